"""DeepSpeed config from the ``deepspeed`` group, and what it takes to run it on CPU workers."""

from __future__ import annotations

import os
from typing import Any

from raysft.config import DeepSpeedConfig


def deepspeed_config(ds: DeepSpeedConfig) -> dict[str, Any] | None:
    """The DeepSpeed JSON config; batch sizes, clipping and precision stay ``auto`` so the HF
    Trainer fills them from the trainer config (one source of truth)."""
    if not ds.enabled:
        return None
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": True, "contiguous_gradients": True}
    if ds.stage == 3:
        zero |= {"stage3_gather_16bit_weights_on_model_save": ds.save_16bit_model,
                 "stage3_param_persistence_threshold": "auto", "stage3_prefetch_bucket_size": "auto",
                 "reduce_bucket_size": "auto"}
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_optimizer and ds.stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    cfg: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,  # the Trainer logs; DeepSpeed's own prints would duplicate them
        "wall_clock_breakdown": False,
    }
    return _deep_merge(cfg, ds.extra)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def patch_accelerate_for_cpu_deepspeed() -> None:
    """Make accelerate count every CPU rank when DeepSpeed runs without CUDA.

    NOTE: accelerate's ``PartialState._prepare_backend`` returns ``backend=None`` without CUDA, so it
    believes it runs one process while DeepSpeed's process group has N; the HF Trainer then fills
    the ``auto`` batch sizes with world size 1 and DeepSpeed's batch check fails
    ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size").
    Giving it gloo, the backend DeepSpeed's CPU accelerator uses, fixes the count. Idempotent.
    """
    import accelerate.state as state

    if getattr(state.PartialState._prepare_backend, "_raysft_patched", False):
        return
    original = state.PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        b, distributed_type = original(self, cpu, sagemaker_dp, backend)
        if b is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            b = "gloo"
        return b, distributed_type

    _prepare_backend._raysft_patched = True
    state.PartialState._prepare_backend = _prepare_backend
