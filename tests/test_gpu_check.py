"""bench/gpu_check.py: the dry run (CPU, tiny model, two short lengths) checks its own outputs and
writes the file ``raysft plan`` reads; ``plan.throughput_file`` then sets the plan's throughput and
memory correction and says so; on a CUDA machine the real check runs briefly (marker ``gpu``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compose

from raysft.cli import main
from raysft.commands import estimates as est
from raysft.commands import measured
from raysft.commands import plan as planner

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _check(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    return proc, time.perf_counter() - t


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    proc, seconds = _check("--dry-run", "--no-vendor", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout, out, seconds


# ----------------------------------------------------------------------------- the dry run


def test_dry_run_checks_itself_and_reports_every_section(dry_run):
    r, stdout, _, seconds = dry_run
    assert r["schema"] == measured.SCHEMA and r["dry_run"] and r["ok"] and r["failures"] == []
    assert r["device"]["cuda"] is False and r["model"]["params"] == 4_153_632 and r["lengths"] == [128, 256]
    assert r["recipe"]["gradient_checkpointing"] is True  # as recipe=smollm3_sft sets it
    sec = r["sections"]
    for name in ("equivalence", "throughput", "memory"):
        assert sec[name]["seconds"] >= 0
    (eq,) = sec["equivalence"]["results"]
    tol = sec["equivalence"]["tolerance"]
    assert eq["attn"] == "sdpa" and eq["loss_path"] == "plain" and eq["ok"]
    assert eq["seq_loss_rel"] <= tol["seq_loss_rel"] and eq["grad_rel_l2"] <= tol["grad_rel_l2"]
    assert eq["control"]["grad_rel_l2"] > 3 * tol["grad_rel_l2"]  # the contaminated row is caught
    assert sec["equivalence"]["loss_paths"]["ok"]
    runs = sec["throughput"]["results"]
    assert [(t["max_length"], t["liger"]) for t in runs] == [(128, False), (256, False)]
    for t in runs:
        assert t["tokens_per_s"] > 0 and t["tflops"] > 0 and 0 < t["mfu"] and t["step_s"] > 0
        assert t["flops_per_token"] == est.flops_per_token(est.ModelShape.from_config(est.load_model_config(
            "bundled:smollm3", init="random", config_overrides=dict(compose().model.config_overrides))[0]),
            mean_seq_len=t["max_length"], gradient_checkpointing=True)
    assert any("liger" in s["reason"] for s in sec["throughput"]["skipped"])  # no CUDA: said, not silent
    for m in sec["memory"]["results"]:
        assert m["peak_gb"] > 0 and m["states_gb"] > 0 and m["activations_gb"] > 0
        assert m["estimate_gb"]["total"] > 0 and m["ratio"] > 0 and m["activation_ratio"] > 0
        assert m["states_ratio"] == pytest.approx(1.0, abs=0.01)  # fp32 + AdamW: 16 bytes/param, as estimated
    for line in ("[1] packed vs unpacked", "[2] throughput", "[3] memory vs raysft plan", "all checks passed"):
        assert line in stdout
    print(f"dry run: {seconds:.1f} s wall")


def test_the_dry_run_file_is_what_plan_reads(dry_run, tmp_path, capsys):
    _, _, path, _ = dry_run
    m = measured.load(str(path))
    assert m.device == "cpu" and not m.cuda and [r["max_length"] for r in m.runs] == [128, 256]
    assert main(["plan", "recipe=smollm3_sft", "model=tiny_smollm3", f"plan.throughput_file={path}",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"measured on cpu, {m.date}" in out and "derived:" not in out
    assert "max_length 256 (the nearest measured to max_length 65,536)" in out and "this config runs on GPUs: used as is" in out
    p = json.loads((tmp_path / "plan.json").read_text())
    assert p["time"]["measured"]["max_length"] == 256
    assert p["memory"]["measured"]["applied"] is False  # CPU measurement, GPU config: not corrected


# ----------------------------------------------------------------------------- plan with a GPU measurement


SMOLLM3_PARAMS = 3_075_098_624
LENGTHS = (4096, 16384, 32768, 65536)


def _gpu_file(path: Path, *, params: int = SMOLLM3_PARAMS) -> Path:
    """A result in the format gpu_check.py writes on a GPU (only the fields plan reads, plus a few)."""
    tps = {False: {4096: 9000.0, 16384: 7000.0, 32768: 5500.0, 65536: 4000.0},
           True: {4096: 9500.0, 16384: 7400.0, 32768: 5800.0, 65536: 4200.0}}
    throughput = [{"max_length": L, "liger": lig, "attn": "sdpa", "mean_seq_len": L, "tokens_per_s": tps[lig][L],
                   "mfu": 0.4, "step_s": L / tps[lig][L]} for lig in (False, True) for L in LENGTHS]
    memory = [{"max_length": L, "liger": lig, "peak_gb": 40.0, "ratio": 0.7, "states_ratio": 0.5,
               "activation_ratio": 0.8 if lig else 1.1} for lig in (False, True) for L in LENGTHS]
    path.write_text(json.dumps({
        "schema": measured.SCHEMA, "dry_run": False, "date": "2026-11-30T10:00:00",
        "device": {"name": "NVIDIA H200", "accelerator_type": "H200", "cuda": True, "peak_tflops": 989.0},
        "model": {"params": params}, "recipe": {"gradient_checkpointing": True},
        "sections": {"throughput": {"results": throughput, "skipped": []}, "memory": {"results": memory}}}))
    return path


def test_plan_uses_a_gpu_measurement_and_says_so(tmp_path, capsys):
    f = _gpu_file(tmp_path / "h200.json")
    assert main(["plan", "recipe=smollm3_sft", f"plan.throughput_file={f}", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "measured on NVIDIA H200, 2026-11-30" in out and "derived:" not in out
    assert "4,200 tokens/s at max_length 65,536, liger on, sdpa" in out
    assert "corrected by measurement" in out and "activations x0.80" in out
    p = json.loads((tmp_path / "p" / "plan.json").read_text())

    # Independent arithmetic: the measured rate, rescaled by FLOPs/token from one 65,536-token sequence to the
    # data's token-weighted mean length (H100 and H200 have the same peak).
    cfg = compose("recipe=smollm3_sft")
    shape = est.ModelShape.from_config(est.load_model_config(cfg.model.name_or_path)[0])
    d = p["data"]["token_weighted_mean_seq_len"]
    fpt = lambda n: est.flops_per_token(shape, mean_seq_len=n, gradient_checkpointing=True)  # noqa: E731
    assert p["time"]["tokens_per_s_per_gpu"] == round(4200 * fpt(65536) / fpt(d))
    assert p["time"]["measured"]["liger"] is True and p["time"]["measured"]["scale"] == pytest.approx(
        fpt(65536) / fpt(d), abs=1e-4)

    # Memory: ZeRO-3 shards the states, so only the activation terms take the measured ratio.
    e = p["memory"]["estimate_gb"]
    acts = e["activation_checkpoints"] + e["layer_activations"] + e["loss_head"]
    mc = p["memory"]["measured"]
    assert mc["applied"] and mc["states_ratio"] is None
    assert mc["total_gb"] == pytest.approx(e["total"] - 0.2 * acts, abs=2e-3)
    assert p["memory"]["fraction"] == pytest.approx(mc["total_gb"] / 80, abs=1e-3)


def test_plan_takes_the_nearest_measured_length_and_the_config_s_liger(tmp_path):
    f = _gpu_file(tmp_path / "h200.json")
    cfg = compose("recipe=smollm3_sft", "data.max_length=20000", "model.use_liger_kernel=false",
                  "deepspeed=none", "scaling=gpu_1", "scaling.accelerator_type=H200", "plan.global_batch_rows=null",
                  f"plan.throughput_file={f}")
    p = planner.build_plan(cfg)
    tm, mc = p["time"]["measured"], p["memory"]["measured"]
    assert (tm["max_length"], tm["liger"]) == (16384, False)
    assert "max_length 16,384 (the nearest measured to max_length 20,000)" in p["time"]["throughput_basis"]
    # No ZeRO, no PEFT: the measured kind, so the model states take their ratio too.
    e = p["memory"]["estimate_gb"]
    states = e["params"] + e["grads"] + e["optimizer"]
    acts = e["activation_checkpoints"] + e["layer_activations"] + e["loss_head"]
    assert mc["states_ratio"] == 0.5
    assert mc["total_gb"] == pytest.approx(e["total"] - 0.5 * states + 0.1 * acts, abs=2e-3)


def test_plan_refuses_a_measurement_it_cannot_use(tmp_path, capsys):
    other = _gpu_file(tmp_path / "other.json", params=1_000_000)
    assert main(["plan", "recipe=smollm3_sft", f"plan.throughput_file={other}", "--out", str(tmp_path / "a")]) == 2
    assert "measured a model of 1,000,000 params" in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    assert main(["plan", "recipe=smollm3_sft", f"plan.throughput_file={missing}", "--out", str(tmp_path / "b")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert main(["plan", "recipe=smollm3_sft", f"plan.throughput_file={tmp_path / 'x.json'}"]) == 2
    assert "is not a bench/gpu_check.py result" in capsys.readouterr().err
    assert main(["plan", "recipe=smollm3_sft", f"plan.throughput_file={other}", "plan.tokens_per_s_per_gpu=1000"]) == 2
    assert "not both" in capsys.readouterr().err


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.slow
def test_the_real_check_runs_briefly_on_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "gpu_check.json"
    proc, _ = _check("--lengths", "4096", "--steps", "1", "--budget-s", "240", "--out", str(out), timeout=600)
    r = json.loads(out.read_text())
    assert proc.returncode == 0 and r["ok"], proc.stdout[-4000:] + proc.stderr[-4000:]
    assert r["device"]["cuda"] and r["model"]["dtype"] == "bfloat16" and r["model"]["params"] == SMOLLM3_PARAMS
    assert r["sections"]["throughput"]["results"][0]["tokens_per_s"] > 0
