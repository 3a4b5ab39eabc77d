"""The training stream: one global, deterministic order of packed rows, dealt out to the workers,
with a cursor that a checkpoint can store and a resumed run can start from.

Why not ``get_dataset_shard`` (Ray Data's ``streaming_split``): it hands blocks to whichever worker
asks first, so which rows a worker sees differs from run to run, and Ray Data has no resumable
iterator. A resumed run could only restart its epoch (rows repeated) or skip ahead blindly (rows
lost). Here one ``RowDealer`` actor pulls the packed rows in their fixed order (the pipeline's
``preserve_order``) and deals them round-robin like HF's ``DistributedSampler``: the rows after
global position ``g0`` go ``g0 -> rank 0, g0+1 -> rank 1, ...``. Every worker consumes the same
number of rows per step, so after step N the consumed rows are exactly a prefix of the global
order; its end, as (pass, unit, rows into that unit), is the cursor a checkpoint stores. Resuming
starts the pipeline at that unit and drops the rows before the cursor, so the resumed workers see
exactly the rows the uninterrupted run would have seen, none lost, none repeated. Because the
cursor is global, it stays valid when the number of workers changes (elastic runs).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from raysft.data.pipeline import build_dataset

ROW_COLUMNS = ("input_ids", "labels", "position_ids", "source_ids")


@dataclass(frozen=True)
class Cursor:
    """A position in the global stream: ``global_row`` rows consumed since the run started, which
    is ``offset`` rows into unit ``unit`` of pass ``pass_`` (a pass = every train unit once)."""

    pass_: int = 0
    unit: int = 0
    offset: int = 0
    global_row: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Cursor":
        return cls(**d) if d else cls()


class RowDealer:
    """Ray actor (threaded: one call per rank in flight) serving micro-batches in global order.

    ``start(cursor, world_size, batch_size)`` (re)starts the stream at ``cursor``; then rank ``r``
    asks for its micro-batches ``k = 0, 1, 2, ...`` in order. Memory: the rows dealt but not yet
    asked for, which the workers' lock-step (DDP syncs every step) keeps to about one step."""

    def __init__(self, spec, *, data_cpus: float, concurrency: int):
        self.spec, self.data_kw = spec, {"data_cpus": data_cpus, "concurrency": concurrency}
        self.lock = threading.Lock()
        # Session ids grow across dealers too (a re-run's dealer starts above this one's): the audit
        # log (monitor.log_batch_hashes) tells the attempts of a run apart by them.
        self.session = time.time_ns() // 1000
        self.world = 0

    # ------------------------------------------------------------------ control

    def start(self, cursor: dict[str, int], world_size: int, batch_size: int) -> int:
        """Restart dealing at ``cursor``. Returns the session id the workers pass back."""
        with self.lock:
            self.session += 1
            self.cursor0 = Cursor.from_dict(cursor)
            self.world, self.batch = world_size, batch_size
            self.rows: list[deque] = [deque() for _ in range(world_size)]
            self.base = [0] * world_size  # rank-local index of rows[r][0]
            self.asked = [0] * world_size  # next micro-batch each rank will ask for
            self.dealt = 0  # rows dealt since the cursor
            # (global row, pass, unit, offset): where each unit's rows begin in the global order.
            self.marks: list[tuple[int, int, int, int]] = []
            self.pass_ = self.cursor0.pass_
            self._open(self.cursor0.unit, self.cursor0.offset)
            self.unit, self.offset = self.cursor0.unit, self.cursor0.offset
            self._mark()
            return self.session

    def _open(self, start_unit: int, skip_rows: int) -> None:
        ds = build_dataset(self.spec, "train", start_unit=start_unit, skip_rows=skip_rows, **self.data_kw)
        self.rows_this_pass = 0
        self.it = iter(()) if ds is None else iter(ds.iter_batches(batch_size=None, batch_format="numpy",
                                                                    prefetch_batches=1))

    def _mark(self) -> None:
        self.marks.append((self.cursor0.global_row + self.dealt, self.pass_, self.unit, self.offset))

    # ------------------------------------------------------------------ dealing

    def next_batch(self, session: int, rank: int, k: int) -> dict[str, np.ndarray]:
        """Rank ``rank``'s micro-batch ``k`` of this session: its rows ``k*B .. (k+1)*B - 1``."""
        with self.lock:
            if session != self.session:
                raise RuntimeError(f"stale data session {session} (current {self.session}): the stream was restarted")
            if k != self.asked[rank]:
                raise RuntimeError(f"rank {rank} asked for micro-batch {k}, expected {self.asked[rank]}")
            need = (k + 1) * self.batch
            while self.base[rank] + len(self.rows[rank]) < need:
                self._pull()
            q = self.rows[rank]
            while self.base[rank] < k * self.batch:  # rows of earlier micro-batches, already served
                q.popleft()
                self.base[rank] += 1
            picked = [q[i] for i in range(self.batch)]
            self.asked[rank] = k + 1
            self._forget()
            return {c: np.stack([r[c] for r in picked]) for c in ROW_COLUMNS}

    def _pull(self) -> None:
        block = next(self.it, None)
        if block is None:  # end of a pass: start the next one from the first unit
            if self.rows_this_pass == 0:
                raise RuntimeError("the training stream produced no packed rows in a whole pass")
            self.pass_ += 1
            self.unit = -1  # the next row opens a unit mark, even when the pass has a single unit
            self._open(0, 0)
            return
        units = block["unit"]
        for i in range(len(units)):
            u = int(units[i])
            if u != self.unit:
                self.unit, self.offset = u, 0
                self._mark()
            row = {c: block[c][i] for c in ROW_COLUMNS}
            self.rows[self.dealt % self.world].append(row)
            self.dealt += 1
            self.offset += 1
            self.rows_this_pass += 1

    def _forget(self) -> None:
        # Marks before the slowest rank's position can no longer be asked for (see cursor_at).
        done = self.cursor0.global_row + min(self.asked) * self.batch * self.world
        while len(self.marks) > 1 and self.marks[1][0] <= done:
            self.marks.pop(0)

    # ------------------------------------------------------------------ cursor

    def cursor_at(self, session: int, global_row: int) -> dict[str, int]:
        """The cursor after ``global_row`` rows (since the run began) were consumed."""
        with self.lock:
            if session != self.session:
                raise RuntimeError(f"stale data session {session} (current {self.session})")
            starts = [m[0] for m in self.marks]
            i = bisect.bisect_right(starts, global_row) - 1
            if i < 0 or global_row > self.cursor0.global_row + self.dealt:
                raise ValueError(f"row {global_row} is outside the dealt window [{starts[0] if starts else '?'}, "
                                 f"{self.cursor0.global_row + self.dealt}]")
            g, pass_, unit, offset = self.marks[i]
            return Cursor(pass_, unit, offset + global_row - g, global_row).to_dict()
