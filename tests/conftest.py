"""Shared fixtures: the real Hydra config with tiny overrides, and one local Ray cluster per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
ASSETS = Path(__file__).resolve().parent / "assets"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with 4 logical CPUs (2 train workers + data, on a 2-core machine)."""
    import ray
    import ray.data

    if not ray.is_initialized():
        # The dashboard's State API keeps Ray Train's PlacementGroupCleaner from removing live runs.
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", object_store_memory=512 << 20,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    # Left running for the rest of the session; pytest's exit tears the processes down.


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
