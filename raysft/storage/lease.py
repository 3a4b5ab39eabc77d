"""One writer per run: ``<run>/lease.json``, held by the driver while its run lives.

The lease names its holder (host, pid, Ray job), when it was taken and when last renewed. It is
created with a conditional write (S3 ``If-None-Match: *``; locally an exclusive create) and renewed
by the driver with a write conditional on its own version (S3 ``If-Match`` on its ETag; locally
under an ``flock``), so two drivers can never both believe they hold it:

- a second driver on a live lease refuses before Ray starts (``LeaseHeldError``);
- a lease not renewed for ``storage.lease_timeout_s`` (a crashed or frozen driver), or held by a
  process on this host that no longer exists, is stale: the next driver takes it over, with a
  conditional write on the stale version, and says so;
- a driver whose renewal finds another holder has lost it: its workers, which watch the lease
  (``train/control.py``), stop at the next step boundary without writing anything more.

The lease also carries a stop request (``request_stop``: the driver got SIGINT or SIGTERM), which
the workers act on the same way: a checkpoint at the end of the current step, then stop.
A finished or stopped driver releases its lease (marks it released, kept as a record).

NOTE: local storage uses ``fcntl.flock`` around each read-check-write: exact between processes of
one host; on a network file system only as good as its locks.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from botocore.exceptions import ClientError

from raysft.storage import files
from raysft.storage.retry import retrying

log = logging.getLogger("raysft")

NAME = "lease.json"


class LeaseHeldError(RuntimeError):
    """The run is being written by another live driver."""


class LeaseLostError(RuntimeError):
    """Another driver took this driver's lease over (it was not renewed in time)."""


@dataclass(frozen=True)
class LeaseInfo:
    token: str
    host: str
    pid: int
    job: str | None
    started: float
    renewed: float
    stop: str | None = None  # "SIGINT" / "SIGTERM": the driver asked its workers to checkpoint and stop
    released: bool = False

    @property
    def holder(self) -> str:
        return f"{self.host} pid {self.pid}" + (f" (Ray job {self.job})" if self.job else "")

    def stale(self, timeout_s: float, now: float | None = None) -> str | None:
        """Why another driver may take this lease over, or None while it is live."""
        if self.released:
            return "released"
        age = (now or time.time()) - self.renewed
        if age > timeout_s:
            return f"not renewed for {age:.0f} s (storage.lease_timeout_s={timeout_s:g})"
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        return None

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseInfo":
        return cls(**json.loads(data))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _when(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.timezone.utc).isoformat(timespec="seconds")


