"""Schema of the `sweep` group: a Ray Tune sweep over any config keys."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from raysft.config.checks import check_choice as _check_choice



DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid", "randint")


@dataclass
class DistributionConfig:
    """How one config key is sampled in a sweep (Ray Tune search space)."""

    type: str = MISSING
    """``loguniform`` / ``uniform`` (``low``, ``high``), ``randint`` (``low`` <= x < ``high``),
    ``choice`` (random pick from ``values``) or ``grid`` (every one of ``values``, x ``num_samples``)."""
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list[Any]] = None

    def check(self, key: str) -> None:
        _check_choice(f"sweep.space[{key}].type", self.type, DISTRIBUTIONS)
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"sweep.space[{key}]: type {self.type} needs a non-empty `values` list")
            return
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"sweep.space[{key}]: type {self.type} needs `low` < `high`, got {self.low}, {self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"sweep.space[{key}]: loguniform needs `low` > 0, got {self.low}")


@dataclass
class SchedulerConfig:
    type: str = "asha"
    """``asha`` (early-stop trials that trail the others at each rung) or ``fifo`` (run every trial to the end)."""
    time_attr: str = "training_iteration"
    """What ASHA counts: ``training_iteration`` = reports of the metric (one per logging step for
    ``loss``, one per evaluation for ``eval_loss``), or ``global_step``."""
    grace_period: int = 2
    """A trial runs at least this many ``time_attr`` units before it can be stopped."""
    reduction_factor: float = 2.0
    """At each rung only the best 1/reduction_factor of the trials continue."""
    max_t: int = 100_000
    """No trial runs past this many ``time_attr`` units (high by default: a trial ends at its own max_steps)."""

    def validate(self) -> None:
        _check_choice("sweep.scheduler.type", self.type, ("asha", "fifo"))
        _check_choice("sweep.scheduler.time_attr", self.time_attr, ("training_iteration", "global_step"))
        if self.grace_period < 1 or self.max_t < self.grace_period:
            raise ValueError(f"sweep.scheduler needs 1 <= grace_period <= max_t, got {self.grace_period}, {self.max_t}")
        if not self.reduction_factor > 1:
            raise ValueError(f"sweep.scheduler.reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass
class SweepConfig:
    """A Ray Tune sweep over any config keys (``raysft sweep=lr``); each trial is a full raysft run."""

    name: str = MISSING
    """The sweep's directory under ``storage.path``; trials run as ``<name>-trial-<id>``. Re-running
    with an existing name resumes that sweep (finished trials are not run again)."""
    space: dict[str, DistributionConfig] = field(default_factory=dict)
    """Config key (dotted, list indices allowed: ``data.dataset_mixture.datasets.0.weight``; or a
    group: ``peft``) -> distribution."""
    metric: str = "eval_loss"
    """Any numeric metric the run logs (``loss``, ``eval_loss``, ``eval_loss/<source>``, ...)."""
    mode: str = "min"
    num_samples: int = 1
    """Trials drawn from the space (with ``grid`` entries: repeats of the whole grid)."""
    max_concurrent_trials: int = 1
    """Trials at once; each takes its ``scaling`` workers (1 on one machine, more on a cluster)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search_alg: str = "random"
    """``random`` (Tune's random / grid variants) or ``optuna`` (TPE; ``pip install 'raysft[sweep]'``)."""
    seed: Optional[int] = None
    """Seed of the random search (None: a different draw each sweep)."""
    trial_cpus: float = 0.1
    """CPUs reserved for each trial's driver (data stats pass, TorchTrainer); the workers come on top."""

    def validate(self) -> None:
        if not self.space:
            raise ValueError("sweep.space is empty: map at least one config key to a distribution")
        for key, dist in self.space.items():
            dist.check(key)
        _check_choice("sweep.mode", self.mode, ("min", "max"))
        _check_choice("sweep.search_alg", self.search_alg, ("random", "optuna"))
        for name in ("num_samples", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"sweep.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.trial_cpus:
            raise ValueError(f"sweep.trial_cpus must be > 0 (Tune cannot place a zero-resource trial), got {self.trial_cpus}")
        if self.search_alg == "optuna":
            if importlib.util.find_spec("optuna") is None:
                raise ValueError("sweep.search_alg=optuna needs optuna: pip install 'raysft[sweep]' (or use sweep.search_alg=random)")
            grids = [k for k, d in self.space.items() if d.type == "grid"]
            if grids:
                raise ValueError(f"sweep.search_alg=optuna cannot take grid entries ({', '.join(grids)}): use type choice")
