"""What a run survives: Ray Train's restart budgets from the ``scaling`` group, and the one line the
driver prints about them at start."""

from __future__ import annotations

from ray.train import FailureConfig

from raysft.config import RaySFTConfig


def failure_config(cfg: RaySFTConfig) -> FailureConfig:
    """Worker failures and preemptions are counted apart (Ray Train 2.60): a spot reclaim does not
    use up the budget meant for crashes. A preemption's restart waits for its deadline (plus
    ``preemption_grace_s``, during which surviving workers may finish uploading)."""
    s = cfg.scaling
    return FailureConfig(max_failures=s.max_failures, max_preemption_failures=s.max_preemption_failures,
                         preemption_grace_s=s.preemption_grace_s)


def _restarts(n: int, key: str) -> str:
    return "unlimited restarts" if n == -1 else f"no ({key}=0)" if n == 0 else f"{n} restart{'s' * (n != 1)}"


def survives(cfg: RaySFTConfig) -> str:
    """e.g. ``worker failures: 3 restarts; preemptions: unlimited restarts, a checkpoint on notice
    (checked every 5 steps); workers: elastic 4-8, ...``. Facts from the config only."""
    s = cfg.scaling
    parts = [f"worker failures: {_restarts(s.max_failures, 'scaling.max_failures')}"]
    pre = f"preemptions: {_restarts(s.max_preemption_failures, 'scaling.max_preemption_failures')}"
    if s.preemption_check_steps:
        pre += f", a checkpoint on notice (checked every {s.preemption_check_steps} steps)"
    else:
        pre += ", no checkpoint on notice (scaling.preemption_check_steps=0)"
    if s.preemption_grace_s:
        pre += f", {s.preemption_grace_s:g} s grace past the deadline"
    parts.append(pre)
    if s.min_workers is not None and s.min_workers < s.num_workers:
        parts.append(f"workers: elastic {s.min_workers}-{s.num_workers}, grows when more fit "
                     f"(checked every {s.elastic_resize_interval_s:g} s)")
    else:
        parts.append(f"workers: fixed {s.num_workers}")
    return "; ".join(parts)


def allowed(max_failures: int, used: int) -> bool:
    """Another restart within ``scaling.max_failures`` (-1: unlimited)?"""
    return max_failures == -1 or used < max_failures
