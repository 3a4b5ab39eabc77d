"""Values derived from a config: computed once, here, printed at start and recorded in the run's
``config.yaml`` under ``derived:``. None of them is a knob, and none is written back into the config.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from raysft.config.data import DataConfig, normalize_strategy
from raysft.config.schema import RaySFTConfig

log = logging.getLogger(__name__)

LOCAL_RAY_SPARE_CPUS = 2
"""Logical CPUs a local Ray gets beyond the workers' (Ray schedules by logical CPUs: with exactly as
many as the workers take, Ray Data gets none and the run hangs; the data tasks use fractional CPUs)."""


@dataclass(frozen=True)
class Derived:
    run_name: str
    template_date: str
    """The date the chat template prints (``strftime_now``), pinned for every worker and resume."""
    packing_strategy: str
    """What packs the rows: ``data.packing_strategy`` with old names mapped, ``none`` without packing."""
    global_batch_rows: int
    """Packed rows per optimizer step: workers x per-device batch x gradient accumulation."""
    max_steps: int
    save_steps: float
    """Steps between checkpoints (0: none)."""
    local_ray_cpus: int
    """Logical CPUs of an in-process local Ray (ignored on a cluster)."""
    ray_state_retry_s: float
    """How long Ray Train's own storage writes (its checkpoint registry) are retried (``ray_state_retry_s``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_run_name(cfg: RaySFTConfig, now: float | None = None) -> str:
    model = os.path.basename(cfg.model.name_or_path.rstrip("/")).replace("bundled:", "")
    return f"{model}-{cfg.stage}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def template_date(data: DataConfig) -> str:
    return data.date or datetime.date.today().isoformat()


def packing_strategy(data: DataConfig) -> str:
    return normalize_strategy(data.packing_strategy) if data.packing else "none"


def global_batch_rows(cfg: RaySFTConfig) -> int:
    t = cfg.trainer
    return cfg.scaling.num_workers * t.per_device_train_batch_size * t.gradient_accumulation_steps


def local_ray_cpus(cfg: RaySFTConfig, *, concurrent_trials: int = 1, trial_cpus: float = 0.0) -> int:
    """``scaling.local_num_cpus``, or enough for ``concurrent_trials`` runs' workers (plus each trial's
    driver share in a sweep) and the data tasks."""
    s = cfg.scaling
    if s.local_num_cpus:
        return s.local_num_cpus
    return int(math.ceil(concurrent_trials * (s.num_workers * s.cpus_per_worker + trial_cpus))) + LOCAL_RAY_SPARE_CPUS


def steps_for(train_packed_rows: int, cfg: RaySFTConfig, *, epochs: float | None = None) -> int:
    """Optimizer steps, exactly as a plain ``accelerate launch`` of the same config would count them
    on the same packed rows: each of W ranks gets ``ceil(rows / W)`` rows per epoch (the distributed
    sampler pads), in ``ceil(. / batch)`` micro-batches, and an epoch is ``ceil(micro-batches / GA)``
    steps (HF ``Trainer.set_initial_training_values``). When the stream runs out before the last step,
    the trainer starts another pass over it, as the distributed sampler repeats rows to pad."""
    t, w = cfg.trainer, cfg.scaling.num_workers
    epochs = t.num_train_epochs if epochs is None else epochs
    micro_batches = math.ceil(math.ceil(train_packed_rows / w) / t.per_device_train_batch_size)
    steps_per_epoch = max(math.ceil(micro_batches / t.gradient_accumulation_steps), 1)
    if train_packed_rows < w * t.per_device_train_batch_size:
        raise ValueError(f"the data give {train_packed_rows} packed rows per epoch, fewer than one micro-batch "
                         f"on every worker needs ({w} workers x {t.per_device_train_batch_size} rows): add data, raise "
                         "source weights or lower the batch")
    return math.ceil(epochs * steps_per_epoch)


def save_steps_for(cfg: RaySFTConfig, max_steps: int) -> float:
    """Checkpoint interval in steps (0 = none). ``epoch`` becomes steps: the stream has no epoch ends."""
    t = cfg.trainer
    if t.save_strategy == "no":
        return 0
    if t.save_strategy == "epoch":
        return max(1, math.ceil(max_steps / max(t.num_train_epochs, 1e-9)))
    return t.save_steps if t.save_steps >= 1 else max(1, math.ceil(t.save_steps * max_steps))


def grad_accum_for(cfg: RaySFTConfig, world: int) -> int:
    """Gradient accumulation for a group of ``world`` workers. Fixed runs: the configured value.
    Elastic runs keep the global batch of ``num_workers`` workers (so the step count and the LR
    schedule, derived for it, stay right); when ``world`` does not divide it, the nearest value."""
    t, s = cfg.trainer, cfg.scaling
    if s.min_workers is None or world == s.num_workers:
        return t.gradient_accumulation_steps
    ga = max(1, round(s.num_workers * t.gradient_accumulation_steps / world))
    if ga * world != s.num_workers * t.gradient_accumulation_steps:
        log.warning("elastic run on %d of %d workers: gradient accumulation %d gives %d rows per step instead of %d",
                    world, s.num_workers, ga, ga * world * t.per_device_train_batch_size, global_batch_rows(cfg))
    return ga


def derive(cfg: RaySFTConfig, *, run_name: str | None, date: str, train_packed_rows: int) -> Derived:
    """Every derived value of one run. ``run_name``: the resolved name (None: a new one); ``date``: the
    ``template_date`` the data were rendered with."""
    max_steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else steps_for(train_packed_rows, cfg)
    return Derived(run_name=run_name or default_run_name(cfg), template_date=date,
                   packing_strategy=packing_strategy(cfg.data), global_batch_rows=global_batch_rows(cfg),
                   max_steps=max_steps, save_steps=save_steps_for(cfg, max_steps), local_ray_cpus=local_ray_cpus(cfg),
                   ray_state_retry_s=ray_state_retry_s(cfg))


def ray_state_retry_s(cfg: RaySFTConfig) -> float:
    """A failed write of Ray Train's own state ends the run, so it rides out as long an outage as the run
    does: a checkpoint upload abandoned after ``storage.retry_timeout_s``, for each of
    ``storage.max_failed_checkpoints`` in a row (then the run stops anyway)."""
    return cfg.storage.retry_timeout_s * cfg.storage.max_failed_checkpoints


def data_resources(cfg_scaling) -> dict[str, Any]:
    """The data preparation actors' resources (``build_dataset`` keyword arguments)."""
    return {"data_cpus": cfg_scaling.data_cpus_per_task, "concurrency": cfg_scaling.data_concurrency}
