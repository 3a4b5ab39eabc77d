"""What the driver tells a running group through the run's lease (``raysft/storage/lease.py``): stop
after a checkpoint (the driver got SIGINT or SIGTERM), or stop at once without writing anything more
(another driver has taken the run over).

Rank 0 reads the lease on a thread every ``POLL_S``; at the end of every optimizer step it hands its
verdict to every rank (one broadcast of one number), so all ranks stop at the same step boundary.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from raysft.storage import lease

log = logging.getLogger("raysft")

POLL_S = 1.0
GO, STOP, LOST = 0, 1, 2


class RunControl(TrainerCallback):
    def __init__(self, run_uri: str, token: str | None, *, rank: int, world: int):
        self.run_uri, self.token, self.rank, self.world = run_uri, token, rank, world
        self.verdict = GO  # rank 0's latest reading of the lease
        self.signal: str | None = None
        self.holder: str | None = None
        self.stopped_at: int | None = None  # the step training stopped after (STOP)
        self.lost = False
        self._done = threading.Event()
        if rank == 0 and token:
            threading.Thread(target=self._watch, name="raysft-lease-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._done.wait(POLL_S):
            try:
                info = lease.read(self.run_uri)
            except Exception as e:  # noqa: BLE001 - storage down: no news is no verdict
                log.debug("lease not read: %s", e)
                continue
            if info is None or info.token != self.token:
                self.holder = info.holder if info else "nobody (the lease was deleted)"
                self.verdict = LOST
                return
            if info.stop:
                self.signal, self.verdict = info.stop, STOP

    def _agreed(self) -> int:
        code = self.verdict if self.rank == 0 else GO
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([code], dtype=torch.int32, device=device)
            dist.broadcast(t, src=0)
            code = int(t.item())
        return code

    def on_step_end(self, args, state, control, **kwargs):
        code = self._agreed()
        if code == STOP:
            control.should_save = True  # the checkpoint the resume starts from
            control.should_training_stop = True
            self.stopped_at = state.global_step
            if self.rank == 0:
                log.warning("raysft: stopping after step %d (%s): checkpointing it", state.global_step, self.signal)
        elif code == LOST:
            control.should_save = control.should_log = control.should_evaluate = False
            control.should_training_stop = True
            self.lost = True
            if self.rank == 0:
                log.warning("raysft: the run's lease was taken over by %s: stopping after step %d without writing "
                            "anything more", self.holder, state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._done.set()
        return control
