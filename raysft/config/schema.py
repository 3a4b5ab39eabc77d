"""The root of the typed configuration: one dataclass per Hydra group, registered in Hydra's
ConfigStore as the ``base_*`` nodes that every preset in ``conf/`` extends (``defaults: [base_<group>]``),
so a misspelt key or a wrong type in a preset or on the command line fails before Ray starts.

The schema is the single source of defaults; ``conf/`` presets state only what differs from it
(``tests/test_layout.py`` enforces this).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from raysft.config.data import DataConfig
from raysft.config.infra import DeepSpeedConfig, PeftConfig, ScalingConfig, StorageConfig
from raysft.config.plan import PlanConfig
from raysft.config.sweep import SweepConfig
from raysft.config.training import ModelConfig, MonitorConfig, TrainerConfig


@dataclass
class RaySFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    resume: Optional[str] = None
    """``latest``: continue the run named ``storage.name`` (or, without a name, the run under
    ``storage.path`` with the newest checkpoint). A URI (a run folder or one of its ``checkpoint_*``
    folders, local or s3://): start this run from that checkpoint (weights, optimizer, schedule,
    step and data position). None: a new run, unless ``storage.name`` names one with checkpoints."""
    stage: str = "custom"
    """Name of the stage preset that set the trainer fields (for run names and model cards)."""
    sweep: Optional[SweepConfig] = None
    """A Ray Tune sweep (``raysft sweep=lr``): when set, ``raysft`` runs the sweep instead of one run."""
    preflight: bool = True
    """Check before Ray starts what can be known then (model, storage, trackers, memory), each failure
    one line naming the setting to change; ``false`` skips the checks."""

    def validate(self) -> None:
        if self.scaling.min_workers is not None and self.deepspeed.enabled:
            raise ValueError("scaling.min_workers (elastic training) needs deepspeed=none: DeepSpeed ZeRO checkpoints "
                             "are sharded per rank and cannot be resumed by a group of another size")



GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "scaling": ScalingConfig,
    "storage": StorageConfig,
    "deepspeed": DeepSpeedConfig,
    "peft": PeftConfig,
    "monitor": MonitorConfig,
    "plan": PlanConfig,
    "sweep": SweepConfig,
}


def register_configs() -> None:
    """Register the schema nodes that ``conf/**.yaml`` presets extend (``defaults: [base_<group>]``)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RaySFTConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)


def to_typed(cfg: DictConfig | dict) -> RaySFTConfig:
    """Instantiate the dataclasses from a composed config and run every ``validate()`` check.

    NOTE: checks live in ``validate()``, not ``__post_init__``: OmegaConf builds the schema's own
    defaults (an empty mixture, a MISSING model) through the constructors, which must not fail.
    """
    if isinstance(cfg, dict):
        cfg = OmegaConf.merge(OmegaConf.structured(RaySFTConfig), cfg)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RaySFTConfig)
    _validate_tree(obj)
    return obj


def _validate_tree(node: Any) -> None:
    if dataclasses.is_dataclass(node):
        if hasattr(node, "validate"):
            node.validate()
        for f in dataclasses.fields(node):
            _validate_tree(getattr(node, f.name))
    elif isinstance(node, list):
        for item in node:
            _validate_tree(item)


def to_plain(cfg: RaySFTConfig) -> dict[str, Any]:
    """A plain dict (no OmegaConf objects) for Ray's ``train_loop_config`` and for saving."""
    return dataclasses.asdict(cfg)


def from_plain(d: dict[str, Any]) -> RaySFTConfig:
    """The typed config of a plain dict (e.g. a run's saved ``config.yaml``; a ``derived:`` section is ignored)."""
    d = {k: v for k, v in d.items() if k != "derived"}
    return to_typed(OmegaConf.merge(OmegaConf.structured(RaySFTConfig), d))


def valid_keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]
