"""A run file a worker appends to (metrics.jsonl, the batch audit, its log) that must outlive the
worker: for a run in object storage the worker writes a local copy and keeps storage's copy current.

Without this, a run on S3 restarted after a preemption or a failure began these files again in a
fresh temp dir, and the end-of-run upload replaced what the earlier attempts had written.
"""

from __future__ import annotations

import logging
import os

from raysft.storage import files

log = logging.getLogger("raysft")

TRY_PUSH_TIMEOUT_S = 5.0


class SyncedFile:
    """``local``: the path the worker appends to. ``uri``: the file in the run directory (None for a
    run on a local path, where ``local`` is that file already)."""

    def __init__(self, local: str, uri: str | None):
        self.local, self.uri = local, uri

    def pull(self) -> None:
        """Continue storage's copy: what earlier attempts wrote comes first in the local file."""
        if not self.uri or not files.exists(self.uri):
            return
        os.makedirs(os.path.dirname(self.local) or ".", exist_ok=True)
        earlier = files.read_bytes(self.uri)
        with open(self.local, "ab") as f:
            if f.tell() == 0:
                f.write(earlier)

    def push(self, *, timeout_s: float | None = None) -> None:
        """Storage's copy := the local file up to its last complete line (the writer may be mid-line)."""
        if not self.uri or not os.path.exists(self.local):
            return
        with open(self.local, "rb") as f:
            data = f.read()
        files.write_bytes(self.uri, data[:data.rfind(b"\n") + 1], timeout_s=timeout_s)

    def try_push(self) -> bool:
        """A push between checkpoints: on the checkpoint upload thread, so it retries briefly only (an
        outage must not hold the next checkpoint back); the next push or the end of the run tries again."""
        try:
            self.push(timeout_s=TRY_PUSH_TIMEOUT_S)
            return True
        except Exception as e:  # noqa: BLE001
            log.warning("raysft: %s not copied to storage this time (%s)", self.uri, e)
            return False
