"""Preflight memory check: the per-worker estimate of ``raysft plan`` (``estimates.memory_per_gpu``,
the loss path's logits included) against the GPU's memory, or, for a local CPU run, the machine's
memory shared by its workers; refused before Ray starts with both numbers and an override that fits."""

from __future__ import annotations

import os

import psutil

from raysft.commands import estimates as est
from raysft.config import RaySFTConfig


class DoesNotFitError(ValueError):
    """The configured run needs more memory than it will have."""


def worker_bytes(cfg: RaySFTConfig, shape: est.ModelShape, max_length: int) -> float:
    s, t, ds = cfg.scaling, cfg.trainer, cfg.deepspeed
    bf16 = s.use_gpu and (t.bf16 or cfg.model.dtype == "bfloat16")
    return est.memory_per_gpu(
        shape, world_size=s.num_workers, micro_batch=t.per_device_train_batch_size, seq_len=max_length, bf16=bf16,
        gradient_checkpointing=t.gradient_checkpointing, zero_stage=ds.stage if ds.enabled else None,
        offload_optimizer=ds.enabled and ds.offload_optimizer, offload_param=ds.enabled and ds.offload_param,
        peft=cfg.peft.method if cfg.peft.enabled else None, lora_r=cfg.peft.r, fused_lm_head=s.use_gpu,
        gpu=s.use_gpu).total


def check_memory(cfg: RaySFTConfig) -> None:
    """Raise ``DoesNotFitError`` when a worker cannot hold the run; nothing when it fits or when the
    memory it will have is not known here (a cluster's CPU nodes, a GPU type without a figure)."""
    m = cfg.model
    model_config, _ = est.load_model_config(m.name_or_path, revision=m.revision, init=m.init,
                                            config_overrides=dict(m.config_overrides))
    if not model_config:
        return
    shape = est.ModelShape.from_config(model_config)
    local = not (cfg.scaling.address or os.environ.get("RAY_ADDRESS"))
    if cfg.scaling.use_gpu:
        if cfg.scaling.accelerator_type not in est.GPUS:
            return
        have, per, what = est.GPUS[cfg.scaling.accelerator_type][0] * est.GB, 1, f"one {cfg.scaling.accelerator_type} GPU"
    elif local:
        have, per, what = psutil.virtual_memory().total * 0.9, cfg.scaling.num_workers, "this machine (90% of its memory)"
    else:
        return
    need = worker_bytes(cfg, shape, cfg.data.max_length) * per
    if need <= have:
        return
    fit = _largest_fitting_length(cfg, shape, have / per)
    hint = (f"data.max_length={fit} would fit" if fit else
            "even 256-token rows do not fit: use a smaller model, fewer workers, LoRA or a bigger machine")
    raise DoesNotFitError(
        f"{cfg.scaling.num_workers if per > 1 else 1} worker(s) x {need / per / est.GB:,.1f} GB (estimate at data.max_length="
        f"{cfg.data.max_length:,}, the loss path's logits included) need {need / est.GB:,.1f} GB, more than "
        f"{what} has ({have / est.GB:,.1f} GB): {hint} (or preflight=false to try anyway)")


def _largest_fitting_length(cfg: RaySFTConfig, shape: est.ModelShape, per_worker: float) -> int | None:
    lo, hi = 256, cfg.data.max_length
    if worker_bytes(cfg, shape, lo) > per_worker:
        return None
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        if worker_bytes(cfg, shape, mid) <= per_worker:
            lo = mid
        else:
            hi = mid
    return lo
