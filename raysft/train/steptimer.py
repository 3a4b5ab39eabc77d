"""Where a training step's time goes (``monitor.step_breakdown``): waiting for data, forward and
backward, the optimizer step, and the rest (callbacks, logging, reporting), one record per step in
``metrics.jsonl``. ``bench/train_overhead.py`` reads it for raysft and for plain TRL alike."""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch.utils.data import IterableDataset
from transformers import TrainerCallback


class DataWait(IterableDataset):
    """Wraps a batch iterable; ``take()`` returns the seconds spent waiting for batches since the last call."""

    def __init__(self, batches):
        self.batches, self.waited = batches, 0.0

    def __iter__(self):
        it = iter(self.batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t0
            yield batch

    def take(self) -> float:
        w, self.waited = self.waited, 0.0
        return w


class StepTimer(TrainerCallback):
    """Add it last: its ``on_step_end`` then runs after every other callback's."""

    def __init__(self, data: DataWait, path: str | None, rank: int):
        self.data, self.path, self.rank = data, Path(path) if path else None, rank
        self.records: list[dict] = []
        self._end = self._begin = self._pre_opt = self._opt = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._pre_opt = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._opt = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if None not in (self._end, self._begin, self._pre_opt, self._opt):
            total = now - self._end
            wait = self.data.take()
            rec = {"global_step": state.global_step, "event": "step_breakdown", "step_s": total, "data_wait_s": wait,
                   "forward_backward_s": self._pre_opt - self._begin, "optimizer_s": self._opt - self._pre_opt}
            rec["other_s"] = total - wait - rec["forward_backward_s"] - rec["optimizer_s"]
            self.records.append(rec)
            if self.path and self.rank == 0:
                with self.path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
        else:
            self.data.take()
        self._end = now
