"""Preflight: what can be known before Ray starts stops the run before Ray starts, in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, compose

from raysft.commands import fits
from raysft.run import preflight

SHRUNK = ["recipe=smollm3_sft", "model=tiny_smollm3", "data=smoltalk2_sft_local", "scaling=local_cpu", "storage=local",
          "deepspeed=none", "trainer.report_to=[none]"]


def test_a_run_that_cannot_fit_in_memory_is_refused_with_the_override_that_fits():
    with pytest.raises(fits.DoesNotFitError) as e:
        fits.check_memory(compose(*SHRUNK))  # 65,536-token rows, 128k vocabulary, fp32 logits on CPU
    msg = str(e.value)
    assert "GB" in msg and "data.max_length=" in msg and "would fit" in msg
    fit = int(msg.split("data.max_length=")[-1].split()[0])
    fits.check_memory(compose(*SHRUNK, f"data.max_length={fit}"))  # the suggested override does fit
    fits.check_memory(compose())  # the default job fits


def test_unreachable_storage_is_refused_before_ray_starts(s3, monkeypatch):
    monkeypatch.setattr(preflight, "PROBE_TIMEOUT_S", 2.0)
    s3.proxy.down()
    try:
        with pytest.raises(preflight.PreflightError, match=r"storage.path=s3://raysft-test/runs is not reachable .*storage=local"):
            preflight.check_storage(compose(f"storage.path=s3://{s3.bucket}/runs"))
    finally:
        s3.proxy.up()
    preflight.check_storage(compose(f"storage.path=s3://{s3.bucket}/runs"))
    with pytest.raises(preflight.PreflightError, match="cannot be written"):
        preflight.check_storage(compose("storage.path=s3://no-such-bucket-raysft/runs"))


def test_the_readme_recipe_as_is_stops_in_one_line_without_starting_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-m", "raysft", *SHRUNK, f"storage.path={tmp_path}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("raysft: error: ") and "data.max_length=" in lines[-1]
    assert "Traceback" not in p.stderr and "Started a local Ray" not in p.stdout + p.stderr
