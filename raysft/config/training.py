"""Schema of the `model`, `trainer` and `monitor` groups: what is trained, and how it is watched."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from raysft.config.checks import check_choice as _check_choice


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    """Hub id or local directory of the model. With ``init=random`` only its config.json is read."""
    revision: str = "main"
    init: str = "pretrained"
    """``pretrained`` loads weights; ``random`` builds a fresh model from the architecture config."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Architecture fields replaced before a random init (how the tiny test model is scaled down)."""
    tokenizer: Optional[str] = None
    """Tokenizer location; defaults to ``name_or_path``. ``bundled:smollm3`` is the copy shipped in raysft."""
    dtype: str = "float32"
    """``float32`` | ``bfloat16`` | ``float16`` | ``auto``."""
    attn_implementation: str = "sdpa"
    """``flash_attention_2`` on GPUs (the recipes); falls back to ``sdpa`` without CUDA, with a log line."""
    trust_remote_code: bool = False
    use_liger_kernel: bool = False
    """Apply liger-kernel's Triton kernels (GPU only; skipped with a log line on CPU)."""

    def validate(self) -> None:
        _check_choice("model.init", self.init, ("pretrained", "random"))
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))


@dataclass
class AnomalyConfig:
    """The loss-spike guard (``raysft/train/anomaly.py``), checked at every logging step
    (``trainer.logging_steps``) on the loss and grad norm every rank logs."""

    policy: str = "stop"
    """What a non-finite loss or grad norm, or a loss spike, does: ``stop`` (the run ends with one line
    naming the step, the loss, the median and the last good checkpoint; exit 8), ``rollback`` (restart
    from the last checkpoint before it and skip the batch that caused it, recorded in
    ``anomalies.jsonl``), ``warn`` (one line, training goes on) or ``off``."""
    loss_factor: float = 2.0
    """A loss above this many times the running median of the last ``window`` logged losses is a spike
    (LLM Foundry's KillLossSpike: 2x over 50 steps)."""
    window: int = 50
    min_history: int = 10
    """Logged losses needed before spikes are looked for (a non-finite value counts from step 1)."""
    max_rollbacks: int = 3
    """Rollbacks a run may make (``policy=rollback``); one more anomaly then stops it."""

    def validate(self) -> None:
        _check_choice("trainer.anomaly.policy", self.policy, ("stop", "rollback", "warn", "off"))
        if self.loss_factor <= 1:
            raise ValueError(f"trainer.anomaly.loss_factor must be > 1, got {self.loss_factor}")
        if self.window < 1 or self.min_history < 1 or self.max_rollbacks < 0:
            raise ValueError("trainer.anomaly.window and min_history must be >= 1 and max_rollbacks >= 0")


@dataclass
class TrainerConfig:
    """A curated subset of TRL ``SFTConfig`` (same names). Anything else: ``trainer.trl_overrides``."""

    num_train_epochs: float = 1.0
    max_steps: int = -1
    """-1 = derived from the packed row count, epochs and the global batch (printed at start)."""
    learning_rate: float = 3.0e-5
    lr_scheduler_type: str = "cosine_with_min_lr"
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=lambda: {"min_lr_rate": 0.1})
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.2
    per_device_train_batch_size: int = 1
    """Packed rows per worker per micro-step."""
    gradient_accumulation_steps: int = 2
    gradient_checkpointing: bool = False
    use_reentrant: bool = True
    bf16: bool = False
    """Mixed precision on GPUs (the recipes); forced off on CPU, with a log line."""
    average_tokens_across_devices: bool = True
    logging_steps: int = 1
    eval_steps: Optional[int] = None
    """Evaluate on the held-out split every N steps (None: at the end only, when there is an eval split)."""
    save_strategy: str = "steps"
    save_steps: float = 0.05
    """Steps between checkpoints, or a fraction of the run when < 1 (as in the recipes)."""
    save_total_limit: int = 1
    """Checkpoints kept in storage: the newest ones, or the best ones with ``metric_for_best_model``
    (Ray Train always keeps the latest too, so a run can resume)."""
    metric_for_best_model: Optional[str] = None
    """e.g. ``eval_loss``: keep the ``save_total_limit`` best checkpoints by this metric."""
    greater_is_better: bool = False
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """Trackers: any of ``trackio``, ``wandb``, ``tensorboard``; ``none`` for none."""
    trl_overrides: dict[str, Any] = field(default_factory=dict)
    """Passed to ``SFTConfig`` as is, for fields not curated above."""
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    """The loss-spike guard (raysft's own, not an SFTConfig field)."""

    def validate(self) -> None:
        self.anomaly.validate()
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"trainer.{name} must be > 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"trainer.max_steps must be -1 (derive) or > 0, got {self.max_steps}")
        _check_choice("trainer.save_strategy", self.save_strategy, ("steps", "epoch", "no"))
        if self.save_total_limit <= 0:
            raise ValueError(f"trainer.save_total_limit must be > 0, got {self.save_total_limit}")
        if self.metric_for_best_model and not self.metric_for_best_model.startswith("eval_"):
            raise ValueError(f"trainer.metric_for_best_model={self.metric_for_best_model!r}: checkpoints are scored "
                             "by an eval metric (eval_loss, eval_mean_token_accuracy, ...)")


@dataclass
class MonitorConfig:
    sample_prompts: list[str] = field(default_factory=list)
    """Fixed prompts generated from (greedy) every ``sample_every_steps`` steps."""
    sample_every_steps: int = 0
    """0 = only at the end of training."""
    sample_max_new_tokens: int = 32
    log_batch_hashes: bool = False
    """Write ``workers/batches_rank<r>.jsonl``: a hash of every micro-batch each worker trained on,
    by its index in the run (an audit trail: two runs, or a run and its resume, can be compared)."""
    peak_tflops_per_gpu: float = 989.0
    """Peak dense bf16 TFLOP/s of one GPU for the MFU estimate (H100 SXM: 989); logged on GPUs only."""
    step_breakdown: bool = False
    """Write a ``step_breakdown`` record per step into ``metrics.jsonl``: seconds waiting for data,
    in forward+backward, in the optimizer step, and the rest (callbacks, logging, reporting)."""
    verbose: bool = False
    """Show every library's and Ray's output live; by default the console shows raysft's lines and
    errors only, and everything goes to ``<run>/logs/`` (the driver's and each worker's log)."""
