"""``raysft upload SRC DEST``: copy a folder a run kept on a node (the final model, or a checkpoint,
when storage stayed unreachable) to where the run would have written it, local or ``s3://``."""

from __future__ import annotations

import argparse
import os
import sys

from pathlib import Path

from raysft.storage import checkpoints as ckpts
from raysft.storage import checksums, files, retry


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="raysft upload", description=__doc__.splitlines()[0])
    p.add_argument("src", help="a local folder, e.g. the one a failed run named")
    p.add_argument("dest", help="its place in storage, e.g. s3://bucket/runs/<run>/model")
    p.add_argument("--retry-timeout-s", type=float, default=120.0, help="how long to retry through an outage")
    args = p.parse_args(argv)
    if not os.path.isdir(args.src):
        print(f"raysft: error: {args.src} is not a folder — pass the folder a run named in its last line", file=sys.stderr)
        return 2
    retry.configure(args.retry_timeout_s)
    # The folder against its manifest first (a kept checkpoint or model has one), then what storage
    # holds against the same checksums once it is there.
    if any(Path(args.src).glob("raysft_manifest_rank*.json")):
        ok, why = ckpts.verify(args.src)
        if not ok:
            print(f"raysft: error: {args.src} fails its check ({why}): it is not uploaded", file=sys.stderr)
            return 7
    expected = ckpts.manifest_checksums(args.src) or {p.relative_to(args.src).as_posix(): checksums.of_file(p)
                                                      for p in Path(args.src).rglob("*") if p.is_file()}
    try:
        files.upload_dir(args.src, args.dest, known=expected)
        bad = checksums.compare(args.dest, expected)
    except retry.StorageUnavailableError as e:
        print(f"raysft: error: {e} — check the storage endpoint and credentials (AWS_*), then run this again",
              file=sys.stderr)
        return 4
    if bad:
        print(f"raysft: error: {args.dest} does not hold what was sent ({bad[0]}): run this again", file=sys.stderr)
        return 7
    print(f"raysft: uploaded {args.src} to {args.dest} ({len(expected)} files, checksums verified)")
    return 0
