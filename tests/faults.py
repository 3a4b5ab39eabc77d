"""Real faults for the tests: a TCP proxy that cuts every connection to a server, or narrows the link
to a few kilobytes per second, as toxiproxy does; SIGKILLs of a run's actors from outside."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path

# Ray Train's own actors (ray/train/v2/_internal): its controller, workers, report barrier, state
# store and cleaners. Any other actor (a data actor, Ray Data's stats or split coordinator) is not
# needed by a run once training starts.
RAY_TRAIN_ACTORS = {"TrainController", "RayTrainWorker", "SynchronizationActor", "TrainStateActor",
                    "PlacementGroupCleaner", "PreemptionWatcher"}


def kill_other_actors_after(run_dir: Path, step: int, killed: list, stop: threading.Event) -> None:
    """Once ``step`` is in the run's metrics.jsonl, SIGKILL every live actor that is not Ray Train's
    own: whatever else the run created is gone mid-run. Appends each class killed to ``killed``,
    then ``"<checked>"`` (there may have been nothing else to kill)."""
    from ray.util.state import list_actors

    metrics = run_dir / "metrics.jsonl"
    while not stop.is_set():
        if metrics.exists() and any(json.loads(x).get("global_step", 0) >= step for x in metrics.read_text().splitlines()):
            for a in list_actors(filters=[("state", "=", "ALIVE")]):
                if a.class_name not in RAY_TRAIN_ACTORS and a.pid:
                    os.kill(a.pid, signal.SIGKILL)
                    killed.append(a.class_name)
            killed.append("<checked>")
            return
        time.sleep(0.2)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset', as when a network path drops.

    NOTE: shutdown(SHUT_RD) first wakes the pump thread blocked in recv() on this socket; a plain
    close() from another thread leaves that recv holding the socket open (Linux), no RST is sent,
    and the client waits out its read timeout (botocore: 60 s) instead of seeing the cut."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class TcpProxy:
    """Listens on 127.0.0.1 (``port``) and forwards to ``127.0.0.1:target_port``. ``down()`` resets every
    open connection and every new one until ``up()``: the server is unreachable for the clients."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listen = socket.socket()
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind(("127.0.0.1", 0))
        self._listen.listen(128)
        self.port = self._listen.getsockname()[1]
        self._down = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.refused = 0
        self._rate: float | None = None  # bytes/s through the proxy, all connections together (None: no limit)
        self._budget_lock = threading.Lock()
        self._next_free = 0.0
        threading.Thread(target=self._accept, daemon=True, name="tcp-proxy").start()

    @property
    def is_down(self) -> bool:
        return self._down.is_set()

    def down(self) -> None:
        self._down.set()
        with self._lock:
            conns, self._open = list(self._open), set()
        for c in conns:
            _reset(c)

    def up(self) -> None:
        self._down.clear()

    def slow(self, bytes_per_s: float | None) -> None:
        """From now on the link carries at most ``bytes_per_s`` (shared by every connection, as one
        thin uplink); None lifts the limit."""
        self._rate = bytes_per_s

    def _throttle(self, n: int) -> None:
        rate = self._rate
        if not rate:
            return
        with self._budget_lock:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + n / rate
            wait = self._next_free - now
        time.sleep(max(0.0, wait))

    def outage(self, seconds: float) -> threading.Thread:
        """Down now, up again after ``seconds`` (on a thread)."""
        self.down()

        def restore() -> None:
            time.sleep(seconds)
            self.up()

        t = threading.Thread(target=restore, daemon=True, name="tcp-proxy-outage")
        t.start()
        return t

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            if self._down.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 12 if self._rate else 1 << 16)
                if not data:
                    break
                self._throttle(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with self._lock:
                    self._open.discard(s)
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def flip_bytes(data: bytes, n: int = 4096) -> bytes:
    """``n`` bytes inverted in the middle, the size unchanged: bit rot at rest, which a manifest's
    sizes cannot see."""
    b = bytearray(data)
    n = min(n, len(b) // 2)
    mid = len(b) // 2 - n // 2
    b[mid:mid + n] = bytes(x ^ 0xFF for x in b[mid:mid + n])
    return bytes(b)
