"""Composition: command-line overrides + the ``conf/`` presets -> one validated ``RaySFTConfig``.

``conf/`` ships inside the package as ``raysft.conf`` (pyproject maps the top-level folder there),
so Hydra finds it through ``pkg://raysft.conf`` from a wheel, a plain ``pip install .`` or an
editable checkout alike, from any working directory.
"""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton

from raysft.config.schema import RaySFTConfig, register_configs, to_typed

CONF_MODULE = "raysft.conf"
CONF_SEARCH_PATH = f"pkg://{CONF_MODULE}"


class OverrideKeyError(ValueError):
    pass


def conf_root() -> resources.abc.Traversable:
    """The shipped ``conf/`` tree (a folder of the checkout or of site-packages)."""
    return resources.files(CONF_MODULE)


def config_groups() -> dict[str, list[str]]:
    """Every config group and its presets, e.g. ``{"model": ["smollm3_3b", ...], ...}``."""
    return {g.name: sorted(p.name.removesuffix(".yaml") for p in g.iterdir() if p.name.endswith(".yaml"))
            for g in conf_root().iterdir() if g.is_dir() and not g.name.startswith("_")}


def check_override_keys(overrides: list[str]) -> None:
    """Fail fast, listing the valid keys, on an override of a key the schema does not have.

    Hydra's own message ("Could not override 'data.x'") names neither the valid keys nor the
    schema, so we walk the dataclass schema ourselves first."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = set(config_groups())
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


def compose(overrides: list[str], *, config_dir: str | None = None, config_name: str = "config") -> RaySFTConfig:
    """The typed config for ``overrides``, composed exactly as the ``raysft`` command would.

    ``config_dir`` / ``config_name``: as ``raysft --config-dir DIR --config-name NAME`` (e.g. a sweep's
    ``best.yaml``); the groups in ``conf/`` stay on the search path."""
    register_configs()
    check_override_keys(overrides)
    # Inside a running Hydra app (`raysft sweep=...` composes its trials) Hydra's global state is
    # taken: set it aside while composing, then put it back.
    running = Singleton._instances.pop(GlobalHydra, None)
    try:
        if config_dir is None:
            with initialize_config_module(config_module=CONF_MODULE, version_base=None):
                return to_typed(hydra_compose(config_name, overrides=overrides))
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            return to_typed(hydra_compose(config_name, overrides=[*overrides, f"hydra.searchpath=[{CONF_SEARCH_PATH}]"]))
    finally:
        if running is not None:
            Singleton._instances[GlobalHydra] = running


# Hydra's own flags that take a value (``--cfg job``, ``--config-dir DIR``): the value is no override.
_HYDRA_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                      "--package", "-p", "--experimental-rerun"}
_HYDRA_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def overrides_in(argv: list[str]) -> list[str]:
    """The Hydra overrides of a ``raysft`` command line (its flags and their values left out)."""
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
