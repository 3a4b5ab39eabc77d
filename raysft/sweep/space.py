"""A sweep's search space: the overrides every trial shares, the sampled ones, and Tune's distributions."""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from ray import tune

from raysft.config import DistributionConfig, RaySFTConfig, SweepConfig, check_override_keys, compose
from raysft.config.secrets import SECRET_KEY

EVAL_EVERY_LOGGING_STEPS = 10
"""With an eval metric and ``trainer.eval_steps=null``, trials evaluate every this many logging steps."""


class SweepConfigError(ValueError):
    """The sweep cannot start as configured (raised before Ray starts)."""


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value that parses back to the same value."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()  # numpy scalars from Tune's samplers
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][\w\-./:@]*", text) and text.lower() not in ("null", "true", "false", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_key(override: str) -> str:
    return OverridesParser.create().parse_overrides([override])[0].key_or_group


def trial_overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={hydra_value(v)}" for k, v in values.items()]


def base_overrides(overrides: list[str], cfg: RaySFTConfig) -> tuple[list[str], list[str]]:
    """The overrides every trial shares: the command line minus the sweep's own keys, the run name
    and the keys the space samples; plus what the metric needs. Returns (overrides, notes).

    The shared overrides are written into the sweep's files (its spec, Tune's experiment state, best
    configs): the hub token is left out (the trials read it from HF_TOKEN, where the caller puts it)
    and any other secret-named key is refused."""
    sweep = cfg.sweep
    assert sweep is not None
    drop = set(sweep.space) | {"storage.name"}
    base = []
    for o in overrides:
        key = override_key(o)
        if key == "sweep" or key.startswith("sweep.") or key in drop or key == "trainer.trl_overrides.hub_token":
            continue
        if SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            raise SweepConfigError(f"{key} holds a secret, and a sweep writes its overrides into its files: "
                                   "set it in the environment of the sweep instead (e.g. HF_TOKEN, WANDB_API_KEY)")
        base.append(o)
    notes = []
    if sweep.metric.startswith("eval_") and "trainer.eval_steps" not in sweep.space:
        if "data.dataset_mixture.test_split_size" not in sweep.space and cfg.data.dataset_mixture.test_split_size <= 0:
            raise SweepConfigError(f"sweep.metric={sweep.metric} needs held-out data: set data.dataset_mixture.test_split_size > 0 "
                             "or sweep.metric=loss")
        if cfg.trainer.eval_steps is None:
            every = EVAL_EVERY_LOGGING_STEPS * cfg.trainer.logging_steps
            base.append(f"trainer.eval_steps={every}")
            notes.append(f"sweep.metric={sweep.metric} is only reported at evaluations and trainer.eval_steps is null: "
                         f"trials evaluate every {every} steps (trainer.eval_steps={every}) so the scheduler can compare them")
    return base, notes


def sample_values(space: dict[str, DistributionConfig]) -> dict[str, Any]:
    """One value of each distribution (for the dry-run composition before Ray starts)."""
    out = {}
    for key, d in space.items():
        out[key] = d.values[0] if d.type in ("choice", "grid") else (int(d.low) if d.type == "randint" else d.low)
    return out


def check_space(sweep: SweepConfig, base: list[str], *, config_dir: Optional[str], config_name: str) -> None:
    """Every key in the space must be a config key, and a trial's config must compose and validate."""
    for key in sweep.space:
        try:
            check_override_keys([f"{key}=0"])
        except ValueError as e:
            raise SweepConfigError(f"sweep.space key '{key}' is not a config key: {e}") from None
    try:
        compose(base + trial_overrides(sample_values(sweep.space)), config_dir=config_dir, config_name=config_name)
    except Exception as e:
        raise SweepConfigError(f"a trial of sweep '{sweep.name}' does not compose ({sample_values(sweep.space)}): {e}") from e


def tune_space(space: dict[str, DistributionConfig]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.type == "loguniform":
            out[key] = tune.loguniform(d.low, d.high)
        elif d.type == "uniform":
            out[key] = tune.uniform(d.low, d.high)
        elif d.type == "randint":
            out[key] = tune.randint(int(d.low), int(d.high))
        elif d.type == "choice":
            out[key] = tune.choice(list(d.values))
        else:
            out[key] = tune.grid_search(list(d.values))
    return out
