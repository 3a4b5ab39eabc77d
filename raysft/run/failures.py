"""A failed run ends in one line that says what happened and what to do, with a documented exit code;
the full traceback goes to a file the line names.

    0  the run finished
    1  a training worker failed (its rank, step and error are named)
    2  usage or config error (before Ray starts)
    3  too many malformed data rows
    4  storage unreachable past storage.retry_timeout_s (what was kept locally is named)
    5  the data stopped arriving (scaling.data_timeout_s)
    6  out of memory
    7  no checkpoint to resume from passes its checksums (each corrupted one is named)
    8  stopped by the loss-spike guard (trainer.anomaly: the step, the loss, the last good checkpoint)
    9  the run is written by another driver (its lease is live), or another driver took it over
    130, 143  stopped by SIGINT / SIGTERM (a checkpoint at that step unless sent twice)
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass

import ray

from raysft.data.pipeline import DataQualityError
from raysft.data.shards import DataStallError
from raysft.logs import Tee
from raysft.storage.checkpoints import CorruptCheckpointError
from raysft.storage.lease import LeaseHeldError
from raysft.storage.retry import StorageUnavailableError
from raysft.storage.rundir import RunDir

EXIT_WORKER, EXIT_CONFIG, EXIT_DATA, EXIT_STORAGE, EXIT_STALL, EXIT_OOM = 1, 2, 3, 4, 5, 6
EXIT_CORRUPT, EXIT_ANOMALY, EXIT_LEASE = 7, 8, 9


@dataclass(frozen=True)
class Failure:
    code: int
    line: str


class RunStopped(Exception):
    """The run stopped as asked (a signal): ``line`` is what the command line prints, ``code`` its exit code."""

    def __init__(self, code: int, line: str):
        super().__init__(line)
        self.code, self.line = code, line


class RunFailedError(RuntimeError):
    """A run that failed after Ray started: ``failure`` is what the command line prints."""

    def __init__(self, failure: Failure):
        super().__init__(failure.line)
        self.failure = failure


def one_line(e: BaseException) -> tuple[int, str]:
    """(exit code, message) for any error out of a run: failures after Ray started come explained
    (``RunFailedError``); earlier ones are config, data or storage errors raised before Ray starts."""
    if isinstance(e, RunFailedError):
        return e.failure.code, e.failure.line
    first = str(e).strip() or type(e).__name__
    if isinstance(e, DataQualityError):
        return EXIT_DATA, f"data quality check failed: {first}"
    if isinstance(e, StorageUnavailableError):
        return EXIT_STORAGE, f"{first} — check storage.path, the endpoint and credentials (AWS_*)"
    if isinstance(e, CorruptCheckpointError):
        return EXIT_CORRUPT, first
    if isinstance(e, LeaseHeldError):
        return EXIT_LEASE, first
    if isinstance(e, (ValueError, FileNotFoundError)) or type(e).__name__ in ("ModelNotAvailableError", "PreflightError", "DoesNotFitError"):
        return EXIT_CONFIG, first
    return explain(e, None).code, explain(e, None).line


def stop_ray() -> None:
    """Shut Ray down before the error line: what Ray's own helpers print while they stop (a cleaner
    thread's traceback about the dead controller) goes to the driver log only, not the console."""
    out, err = sys.stdout, sys.stderr
    if isinstance(out, Tee) and isinstance(err, Tee):  # Ray looks sys.stdout/stderr up per line it prints
        sys.stdout, sys.stderr = out.file, err.file
    try:
        if ray.is_initialized():
            ray.shutdown()
    finally:
        sys.stdout, sys.stderr = out, err
        sys.stdout.flush()
        sys.stderr.flush()


def root_cause(e: BaseException) -> BaseException:
    """The error that ended the run, out of Ray Train's and Ray's wrappers (worker group errors,
    task errors), the first failing worker's when several failed."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        workers = getattr(e, "worker_failures", None)
        if workers:
            e = workers[0] if 0 in workers else workers[min(workers)]  # rank 0 holds the model and the summary
            continue
        inner = getattr(e, "controller_failure", None) or getattr(e, "cause", None)
        if isinstance(inner, BaseException):
            e = inner
            continue
        if type(e).__name__ in ("RayTaskError", "RayActorError") and e.__cause__ is not None:
            e = e.__cause__
            continue
        break
    return e


def where(e: BaseException) -> str:
    """The rank and step a worker attached to its error (``worker.py`` adds them as a note)."""
    notes = [n for n in getattr(e, "__notes__", []) if n.startswith("raysft: ")]
    return notes[-1].removeprefix("raysft: ") if notes else ""


def explain(e: BaseException, log_file: str | None) -> Failure:
    cause = root_cause(e)
    at = where(cause)
    logs = f" (traceback in {log_file})" if log_file else ""
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, StorageUnavailableError):
        return Failure(EXIT_STORAGE, f"{text}{logs}")
    if isinstance(cause, CorruptCheckpointError):
        return Failure(EXIT_CORRUPT, f"{text}{logs}")
    if isinstance(cause, DataStallError):
        return Failure(EXIT_STALL, f"{at + ': ' if at else ''}{text}{logs}")
    if isinstance(cause, DataQualityError):
        return Failure(EXIT_DATA, f"data quality check failed: {text} — fix or drop the rows, or raise "
                                  f"data.max_bad_fraction{logs}")
    if _is_oom(cause):
        return Failure(EXIT_OOM, f"out of memory{' on ' + at if at else ''}: {text} — lower data.max_length or "
                                 f"trainer.per_device_train_batch_size, or use more memory per worker{logs}")
    return Failure(EXIT_WORKER, f"{'worker ' + at if at else 'the run'} failed: {type(cause).__name__}: {text} — "
                                f"fix the cause and rerun the same command to resume{logs}")


def with_kept_model(failure: Failure, rundir: RunDir, since_unix_s: float) -> Failure:
    """A storage failure names the trained model a worker kept on this node, when it did during this run.

    The worker's own line says so, but when Ray Train's controller is the one whose storage write
    failed last (its checkpoint registry, retried as long as the run rides out an outage) its error
    is what the run ends with; the model is kept either way (``train/finish.py``)."""
    kept = rundir.kept_model()
    if failure.code != EXIT_STORAGE or "raysft upload" in failure.line or not os.path.isdir(kept) \
            or os.path.getmtime(kept) < since_unix_s:
        return failure
    return Failure(failure.code, f"{failure.line}; the trained model is kept at {kept}. {rundir.upload_kept_model()}")


def _is_oom(e: BaseException) -> bool:
    return type(e).__name__ in ("OutOfMemoryError", "OutOfMemoryError_", "MemoryError") or "out of memory" in str(e).lower()


def write_traceback(e: BaseException, path: str) -> str | None:
    """The full traceback (Ray's wrappers included) in ``path``; None when it cannot be written."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("".join(traceback.format_exception(e)))
            cause = root_cause(e)
            if cause is not e:
                f.write("\n--- root cause ---\n" + "".join(traceback.format_exception(cause)))
        return path
    except OSError:
        return None
