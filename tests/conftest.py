"""Shared fixtures: the real Hydra config with tiny overrides, and one local Ray cluster per session."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults import TcpProxy

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
ASSETS = Path(__file__).resolve().parent / "assets"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3:
    """moto's S3 server with a cuttable proxy in front: raysft (and every Ray process) talks to the
    proxy (AWS_ENDPOINT_URL), the test's own ``client`` to moto directly."""

    client: object
    bucket: str
    proxy: TcpProxy
    endpoint: str


@pytest.fixture(scope="session")
def s3():
    """Started before Ray (``ray_cluster`` depends on it), so every Ray worker inherits the endpoint
    and credentials the way workers on a cluster get them from their nodes."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = TcpProxy(port)
    endpoint = f"http://127.0.0.1:{proxy.port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    for _ in range(150):
        try:
            client.create_bucket(Bucket="raysft-test")
            break
        except Exception:
            time.sleep(0.2)
    yield S3(client, "raysft-test", proxy, endpoint)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A local Ray with 4 logical CPUs (2 train workers + data, on a 2-core machine)."""
    import ray
    import ray.data

    if not ray.is_initialized():
        # The dashboard's State API keeps Ray Train's PlacementGroupCleaner from removing live runs; its
        # processes find it by RAY_API_SERVER_ADDRESS (other Rays run beside this one: see run/ray_init.py),
        # set only while Ray starts: in this process it would override the address of every State API call.
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 object_store_memory=512 << 20,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}})
        del os.environ["RAY_API_SERVER_ADDRESS"]
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    # Left running for the rest of the session; pytest's exit tears the processes down.


@pytest.fixture(scope="session")
def planted_run(s3):
    """The run with planted secrets whose storage goes down at its final save (tests/planted.py),
    shared by test_secrets and test_storage_faults."""
    import shutil
    import tempfile

    import planted

    work = Path(tempfile.mkdtemp(prefix="rsec-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        yield planted.start(s3, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from raysft import assets

    return AutoTokenizer.from_pretrained(assets.resolve("bundled:smollm3"))


def compose(*overrides: str):
    """The real config tree, composed exactly as the CLI does."""
    from raysft.config import compose as cli_compose

    return cli_compose(list(overrides))


@pytest.fixture
def compose_cfg():
    return compose


def shared_path(*parts: str) -> Path:
    """A path in ../shared, skipping the test when it is absent (the project never needs it at run time)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


# The default job as test_train checks it and test_resume replays it with a worker killed: one
# uninterrupted run, shared (each run costs a minute or more on 2 cores).
CLEAN_RUN = ["trainer.max_steps=6", "trainer.gradient_accumulation_steps=2", "trainer.eval_steps=3",
             "monitor.sample_every_steps=3", "trainer.save_strategy=steps", "trainer.save_steps=2",
             "monitor.log_batch_hashes=true"]


@pytest.fixture(scope="session")
def clean_run(ray_cluster, tmp_path_factory):
    """(RunResult, run directory) of the default job with CLEAN_RUN overrides."""
    from raysft.run import driver

    root = tmp_path_factory.mktemp("clean")
    result = driver.run(compose(f"storage.path={root}", "storage.name=clean", *CLEAN_RUN))
    return result, root / "clean"


@dataclass
class GrownRun:
    """A run that grew from 1 worker to 2 between its two attempts (see ``grown_run``)."""

    root: Path  # storage.path
    run_dir: Path
    after_first: Path  # a copy of the run folder's trackers/ as the 1-worker attempt left it
    source: str  # a source name of its mixture
    common: list[str]  # the overrides both attempts share
    first_worker: dict  # workers/rank_0.json as the 1-worker attempt wrote it


# The grown run's data: 8 packed train rows (4 rows a step: 1 epoch = 2 steps) and 2 eval rows, from
# both sources of the sample.
GROWN_DATA = ["data.dataset_mixture.datasets.0.weight=0.004", "data.dataset_mixture.datasets.1.weight=0.008",
              "data.dataset_mixture.test_split_size=2"]
GROWN_ROWS = 8
GROWN_STEPS = (2, 4)  # the 1-worker attempt trains epoch 1 (steps 1-2), the 2-worker one epoch 2 (3-4)


@pytest.fixture(scope="session")
def grown_run(ray_cluster, tmp_path_factory):
    """One run, resumed on more workers at an epoch boundary, reporting to its trackers; shared by
    test_resume (the global data order continues across the resize, epoch 2 is trained, not skipped:
    verl #7401) and test_trackers (trackio and TensorBoard continue the same run). Attempt 1: 1 worker
    (accumulation 4), `num_train_epochs=1`: steps 1-2; attempt 2, the same storage.name: 2 workers
    (accumulation 2, the same 4 rows per step), `num_train_epochs=2`: steps 3-4 from the epoch-1
    checkpoint. Checkpoints every epoch, evaluations and sample generations every 2 steps; every
    micro-batch hashed."""
    import importlib.util
    import shutil

    from raysft.run import driver

    root = tmp_path_factory.mktemp("grown")
    report = ["trackio", "tensorboard"] + (["wandb"] if importlib.util.find_spec("wandb") else [])
    common = [f"storage.path={root}", "storage.name=grow", *GROWN_DATA, "trainer.save_strategy=epoch",
              "trainer.eval_steps=2", "monitor.sample_every_steps=2", "monitor.log_batch_hashes=true",
              f"trainer.report_to=[{','.join(report)}]"]
    first = driver.run(compose(*common, "scaling.num_workers=1", "trainer.gradient_accumulation_steps=4",
                               "trainer.num_train_epochs=1"))
    assert (first.stats.train_packed_rows, first.max_steps) == (GROWN_ROWS, GROWN_STEPS[0])
    run_dir = Path(first.run_uri)
    shutil.copytree(run_dir / "trackers", root / "after_first" / "trackers")
    first_worker = json.loads((run_dir / "workers" / "rank_0.json").read_text())
    second = driver.run(compose(*common, "scaling.num_workers=2", "trainer.gradient_accumulation_steps=2",
                                "trainer.num_train_epochs=2"))
    assert second.max_steps == GROWN_STEPS[1]
    return GrownRun(root, run_dir, root / "after_first", next(iter(first.stats.sources)), common, first_worker)
