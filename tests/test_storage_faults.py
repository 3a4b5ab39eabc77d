"""Storage that rides out blips, produced for real: a TCP proxy (tests/faults.py) between raysft and
moto's S3 server cuts every connection, during a checkpoint upload and at the final save."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import compose

import planted

from raysft.storage import checkpoints as ckpts
from raysft.storage import files, retry


_BUCKETS = itertools.count()


@pytest.fixture
def s3_up(s3):
    """The session's S3 with the link up, and a bucket of the test's own: moto lists a prefix by
    scanning its whole bucket, and the suite's other runs fill the shared one."""
    s3.proxy.up()
    s3.proxy.slow(None)
    bucket = f"faults-{next(_BUCKETS)}"
    s3.client.create_bucket(Bucket=bucket)
    yield dataclasses.replace(s3, bucket=bucket)
    s3.proxy.up()
    s3.proxy.slow(None)


def _keys(s3, prefix: str) -> list[str]:
    out = []
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


# ----------------------------------------------------------------------------- the retry loop


def test_a_write_during_an_outage_waits_for_storage_and_lands(s3_up):
    uri = f"s3://{s3_up.bucket}/retry/a.json"
    retry.configure(60)
    s3_up.proxy.outage(3.0)
    t0 = time.monotonic()
    files.write_bytes(uri, b"{}")
    assert time.monotonic() - t0 >= 2.5  # it waited for the outage, then succeeded
    assert files.read_bytes(uri) == b"{}"


def test_past_the_deadline_it_fails_with_one_clear_error(s3_up):
    retry.configure(2)
    s3_up.proxy.down()
    try:
        with pytest.raises(retry.StorageUnavailableError, match=r"write s3://.*/retry/b.json: storage unreachable for 2 s"):
            files.write_bytes(f"s3://{s3_up.bucket}/retry/b.json", b"x")
    finally:
        s3_up.proxy.up()
        retry.configure(600)


def test_ray_trains_storage_keeps_the_runs_deadline_in_another_process(s3_up):
    """The filesystem handed to Ray Train (its controller runs none of raysft's set-up) carries the
    run's deadline for Ray's own writes (storage.retry_timeout_s x storage.max_failed_checkpoints: such
    a write ends the run, so it waits as long as the run rides out an outage), not the 600 s default
    of the process that unpickles it."""
    import pickle

    from raysft.config import derived
    from raysft.storage.rundir import Storage

    cfg = compose("storage.retry_timeout_s=1", "storage.max_failed_checkpoints=2")
    assert derived.ray_state_retry_s(cfg) == 2
    _, fs = Storage.at(f"s3://{s3_up.bucket}/runs").run("deadline").ray_storage(derived.ray_state_retry_s(cfg))
    retry.configure(600)  # what a fresh process has
    fs = pickle.loads(pickle.dumps(fs))
    s3_up.proxy.down()
    t0 = time.monotonic()
    try:
        with pytest.raises(retry.StorageUnavailableError, match="storage unreachable for 2 s"):
            with fs.open_output_stream(f"{s3_up.bucket}/runs/deadline/state.json") as f:
                f.write(b"{}")
        # ... and makes one SDK attempt per call there too (pyarrow pickles S3 without its retry setting).
        before = s3_up.proxy.refused
        with pytest.raises(OSError):
            fs.handler.inner.get_file_info(f"{s3_up.bucket}/runs/deadline/state.json")
        assert s3_up.proxy.refused - before == 1
    finally:
        s3_up.proxy.up()
    assert time.monotonic() - t0 < 30


def _checkpoint_folder(root: Path, count: int, size: int) -> Path:
    ckpt = root / "checkpoint-5"
    ckpt.mkdir(parents=True)
    for i in range(count):
        (ckpt / f"shard-{i:02d}.bin").write_bytes(os.urandom(size))
    ckpts.write_manifest(ckpt, 0, 1, {"global_step": 5})
    return ckpt


