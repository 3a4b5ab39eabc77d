"""Starting or joining Ray for a run: the settings every Ray process gets, Ray's console level, and
the local cluster's own API address."""

from __future__ import annotations

import contextlib
import os
import socket

import ray

from raysft import logs
from raysft.config import RaySFTConfig, derived
from raysft.run import console

# Settings (never secrets) every Ray process of a run gets: no usage stats, no tokenizer threads per
# data actor, and Ray Train's print patch off (it logs each print once more through the root
# logger: every worker line appeared twice).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def ray_logging(cfg: RaySFTConfig, *, train: bool = False) -> ray.LoggingConfig:
    """Ray's console level. Ray Train's own console lines (its controller logs a failed worker's
    traceback) stay in its log files: raysft ends a failure with one line of its own."""
    if cfg.monitor.verbose:
        return ray.LoggingConfig(log_level="INFO")
    return ray.LoggingConfig(log_level="CRITICAL" if train else "ERROR")


def init_ray(cfg: RaySFTConfig, *, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``scaling.address`` or ``RAY_ADDRESS``) or start Ray in-process with
    ``num_cpus`` logical CPUs (default ``derived.local_ray_cpus``)."""
    if ray.is_initialized():
        return
    for k, v in RAY_ENV.items():  # workers of a local Ray inherit these (the raylet starts from this process)
        os.environ.setdefault(k, v)
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would probe for CUDA and say so on every worker
    logs.quiet_libraries(cfg.monitor.verbose)
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_config=ray_logging(cfg))
    else:
        # NOTE: the dashboard is needed: Ray Train V2's PlacementGroupCleaner asks the State API
        # whether the controller is alive and, when the answer comes back empty, removes the workers'
        # placement group and kills a healthy run. It finds that API with no address given, which
        # fails ("Found multiple active Ray instances") when another Ray runs on the machine; so the
        # dashboard gets a port chosen here and every process of this Ray is told where it is (they
        # inherit this process's environment as Ray starts; this process keeps its own: the variable
        # overrides even an explicit address in every State API call).
        port = _free_port()
        with _env("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}"):
            ray.init(num_cpus=num_cpus or derived.local_ray_cpus(cfg), include_dashboard=True,
                     dashboard_host="127.0.0.1", dashboard_port=port, object_store_memory=512 << 20,
                     logging_config=ray_logging(cfg), runtime_env={"env_vars": dict(RAY_ENV)})
    console.filter_forwarded_output(verbose=cfg.monitor.verbose)


@contextlib.contextmanager
def _env(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
