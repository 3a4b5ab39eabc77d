"""``raysft upload SRC DEST``: copy a folder a run kept on a node (the final model, or a checkpoint,
when storage stayed unreachable) to where the run would have written it, local or ``s3://``."""

from __future__ import annotations

import argparse
import os
import sys

from raysft.storage import files, retry


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
    try:
        files.upload_dir(args.src, args.dest)
    except retry.StorageUnavailableError as e:
        print(f"raysft: error: {e} — check the storage endpoint and credentials (AWS_*), then run this again",
              file=sys.stderr)
        return 4
    print(f"raysft: uploaded {args.src} to {args.dest}")
    return 0
