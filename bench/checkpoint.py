"""Checkpoint cost against an S3-compatible server (moto's, started here): save + upload and
restore of a ~100M-parameter model's full training checkpoint (weights, AdamW state, scheduler, RNG)
through raysft's path, side by side with a plain boto3 transfer of the same bytes (what
``aws s3 cp --recursive`` does: s3transfer, 10 files in flight), and the training stall.
Not a test: numbers only.

    python bench/checkpoint.py [--hidden 512] [--layers 8] [--repeats 2]

raysft's path, step by step as a worker runs it:
  save      HF Trainer._save_checkpoint (what save_steps triggers) into the worker's scratch dir
  manifest  raysft's per-rank manifest (sizes of every file, written last)
  upload    raysft's upload (``raysft.storage.files.upload_dir``: s3transfer), which
            ``ray.train.report(..., checkpoint_upload_mode=ASYNC, checkpoint_upload_fn=...)`` runs on
            a background thread while training goes on
  restore   download (``raysft.storage.files.download_dir``) + manifest verification
For reference, Ray Train's default upload (``_pyarrow_fs_copy_files``: single-threaded to S3).
The training stall per checkpoint is save + manifest (the upload overlaps the next steps).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    return proc, os.environ["AWS_ENDPOINT_URL"]


def trained_trainer(hidden: int, layers: int, out: str):
    """A SmolLM3-architecture model after one AdamW step (so the optimizer state exists)."""
    import datasets
    from transformers import Trainer, TrainingArguments

    from raysft.config import compose
    from raysft.train import model as models

    # The real SmolLM3 architecture config, scaled as the tiny test model is (raysft's own builder).
    cfg = compose([f"model.config_overrides.hidden_size={hidden}", f"model.config_overrides.num_hidden_layers={layers}",
                   f"model.config_overrides.intermediate_size={hidden * 4}", "model.config_overrides.num_attention_heads=8",
                   "model.config_overrides.num_key_value_heads=4"])
    model = models.build_model(cfg.model, models.resolve_accel(cfg.model, bf16=False), seed=0)
    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4] * 8] * 2, "labels": [[1, 2, 3, 4] * 8] * 2})
    args = TrainingArguments(output_dir=out, max_steps=1, per_device_train_batch_size=2, save_strategy="no",
                             use_cpu=True, report_to=[], logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return trainer, sum(p.numel() for p in model.parameters())


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def boto3_upload(client, bucket: str, local: Path, prefix: str) -> None:
    files = [p for p in local.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(10) as pool:  # aws s3 cp's default max_concurrent_requests
        list(pool.map(lambda p: client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local)}"), files))


def boto3_download(client, bucket: str, prefix: str, local: Path) -> None:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]

    def get(key: str) -> None:
        dest = local / key[len(prefix) + 1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(dest))

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(get, keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    import boto3
    from ray.train.v2._internal.execution.storage import _pyarrow_fs_copy_files

    from raysft.storage import files
    from raysft.storage import checkpoints as ckpts

    proc, endpoint = start_moto()
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.2)
        scratch = tempfile.mkdtemp(prefix="raysft-bench-ckpt-")
        trainer, n_params = trained_trainer(a.hidden, a.layers, scratch)
        rows = {k: [] for k in ("save", "manifest", "upload", "ray_upload", "boto3_up", "restore", "boto3_down")}
        size = 0
        for i in range(a.repeats):
            trainer.state.global_step = i + 1
            t = time.perf_counter()
            trainer._save_checkpoint(trainer.model, trial=None)
            local = Path(scratch) / f"checkpoint-{i + 1}"
            rows["save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ckpts.write_manifest(local, 0, 1, {"global_step": i + 1})
            rows["manifest"].append(time.perf_counter() - t)
            size = dir_bytes(local)

            uri = f"s3://bench/raysft/run/checkpoint_{i}"
            t = time.perf_counter()
            files.upload_dir(local, uri)
            rows["upload"].append(time.perf_counter() - t)
            fs, path = files.filesystem(f"s3://bench/ray-default/checkpoint_{i}")
            t = time.perf_counter()
            fs.create_dir(path)
            _pyarrow_fs_copy_files(str(local), path, destination_filesystem=fs)
            rows["ray_upload"].append(time.perf_counter() - t)
            t = time.perf_counter()
            boto3_upload(client, "bench", local, f"boto3/checkpoint_{i}")
            rows["boto3_up"].append(time.perf_counter() - t)

            t = time.perf_counter()
            got = files.download_dir(uri, tempfile.mkdtemp(prefix="raysft-bench-restore-"))
            ok, why = ckpts.verify(got)
            rows["restore"].append(time.perf_counter() - t)
            assert ok, why
            t = time.perf_counter()
            boto3_download(client, "bench", f"boto3/checkpoint_{i}", Path(tempfile.mkdtemp(prefix="raysft-bench-b3-")))
            rows["boto3_down"].append(time.perf_counter() - t)
    finally:
        proc.terminate()

    med = {k: statistics.median(v) for k, v in rows.items()}
    mb = size / 1e6
    print(f"model: {n_params / 1e6:.1f}M parameters; checkpoint {mb:,.0f} MB (weights, AdamW state, scheduler, RNG); "
          f"median of {a.repeats}")
    print(f"{'step':<34}{'raysft s':>10}{'boto3 s':>10}{'ratio':>8}")
    print(f"{'save (HF Trainer, local)':<34}{med['save']:>10.2f}")
    print(f"{'manifest':<34}{med['manifest']:>10.3f}")
    print(f"{'upload (raysft vs boto3)':<34}{med['upload']:>10.2f}{med['boto3_up']:>10.2f}"
          f"{med['upload'] / med['boto3_up']:>8.2f}")
    print(f"{'  Ray Train default upload':<34}{med['ray_upload']:>10.2f}{med['boto3_up']:>10.2f}"
          f"{med['ray_upload'] / med['boto3_up']:>8.2f}")
    sp = med["save"] + med["manifest"] + med["upload"]
    print(f"{'save+upload vs boto3 upload':<34}{sp:>10.2f}{med['boto3_up']:>10.2f}{sp / med['boto3_up']:>8.2f}")
    print(f"{'restore (download+verify)':<34}{med['restore']:>10.2f}{med['boto3_down']:>10.2f}"
          f"{med['restore'] / med['boto3_down']:>8.2f}")
    stall = med["save"] + med["manifest"]
    print(f"training stall per checkpoint: {stall:.2f} s (save + manifest; the upload runs asynchronously), "
          f"{sp:.2f} s if it were synchronous; upload {mb / med['upload']:.0f} MB/s vs boto3 {mb / med['boto3_up']:.0f} MB/s")


if __name__ == "__main__":
    main()
