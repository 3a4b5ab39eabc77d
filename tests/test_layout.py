"""Fitness tests that keep the layout honest: import layers, module size, packaging, the frozen config
surface, and one home per default (presets state only what differs from the schema)."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import tomllib
import typing
from pathlib import Path

import pytest
import yaml

from raysft.config import GROUP_SCHEMAS, RaySFTConfig, conf_root

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "raysft"
SURFACE = Path(__file__).parent / "assets" / "config_surface.txt"

# Each layer may import from its own layer and the ones before it, never from a later one.
LAYERS = [
    ("config", {"raysft", "raysft.assets", "raysft.config", "raysft.conf", "raysft.logs"}),
    ("storage", {"raysft.storage", "raysft.plots"}),
    ("data", {"raysft.data"}),
    ("train", {"raysft.train"}),
    ("run", {"raysft.run"}),
    ("sweep", {"raysft.sweep"}),
    ("commands", {"raysft.commands"}),
    ("cli", {"raysft.cli", "raysft.__main__"}),
]
MAX_MODULE_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and (best is None or len(pre) > best[1]):
                best = (i, len(pre))
    assert best is not None, f"{module} is in no layer of tests/test_layout.py: add it to LAYERS"
    return best[0]


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported raysft module, line, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.startswith("raysft"):
                found.append((n, node.lineno, id(node) in top))
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_imports_point_one_way():
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        for name, line, _ in _imports(path):
            target = _resolve(name, modules)
            if target and _layer(target) > _layer(mod):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[_layer(mod)][0]}) imports {target} "
                           f"({LAYERS[_layer(target)][0]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {t for n, _, top in _imports(p) if top and (t := _resolve(n, modules)) and t != m and t != "raysft"}
             for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by concept): {big}"


def test_pyproject_ships_every_package_and_the_conf_tree():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    assert set(meta["packages"]) == on_disk | {"raysft.conf"}
    assert meta["package-dir"] == {"raysft.conf": "conf"}
    assert (ROOT / "conf" / "__init__.py").exists()


def _readme_module_map() -> set[str]:
    """Module paths the README's architecture map names (``config/data.py``, ``cli.py``, ...)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture"):]
    block = section[section.index("```\nraysft/\n") + 4:]
    block = block[:block.index("```")]
    named, package = set(), ""
    for line in block.splitlines()[1:]:
        depth = (len(line) - len(line.lstrip())) // 2
        head = re.split(r"\s{2,}", line.strip())[0]  # the names, before the description's column
        if depth == 0:
            break  # conf/, tests/, bench/: outside the package
        if depth > 2:
            continue  # a description's second line
        if depth == 1:
            package = head if head.endswith("/") else ""
        named |= {(package if depth == 2 else "") + n.strip() for n in head.split(",") if n.strip().endswith(".py")}
    return named


def test_the_readme_module_map_names_every_module():
    """The architecture section is where a newcomer starts: one line per module, none stale."""
    on_disk = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    named = _readme_module_map()
    assert not on_disk - named, f"README's architecture map lacks {sorted(on_disk - named)}"
    assert not named - on_disk, f"README's architecture map names modules that do not exist: {sorted(named - on_disk)}"


# ----------------------------------------------------------------------------- the config surface


def _surface(schema: typing.Any, prefix: str = "") -> list[str]:
    lines = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        target = inner[0] if typing.get_origin(tp) is typing.Union and len(inner) == 1 else tp
        if dataclasses.is_dataclass(target):
            lines += _surface(target, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "MISSING")
        lines.append(f"{key}: {getattr(tp, '__name__', None) or str(tp).replace('typing.', '')} = {default!r}")
    return lines


def test_config_surface_is_frozen():
    """Every config key, its type and default. A diff is an API change: review it, then regenerate
    with ``RAYSFT_UPDATE_SURFACE=1 pytest tests/test_layout.py -k surface`` (as torchtitan's
    test_no_new_cli_options)."""
    now = "\n".join(_surface(RaySFTConfig)) + "\n"
    if os.environ.get("RAYSFT_UPDATE_SURFACE"):
        SURFACE.write_text(now)
    old = SURFACE.read_text()
    added = sorted(set(now.splitlines()) - set(old.splitlines()))
    removed = sorted(set(old.splitlines()) - set(now.splitlines()))
    assert not added and not removed, f"config surface changed.\nadded: {added}\nremoved: {removed}"


# ----------------------------------------------------------------------------- one home per default


def _restated(values: dict, schema: typing.Any, where: str) -> list[str]:
    """Leaves of ``values`` equal to the schema default at the same place (dataclass fields walked;
    free-form dicts, e.g. ``lr_scheduler_kwargs``, compared whole)."""
    out = []
    hints = typing.get_type_hints(schema)
    defaults = schema()
    for k, v in values.items():
        if k == "defaults" or k not in hints:
            continue
        tp = hints[k]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        target = inner[0] if typing.get_origin(tp) is typing.Union and len(inner) == 1 else tp
        if dataclasses.is_dataclass(target) and isinstance(v, dict):
            out += _restated(v, target, f"{where}{k}.")
        elif v == getattr(defaults, k) and not (isinstance(v, (dict, list)) and not v):
            out.append(f"{where}{k}: {v!r}")
    return out


def _presets():
    root = conf_root()
    for group in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for p in sorted((root / group).iterdir(), key=lambda x: x.name):
            if p.name.endswith(".yaml"):
                yield group, p


@pytest.mark.parametrize(("group", "preset"), list(_presets()), ids=lambda x: getattr(x, "name", x))
def test_presets_state_only_what_differs_from_the_schema(group, preset):
    """The schema is the single home of every default (the SmolLM3 recipe values where the recipe
    has one); a preset that restates one would silently keep the old value when the schema changes."""
    text = preset.read_text()
    values = yaml.safe_load(text) or {}
    if "# @package _global_" in text.splitlines()[:3]:
        found = _restated(values, RaySFTConfig, "")
    else:
        found = _restated(values, GROUP_SCHEMAS[group], f"{group}.") if group in GROUP_SCHEMAS else []
    assert not found, f"{preset.name} restates schema defaults (delete these lines): {found}"
