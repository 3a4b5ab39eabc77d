"""Storage that rides out blips: every storage operation retried with exponential backoff and jitter
up to a deadline (``storage.retry_timeout_s``), for our own calls and for Ray Train's (through a
retrying ``pyarrow`` filesystem handed to its RunConfig).

What is retried: network and server-side failures (connection refused or reset, timeouts, DNS,
HTTP 5xx / throttling). What is not: answers (a missing file, access denied): retrying cannot
change them. botocore's own retries (a few quick tries) sit underneath; this is the outer loop that
turns "S3 was unreachable for 30 s" into a pause instead of a failed run.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError

log = logging.getLogger("raysft")
T = TypeVar("T")

# pyarrow raises OSError with AWS's error names in the message; these are the transient ones.
_TRANSIENT_TEXT = re.compile(r"NETWORK_CONNECTION|curlCode|Couldn't connect|Connection refused|connection reset|"
                             r"Timeout|timed out|SlowDown|Throttl|ServiceUnavailable|InternalError|RequestTimeTooSkewed|"
                             r"status code (5\d\d|429)|HTTP response code: (5\d\d|429)|Broken pipe|EOF occurred",
                             re.IGNORECASE)


class StorageUnavailableError(RuntimeError):
    """Storage stayed unreachable past ``storage.retry_timeout_s``."""


def unsaved_dir(run_name: str) -> str:
    """Where a node keeps what it could not upload (the final model, the newest abandoned checkpoint),
    under a name a person can find: ``$RAYSFT_UNSAVED_DIR`` or ``~/.cache/raysft/unsaved``."""
    root = os.environ.get("RAYSFT_UNSAVED_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "raysft", "unsaved")
    return os.path.join(root, run_name)


@dataclass
class RetryPolicy:
    timeout_s: float = 600.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 20.0


_policy = RetryPolicy()


def configure(timeout_s: float) -> None:
    """Set the deadline for this process (the driver and each worker call it with the run's config)."""
    _policy.timeout_s = timeout_s


def policy() -> RetryPolicy:
    return _policy


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "Throttling", "InternalError")
    if isinstance(e, (BotoCoreError, RetriesExceededError, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError):
        return bool(_TRANSIENT_TEXT.search(str(e))) or e.errno in (104, 110, 111, 113)  # reset, timeout, refused, no route
    cause = e.__cause__ or e.__context__
    return cause is not None and cause is not e and is_transient(cause)


def retrying(what: str, fn: Callable[[], T], *, timeout_s: float | None = None) -> T:
    """``fn()``, retried on transient storage errors until it succeeds or ``timeout_s`` (default: the
    configured deadline) has passed; then ``StorageUnavailableError`` naming ``what``."""
    limit_s = _policy.timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + limit_s
    backoff, attempt, first_error = _policy.first_backoff_s, 0, None
    while True:
        try:
            out = fn()
            if first_error is not None:
                log.warning("raysft: storage is back: %s succeeded after %d retries", what, attempt)
            return out
        except Exception as e:  # noqa: BLE001 - classified right below
            if not is_transient(e):
                raise
            attempt += 1
            if first_error is None:
                first_error = e
                log.warning("raysft: storage unreachable (%s: %s); retrying for up to %.0f s",
                            what, _short(e), max(0.0, deadline - time.monotonic()))
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailableError(f"{what}: storage unreachable for {limit_s:.0f} s "
                                              f"({_short(e)})") from e
            time.sleep(min(left, backoff * random.uniform(0.5, 1.0)))  # full jitter, capped exponential
            backoff = min(backoff * 2, _policy.max_backoff_s)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


# ----------------------------------------------------------------------------- for Ray Train


def one_sdk_attempt() -> pafs.S3RetryStrategy:
    """pyarrow's S3 retry setting for one attempt per call: the retries are this module's, to its deadline."""
    return pafs.AwsStandardS3RetryStrategy(max_attempts=1)


class RetryingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem that retries every call of the one it wraps (Ray Train's own storage
    calls: its experiment state, checkpoint registry and deletions). Small writes are buffered and
    sent whole on close, so a write cut midway is retried as a whole.

    It carries its deadline (``derived.ray_state_retry_s``): Ray Train's controller runs none of
    raysft's set-up, and the default there would hold a run 600 s on a storage that is down."""

    def __init__(self, inner: pafs.FileSystem, timeout_s: float):
        self.inner, self.timeout_s = inner, timeout_s

    def __setstate__(self, state: dict[str, Any]) -> None:
        # NOTE: pyarrow pickles an S3FileSystem without its retry_strategy: in Ray's processes it came
        # back with the SDK's own retries (3 attempts, with backoff) inside each of this handler's.
        self.__dict__.update(state)
        if isinstance(self.inner, pafs.S3FileSystem):
            self.inner = pafs.S3FileSystem(**self.inner.__reduce__()[1][0], retry_strategy=one_sdk_attempt())

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, RetryingHandler) and self.inner.equals(other.inner)

    def __ne__(self, other: Any) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"retrying+{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def _r(self, what: str, fn: Callable[[], T]) -> T:
        return retrying(what, fn, timeout_s=self.timeout_s)

    def get_file_info(self, paths):
        return self._r(f"stat {paths[:1]}", lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._r(f"list {selector.base_dir}", lambda: self.inner.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._r(f"mkdir {path}", lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._r(f"delete {path}", lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._r(f"delete {path}/*", lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        self._r("delete /*", lambda: self.inner.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path):
        self._r(f"delete {path}", lambda: self.inner.delete_file(path))

    def move(self, src, dest):
        self._r(f"move {src}", lambda: self.inner.move(src, dest))

    def copy_file(self, src, dest):
        self._r(f"copy {src}", lambda: self.inner.copy_file(src, dest))

    def open_input_stream(self, path):
        return pa.BufferReader(self._r(f"read {path}", lambda: _read_all(self.inner, path)))

    def open_input_file(self, path):
        return pa.BufferReader(self._r(f"read {path}", lambda: _read_all(self.inner, path)))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_UploadOnClose(self.inner, path, metadata, self.timeout_s), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("append is not used by Ray Train")


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


class _UploadOnClose(io.RawIOBase):
    def __init__(self, fs: pafs.FileSystem, path: str, metadata, timeout_s: float):
        self.fs, self.path, self.metadata, self.timeout_s, self.buf = fs, path, metadata, timeout_s, io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.buf.write(b)

    def close(self) -> None:
        if not self.closed:
            data = self.buf.getvalue()

            def put() -> None:
                with self.fs.open_output_stream(self.path, metadata=self.metadata) as f:
                    f.write(data)

            retrying(f"write {self.path}", put, timeout_s=self.timeout_s)
        super().close()


def retrying_filesystem(fs: pafs.FileSystem, timeout_s: float) -> pafs.FileSystem:
    """``fs`` with every call retried for up to ``timeout_s``, in whichever process it is unpickled."""
    return pafs.PyFileSystem(RetryingHandler(fs, timeout_s))
