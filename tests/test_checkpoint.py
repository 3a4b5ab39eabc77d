"""Checkpoints in object storage (a real S3-compatible server: moto), completeness, resume by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import compose
from faults import flip_bytes

from raysft.storage import checkpoints as ckpts


def test_manifest_detects_incomplete_checkpoints(tmp_path):
    for rank in (0, 1):
        (tmp_path / f"shard_{rank}.pt").write_bytes(b"x" * (100 + rank))
        ckpts.write_manifest(tmp_path, rank, 2, {"global_step": 4, "num_tokens": 1024})
    assert ckpts.verify(tmp_path) == (True, "")
    assert ckpts.read_state(tmp_path) == {"global_step": 4, "num_tokens": 1024}
    (tmp_path / "shard_1.pt").write_bytes(b"x" * 10)  # an upload cut short
    assert not ckpts.verify(tmp_path)[0]
    (tmp_path / "shard_1.pt").write_bytes(b"x" * 101)
    (tmp_path / ckpts.manifest_name(1)).unlink()  # one rank never finished
    assert ckpts.verify(tmp_path) == (False, "1 of 2 rank manifests")


@pytest.fixture
def s3_bucket(s3):
    """moto's S3 server on 127.0.0.1 (conftest.s3), used through the same code path as AWS (AWS_* environment)."""
    s3.proxy.up()
    return s3.client, s3.bucket


def _keys(client, bucket, prefix):
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


# ----------------------------------------------------------------------------- storage scan (no Ray)


def _fake_checkpoint(root, name: str, step: int, world: int = 2, size: int = 64, world_size_state: int | None = None):
    """A checkpoint folder as the ranks write it: shards, then each rank's manifest last."""
    d = root / name
    d.mkdir(parents=True)
    for rank in range(world):
        (d / f"shard_{rank}.pt").write_bytes(os.urandom(size))
    for rank in range(world):
        ckpts.write_manifest(d, rank, world, {"global_step": step, "world_size": world_size_state or world,
                                              "data_cursor": {"pass_": 0, "unit": 0, "offset": step, "global_row": step}})
    return d


def test_s3_scan_resumes_from_the_newest_complete_checkpoint_and_prunes_orphans(s3_bucket, tmp_path):
    from raysft.storage import files

    client, bucket = s3_bucket
    run = f"s3://{bucket}/scan/run"
    for name, step in (("checkpoint_2026-01-01_00-00-02", 2), ("checkpoint_2026-01-01_00-00-04", 4),
                       ("checkpoint_2026-01-01_00-00-06", 6)):
        files.upload_dir(_fake_checkpoint(tmp_path, name, step), files.join(run, name))
    # Step 6's upload was cut short: rank 1's shard never arrived.
    client.delete_object(Bucket=bucket, Key="scan/run/checkpoint_2026-01-01_00-00-06/shard_1.pt")

    found = {c.step: c for c in ckpts.scan(run)}
    assert [found[s].complete for s in (2, 4, 6)] == [True, True, False]
    assert found[6].why == "shard_1.pt missing or truncated"
    assert ckpts.latest_complete(run).step == 4  # newest complete, even if Ray never registered it
    assert ckpts.resolve(run).step == 4 and ckpts.resolve(found[2].uri).step == 2

    assert ckpts.remove_incomplete(run) == [found[6].uri]
    # After a run, what Ray Train does not keep (here: step 4, an orphan) is removed.
    assert ckpts.prune(run, keep={"checkpoint_2026-01-01_00-00-02"}) == [found[4].uri]
    assert [c.step for c in ckpts.scan(run)] == [2]
    with pytest.raises(ValueError, match="neither a complete raysft checkpoint"):
        ckpts.resolve(f"s3://{bucket}/scan/nothing-here")


def test_an_upload_killed_midway_never_looks_complete(s3_bucket, tmp_path):
    """A real upload process SIGKILLed while objects are arriving: the partial checkpoint is not
    complete and the previous one stays the latest."""
    import signal

    from raysft.storage import files

    client, bucket = s3_bucket
    run = f"s3://{bucket}/killed/run"
    files.upload_dir(_fake_checkpoint(tmp_path, "checkpoint_a", 2), files.join(run, "checkpoint_a"))
    big = _fake_checkpoint(tmp_path, "checkpoint_b", 4, world=8, size=24 << 20)  # 8 x 24 MB shards + manifests
    total = len(list(big.iterdir()))
    code = f"from raysft.storage import files; files.upload_dir({str(big)!r}, {files.join(run, 'checkpoint_b')!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
    arrived = 0
    while proc.poll() is None:
        arrived = len(_keys(client, bucket, "killed/run/checkpoint_b/"))
        if arrived:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    arrived = len(_keys(client, bucket, "killed/run/checkpoint_b/"))
    assert 0 < arrived < total, f"{arrived} of {total} objects: the upload was not cut midway"
    partial = ckpts.inspect(files.join(run, "checkpoint_b"))
    assert not partial.complete
    assert ckpts.latest_complete(run).uri.endswith("checkpoint_a")


