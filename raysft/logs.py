"""What a person sees: raysft's own lines on the console, everything (libraries included) in the run's
``logs/`` folder. ``monitor.verbose=true`` shows it all live.

The libraries give the switches (logger levels, ``disable_tqdm``, Ray's ``LoggingConfig``, the Ray
Train print patch); this module uses them rather than filtering text, with one exception: the
console handler a Ray Train worker installs on the root logger gets a filter that lets only
raysft's records and errors through (the file handler next to it keeps everything).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TextIO

# Libraries whose INFO/WARNING chatter stays out of the console (it still reaches the log files).
LIBRARIES = ("ray", "ray.data", "ray.train", "ray.tune", "transformers", "trl", "accelerate", "deepspeed", "DeepSpeed",
             "bitsandbytes", "torch", "datasets", "huggingface_hub", "urllib3", "botocore", "boto3", "s3transfer",
             "filelock", "fsspec", "py.warnings", "peft", "matplotlib", "PIL")

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# ``log.info(..., extra=LOG_ONLY)``: a raysft record for the log files, never the console.
LOG_ONLY = {"console": False}


class OursOrErrors(logging.Filter):
    """Pass raysft's records (INFO and up, unless marked ``LOG_ONLY``) and anyone's errors; drop the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return (record.name == "raysft" or record.name.startswith("raysft.")) and getattr(record, "console", True)


def count(n: int, noun: str) -> str:
    """``1 step``, ``24 steps``: a count for a console line."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


def quiet_libraries(verbose: bool) -> None:
    """Library loggers keep their records for the log files but stop printing below ERROR; Python
    warnings become log records (``py.warnings``) instead of stderr lines."""
    logging.captureWarnings(True)
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for h in logger.handlers:  # handlers libraries attached themselves (Ray, DeepSpeed)
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.addFilter(OursOrErrors())
    warnings.filterwarnings("default")


def filter_console_handlers(logger: logging.Logger, verbose: bool) -> None:
    """Add ``OursOrErrors`` to every console handler of ``logger`` (not to file handlers)."""
    if verbose:
        return
    for h in logger.handlers:
        if not isinstance(h, logging.FileHandler) and not any(isinstance(f, OursOrErrors) for f in h.filters):
            h.addFilter(OursOrErrors())


def add_file_log(path: str, level: int = logging.INFO) -> logging.Handler:
    """Every record (any logger, ``level`` and up) appended to ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    return handler


class Tee:
    """A text stream that writes to ``stream`` and to ``file`` (the driver's console, kept in its log)."""

    def __init__(self, stream: TextIO, file: TextIO):
        self.stream, self.file = stream, file

    def write(self, s: str) -> int:
        self.file.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def tee_console(path: str) -> TextIO:
    """From now on, this process's stdout and stderr also go to ``path``; returns the open file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a", buffering=1)
    if not isinstance(sys.stdout, Tee):
        sys.stdout = Tee(sys.stdout, f)
    if not isinstance(sys.stderr, Tee):
        sys.stderr = Tee(sys.stderr, f)
    return f
