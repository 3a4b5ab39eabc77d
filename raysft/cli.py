"""``raysft`` command line: a Hydra app over ``conf/`` plus a few offline subcommands.

    raysft [overrides...]                 train (the default job with no overrides)
    raysft data preview|stats [overrides] look at the data a run would see
    raysft export SRC DEST [--merge]      a consolidated Hugging Face model from a run
    raysft plan [--out DIR] [overrides]   rows, tokens, steps, memory, time and cost, without training
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

from raysft.config import GROUP_SCHEMAS, RaySFTConfig, register_configs, to_typed

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SUBCOMMANDS = {"data", "export", "plan"}


class OverrideKeyError(ValueError):
    pass


def check_override_keys(overrides: list[str]) -> None:
    """Fail fast, listing the valid keys, on an override of a key the schema does not have.

    Hydra's own message ("Could not override 'data.x'") names neither the valid keys nor the
    schema, so we walk the dataclass schema ourselves first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = {p.name for p in (CONF_DIR).iterdir() if p.is_dir()}
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or (o.is_delete() and key in groups):
            continue
        if "." not in key and key in groups and not o.is_add():
            continue  # a group choice, e.g. model=smollm3_3b (Hydra checks the option exists)
        if "@" in key:
            continue
        _walk(RaySFTConfig, key.split("."), key)


def _walk(schema: typing.Any, parts: list[str], full: str) -> None:
    if not parts or not dataclasses.is_dataclass(schema):
        return  # reached a leaf or a free-form dict: any key is fine there
    fields = {f.name: f for f in dataclasses.fields(schema)}
    head = parts[0]
    if head not in fields:
        where = ".".join(full.split(".")[: full.split(".").index(head)]) or "the top level"
        raise OverrideKeyError(f"Unknown config key '{full}': '{head}' is not a field of {where}. "
                               f"Valid keys there: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(schema)
    target = hints[head]
    origin = typing.get_origin(target)
    if origin is typing.Union:  # Optional[X] (e.g. the sweep group): walk X
        args = [a for a in typing.get_args(target) if a is not type(None)]
        target = args[0] if len(args) == 1 else typing.Any
        origin = typing.get_origin(target)
    if origin in (list, dict) or target is typing.Any:
        if origin is list and parts[1:] and parts[1].isdigit():  # e.g. data.dataset_mixture.datasets.0.weight
            (item,) = typing.get_args(target)
            _walk(item, parts[2:], full)
        return
    _walk(target, parts[1:], full)


def _hydra_main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def _train(cfg: DictConfig) -> None:
        import logging

        from raysft.launch.driver import run

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        typed = to_typed(cfg)
        if typed.sweep is not None:  # `raysft sweep=lr ...`: a Ray Tune sweep of full runs
            from hydra.core.hydra_config import HydraConfig

            from raysft.launch import tune

            hc = HydraConfig.get()
            config_dir = next((s.path for s in hc.runtime.config_sources if s.provider == "command-line"), None)
            try:
                tune.run(list(hc.overrides.task), config_dir=config_dir, config_name=hc.job.config_name or "config")
            except tune.SweepConfigError as e:
                print(f"raysft: error: {e}", file=sys.stderr)
                sys.exit(2)
            return
        run(typed)

    _train()


def compose(overrides: list[str], *, config_dir: str | None = None, config_name: str = "config") -> RaySFTConfig:
    """The typed config for ``overrides``, composed exactly as the ``raysft`` command would.

    ``config_dir`` / ``config_name``: as ``raysft --config-dir DIR --config-name NAME`` (e.g. a sweep's
    ``best.yaml``); the groups in ``conf/`` stay on the search path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    register_configs()
    check_override_keys(overrides)
    # Inside a running Hydra app (`raysft sweep=...` composes its trials) Hydra's global state is
    # taken: set it aside while composing, then put it back.
    running = Singleton._instances.pop(GlobalHydra, None)
    try:
        if config_dir is None:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
                return to_typed(hydra_compose(config_name, overrides=overrides))
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            return to_typed(hydra_compose(config_name, overrides=[*overrides, f"hydra.searchpath=[file://{CONF_DIR}]"]))
    finally:
        if running is not None:
            Singleton._instances[GlobalHydra] = running


# Hydra's own flags that take a value (``--cfg job``, ``--config-dir DIR``): the value is no override.
_HYDRA_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                      "--package", "-p", "--experimental-rerun"}
_HYDRA_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _overrides_in(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            skip = a in _HYDRA_VALUE_FLAGS or (a in ("--info", "-i") and argv[i + 1:i + 2] != [] and argv[i + 1] in _HYDRA_INFO_TOPICS)
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    try:
        if argv and argv[0] == "export":
            from raysft.launch import export

            return export.main(argv[1:])
        if argv and argv[0] == "plan":
            from raysft.launch import plan

            return plan.main(argv[1:])
        if argv and argv[0] in SUBCOMMANDS:
            from raysft.launch import commands

            return commands.dispatch(argv)
        check_override_keys(_overrides_in(argv))
    except (OverrideKeyError, ValueError) as e:
        print(f"raysft: error: {e}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()
    return 0


__all__ = ["main", "compose", "check_override_keys", "GROUP_SCHEMAS"]
