"""The trackers of ``trainer.report_to``, read back from their own stores (not raysft's metrics.jsonl).

One short run of the default job reports to trackio and TensorBoard (and wandb, offline, when it is
installed) with checkpoints every 2 steps, then a re-run under the same storage.name continues it
to step 6: trackio's database holds one run reaching step 6, TensorBoard's event files in the same
folder reach step 6, and both hold the train loss, a per-source loss, the eval loss and the sample
generations. A tracker that is not installed fails before Ray starts."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path

import pytest
from conftest import compose

from raysft.run import driver
from raysft.train import trackers

PROMPT = "What is 12 + 30?"  # conf/stage/tiny.yaml's sample prompt
WANDB = importlib.util.find_spec("wandb") is not None


def _overrides(root: Path, steps: int) -> list[str]:
    report = ["trackio", "tensorboard"] + (["wandb"] if WANDB else [])
    return [f"storage.path={root}", "storage.name=trk", f"trainer.max_steps={steps}", "trainer.eval_steps=2",
            "monitor.sample_every_steps=2", "trainer.save_strategy=steps", "trainer.save_steps=2",
            f"trainer.report_to=[{','.join(report)}]"]


def _trackio(run_dir: Path) -> tuple[set[str], dict[int, dict]]:
    """(run ids of run ``trk``, step -> every key logged at that step) from trackio's own database."""
    db = run_dir / "trackers" / "trackio" / f"{trackers.PROJECT}.db"
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT run_id, step, metrics FROM metrics WHERE run_name = 'trk'").fetchall()
    steps: dict[int, dict] = {}
    for _, step, metrics in rows:
        steps.setdefault(step, {}).update(json.loads(metrics))
    return {r[0] for r in rows}, steps


def _tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "trackers" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _check_trackio(run_dir: Path, source: str, last: int) -> None:
    run_ids, steps = _trackio(run_dir)
    assert len(run_ids) == 1, f"trackio holds {len(run_ids)} runs named trk, expected one continued run"
    assert max(steps) == last and all("train/loss" in steps[s] for s in range(1, last + 1)), sorted(steps)
    assert any(f"train/loss/{source}" in v for v in steps.values())
    assert "eval/loss" in steps[2] and any(k.startswith("eval/loss/") for k in steps[2])
    samples = [v["samples"] for v in steps.values() if "samples" in v]
    assert samples and PROMPT in json.dumps(samples[-1]), samples
    assert "samples" in steps[last]


def _check_tensorboard(run_dir: Path, source: str, last: int) -> None:
    acc = _tensorboard(run_dir)
    tags = acc.Tags()
    assert {"train/loss", f"train/loss/{source}", "eval/loss"} <= set(tags["scalars"]), tags["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")][-1] == last
    assert set(range(1, last + 1)) <= {e.step for e in acc.Scalars("train/loss")}
    texts = acc.Tensors("samples/text_summary")
    assert texts[-1].step == last and PROMPT in texts[-1].tensor_proto.string_val[0].decode()


@pytest.mark.ray
@pytest.mark.slow
def test_trackers_log_offline_into_the_run_and_continue_across_a_resume(ray_cluster, tmp_path):
    first = driver.run(compose(*_overrides(tmp_path, 4)))
    run_dir = Path(first.run_uri)
    source = next(iter(first.stats.sources))
    _check_trackio(run_dir, source, 4)
    _check_tensorboard(run_dir, source, 4)

    driver.run(compose(*_overrides(tmp_path, 6)))  # the same storage.name: resumes from the step-4 checkpoint
    _check_trackio(run_dir, source, 6)
    _check_tensorboard(run_dir, source, 6)
    if not WANDB:
        pytest.skip("wandb is not installed (not in the test extra): its offline run was not checked")
    offline = sorted((run_dir / "trackers" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, "wandb wrote no offline run under <run>/trackers/wandb"


def test_a_tracker_that_is_not_installed_fails_before_ray_starts(monkeypatch, tmp_path):
    import ray

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    started = ray.is_initialized()
    with pytest.raises(trackers.TrackerNotInstalledError, match="pip install trackio"):
        driver.run(compose("trainer.report_to=[trackio]", f"storage.path={tmp_path}"))
    assert ray.is_initialized() == started