def _ray_job() -> str | None:
    """The Ray job submission id when this driver runs under ``ray job submit``."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


# ----------------------------------------------------------------------------- storage backends


class _Conflict(Exception):
    """A conditional write lost: someone else wrote the lease first."""


class _Local:
    def __init__(self, path: str):
        self.path = path

    @contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(os.path.join(os.path.dirname(self.path), ".lease.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def read(self) -> tuple[LeaseInfo, str] | None:
        try:
            with open(self.path, "rb") as f:
                info = LeaseInfo.from_bytes(f.read())
        except FileNotFoundError:
            return None
        return info, info.token + str(info.renewed)

    def create(self, info: LeaseInfo) -> str:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise _Conflict from None
            with os.fdopen(fd, "wb") as f:
                f.write(info.to_bytes())
        return info.token + str(info.renewed)

    def replace(self, info: LeaseInfo, version: str) -> str:
        with self._locked():
            now = self.read()
            if now is None or now[1] != version:
                raise _Conflict
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(info.to_bytes())
            os.replace(tmp, self.path)
        return info.token + str(info.renewed)


class _S3:
    def __init__(self, uri: str):
        self.bucket, _, self.key = uri[len("s3://"):].partition("/")
        self.uri = uri

    def read(self) -> tuple[LeaseInfo, str] | None:
        client = files.s3_client(2)

        def get():
            try:
                r = client.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return LeaseInfo.from_bytes(r["Body"].read()), r["ETag"]

        return retrying(f"read {self.uri}", get)

    def _put(self, info: LeaseInfo, **condition) -> str:
        client = files.s3_client(2)

        def put():
            try:
                return client.put_object(Bucket=self.bucket, Key=self.key, Body=info.to_bytes(), **condition)["ETag"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise _Conflict from None
                raise

        return retrying(f"write {self.uri}", put)

    def create(self, info: LeaseInfo) -> str:
        return self._put(info, IfNoneMatch="*")

    def replace(self, info: LeaseInfo, version: str) -> str:
        return self._put(info, IfMatch=version)


def _backend(uri: str):
    if uri.startswith("s3://"):
        return _S3(uri)
    if files.is_remote(uri):
        raise ValueError(f"{uri}: run leases need a local path or s3:// storage (conditional writes)")
    return _Local(files.filesystem(uri)[1])


# ----------------------------------------------------------------------------- the lease


class Lease:
    """This driver's hold on a run directory. ``acquire`` takes it (or refuses); ``start`` renews it
    on a thread every ``timeout_s / 4``; ``release`` gives it up."""

    def __init__(self, run_uri: str, info: LeaseInfo, version: str, timeout_s: float):
        self.uri, self.info, self.version, self.timeout_s = files.join(run_uri, NAME), info, version, timeout_s
        self._store = _backend(self.uri)
        self.lost_to: LeaseInfo | None = None
        self._wake = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.on_lost: Callable[[LeaseInfo], None] | None = None
        self.stop: str | None = None  # set by request_stop (from a signal handler: no lock taken there)

    @property
    def token(self) -> str:
        return self.info.token

    @classmethod
    def acquire(cls, run_uri: str, run_name: str, timeout_s: float, *, wait_s: float = 0) -> tuple["Lease", str | None]:
        """(the lease, a line saying whose stale lease was taken over, or None). Raises
        ``LeaseHeldError`` with the line to print when a live driver holds it (after ``wait_s`` of
        waiting for it to be released or go stale: a sweep trial resumed right after its sweep was
        interrupted, whose old trial process on another node cannot be seen to be gone)."""
        give_up = time.time() + wait_s
        while True:
            try:
                return cls._acquire(run_uri, run_name, timeout_s)
            except LeaseHeldError:
                if time.time() >= give_up:
                    raise
                time.sleep(min(5.0, timeout_s / 4))

    @classmethod
    def _acquire(cls, run_uri: str, run_name: str, timeout_s: float) -> tuple["Lease", str | None]:
        uri = files.join(run_uri, NAME)
        store = _backend(uri)
        now = time.time()
        mine = LeaseInfo(uuid.uuid4().hex, socket.gethostname(), os.getpid(), _ray_job(), now, now)
        for _ in range(5):  # each round loses only to another driver's write in between
            current = store.read()
            try:
                if current is None:
                    return cls(run_uri, mine, store.create(mine), timeout_s), None
                held, version = current
                why = held.stale(timeout_s)
                if why is None:
                    raise LeaseHeldError(
                        f"run {run_name} is being written by {held.holder} since {_when(held.started)} (lease renewed "
                        f"{time.time() - held.renewed:.0f} s ago) — wait for it, stop it, or use another storage.name")
                lease = cls(run_uri, mine, store.replace(mine, version), timeout_s)
                note = None if held.released else f"took over the lease of run {run_name} from {held.holder} ({why})"
                return lease, note
            except _Conflict:
                continue
        raise LeaseHeldError(f"run {run_name}: another driver keeps taking its lease — use another storage.name")

    def renew(self, **changes) -> None:
        """Write the lease again (renewed now, plus ``changes``), only if it is still this driver's
        version; ``LeaseLostError`` when another driver has written it since."""
        with self._lock:
            if self.lost_to is not None:
                raise LeaseLostError(self.lost_to.holder)
            info = dataclasses.replace(self.info, renewed=time.time(), **{"stop": self.stop, **changes})
            try:
                self.version = self._store.replace(info, self.version)
            except _Conflict:
                current = self._store.read()
                self.lost_to = current[0] if current else dataclasses.replace(self.info, host="(deleted)", pid=0)
                raise LeaseLostError(self.lost_to.holder) from None
            self.info = info

    def request_stop(self, signame: str) -> None:
        """Ask the workers (through the lease) to checkpoint at the end of the current step and stop."""
        self.stop = signame  # written by the renewal thread, woken now
        self._wake.set()

    def start(self) -> "Lease":
        self._thread = threading.Thread(target=self._renew_loop, name="raysft-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        warned = False
        while not self._done.is_set():
            self._wake.wait(self.timeout_s / 4)
            self._wake.clear()
            if self._done.is_set():
                return
            try:
                self.renew()
                warned = False
            except LeaseLostError:
                log.warning("raysft: lost the lease of %s to %s", self.uri, self.lost_to.holder)
                if self.on_lost is not None:
                    self.on_lost(self.lost_to)
                return
            except Exception as e:  # noqa: BLE001 - storage down: the next round tries again
                if not warned:
                    log.warning("raysft: could not renew the run's lease (%s); trying again", e)
                    warned = True

    def release(self) -> None:
        """Mark the lease released (the next driver takes it without waiting); never another's."""
        self._done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost_to is not None:
            return
        try:
            self.renew(released=True)
        except Exception as e:  # noqa: BLE001 - a stale lease is taken over anyway
            log.warning("raysft: the run's lease was not released (%s); it goes stale in %g s", e, self.timeout_s)


def read(run_uri: str) -> LeaseInfo | None:
    """The run's lease as storage holds it now (what the workers watch); None when there is none."""
    got = _backend(files.join(run_uri, NAME)).read()
    return got[0] if got else None
