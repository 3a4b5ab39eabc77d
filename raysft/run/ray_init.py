"""Starting or joining Ray for a run: the settings every Ray process gets, Ray's console level, and
the local cluster's own API address."""

from __future__ import annotations

import logging
import os
import re
import socket

import ray

from raysft import logs
from raysft.config import RaySFTConfig, derived

log = logging.getLogger("raysft")

# Settings (never secrets) every Ray process of a run gets: no usage stats, no tokenizer threads per
# data actor, and Ray Train's print patch off (it logs each print once more through the root
# logger: every worker line appeared twice).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

# A line Ray's C++ core writes to a worker's stderr, e.g.
# "[2026-12-01 11:38:12,304 I 21329 21329] logging.cc:303: Set ray log level ...". Fatal ones (F) stay.
RAY_CORE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] [\w./-]+\.(cc|h):\d+: ")

_own_api_address: str | None = None  # the State API address init_ray set for a local Ray


def ray_logging(cfg: RaySFTConfig, *, train: bool = False) -> ray.LoggingConfig:
    """Ray's console level. Ray Train's own console lines (its controller logs a failed worker's
    traceback) stay in its log files: raysft ends a failure with one line of its own."""
    if cfg.monitor.verbose:
        return ray.LoggingConfig(log_level="INFO")
    return ray.LoggingConfig(log_level="CRITICAL" if train else "ERROR")


def init_ray(cfg: RaySFTConfig, *, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``scaling.address`` or ``RAY_ADDRESS``) or start Ray in-process with
    ``num_cpus`` logical CPUs (default ``derived.local_ray_cpus``)."""
    global _own_api_address
    if ray.is_initialized():
        return
    for k, v in RAY_ENV.items():  # workers of a local Ray inherit these (the raylet starts from this process)
        os.environ.setdefault(k, v)
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would probe for CUDA and say so on every worker
    logs.quiet_libraries(cfg.monitor.verbose)
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    if address:
        if os.environ.get("RAY_API_SERVER_ADDRESS") == _own_api_address:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # ours, from a local Ray this process ran before
        ray.init(address=address, log_to_driver=True, logging_config=ray_logging(cfg))
    else:
        # NOTE: the dashboard is needed: Ray Train V2's PlacementGroupCleaner asks the State API
        # whether the controller is alive and, when the answer comes back empty, removes the workers'
        # placement group and kills a healthy run. It finds that API with no address given, which
        # fails ("Found multiple active Ray instances") when another Ray runs on the machine; so the
        # dashboard gets a port chosen here and every process of this Ray is told where it is.
        port = _free_port()
        _own_api_address = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=num_cpus or derived.local_ray_cpus(cfg), include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, object_store_memory=512 << 20, logging_config=ray_logging(cfg),
                 runtime_env={"env_vars": dict(RAY_ENV)})
    if not cfg.monitor.verbose:
        _drop_ray_core_lines()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drop_ray_core_lines() -> None:
    """Keep Ray's C++ core notes (error-level ones included: Ray Train's own restartable actors
    trigger them) off the console; they stay in Ray's session logs (``monitor.verbose=true`` shows
    them). Ray has no public filter for the worker output it forwards to the driver, and its
    RAY_BACKEND_LOG_LEVEL itself prints a line per process, so wrap its forwarding handler."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        name, forward = next((n, h) for n, h in dispatcher.handlers if n == "ray_print_logs")
    except (ImportError, AttributeError, StopIteration):
        log.debug("Ray's worker-output handler not found; Ray's core lines reach the console")
        return

    def without_core_lines(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not RAY_CORE_LINE.match(line)]
        if lines:
            forward({**data, "lines": lines})

    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, without_core_lines)
