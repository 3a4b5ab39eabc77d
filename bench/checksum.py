"""What checksums cost (issue #28): hash throughput per GB on these cores, and the training step stall
with checkpoint checksums on vs off.

    python bench/checksum.py [--gb 1] [--ckpt-mb 512] [--steps 60]

1. Throughput: CRC32 (zlib, what raysft uses and S3 computes) and SHA-256 (hashlib) of a buffer in
   memory, one thread; and ``checksums.of_file`` of a file of that size (page cache).
2. The stall: a training-like step (a fixed matmul workload on the main thread, 1 intra-op thread,
   as a CPU worker runs) with a checkpoint of ``--ckpt-mb`` written every 10 steps; its manifest
   written with checksums (on) or with sizes only (off), on a background thread as raysft's upload
   thread does (``RayCheckpointCallback._upload``). Printed: the mean step, the ratio on/off, and
   what the same manifest would have cost had it been written on the training thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from raysft.storage import checkpoints as ckpts  # noqa: E402
from raysft.storage import checksums  # noqa: E402


def throughput(gb: float) -> dict[str, float]:
    buf = os.urandom(int(gb * (1 << 30)))
    out = {}
    for name, fn in (("crc32", zlib.crc32), ("sha256", lambda b: hashlib.sha256(b).digest())):
        t = time.perf_counter()
        fn(buf)
        out[name] = gb / (time.perf_counter() - t)
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(buf)
    try:
        checksums.of_file(f.name)  # warm the page cache
        t = time.perf_counter()
        checksums.of_file(f.name)
        out["crc32 of a file (page cache)"] = gb / (time.perf_counter() - t)
    finally:
        os.unlink(f.name)
    return out


def _sizes_only(ckpt: Path) -> None:
    """The manifest as raysft wrote it before checksums: sizes alone."""
    entries = {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    (ckpt / ckpts.manifest_name(0)).write_text(json.dumps({"rank": 0, "world_size": 1, "files": entries}))


def stall(ckpt_mb: int, steps: int, with_checksums: bool) -> tuple[list[float], float]:
    """(step times, seconds the manifest took on its thread, summed)."""
    torch.set_num_threads(1)
    a, b = torch.randn(768, 768), torch.randn(768, 768)
    work = Path(tempfile.mkdtemp(prefix="rsft-bench-ckpt-"))
    manifest_s, threads, times = [0.0], [], []
    try:
        for step in range(steps):
            t = time.perf_counter()
            for _ in range(20):
                a = torch.tanh(a @ b)
            times.append(time.perf_counter() - t)
            if step % 10 == 5:  # a checkpoint: the local save, then its manifest on the upload thread
                d = work / f"checkpoint-{step}"
                d.mkdir()
                (d / "model.safetensors").write_bytes(os.urandom(ckpt_mb << 20))

                def manifest(d=d):
                    t0 = time.perf_counter()
                    ckpts.write_manifest(d, 0, 1) if with_checksums else _sizes_only(d)
                    manifest_s[0] += time.perf_counter() - t0

                threads.append(threading.Thread(target=manifest))
                threads[-1].start()
        for th in threads:
            th.join()
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return times, manifest_s[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--ckpt-mb", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    print(f"cores: {os.cpu_count()}, torch threads in the step: 1")
    for name, gbs in throughput(args.gb).items():
        print(f"{name:32s} {gbs:6.2f} GB/s  ({1 / gbs:.2f} s per GB)")
    off, off_s = stall(args.ckpt_mb, args.steps, False)
    on, on_s = stall(args.ckpt_mb, args.steps, True)
    saves = len(range(5, args.steps, 10))
    print(f"\nstep with a {args.ckpt_mb} MB checkpoint every 10 steps ({saves} saves), manifest on the upload thread:")
    print(f"  checksums off: mean {statistics.mean(off):.4f} s, median {statistics.median(off):.4f} s")
    print(f"  checksums on:  mean {statistics.mean(on):.4f} s, median {statistics.median(on):.4f} s")
    print(f"  ratio on/off (mean step): {statistics.mean(on) / statistics.mean(off):.3f}")
    print(f"  manifest time per checkpoint: {on_s / saves:.3f} s with checksums, {off_s / saves:.4f} s sizes only "
          "(what each save would stall training if written on its thread)")


if __name__ == "__main__":
    main()
