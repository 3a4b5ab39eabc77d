"""Spot preemption: a just-in-time checkpoint, with the data position, on Ray Train's notice.

Ray Train 2.60 watches node drains (a cloud reclaiming a spot node reaches Ray as a drain with
reason PREEMPTION and a deadline), hands every worker a ``PreemptionInfo``, and once the deadline
has passed restarts the group, counted against ``FailureConfig.max_preemption_failures`` apart from
``max_failures`` (``raysft/run/restarts.py`` builds that config). Saving before the node goes is the
training loop's job: this callback. Every ``scaling.preemption_check_steps`` optimizer steps every
rank calls ``ray.train.get_preemption_info()`` (a barrier that hands rank 0's answer to all ranks,
so every rank decides alike); on a notice not seen before the Trainer saves at the end of that
step, and ``RayCheckpointCallback`` reports the checkpoint (with the data cursor) as any other.
Training then goes on until Ray tears the group down; the restart resumes from that checkpoint.

Rank 0 times the notice to the checkpoint being complete in storage (every rank's manifest and the
files they list), logs one line and writes a ``preemption_checkpoint`` record to metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from raysft.storage import checkpoints as ckpts

log = logging.getLogger(__name__)

EVENT = "preemption_checkpoint"
POLL_S = 0.2  # how often rank 0 looks whether the other ranks' parts of the checkpoint have landed


@dataclass
class Notice:
    step: int  # the optimizer step whose end the notice was seen at: the checkpoint's step
    seen: float  # time.time() when this rank's check returned it
    deadline_ms: int | None
    ranks: list[int]
    nodes: list[str]
    saved_s: float | None = None  # notice -> the local save done (the training stall)
    uploaded: threading.Event = field(default_factory=threading.Event)


def _ray_preemption_info():
    import ray.train

    return ray.train.get_preemption_info()


class PreemptionCallback(TrainerCallback):
    """``every_steps``: check every this many optimizer steps (0 = never). ``get_info``: the check
    (every rank must make it equally often). ``metrics_path``: rank 0's metrics.jsonl."""

    def __init__(self, every_steps: int, *, rank: int, metrics_path: str | Path | None,
                 get_info: Callable[[], Any] = _ray_preemption_info, wait_complete_s: float = 600.0):
        self.every, self.rank, self.get_info = every_steps, rank, get_info
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.wait_complete_s = wait_complete_s
        self.seen: set[tuple] = set()  # notices already checkpointed for (once per notice)
        self.notice: Notice | None = None
        self.records: list[dict[str, Any]] = []
        self._threads: list[threading.Thread] = []
        self.on_notice: Callable[[int], None] | None = None  # f(step) when a checkpoint on notice is due
        self.after_record: Callable[[], None] | None = None  # rank 0, once the record is in metrics.jsonl

    def on_step_end(self, args, state, control, **kwargs):
        if not self.every or state.global_step % self.every:
            return control
        info = self.get_info()
        if info is None:
            return control
        key = (tuple(info.preempted_node_ids), info.deadline_ms)
        if key in self.seen:
            return control
        self.seen.add(key)
        self.notice = Notice(state.global_step, time.time(), info.deadline_ms, list(info.preempted_ranks),
                             list(info.preempted_node_ids))
        if self.rank == 0:
            left = "no deadline" if info.deadline_ms is None else f"deadline in {info.deadline_ms / 1000 - time.time():.0f} s"
            log.warning("raysft: preemption notice at step %d (ranks %s, %s): checkpointing now",
                        state.global_step, self.notice.ranks, left)
        control.should_save = True
        if self.on_notice is not None:
            self.on_notice(state.global_step)
        return control

    def on_save(self, args, state, control, **kwargs):
        n = self.notice
        if n is not None and n.step == state.global_step and n.saved_s is None:
            n.saved_s = time.time() - n.seen
        return control

    def checkpoint_uploaded(self, step: int, uri: str) -> None:
        """RayCheckpointCallback's hook: this rank's part of checkpoint ``step`` is in storage at ``uri``
        (called on its upload thread). Rank 0 then waits for the whole checkpoint and records it."""
        n = self.notice
        if n is None or n.step != step or n.uploaded.is_set():
            return
        n.uploaded.set()
        if self.rank != 0:
            return
        t = threading.Thread(target=self._record_when_complete, args=(n, uri), name="raysft-preemption-timer", daemon=True)
        t.start()
        self._threads.append(t)

    def _record_when_complete(self, n: Notice, uri: str) -> None:
        give_up = time.time() + self.wait_complete_s
        info = ckpts.inspect(uri)
        while not info.complete and time.time() < give_up:
            time.sleep(POLL_S)
            info = ckpts.inspect(uri)
        done = time.time()
        record = {"global_step": n.step, "event": EVENT, "checkpoint": uri, "complete": info.complete,
                  "notice_unix_s": round(n.seen, 3), "notice_to_checkpoint_s": round(done - n.seen, 3),
                  "notice_to_saved_s": None if n.saved_s is None else round(n.saved_s, 3),
                  "deadline_left_s": None if n.deadline_ms is None else round(n.deadline_ms / 1000 - done, 3),
                  "preempted_ranks": n.ranks, "preempted_nodes": n.nodes}
        self.records.append(record)
        if self.metrics_path:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.after_record is not None:
                self.after_record()
        if info.complete:
            spare = "" if record["deadline_left_s"] is None else f", {record['deadline_left_s']:.1f} s before the deadline"
            log.warning("raysft: preemption checkpoint at step %d complete %.1f s after the notice (local save %.1f s%s): %s",
                        n.step, record["notice_to_checkpoint_s"], record["notice_to_saved_s"] or 0.0, spare, uri)
        else:
            log.warning("raysft: preemption checkpoint at step %d still incomplete %.0f s after the notice (%s): %s",
                        n.step, record["notice_to_checkpoint_s"], info.why, uri)

    def on_train_end(self, args, state, control, **kwargs):
        # A run that ends right after a notice still records the checkpoint's time.
        for t in self._threads:
            t.join(timeout=min(self.wait_complete_s, 120.0))
        return control
