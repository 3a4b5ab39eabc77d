"""A measurement file (the JSON ``bench/gpu_check.py`` writes) as ``raysft plan`` uses it:
``plan.throughput_file=<file>``. Pure (no torch, no Ray).

The file holds, per measured ``max_length`` and liger setting, tokens/s of a batch-1 training step
(one sequence of ``max_length`` tokens per row) and the peak memory beside ``estimates.memory_per_gpu``'s
figure for the same single-GPU config. The plan takes the entry at the nearest measured
``max_length`` (same liger setting when measured) and says which.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from raysft.commands import estimates as est

SCHEMA = "raysft.gpu_check/1"
"""The ``schema`` field of the file; bench/gpu_check.py writes it, ``load`` checks it."""


class MeasurementError(ValueError):
    """The file is missing, unreadable or not a gpu_check result; the message says which."""


@dataclass(frozen=True)
class Measurement:
    path: str
    device: str
    """``torch.cuda.get_device_name`` ("NVIDIA H200"), or "cpu" for a dry run."""
    accelerator_type: str | None
    """Its ``estimates.GPUS`` label, when known."""
    cuda: bool
    date: str
    params: int
    gradient_checkpointing: bool
    runs: list[dict[str, Any]]
    """One per measured (max_length, liger): ``max_length``, ``liger``, ``attn``, ``mean_seq_len``,
    ``tokens_per_s``, ``mfu`` and ``memory`` (the memory section's entry, or None)."""

    @property
    def label(self) -> str:
        return f"{self.device}, {self.date}"


def load(path: str) -> Measurement:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise MeasurementError(f"plan.throughput_file={path!r} cannot be read ({type(e).__name__}: {e}); point it "
                               f"at the JSON bench/gpu_check.py writes") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise MeasurementError(f"plan.throughput_file={path!r} is not a bench/gpu_check.py result (schema "
                               f"{d.get('schema') if isinstance(d, dict) else None!r}, expected {SCHEMA!r})")
    try:
        sections = d["sections"]
        memory = {(r["max_length"], r["liger"]): r for r in sections["memory"]["results"]}
        runs = [{**r, "memory": memory.get((r["max_length"], r["liger"]))} for r in sections["throughput"]["results"]
                if r.get("tokens_per_s")]
        m = Measurement(path=path, device=d["device"]["name"], accelerator_type=d["device"].get("accelerator_type"),
                        cuda=bool(d["device"]["cuda"]), date=str(d["date"])[:10], params=int(d["model"]["params"]),
                        gradient_checkpointing=bool(d["recipe"]["gradient_checkpointing"]), runs=runs)
    except (KeyError, TypeError) as e:
        raise MeasurementError(f"plan.throughput_file={path!r}: malformed gpu_check result (missing {e})") from None
    if not runs:
        raise MeasurementError(f"plan.throughput_file={path!r} has no throughput measurement (every length skipped?)")
    return m


def pick(m: Measurement, max_length: int, liger: bool) -> tuple[dict[str, Any], str]:
    """The run at the nearest measured ``max_length`` (log distance; ties: the longer), with the same
    liger setting when one was measured; and a phrase saying which."""
    same = [r for r in m.runs if r["liger"] == liger] or m.runs
    run = min(same, key=lambda r: (abs(math.log(r["max_length"] / max_length)), -r["max_length"]))
    where = "" if run["max_length"] == max_length else f" (the nearest measured to max_length {max_length:,})"
    return run, f"max_length {run['max_length']:,}{where}, liger {'on' if run['liger'] else 'off'}, {run['attn']}"


def throughput(m: Measurement, *, shape: est.ModelShape, max_length: int, liger: bool, mean_seq_len: float | None,
               gradient_checkpointing: bool, peft: bool, gpu: bool, accelerator_type: str | None) -> tuple[float, str, dict]:
    """(tokens/s per GPU, basis, details) from the measurement: the measured tokens/s, rescaled by
    FLOPs/token (``estimates.flops_per_token``, i.e. the measured MFU held) from the measured row
    (one ``max_length``-token sequence) to this config (the data's mean sequence length, its
    checkpointing and PEFT), and by peak TFLOP/s when the plan's GPU is another known one."""
    run, which = pick(m, max_length, liger)
    tps = float(run["tokens_per_s"])
    notes = []
    scale = 1.0
    if mean_seq_len:
        measured_fpt = est.flops_per_token(shape, mean_seq_len=run["mean_seq_len"],
                                           gradient_checkpointing=m.gradient_checkpointing)
        plan_fpt = est.flops_per_token(shape, mean_seq_len=mean_seq_len, gradient_checkpointing=gradient_checkpointing,
                                       peft=peft)
        scale = measured_fpt / plan_fpt
        if abs(scale - 1) > 0.005:
            notes.append(f"x{scale:.2f} for FLOPs/token at the data's mean sequence length {mean_seq_len:,.0f} "
                         f"(measured: {run['mean_seq_len']:,}-token sequences)")
    else:
        notes.append("data's mean sequence length unknown: not rescaled for it")
    gpus = est.GPUS
    if gpu != m.cuda:
        notes.append(f"measured on {m.device}, this config runs on {'GPUs' if gpu else 'CPU workers'}: used as is")
    elif gpu and accelerator_type and accelerator_type != m.accelerator_type:
        if m.accelerator_type in gpus and accelerator_type in gpus:
            peak = gpus[accelerator_type][1] / gpus[m.accelerator_type][1]
            scale *= peak
            notes.append(f"x{peak:.2f} for {accelerator_type}'s peak TFLOP/s vs {m.accelerator_type}'s" if peak != 1 else
                         f"{accelerator_type} and {m.accelerator_type} have the same peak TFLOP/s: not rescaled for the GPU")
        else:
            notes.append(f"measured on {m.device}, not on {accelerator_type}: not rescaled (no peak figure for both)")
    basis = f"measured on {m.label}: {tps:,.0f} tokens/s at {which} (bench/gpu_check.py)"
    basis += "".join(f"; {n}" for n in notes)
    return tps * scale, basis, {"file": m.path, "device": m.device, "date": m.date, "max_length": run["max_length"],
                                "liger": run["liger"], "attn": run["attn"], "measured_tokens_per_s": tps,
                                "measured_mfu": run.get("mfu"), "scale": round(scale, 4), "notes": notes}


def memory_correction(m: Measurement, mem: est.MemoryEstimate, *, max_length: int, liger: bool, gpu: bool,
                      zero_stage: int | None, peft: bool) -> dict[str, Any]:
    """The estimate corrected by the measured/estimated ratios of the file's nearest run. The
    activation terms (checkpoints, layer activations, loss head) scale by the measured ratio: per GPU
    they do not depend on ZeRO. The model states (params, grads, optimizer) scale by theirs only
    when this config is measured's own kind (no ZeRO, no PEFT): ZeRO and adapters change them by design."""
    run, which = pick(m, max_length, liger)
    mm = run.get("memory")
    if not mm or not mm.get("activation_ratio"):
        return {"applied": False, "note": f"no memory measurement at {which} in {m.path}"}
    if gpu != m.cuda:
        return {"applied": False, "note": f"measured on {m.device}, this config runs on {'GPUs' if gpu else 'CPUs'}: "
                                          f"memory not corrected"}
    acts = mem.activation_checkpoints + mem.layer_activations + mem.loss_head
    states = mem.params + mem.grads + mem.optimizer
    total = mem.total + (mm["activation_ratio"] - 1) * acts
    states_ratio = mm.get("states_ratio") if zero_stage is None and not peft else None
    if states_ratio:
        total += (states_ratio - 1) * states
    parts = [f"activations x{mm['activation_ratio']:.2f}"]
    parts.append(f"model states x{states_ratio:.2f}" if states_ratio else "model states as estimated (ZeRO/PEFT: "
                 "not what was measured)")
    return {"applied": True, "total_gb": round(total / est.GB, 3), "activation_ratio": mm["activation_ratio"],
            "states_ratio": states_ratio, "measured_peak_gb": mm.get("peak_gb"), "measured_ratio": mm.get("ratio"),
            "basis": f"measured on {m.label}, {which}: {', '.join(parts)}"}
