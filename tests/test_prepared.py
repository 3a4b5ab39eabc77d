"""Prepare once (raysft/data/prepared.py, raysft/data/shards.py): the prepared set's format, its
fingerprint, reuse and invalidation, and a prepare killed midway. Training that reads the set
directly is checked where runs are shared: every epoch a permutation of the packed rows, resumed at
an epoch boundary (test_resume, conftest.grown_run), and no actor but Ray Train's needed once
training starts (test_resume's SIGKILL run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose
from faults import flip_bytes

from raysft import assets
from raysft.config import derived
from raysft.data import shards
from raysft.data.pipeline import PrepareUnit, build_spec
from raysft.data.prepared import fingerprint, fingerprint_inputs, open_prepared, prepare
from raysft.storage import checksums
from raysft.storage.rundir import Storage

TOKENIZER = assets.resolve("bundled:smollm3")
SAMPLE = Path(assets.resolve("bundled:data/smoltalk2-sample"))


def _fp(*overrides: str) -> str:
    cfg = compose(*overrides)
    return fingerprint(fingerprint_inputs(build_spec(cfg.data, TOKENIZER)))


# ----------------------------------------------------------------------------- format (no Ray)


def test_a_shard_reads_back_exactly_and_loads_with_datasets(tmp_path):
    import datasets

    cfg = compose()
    spec = build_spec(cfg.data, TOKENIZER)
    prep = PrepareUnit(spec)
    unit = spec.unit_plan().units("train")[0]
    columns, stats = prep.prepare(unit)
    uri = str(tmp_path / "train" / "unit-00000.parquet")
    n, crc = shards.write_shard(uri, columns, stats, cfg.data.max_length)
    assert n == len(columns["input_ids"]) > 1
    assert crc == checksums.of_file(uri)  # the manifest's checksum is the file's
    assert shards.shard_stats(uri) == json.loads(json.dumps(stats))
    assert not list(tmp_path.rglob("*.tmp-*"))  # written aside, then renamed

    rows = shards.PreparedRows({"train": [(uri, n)]}, cfg.data.max_length)
    back = rows.read("train", np.arange(n)[::-1])
    for c in shards.COLUMNS:
        np.testing.assert_array_equal(back[c], np.asarray(columns[c])[::-1], err_msg=c)

    ds = datasets.load_dataset("parquet", data_files=uri, split="train")
    assert ds.num_rows == n and set(ds.column_names) == set(shards.COLUMNS)
    assert ds[3]["input_ids"] == list(np.asarray(columns["input_ids"][3]))


def test_eval_rows_are_read_once_and_evaluate_with_storage_down(s3, tmp_path):
    """A worker reads its share of the eval rows from S3 when it starts; with the link cut (the
    test's proxy refuses every connection) every later evaluation still gets the same batches."""
    from raysft.storage import files, retry
    from raysft.train.batches import EvalBatches

    cfg = compose()
    spec = build_spec(cfg.data, TOKENIZER)
    unit = spec.unit_plan().units("train")[0]
    columns, stats = PrepareUnit(spec).prepare(unit)
    uri = f"s3://{s3.bucket}/eval-once/eval/unit-00000.parquet"
    n, crc = shards.write_shard(uri, columns, stats, cfg.data.max_length)
    assert checksums.stored(uri) == crc  # S3 kept the CRC32 it checked on receipt (one HEAD)
    rows = shards.PreparedRows({"eval": [(uri, n)]}, cfg.data.max_length)
    retry.configure(2)
    try:
        share = EvalBatches(rows, rank=1, world=2, batch_size=2, timeout_s=30)
        s3.proxy.down()
        first, again = list(share), list(share)
        with pytest.raises(retry.StorageUnavailableError):  # storage is really down
            files.read_bytes(uri)
    finally:
        s3.proxy.up()
        retry.configure(600)
    assert share.in_memory is not None and len(first) == (n // 2 + 1) // 2
    want = np.asarray(columns["input_ids"])[1:2 * (n // 2):2]  # rank 1 of 2: rows 1, 3, 5, ...
    np.testing.assert_array_equal(np.concatenate([b["input_ids"].reshape(-1, cfg.data.max_length) for b in first]), want)
    assert all(a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a) for a, b in zip(first, again))


def test_consumed_positions_are_a_prefix_of_the_global_order_for_any_world_size():
    rows = shards.PreparedRows({"train": [("unused", 10)]}, 8)

    def positions(world: int, batch: int, steps: int, ga: int, start: int = 0) -> list[int]:
        out = []
        for r in range(world):
            s = shards.RowStream(rows, rank=r, world=world, batch=batch, start=start, seed=1, timeout_s=1)
            out += [int(p) for k in range(steps * ga) for p in s.positions(k)]
        return sorted(out)

    assert positions(1, 4, 3, 1) == positions(2, 2, 3, 1) == positions(4, 1, 3, 1) == list(range(12))
    assert positions(2, 1, 2, 2, start=12) == list(range(12, 20))  # a resumed run continues the prefix


def test_every_epoch_is_a_seeded_permutation_of_the_packed_rows():
    e0, e1 = shards.train_order(1000, 42, 0), shards.train_order(1000, 42, 1)
    assert sorted(e0) == sorted(e1) == list(range(1000))
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, shards.train_order(1000, 42, 0))


def test_fingerprint_changes_with_what_changes_tokens_only(tmp_path):
    base = _fp()
    assert _fp("trainer.learning_rate=1e-2", "scaling.num_workers=1", "trainer.max_steps=7",
               "trainer.num_train_epochs=3", "data.max_bad_fraction=0.5") == base
    assert _fp("data.max_length=256") != base
    assert _fp("data.chat_template=mid") != base
    assert _fp("data.packing_strategy=wrapped") != base
    assert _fp("data.loss=all") != base
    assert _fp("data.dedupe=false") != base
    assert _fp("data.dataset_mixture.seed=7") != base
    assert _fp("data.dataset_mixture.datasets.0.weight=0.03") != base

    # A source file rewritten in place gives a new fingerprint.
    f = tmp_path / "rows.parquet"
    shutil.copy(next(SAMPLE.glob("SFT/gsm8k_think-*.parquet")), f)
    src = f"data.dataset_mixture.datasets=[{{path:'{f}',weight:0.01}}]"
    before = _fp(src)
    assert _fp(src) == before
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert _fp(src) != before


# ----------------------------------------------------------------------------- prepare on Ray

PREP = ["data.window_rows=16", "data.dataset_mixture.datasets.0.weight=0.3"]  # ~40 units: a prepare takes seconds


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_prepare_is_never_used_and_the_next_one_resumes_it(ray_cluster, tmp_path):
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "raysft", "data", "prepare", f"storage.path={killed_root}", *PREP],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(killed_root.glob("prepared/*/train/unit-*.parquet")):
            assert proc.poll() is None and time.monotonic() < deadline, "the prepare ended before it wrote a shard"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # from outside, midway
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    (set_dir,) = (killed_root / "prepared").iterdir()
    written = len(list(set_dir.glob("train/*.parquet")))
    assert not (set_dir / "manifest.json").exists()
    with pytest.raises(ValueError, match="not a complete prepared set"):
        open_prepared(str(set_dir))

    cfg = compose(f"storage.path={killed_root}", *PREP)
    spec = build_spec(cfg.data, TOKENIZER)
    resumed = prepare(spec, Storage.at(str(killed_root)), **derived.data_resources(cfg.scaling))
    clean = prepare(build_spec(compose(f"storage.path={clean_root}", *PREP).data, TOKENIZER, date=spec.date),
                    Storage.at(str(clean_root)), **derived.data_resources(cfg.scaling))
    assert resumed.uri == str(set_dir) and not resumed.reused and resumed.fingerprint == clean.fingerprint
    units = len(resumed.manifest["shards"]["train"])
    assert 0 < written < units, "the kill did not land midway"
    a, b = resumed.rows(), clean.rows()
    n = a.num_rows("train")
    assert n == b.num_rows("train") > 0
    for c in shards.COLUMNS:
        np.testing.assert_array_equal(a.read("train", np.arange(n))[c], b.read("train", np.arange(n))[c], err_msg=c)
    assert resumed.manifest["stats"] == clean.manifest["stats"]
    assert resumed.manifest["checksums"] == clean.manifest["checksums"]  # byte-identical shards
    # The next prepare of the same config reuses the set without running the pipeline.
    again = prepare(spec, Storage.at(str(killed_root)), **derived.data_resources(cfg.scaling))
    assert again.reused and again.uri == resumed.uri

    # 2 KB flipped in one shard at rest (same size): never trained on; that shard alone is prepared
    # again, to the same bytes, and the set is whole again.
    shard = set_dir / "train" / "unit-00001.parquet"
    others = {p: p.stat().st_mtime_ns for p in set_dir.glob("*/*.parquet") if p != shard}
    good = shard.read_bytes()
    shard.write_bytes(flip_bytes(good, 2048))
    assert shard.stat().st_size == len(good) and shard.read_bytes() != good
    repaired = prepare(spec, Storage.at(str(killed_root)), **derived.data_resources(cfg.scaling))
    assert not repaired.reused and shard.read_bytes() == good
    assert {p: p.stat().st_mtime_ns for p in others} == others  # only the corrupt one was prepared again
    assert repaired.manifest["checksums"] == clean.manifest["checksums"]