def test_a_checkpoint_upload_cut_midway_sends_its_failed_files_again_together(s3_up, tmp_path, caplog):
    """Storage cut while a 40-file checkpoint is in flight: once it is back the failed files go out
    again together (one retry loop for the folder: one warning, one "back"), and the checkpoint lands
    complete, its manifest last."""
    ckpt = _checkpoint_folder(tmp_path, count=40, size=16 << 10)
    retry.configure(60)
    s3_up.proxy.slow(256 << 10)  # ~2.5 s for all of it: the cut (at 1 s, for 2 s) finds transfers in flight
    threading.Timer(1.0, s3_up.proxy.outage, args=(2.0,)).start()
    uri = f"s3://{s3_up.bucket}/resent/checkpoint-5"
    with caplog.at_level("WARNING", logger="raysft"):
        files.upload_dir(ckpt, uri)
    s3_up.proxy.slow(None)
    assert s3_up.proxy.refused > 0 or any("unreachable" in r.message for r in caplog.records)
    unreachable = [r.message for r in caplog.records if "storage unreachable" in r.message]
    back = [r.message for r in caplog.records if "storage is back" in r.message]
    assert len(unreachable) == 1 and "upload 40 files to" in unreachable[0], unreachable
    assert len(back) == 1, back
    assert ckpts.inspect(uri).complete
    assert len(_keys(s3_up, "resent/")) == len(list(ckpt.iterdir()))  # the shards, the state, the manifest


def test_an_upload_told_to_stop_stops_mid_transfer_and_is_never_complete(s3_up, tmp_path):
    """What a preemption notice does to an older checkpoint still uploading (train/checkpoint.py):
    on a thin S3 link no transfer starts after it, the ones in flight (s3transfer cannot abort a request
    mid-body) finish, and what landed has no manifest."""
    ckpt = _checkpoint_folder(tmp_path, count=40, size=32 << 10)  # 20 in flight at a time (files.py)
    retry.configure(60)
    s3_up.proxy.slow(128 << 10)  # 1.3 MB: ~10 s for all of it
    stop_at = time.monotonic() + 1.0
    uri = f"s3://{s3_up.bucket}/stopped/checkpoint-5"
    with pytest.raises(files.UploadStopped):
        files.upload_dir(ckpt, uri, stop=lambda: time.monotonic() > stop_at)
    s3_up.proxy.slow(None)
    landed = _keys(s3_up, "stopped/")
    assert 0 < len(landed) < 40 and not [k for k in landed if "manifest" in k], landed
    assert not ckpts.inspect(uri).complete
    # Locally: between files.
    seen = []
    with pytest.raises(files.UploadStopped):
        files.upload_dir(ckpt, str(tmp_path / "local" / "checkpoint-5"), stop=lambda: seen.append(1) or len(seen) > 2)
    assert sorted(p.name for p in (tmp_path / "local" / "checkpoint-5").iterdir()) == ["shard-00.bin", "shard-01.bin"]
    # Not told to stop: the whole folder, manifest last.
    files.upload_dir(ckpt, uri)
    assert ckpts.inspect(uri).complete


def test_answers_are_not_retried(s3_up, tmp_path):
    retry.configure(60)
    t0 = time.monotonic()
    with pytest.raises(OSError):
        files.read_bytes(f"s3://{s3_up.bucket}/retry/never-written.json")
    with pytest.raises(FileNotFoundError):
        files.read_bytes(str(tmp_path / "missing"))
    assert time.monotonic() - t0 < 5


def _fake(run: Path, name: str, step: int, *, score: float | None = None, complete: bool = True) -> None:
    d = run / name
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"w" * step)
    ckpts.write_manifest(d, 0, 1, {"global_step": step, "world_size": 1, "score": score})
    if not complete:
        (d / "weights.bin").write_bytes(b"")


