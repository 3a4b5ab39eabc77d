"""raysft's configuration: the typed schema (one module per concern), its composition from ``conf/``
and the values derived from it.

    data.py      the `data` group: mixture, template, loss mask, packing
    training.py  `model`, `trainer`, `monitor`
    infra.py     `scaling`, `storage`, `deepspeed`, `peft`
    sweep.py     `sweep` (Ray Tune)
    plan.py      `plan` (knobs of `raysft plan`)
    schema.py    the root `RaySFTConfig`, ConfigStore registration, typed conversion
    compose.py   overrides + conf/ -> a validated config (the key check, Hydra composition)
    derived.py   values derived from a config, computed once and recorded under `derived:`
    secrets.py   what never leaves the process in a saved config
"""

from raysft.config.compose import OverrideKeyError, check_override_keys, compose, config_groups, conf_root
from raysft.config.data import DataConfig, MixtureConfig, SourceConfig
from raysft.config.infra import DeepSpeedConfig, PeftConfig, ScalingConfig, StorageConfig
from raysft.config.plan import PlanConfig
from raysft.config.schema import GROUP_SCHEMAS, RaySFTConfig, from_plain, register_configs, to_plain, to_typed, valid_keys
from raysft.config.sweep import DISTRIBUTIONS, DistributionConfig, SchedulerConfig, SweepConfig
from raysft.config.training import ModelConfig, MonitorConfig, TrainerConfig

__all__ = [
    "OverrideKeyError", "check_override_keys", "compose", "config_groups", "conf_root",
    "DataConfig", "MixtureConfig", "SourceConfig", "DeepSpeedConfig", "PeftConfig", "ScalingConfig", "StorageConfig",
    "PlanConfig", "GROUP_SCHEMAS", "RaySFTConfig", "from_plain", "register_configs", "to_plain", "to_typed", "valid_keys",
    "DISTRIBUTIONS", "DistributionConfig", "SchedulerConfig", "SweepConfig", "ModelConfig", "MonitorConfig", "TrainerConfig",
]
