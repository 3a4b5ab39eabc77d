"""The trackers of ``trainer.report_to``, read back from their own stores (not raysft's metrics.jsonl).

One short run of the default job reports to trackio and TensorBoard (and wandb, offline, when it is
installed) with checkpoints every 2 steps, then a re-run under the same storage.name (on more
workers: conftest.grown_run, which test_resume shares) continues it to step 4: trackio's database
holds one run reaching step 4, TensorBoard's event files in the same folder reach step 4, and both hold the train loss, a per-source loss, the eval loss and the sample
generations. A tracker that is not installed fails before Ray starts."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import GROWN_STEPS, compose

from raysft.run import driver, preflight
from raysft.train import trackers

PROMPT = "What is 12 + 30?"  # conf/stage/tiny.yaml's sample prompt
WANDB = importlib.util.find_spec("wandb") is not None
RUN = "grow"  # conftest.grown_run's storage.name: the tracker run continues under the run's name


def _trackio(run_dir: Path) -> tuple[set[str], dict[int, dict]]:
    """(run ids of the run named ``RUN``, step -> every key logged at that step) from trackio's own database."""
    db = run_dir / "trackers" / "trackio" / f"{trackers.PROJECT}.db"
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT run_id, step, metrics FROM metrics WHERE run_name = ?", (RUN,)).fetchall()
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
    assert len(run_ids) == 1, f"trackio holds {len(run_ids)} runs named {RUN}, expected one continued run"
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


@pytest.fixture(scope="module")
def tracked(grown_run):
    """(run directory, a copy of its trackers/ after the first attempt, a source name) of
    conftest.grown_run: attempt 1 (1 worker) reports steps 1-2, attempt 2 (2 workers, the same
    storage.name) continues from the step-2 checkpoint to step 4."""
    return grown_run.run_dir, grown_run.after_first, grown_run.source


@pytest.mark.ray
@pytest.mark.slow
def test_trackio_logs_into_the_run_and_continues_the_same_run(tracked):
    run_dir, after_first, source = tracked
    _check_trackio(after_first, source, GROWN_STEPS[0])
    _check_trackio(run_dir, source, GROWN_STEPS[1])


@pytest.mark.ray
@pytest.mark.slow
def test_tensorboard_logs_into_the_run_and_continues_the_same_folder(tracked):
    run_dir, after_first, source = tracked
    _check_tensorboard(after_first, source, GROWN_STEPS[0])
    _check_tensorboard(run_dir, source, GROWN_STEPS[1])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not WANDB, reason="wandb is not installed (it is in the trackers extra, not the test extra)")
def test_wandb_writes_its_offline_run_into_the_run(tracked):
    run_dir, _, _ = tracked
    runs = sorted((run_dir / "trackers" / "wandb").glob("offline-run-*"))
    assert runs and all(list(r.glob("run-*.wandb")) for r in runs), runs
    assert all(r.name.endswith(f"-{RUN}") for r in runs)  # the run id derived from the run name, both sessions


def test_a_tracker_that_is_not_installed_fails_before_ray_starts(monkeypatch, tmp_path):
    import ray

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    started = ray.is_initialized()
    with pytest.raises(preflight.TrackerNotInstalledError, match="pip install trackio"):
        driver.run(compose("trainer.report_to=[trackio]", f"storage.path={tmp_path}"))
    assert ray.is_initialized() == started


def test_a_run_in_object_storage_continues_its_tracker_files_and_uploads_them(s3, tmp_path, monkeypatch):
    """Rank 0 of a run in S3 gets back the tracker files an earlier attempt uploaded, logs into its
    scratch (the variables point there), and uploads the folder at the end."""
    from raysft.storage import files
    from raysft.storage.rundir import RunDir

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if not k.startswith(("TRACKIO_", "TENSORBOARD_", "WANDB_"))})
    rundir = RunDir(f"s3://{s3.bucket}/trackers-test", "trk-s3")
    files.write_bytes(rundir.file("trackers/trackio/raysft.db"), b"earlier attempt")
    local, upload_to = trackers.open_folder(rundir, str(tmp_path), ["trackio", "tensorboard"], rank=0)
    assert upload_to == rundir.file(RunDir.TRACKERS) and local == str(tmp_path / RunDir.TRACKERS)
    assert (tmp_path / "trackers" / "trackio" / "raysft.db").read_bytes() == b"earlier attempt"
    assert os.environ["TRACKIO_DIR"] == str(tmp_path / "trackers" / "trackio")
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "trackers" / "tensorboard")
    (tmp_path / "trackers" / "tensorboard").mkdir()
    (tmp_path / "trackers" / "tensorboard" / "events.out.tfevents.1").write_bytes(b"tb")
    trackers.finish([], local, upload_to)
    assert files.read_bytes(rundir.file("trackers/tensorboard/events.out.tfevents.1")) == b"tb"

    os.environ["TRACKIO_DIR"] = "/mine"  # a variable the user set wins
    trackers.open_folder(rundir, str(tmp_path / "again"), ["trackio"], rank=0)
    assert os.environ["TRACKIO_DIR"] == "/mine"