def test_aws_itself_looks_the_bucket_region_up_once_and_falls_back_to_the_environment(monkeypatch):
    """Without AWS_ENDPOINT_URL (AWS itself) the bucket's region is asked once per process, not for
    every file outside the retries; when the lookup cannot answer, AWS_DEFAULT_REGION is used."""
    import pyarrow.fs as pafs

    asked: list[str] = []

    def lookup(bucket: str) -> str:
        asked.append(bucket)
        if bucket.startswith("unreachable"):
            raise OSError("When resolving region for bucket 'unreachable': AWS Error NETWORK_CONNECTION")
        return "eu-north-1"

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.setattr(pafs, "resolve_s3_region", lookup)
    files.s3_region.cache_clear()
    try:
        regions = [files.filesystem(f"s3://{b}/runs/{i}")[0].region for b in ("mine", "unreachable") for i in range(3)]
        assert regions == ["eu-north-1"] * 3 + ["us-west-2"] * 3 and asked == ["mine", "unreachable"]
        monkeypatch.delenv("AWS_DEFAULT_REGION")
        with pytest.raises(OSError, match="resolving region"):
            files.filesystem("s3://unreachable-too/x")
    finally:
        files.s3_region.cache_clear()


def test_retention_keeps_the_newest_and_never_touches_an_upload_in_flight(tmp_path):
    run = tmp_path / "run"
    _fake(run, "checkpoint_01", 2, score=3.0)
    _fake(run, "checkpoint_02", 4, score=1.0)
    _fake(run, "checkpoint_03", 6, score=2.0, complete=False)  # abandoned: never completed
    _fake(run, "checkpoint_04", 8, score=5.0)
    _fake(run, "checkpoint_05", 10, score=4.0, complete=False)  # newer than the newest complete: in flight
    best = ckpts.apply_retention(str(run), keep=1, score_key="eval_loss", found=ckpts.scan(str(run)))
    assert sorted(Path(u).name for u in best) == ["checkpoint_01", "checkpoint_03"]  # kept: best (02), newest (04)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_02", "checkpoint_04", "checkpoint_05"]
    newest = ckpts.apply_retention(str(run), keep=1)
    assert [Path(u).name for u in newest] == ["checkpoint_02"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_04", "checkpoint_05"]


# ----------------------------------------------------------------------------- real runs

# The outage outlasts the retries (the checkpoints it meets are abandoned) and ends well before the
# run does (at ~0.5 s a step, 40 steps take ~25 s with their saves; the cut comes at the step-4 upload).
OUTAGE_S, RETRY_S, SAVE_EVERY, STEPS = 12, 4, 4, 40


def _cut_when_a_checkpoint_uploads(s3, prefix: str, done: list, stop: threading.Event) -> None:
    """Once the first checkpoint object appears (its upload has started), cut storage for OUTAGE_S."""
    while not stop.is_set():
        if any("/checkpoint_" in k for k in _keys(s3, prefix)):
            s3.proxy.outage(OUTAGE_S)
            done.append(time.monotonic())
            return
        time.sleep(0.1)


@pytest.mark.ray
@pytest.mark.slow
def test_a_storage_outage_during_a_checkpoint_upload_does_not_end_the_run(ray_cluster, s3_up):
    from raysft.run import driver

    name, steps = "outage", STEPS
    cut: list[float] = []
    stop = threading.Event()
    threading.Thread(target=_cut_when_a_checkpoint_uploads, args=(s3_up, f"runs/{name}/", cut, stop), daemon=True).start()
    try:
        result = driver.run(compose(f"storage.path=s3://{s3_up.bucket}/runs", f"storage.name={name}",
                                    f"trainer.max_steps={steps}", "trainer.save_strategy=steps",
                                    f"trainer.save_steps={SAVE_EVERY}", "trainer.save_total_limit=100",
                                    "trainer.eval_steps=null", "monitor.sample_prompts=[]",
                                    f"storage.retry_timeout_s={RETRY_S}", "storage.max_failed_checkpoints=8"))
    finally:
        stop.set()
    assert cut, "storage was never cut"
    assert result.max_steps == steps
    run_uri = f"s3://{s3_up.bucket}/runs/{name}"
    found = ckpts.scan(run_uri)
    complete = sorted(c.step for c in found if c.complete)
    # Nothing half-written survives the run: every checkpoint folder left is complete.
    assert all(c.complete for c in found), [(c.uri, c.why) for c in found if not c.complete]
    assert complete[-1] == steps and set(complete) <= set(range(SAVE_EVERY, steps + 1, SAVE_EVERY))
    assert len(complete) < steps // SAVE_EVERY  # some were abandoned during the outage, the rest are there
    keys = _keys(s3_up, f"runs/{name}/model/")
    assert any(k.endswith("model.safetensors") for k in keys)  # the final model is in storage
    summary = json.loads(files.read_bytes(f"{run_uri}/train_summary.json"))
    assert summary["global_step"] == steps  # every step trained

    # A new run starts from that run's newest checkpoint in S3 (resume=<uri>; Ray Train V2 has no
    # resume_from_checkpoint): it continues at the next step under its own name, its token count
    # too, keeps only its newest checkpoint (trainer.save_total_limit=1) and leaves the source alone.
    # (Resuming a run by name is tested in test_cluster, exact resume after a kill in test_resume.)
    source = sorted(_keys(s3_up, f"runs/{name}/"))
    first = [json.loads(x) for x in files.read_bytes(f"{run_uri}/metrics.jsonl").decode().splitlines()]
    tokens_before = [m["num_tokens"] for m in first if m.get("global_step") == steps and "num_tokens" in m][0]
    driver.run(compose(f"storage.path=s3://{s3_up.bucket}/runs", "storage.name=fork", f"trainer.max_steps={steps + 2}",
                       "trainer.save_strategy=steps", "trainer.save_steps=1", "trainer.eval_steps=null",
                       "monitor.sample_prompts=[]", f"resume={run_uri}"))
    forked = [json.loads(x) for x in files.read_bytes(f"s3://{s3_up.bucket}/runs/fork/metrics.jsonl").decode().splitlines()]
    assert [m["global_step"] for m in forked if "loss" in m] == [steps + 1, steps + 2]
    assert [m["num_tokens"] for m in forked if m.get("global_step") == steps + 1 and "num_tokens" in m][0] > tokens_before
    manifests = [k for k in _keys(s3_up, "runs/fork/") if "checkpoint_" in k and "raysft_manifest_rank" in k]
    assert len(manifests) == 2  # the newest checkpoint only, one manifest per rank
    assert sorted(_keys(s3_up, f"runs/{name}/")) == source


@pytest.mark.ray
@pytest.mark.slow
def test_storage_down_at_the_final_save_keeps_the_model_and_says_how_to_upload_it(planted_run, s3):
    """The planted run (tests/planted.py, shared with test_secrets): storage goes down once its last
    step is logged, so the last checkpoint and the final save meet a dead storage."""
    from transformers import AutoModelForCausalLM

    run = planted_run
    assert run.cut_after_step, run.out[-3000:]
    assert run.code == 4, (run.code, run.out[-3000:])
    last = run.out.strip().splitlines()[-1]
    kept = run.unsaved / planted.NAME / "model"
    assert last.startswith("raysft: error: ") and str(kept) in last and "raysft upload" in last, last
    assert "Traceback" not in run.out
    model = AutoModelForCausalLM.from_pretrained(kept)
    assert model.num_parameters() > 0
    # ... and the command the line names puts it where the run would have.
    assert run.upload.returncode == 0, run.upload.stdout[-2000:] + run.upload.stderr[-2000:]
    assert any(o["Key"].endswith("model.safetensors") for o in planted.keys(s3, f"runs/{planted.NAME}/model/"))