def test_resume_latest_finds_the_run_with_the_newest_checkpoint(tmp_path):
    from raysft.storage.rundir import Storage

    _fake_checkpoint(tmp_path / "old", "checkpoint_2026-01-01_00-00-01", 3)
    _fake_checkpoint(tmp_path / "new", "checkpoint_2026-01-02_00-00-01", 5)
    _fake_checkpoint(tmp_path / "new", "checkpoint_2026-01-03_00-00-01", 7)
    (tmp_path / "new" / "checkpoint_2026-01-03_00-00-01" / ckpts.manifest_name(1)).unlink()  # incomplete
    _fake_checkpoint(tmp_path / "newest-but-broken", "checkpoint_2026-01-04_00-00-01", 9)
    (tmp_path / "newest-but-broken" / "checkpoint_2026-01-04_00-00-01" / "shard_0.pt").write_bytes(b"")

    def resolve_resume(cfg):
        return Storage.at(cfg.storage.path).resolve_resume(cfg.resume, cfg.storage.name)

    cfg = compose(f"storage.path={tmp_path}", "resume=latest")
    assert resolve_resume(cfg) == ("new", None) and cfg.storage.name is None  # the config is not written back
    assert resolve_resume(compose(f"storage.path={tmp_path}", "storage.name=old", "resume=latest")) == ("old", None)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume(compose(f"storage.path={tmp_path}", "storage.name=missing", "resume=latest"))
    name, start = resolve_resume(compose(f"storage.path={tmp_path}", "storage.name=fork", f"resume={tmp_path / 'new'}"))
    assert name == "fork" and start.endswith("new/checkpoint_2026-01-02_00-00-01")
    with pytest.raises(ValueError, match="neither a complete raysft checkpoint"):
        resolve_resume(compose(f"storage.path={tmp_path}", f"resume={tmp_path / 'newest-but-broken'}"))


def test_zero3_checkpoint_on_another_world_size_fails_before_ray_starts(tmp_path):
    from raysft.run import driver

    _fake_checkpoint(tmp_path / "z3", "checkpoint_2026-01-01_00-00-01", 4, world=2)
    with pytest.raises(RuntimeError, match="written by 2 workers and this run has 1: DeepSpeed ZeRO-3"):
        driver.run(compose(f"storage.path={tmp_path}", "storage.name=z3", "deepspeed=zero3", "scaling.num_workers=1"))


# ----------------------------------------------------------------------------- checksums (bytes flipped for real)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_checkpoint_with_flipped_bytes_is_skipped_for_the_previous_one(where, s3_bucket, tmp_path):
    """4 KB flipped (same size) in the newest checkpoint's shard, on disk or in S3 (the object written
    again, as a faulty copy would): it is named with both checksums and passed over for the previous
    complete one; all of them corrupted: one error; a checkpoint from an older raysft (no checksums)
    resumes with one line saying it cannot be verified; a download that does not match fails verify."""
    from raysft.storage import checksums, files

    client, bucket = s3_bucket
    src = tmp_path / "src"
    run = str(tmp_path / "run") if where == "local" else f"s3://{bucket}/flipped/run"
    names = {2: "checkpoint_2026-01-01_00-00-02", 4: "checkpoint_2026-01-01_00-00-04", 6: "checkpoint_2026-01-01_00-00-06"}
    for step, name in names.items():
        files.upload_dir(_fake_checkpoint(src, name, step, size=64 << 10), files.join(run, name))

    def flip(step: int, file: str) -> tuple[str, str]:
        rel = f"{names[step]}/{file}"
        if where == "local":
            p = tmp_path / "run" / rel
            good = p.read_bytes()
            p.write_bytes(flip_bytes(good))
        else:
            key = f"flipped/run/{rel}"
            good = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            client.put_object(Bucket=bucket, Key=key, Body=flip_bytes(good))
        return checksums.of_bytes(good), checksums.of_bytes(flip_bytes(good))

    assert ckpts.latest_verified(run).chosen.step == 6 and all(c.checksums for c in ckpts.scan(run))
    if where == "s3":  # S3 holds each file's CRC32 as sent (checked on receipt): no download to compare
        assert checksums.stored(files.join(run, names[6], "shard_0.pt")) == checksums.of_file(src / names[6] / "shard_0.pt")
    want, got = flip(6, "shard_0.pt")
    choice = ckpts.latest_verified(run)
    assert choice.chosen.step == 4 and [c.step for c, _ in choice.corrupt] == [6]
    (line,) = choice.lines()
    assert "shard_0.pt" in line and want in line and got in line and "step 4" in line, line
    assert ckpts.scan(run)[-1].complete  # the sizes alone would have taken it

    flip(4, "raysft_state.json"), flip(2, "shard_1.pt")
    choice = ckpts.latest_verified(run)
    assert choice.chosen is None and len(choice.corrupt) == 3
    with pytest.raises(ckpts.CorruptCheckpointError, match="every complete checkpoint .* failed its checksums"):
        choice.raise_if_none_left(run)

    # A download that arrives with other bytes than its manifest says fails the check.
    got_dir = files.download_dir(files.join(run, names[6]), tmp_path / "dl") if where == "s3" else tmp_path / "run" / names[6]
    ok, why = ckpts.verify(got_dir)
    assert not ok and "shard_0.pt" in why and want in why

    # Written by an older raysft (sizes only): resumed, with one line that it cannot be verified.
    old = tmp_path / "old" / "checkpoint_2026-01-01_00-00-08"
    _fake_checkpoint(tmp_path / "old", old.name, 8)
    for m in old.glob("raysft_manifest_rank*.json"):
        body = json.loads(m.read_text())
        m.write_text(json.dumps({**body, "files": {k: v["size"] for k, v in body["files"].items()}}))
    choice = ckpts.latest_verified(str(tmp_path / "old"))
    assert choice.chosen.step == 8 and choice.unverified
    assert "cannot be verified" in choice.lines()[0]
