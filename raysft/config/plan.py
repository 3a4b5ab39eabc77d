"""Schema of `plan`: knobs of `raysft plan` only (training ignores them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class PlanConfig:
    """Knobs of ``raysft plan`` (run size, memory, time and cost, computed before anything trains).
    Training ignores them."""

    tokens_per_s_per_gpu: Optional[float] = None
    """Training throughput per GPU (or per CPU worker) for the wall-time estimate, in processed tokens
    (padding included). None = derived on GPUs: the MFU of SmolLM3's published pretraining run
    (11.2T tokens on 384 H100s in 24 days = 14.1k tokens/s/GPU for 3.08B params, i.e. 26% of the
    H100's 989 dense bf16 TFLOP/s counting 6 FLOPs/param/token) held constant for this model's FLOPs
    per token (attention and gradient-checkpointing recompute included) and this GPU's peak.
    See ``raysft/commands/estimates.py``. Set your measured figure (runs log tokens/s), or
    ``plan.throughput_file``, to sharpen it."""
    usd_per_gpu_hour: Optional[float] = None
    """Price of one GPU-hour for the cost estimate. None = a rough on-demand list price for
    ``scaling.accelerator_type`` (table in ``raysft/commands/estimates.py``)."""
    throughput_file: Optional[str] = None
    """The JSON ``bench/gpu_check.py`` writes (tokens/s, MFU and peak memory of this model measured on
    one GPU at several ``max_length``). Set, the plan's throughput is the measured one at the nearest
    measured ``max_length`` (rescaled by FLOPs/token to the data's mean sequence length, and by peak
    TFLOP/s when the GPU differs), labelled "measured on <GPU>, <date>", and the memory estimate gets
    the measured/estimated correction from the file. None = derived throughput, uncorrected memory.
    Exclusive with ``tokens_per_s_per_gpu``."""
    global_batch_rows: Optional[int] = None
    """Packed rows per optimizer step the config must reproduce (workers x per-device batch x
    accumulation); ``raysft plan`` refuses a config that does not (the SmolLM3 recipes: 128).
    None = not checked."""

    def validate(self) -> None:
        if self.tokens_per_s_per_gpu is not None and not self.tokens_per_s_per_gpu > 0:
            raise ValueError(f"plan.tokens_per_s_per_gpu must be > 0, got {self.tokens_per_s_per_gpu}")
        if self.tokens_per_s_per_gpu is not None and self.throughput_file:
            raise ValueError("set one of plan.tokens_per_s_per_gpu (a figure) and plan.throughput_file (a measurement), "
                             "not both")
        if self.usd_per_gpu_hour is not None and self.usd_per_gpu_hour < 0:
            raise ValueError(f"plan.usd_per_gpu_hour must be >= 0, got {self.usd_per_gpu_hour}")
        if self.global_batch_rows is not None and self.global_batch_rows <= 0:
            raise ValueError(f"plan.global_batch_rows must be > 0, got {self.global_batch_rows}")
