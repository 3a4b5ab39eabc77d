"""The run's own history, appended by the driver that holds its lease, never rewritten:

    attempts.jsonl   one line per attempt (a start, a restart after a fault, a resume, a resubmit):
                     started, ended, host and pid, the step it started from and reached, why it ended
    anomalies.jsonl  each anomaly the loss-spike guard found and what was done (``trainer.anomaly``):
                     a rollback's skipped rows (global-order positions), which every later attempt skips

Object storage has no append: a line is added by writing the file again whole (one writer: the lease).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from typing import Any

from raysft.storage import files
from raysft.storage.rundir import RunDir


def read(run: RunDir, name: str) -> list[dict[str, Any]]:
    uri = run.file(name)
    if not files.exists(uri):
        return []
    return [json.loads(line) for line in files.read_bytes(uri).decode().splitlines() if line.strip()]


def append(run: RunDir, name: str, record: dict[str, Any]) -> None:
    lines = read(run, name) + [record]
    files.write_bytes(run.file(name), "".join(json.dumps(r) + "\n" for r in lines).encode())


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Attempt:
    """This driver's attempt at the run: ``end(...)`` writes its line."""

    def __init__(self, run: RunDir):
        self.run = run
        self.started, self._t0 = now_iso(), time.time()
        self.record: dict[str, Any] = {"attempt": len(read(run, RunDir.ATTEMPTS)) + 1, "started": self.started,
                                       "host": socket.gethostname(), "pid": os.getpid(), "from_step": 0}

    def end(self, ended_by: str, to_step: int | None, **extra: Any) -> None:
        self.record.update(ended=now_iso(), wall_time_s=round(time.time() - self._t0, 1), to_step=to_step,
                           ended_by=ended_by, **extra)
        try:
            append(self.run, RunDir.ATTEMPTS, self.record)
        except Exception:  # noqa: BLE001 - the record is lost with the storage; the run's outcome stands
            pass


def data_skips(run: RunDir) -> list[tuple[int, int]]:
    """Every global-order range a rollback skipped in this run (never trained, by any later attempt)."""
    return [tuple(r["skipped_rows"]) for r in read(run, RunDir.ANOMALIES) if r.get("skipped_rows")]


def rollbacks(run: RunDir) -> int:
    return sum(1 for r in read(run, RunDir.ANOMALIES) if r.get("action") == "rollback")
