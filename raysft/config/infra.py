"""Schema of the infrastructure groups: `scaling` (Ray Train), `storage`, `deepspeed` and `peft`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


from raysft.config.checks import check_choice as _check_choice


@dataclass
class ScalingConfig:
    """Maps to ``ray.train.ScalingConfig`` (same names)."""

    num_workers: int = 2
    """Training workers (one per GPU). With ``min_workers`` set, the most an elastic run uses."""
    min_workers: Optional[int] = None
    """Elastic training: Ray Train runs with any number of workers in [min_workers, num_workers]
    and resizes the group (restarting from the latest checkpoint) as nodes come and go. The global
    batch stays num_workers x batch x accumulation: accumulation is re-derived for the live group.
    DDP only (ZeRO-3 shards are per rank)."""
    elastic_resize_interval_s: float = 60.0
    """Elastic runs: how often Ray Train checks whether more workers fit (then it restarts the group,
    bigger, from the latest checkpoint)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    accelerator_type: Optional[str] = None
    """e.g. ``H100``: Ray only places workers on nodes of that type (the autoscaler starts them)."""
    memory_per_worker_gb: Optional[float] = None
    placement_strategy: str = "PACK"
    address: Optional[str] = None
    """Ray cluster address; None = ``RAY_ADDRESS`` if set, else an in-process local Ray."""
    local_num_cpus: Optional[int] = None
    """Logical CPUs of the in-process local Ray. None = workers' CPUs + 2 so Ray Data never starves
    (Ray schedules by logical CPUs: with exactly 2 on a 2-core box two workers leave data 0 CPU)."""
    data_cpus_per_task: float = 0.5
    """CPUs reserved by each data preparation task (fractional, so it can share a core with workers)."""
    data_concurrency: int = 1
    """Data preparation actors per dataset (more on clusters with CPU nodes). The output is the same."""
    max_failures: int = 0
    """Ray Train restarts the worker group this many times after a failure, resuming from the
    latest checkpoint (``ray.train.FailureConfig``); -1 = forever. Preemptions are not counted here."""
    max_preemption_failures: int = 0
    """Restarts after a node preemption (a drain with reason PREEMPTION, e.g. a spot reclaim), counted
    apart from ``max_failures``; each resumes from the just-in-time checkpoint; -1 = forever."""
    preemption_check_steps: int = 5
    """Every this many optimizer steps every worker asks Ray Train for a preemption notice (one small
    barrier); on a notice the run checkpoints at once, with its data position. 0 = never check."""
    preemption_grace_s: float = 0.0
    """How long workers on surviving nodes may run past a preemption's deadline (to finish uploading
    the just-in-time checkpoint) before Ray Train restarts the group."""
    data_timeout_s: float = 1800.0
    """A worker waiting this long for its next batch fails the run with a message instead of hanging."""

    def validate(self) -> None:
        if self.num_workers <= 0:
            raise ValueError(f"scaling.num_workers must be > 0, got {self.num_workers}")
        if self.min_workers is not None and not 0 < self.min_workers <= self.num_workers:
            raise ValueError(f"scaling.min_workers must be in [1, num_workers={self.num_workers}], got {self.min_workers}")
        for key in ("max_failures", "max_preemption_failures"):
            if getattr(self, key) < -1:
                raise ValueError(f"scaling.{key} must be >= -1 (-1 = forever), got {getattr(self, key)}")
        if self.preemption_check_steps < 0 or self.preemption_grace_s < 0:
            raise ValueError("scaling.preemption_check_steps and scaling.preemption_grace_s must be >= 0, got "
                             f"{self.preemption_check_steps} and {self.preemption_grace_s}")
        _check_choice("scaling.placement_strategy", self.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


@dataclass
class StorageConfig:
    path: str = "runs"
    """Where runs go: a local directory (relative to the launch directory) or ``s3://bucket/prefix``.
    Endpoint, region and credentials come from the environment (AWS_*), never from the config."""
    name: Optional[str] = None
    """Run name; None = ``<model>-<data>-<timestamp>``. Re-using a name resumes that run."""
    retry_timeout_s: float = 600.0
    """How long every storage operation (checkpoint upload, run files, resume scan and download, the
    final model, prepared data) is retried, with exponential backoff and jitter, through an outage."""
    max_failed_checkpoints: int = 3
    """A checkpoint whose upload still fails after the retries is abandoned (a warning names it; its
    local copy is kept) and training goes on; this many abandoned in a row stop the run."""
    lease_timeout_s: float = 120.0
    """The driver renews the run's lease (``<run>/lease.json``) every quarter of this; a lease not
    renewed for this long is stale, and another driver may take the run over (a crashed driver)."""

    def validate(self) -> None:
        if self.lease_timeout_s <= 0:
            raise ValueError(f"storage.lease_timeout_s must be > 0, got {self.lease_timeout_s}")
        if self.retry_timeout_s < 0:
            raise ValueError(f"storage.retry_timeout_s must be >= 0, got {self.retry_timeout_s}")
        if self.max_failed_checkpoints < 1:
            raise ValueError(f"storage.max_failed_checkpoints must be >= 1, got {self.max_failed_checkpoints}")


@dataclass
class DeepSpeedConfig:
    enabled: bool = False
    stage: int = 3
    zero3_init: bool = True
    save_16bit_model: bool = True
    offload_optimizer: bool = False
    offload_param: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged into the generated DeepSpeed JSON config."""

    def validate(self) -> None:
        _check_choice("deepspeed.stage", self.stage, (0, 1, 2, 3))


@dataclass
class PeftConfig:
    enabled: bool = False
    method: str = "lora"
    """``lora`` or ``qlora`` (4-bit base weights through bitsandbytes; GPUs)."""
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: Any = "all-linear"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True

    def validate(self) -> None:
        _check_choice("peft.method", self.method, ("lora", "qlora"))
