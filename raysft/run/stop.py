"""Stop on a signal: SIGINT (Ctrl-C) or SIGTERM (``ray job stop``, Kubernetes) on the driver.

The first one asks the workers, through the run's lease (``storage/lease.py``), to checkpoint at the
end of the current step and stop; the run then ends with one line, ``raysft: stopped at step N
(checkpoint ...) — run the same command to resume``, exit 130 / 143. A second one stops at once,
without a checkpoint (the process exits there), and says so.

NOTE: Ray Train's ``fit()`` installs its own SIGINT handler, which aborts the run at once (no
checkpoint); the driver's trainer skips it (``run/driver.py``). Handlers can only be installed from
the main thread: a sweep trial (a Tune thread) has none, and Tune handles the sweep's Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from raysft.storage.lease import Lease

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signame: str) -> int:
    return 128 + signal.Signals[signame].value


class SignalStop:
    """Installed around a run (a context manager): ``signal`` is the first signal's name once one came."""

    def __init__(self):
        self._lease: Lease | None = None  # set once the driver holds the run's lease
        self.signal: str | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def reinstall(self) -> None:
        """Take the signals back once Ray is connected. NOTE: connecting a driver installs Ray's C++
        failure-signal handler, which catches SIGTERM, logs "SIGTERM received" and kills the process."""
        for s in self._old:
            signal.signal(s, self._handle)

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    @property
    def lease(self) -> Lease | None:
        return self._lease

    @lease.setter
    def lease(self, held: Lease) -> None:
        self._lease = held
        if self.signal is not None:  # a signal before the lease was held: asked for now
            held.request_stop(self.signal)

    @property
    def installed(self) -> bool:
        return bool(self._old)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            # At once: no exception raised into whatever the main thread is doing (it may hold a lock a
            # clean-up would wait on). Ray's own processes go with this one (they die with their parent);
            # the lease is left to go stale (at once for the next driver on this host: its pid is gone).
            print(f"raysft: stopped at once ({name} twice), without a checkpoint — run the same command to resume "
                  "from the newest one", file=sys.stderr, flush=True)
            os._exit(exit_code(name))
        self.signal = name
        if self._lease is not None:
            self._lease.request_stop(name)
        print(f"raysft: {name}: stopping at the end of the current step, after a checkpoint (send it again to stop "
              "at once, without one)", flush=True)
