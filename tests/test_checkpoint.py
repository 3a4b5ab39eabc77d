"""Checkpoints in object storage (a real S3-compatible server: moto), completeness, resume by name."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import compose

from raysft.train import checkpoint as ckpts


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_bucket():
    """moto's S3 server on 127.0.0.1, used through the same code path as AWS (AWS_* environment)."""
    import boto3

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    for _ in range(100):
        try:
            client.create_bucket(Bucket="raysft-test")
            break
        except Exception:
            time.sleep(0.2)
    yield client, "raysft-test"
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _keys(client, bucket, prefix):
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_checkpoints_go_to_s3_and_a_rerun_resumes(ray_cluster, s3_bucket):
    from raysft.launch import driver

    client, bucket = s3_bucket
    common = [f"storage.path=s3://{bucket}/runs", "storage.name=ck", "trainer.save_strategy=steps",
              "trainer.save_steps=2", "trainer.eval_steps=null", "monitor.sample_prompts=[]"]
    driver.run(compose(*common, "trainer.max_steps=4"))
    keys = _keys(client, bucket, "runs/ck/")
    assert any(k.endswith("model/model.safetensors") for k in keys) and "runs/ck/metrics.jsonl" in keys
    ckpt_manifests = [k for k in keys if "checkpoint_" in k and "raysft_manifest_rank" in k]
    assert len(ckpt_manifests) == 2  # num_to_keep=1: only the step-4 checkpoint, one manifest per rank
    first = [json.loads(line) for line in client.get_object(Bucket=bucket, Key="runs/ck/metrics.jsonl")["Body"].read().decode().splitlines()]
    tokens_at_4 = [m["num_tokens"] for m in first if m.get("global_step") == 4 and "num_tokens" in m][0]

    # Same name, longer run: Ray Train restores the run and hands the step-4 checkpoint back.
    driver.run(compose(*common, "trainer.max_steps=6"))
    second = [json.loads(line) for line in client.get_object(Bucket=bucket, Key="runs/ck/metrics.jsonl")["Body"].read().decode().splitlines()]
    steps = [m["global_step"] for m in second if "loss" in m]
    assert steps == [5, 6], steps  # continued, not restarted
    tokens_at_5 = [m["num_tokens"] for m in second if m.get("global_step") == 5 and "num_tokens" in m][0]
    assert tokens_at_5 > tokens_at_4  # the token count continues across the resume
