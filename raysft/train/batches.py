"""What the Trainer iterates: a worker's micro-batches of the prepared set, as model inputs.

The rows arrive packed and masked, so nothing is re-tokenised, re-packed or collated:
``position_ids`` reach the model untouched (see ``as_model_batch``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np
import torch
from torch.utils.data import IterableDataset

from raysft.data.shards import COLUMNS, PreparedRows, RowStream, eval_batches
from raysft.storage import files
from raysft.storage.rundir import RunDir
from raysft.storage.synced import SyncedFile

MODEL_COLUMNS = ("input_ids", "labels", "position_ids")
ROW_COLUMNS = (*MODEL_COLUMNS, "source_ids")


def as_model_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    # TRL's padding-free layout: the B packed rows become one row of B*L tokens. The per-sequence
    # position_ids keep sequences apart (flash-attn varlen / sdpa block mask), and TRL's token
    # counter (position_ids.size(1)) then counts every token.
    return {k: torch.from_numpy(np.array(batch[k], dtype=np.int64)).reshape(1, -1) for k in ROW_COLUMNS if k in batch}


def row_digests(batch: dict[str, np.ndarray]) -> list[str]:
    """A short hash of each packed row's tokens, labels and positions (the data audit log)."""
    out = []
    for i in range(len(batch["input_ids"])):
        h = hashlib.sha1()
        for c in MODEL_COLUMNS:
            h.update(np.ascontiguousarray(batch[c][i], dtype=np.int64).tobytes())
        out.append(h.hexdigest()[:16])
    return out


class TrainBatches(IterableDataset):
    """A worker's endless training micro-batches (``RowStream``: its round-robin share of the global
    order, read ahead from storage).

    Endless, because the step count is fixed up front: the order runs on into the next epoch's
    permutation, so every rank takes exactly ``max_steps x GA`` micro-batches. ``rows_consumed``
    counts rows handed to the trainer; ``on_batch(step, micro, batch)`` sees every micro-batch with
    the optimizer step it belongs to (``first_step`` = steps done before a resume) and its place in it."""

    def __init__(self, stream: RowStream, *, grad_accum: int, first_step: int = 0,
                 on_batch: Callable[[int, int, dict], None] | None = None):
        self.stream, self.grad_accum, self.first_step, self.on_batch = stream, grad_accum, first_step, on_batch
        self.rows_consumed = 0

    def __iter__(self):
        for k, batch in enumerate(self.stream):
            self.rows_consumed += len(batch["input_ids"])
            if self.on_batch is not None:
                self.on_batch(self.first_step + k // self.grad_accum + 1, k % self.grad_accum, batch)
            yield as_model_batch(batch)


class EvalBatches(IterableDataset):
    """This rank's equal share of the prepared eval rows (order does not matter for a mean loss).

    A share that fits in ``MEMORY_BYTES`` is read once, when the worker starts: every evaluation
    then reads nothing from storage, so an outage late in a run cannot fail its final evaluation
    (all ranks are in the loss gather: one rank cannot skip it), and periodic evaluations do not read
    the same rows again. A bigger share streams from storage at each evaluation."""

    MEMORY_BYTES = 256 << 20

    def __init__(self, rows: PreparedRows, *, rank: int, world: int, batch_size: int, timeout_s: float):
        self.rows, self.rank, self.world, self.batch_size, self.timeout_s = rows, rank, world, batch_size, timeout_s
        share_bytes = rows.num_rows("eval") // world * rows.max_length * sum(t.byte_width for t in COLUMNS.values())
        self.in_memory = list(self._read()) if share_bytes <= self.MEMORY_BYTES else None

    def _read(self):
        return eval_batches(self.rows, rank=self.rank, world=self.world, batch=self.batch_size, timeout_s=self.timeout_s)

    def __iter__(self):
        for b in self.in_memory if self.in_memory is not None else self._read():
            yield as_model_batch(b)  # fresh tensors: the trainer pops keys from the batch it gets


class BatchAudit:
    """Appends ``{"step": s, "micro": j, "session": n, "rows": [row hashes]}`` for every micro-batch a
    rank trains on. A resumed run appends the steps it re-trains again, under a higher data session."""

    def __init__(self, path: str, upload_to: str | None, session: int):
        self.path, self.session = path, session
        self.synced = SyncedFile(path, upload_to)  # a run in object storage: earlier attempts' lines first
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.synced.pull()
        self.f = open(path, "a")

    def write(self, step: int, micro: int, batch) -> None:
        self.f.write(json.dumps({"step": step, "micro": micro, "session": self.session, "rows": row_digests(batch)}) + "\n")
        self.f.flush()

    def finish(self) -> None:
        self.f.close()
        self.synced.push()


def batch_audit(enabled: bool, rundir: RunDir, scratch: str, rank: int, session: int) -> BatchAudit | None:
    """``monitor.log_batch_hashes``: this rank's audit log, in the run directory (or uploaded there)."""
    if not enabled:
        return None
    uri = rundir.batch_hashes(rank)
    if rundir.local_path:
        return BatchAudit(files.filesystem(uri)[1], None, session)
    return BatchAudit(os.path.join(scratch, uri.rsplit("/", 1)[-1]), uri, session)
