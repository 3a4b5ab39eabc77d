"""The driver's console while Ray forwards the workers' output: Ray's C++ core notes kept off it,
and, on a terminal, one live progress bar that rank 0's per-step marks drive.

Ray has no public filter for the worker output it forwards to the driver (and its
RAY_BACKEND_LOG_LEVEL itself prints a line per process), so this wraps Ray's forwarding handler.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Callable

from tqdm import tqdm

from raysft.train.loop import PROGRESS_MARK

log = logging.getLogger("raysft")

# A line Ray's C++ core writes to a worker's stderr, e.g.
# "[2026-12-01 11:38:12,304 I 21329 21329] logging.cc:303: Set ray log level ...". Fatal ones (F) stay.
RAY_CORE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] [\w./-]+\.(cc|h):\d+: ")
_MARK = re.compile(re.escape(PROGRESS_MARK) + r"(\d+)/(\d+)$")


def live_progress_wanted(verbose: bool) -> bool:
    """A live bar only for a person at a terminal (not in CI logs, `ray job logs` or a pipe)."""
    return not verbose and sys.__stdout__ is not None and sys.__stdout__.isatty()


class ProgressBar:
    """One tqdm bar on the terminal itself (not the Tee into driver.log: the log keeps only lines).
    Lines printed while it shows are written above it."""

    def __init__(self):
        self._bar: tqdm | None = None
        self._lock = threading.Lock()

    def update(self, step: int, total: int) -> None:
        with self._lock:
            if self._bar is None or self._bar.total != total or step < self._bar.n:  # first, or a restart
                self._close()
                self._bar = tqdm(total=total, initial=step, file=sys.__stdout__, unit="step", desc="train",
                                 dynamic_ncols=True, leave=False, bar_format="{desc} {n}/{total} {bar} "
                                 "[{elapsed}<{remaining}, {rate_fmt}]")
            else:
                self._bar.update(step - self._bar.n)

    def write_above(self, emit: Callable[[], None]) -> None:
        with self._lock:
            if self._bar is None:
                emit()
                return
            self._bar.clear()
            emit()
            sys.stderr.flush()
            sys.stdout.flush()
            self._bar.refresh()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


progress = ProgressBar()


def filter_forwarded_output(*, verbose: bool) -> None:
    """Wrap Ray's handler of forwarded worker output: drop Ray's core lines (unless ``verbose``;
    they stay in Ray's session logs), turn rank 0's progress marks into the live bar."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        name, forward = next((n, h) for n, h in dispatcher.handlers if n == "ray_print_logs")
    except (ImportError, AttributeError, StopIteration):
        log.debug("Ray's worker-output handler not found; the console shows Ray's output unfiltered")
        return

    def filtered(data: dict) -> None:
        lines = []
        for line in data.get("lines", []):
            if m := _MARK.match(line):
                progress.update(int(m[1]), int(m[2]))
            elif verbose or not RAY_CORE_LINE.match(line):
                lines.append(line)
        if lines:
            progress.write_above(lambda: forward({**data, "lines": lines}))

    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, filtered)
