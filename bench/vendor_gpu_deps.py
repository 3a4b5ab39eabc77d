#!/usr/bin/env python3
"""Vendor the pure-Python packages bench/gpu_check.py needs on the lent GPU machine into bench/.vendor.

That machine has Python 3.12 with torch (CUDA), transformers, accelerate, peft, triton, numpy, pandas
and pyarrow, but no network and none of: trl, datasets, liger-kernel, hydra-core, omegaconf (and
raysft's transformers minimum is newer than its copy). This script downloads their wheels from PyPI
here (``pip download``, pure-Python wheels only; antlr4's runtime exists only as an sdist and is built
into a wheel), at the versions installed on this machine where there are any, so the GPU runs what
the tests here ran. gpu_check.py unpacks them to /tmp and puts them first on ``sys.path``.

    python bench/vendor_gpu_deps.py          # writes bench/.vendor/*.whl (ignored by git)

The folder must travel with the tree (the device tool's ``carry``; its limit is 64 MiB in all).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

VENDOR = Path(__file__).resolve().parent / ".vendor"
# name -> version used when it is not installed here. Each is pure Python.
PACKAGES = {
    "liger-kernel": "0.8.5",        # the `gpu` extra's minimum (pyproject.toml)
    "trl": None,                    # the fused LM head (trl.trainer.utils.add_fused_lm_head)
    "datasets": None,               # imported by trl.trainer.utils (pandas, pyarrow, xxhash are there)
    "dill": None,
    "multiprocess": None,           # datasets' own needs that the GPU machine lacks
    "transformers": None,           # raysft needs >= 5.23; the GPU machine has 5.17
    "peft": None,                   # imported by trl when present: the version tested with this transformers
    "hydra-core": None,
    "omegaconf": None,              # raysft.config (composition of the recipe)
}
SDIST_ONLY = {"antlr4-python3-runtime": "4.9.3"}  # hydra / omegaconf's parser runtime: built into a wheel here
MAX_MIB = 40


def pin(name: str, default: str | None) -> str:
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        if default is None:
            sys.exit(f"{name} is not installed here and has no default version: pip install -e '.[test]' first")
        return f"{name}=={default}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    args = p.parse_args()
    VENDOR.mkdir(exist_ok=True)
    for old in VENDOR.glob("*.whl"):
        old.unlink()
    pins = [pin(n, v) for n, v in PACKAGES.items()]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", args.python_version,
                          "--implementation", "py", "--abi", "none", "--platform", "any", "-d", str(VENDOR), *pins],
                   check=True)
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(VENDOR), *(f"{n}=={v}" for n, v in SDIST_ONLY.items())],
                   check=True)
    wheels = sorted(VENDOR.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {VENDOR}")
    if size > MAX_MIB:
        print(f"more than {MAX_MIB} MiB: the tree must stay under 64 MiB to travel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
