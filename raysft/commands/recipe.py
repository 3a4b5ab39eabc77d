"""Run TRL CLI / alignment-handbook recipe files as they are, or keep their translation as a preset.

    raysft --trl-config FILE [--accelerate-config FILE] [overrides...]
        Train on the recipe file (also ``raysft plan --trl-config FILE ...`` and ``raysft data ...``):
        the file is translated (``raysft.config.recipe_file``; what it maps to is printed first) and
        composed as the preset ``recipe=trl_file``. Overrides on the command line win over the file; a
        group chosen there (``model=tiny_smollm3``, ``data=sample_sft``) replaces what the file says for it.
    raysft import-recipe FILE [--accelerate-config FILE] > conf/recipe/mine.yaml
        Print the translation as a Hydra preset to keep and edit (then ``raysft recipe=mine``).

``--accelerate-config``: the ``accelerate launch --config_file`` YAML (ZeRO stage, offload, bf16, the
process count); what raysft ignores of it is listed. Exit code 2: the file is refused (a non-SFT recipe,
an unknown key, an unsupported setting), each reason on its own line.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

from raysft.config import RaySFTConfig, compose, conf_root
from raysft.config.compose import overrides_in
from raysft.config.recipe_file import (GROUPS, PRESET_NAME, RecipeError, deletions, render_preset, summary_lines,
                                       translate_file)

FLAGS = ("--trl-config", "--accelerate-config")
USAGE = ("usage: raysft --trl-config FILE [--accelerate-config FILE] [overrides...]\n"
         "       raysft plan|data ... --trl-config FILE [--accelerate-config FILE] [overrides...]\n"
         "       raysft import-recipe FILE [--accelerate-config FILE] > conf/recipe/NAME.yaml")


def split_flags(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(recipe file, accelerate config, the other arguments) of a command line."""
    found: dict[str, str] = {}
    rest, it = [], iter(argv)
    for a in it:
        flag, eq, value = a.partition("=")
        if flag in FLAGS:
            value = value if eq else next(it, "")
            if not value or value.startswith("-"):
                raise RecipeError(f"{flag} needs a file")
            if flag in found:
                raise RecipeError(f"{flag} given twice")
            found[flag] = value
        else:
            rest.append(a)
    return found.get("--trl-config"), found.get("--accelerate-config"), rest


def chosen_groups(overrides: list[str]) -> set[str]:
    """Config groups picked on the command line (``model=tiny_smollm3``), which replace the file's values."""
    out: set[str] = set()
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in overrides if "=" in a and not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a malformed override: the command itself reports it
        return out
    for o in parsed:
        key = o.key_or_group
        if "." not in key and not o.is_add() and not key.startswith("hydra"):
            out.add(key.split("@")[0])
    return out


def preset_dir(text: str) -> Path:
    """A config directory holding the preset as ``recipe/trl_file.yaml`` (and raysft's own primary config,
    so ``--config-dir`` composes as usual), named by the preset's content."""
    d = Path(tempfile.gettempdir()) / "raysft-recipes" / hashlib.sha1(text.encode()).hexdigest()[:16]
    (d / "recipe").mkdir(parents=True, exist_ok=True)
    (d / "recipe" / f"{PRESET_NAME}.yaml").write_text(text)
    (d / "config.yaml").write_text((conf_root() / "config.yaml").read_text())
    return d


def prepare(recipe: str, accelerate: str | None, overrides: list[str], *, echo: bool = True) -> tuple[Path, list[str]]:
    """Translate ``recipe`` (groups chosen in ``overrides`` left out), print the translation to stderr,
    and return the config directory holding it as ``recipe/trl_file.yaml`` and the overrides that go
    with it (``recipe=trl_file``, deletions of schema-default dict entries the file does not have)."""
    chosen = chosen_groups(overrides)
    if "recipe" in chosen:
        raise RecipeError("recipe=... and --trl-config both choose a whole recipe: use one")
    leave_out = chosen & set(GROUPS)
    t = translate_file(recipe, accelerate)
    if echo:
        for line in summary_lines(t, leave_out=leave_out):
            print(line, file=sys.stderr)
    return preset_dir(render_preset(t, leave_out=leave_out)), [f"recipe={PRESET_NAME}", *deletions(t, leave_out)]


def compose_recipe(recipe: str, accelerate: str | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                   echo: bool = False) -> RaySFTConfig:
    """The typed config ``raysft --trl-config RECIPE [--accelerate-config ACC] OVERRIDES`` runs."""
    d, extra = prepare(recipe, accelerate, list(overrides), echo=echo)
    return compose([f"hydra.searchpath=[file://{d}]", *extra, *overrides])


def rewrite_argv(argv: list[str]) -> list[str]:
    """``raysft [plan|data ...] --trl-config FILE ... overrides`` -> the same command on ``recipe=trl_file``.
    Prints the translation (to stderr, so ``--cfg job`` output stays the composed config alone)."""
    recipe, accelerate, rest = split_flags(argv)
    if recipe is None:
        raise RecipeError("--accelerate-config goes with --trl-config FILE")
    sub = rest[:2] if rest[:1] == ["data"] else rest[:1] if rest[:1] == ["plan"] else []
    if rest[:1] and rest[0] in ("export", "import-recipe"):
        raise RecipeError(f"--trl-config does not apply to `raysft {rest[0]}`")
    remaining = rest[len(sub):]
    d, extra = prepare(recipe, accelerate, overrides_in(remaining) if not sub else remaining)
    if sub:
        return [*sub, f"hydra.searchpath=[file://{d}]", *extra, *remaining]
    if any(a.split("=", 1)[0] in ("--config-dir", "-cd") for a in remaining):
        raise RecipeError("--config-dir and --trl-config cannot be combined: keep the translation as a preset "
                          "(raysft import-recipe FILE > DIR/recipe/NAME.yaml) and use recipe=NAME")
    return ["--config-dir", str(d), *extra, *remaining]


def main(argv: list[str]) -> int:
    """``raysft import-recipe FILE [--accelerate-config FILE]``: the preset on stdout."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.split("\n\n")[0] + "\n" + USAGE)
        return 0 if argv else 2
    try:
        recipe, accelerate, rest = split_flags(argv)
        if recipe is None and rest:
            recipe, rest = rest[0], rest[1:]
        if recipe is None or rest:
            raise RecipeError("expected one recipe file" + (f", got also {' '.join(rest)} (override fields when "
                                                            "running the preset)" if rest else ""))
        t = translate_file(recipe, accelerate)
    except RecipeError as e:
        print(f"raysft: error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    sys.stdout.write(render_preset(t))
    print(f"raysft: translated {recipe} ({len(t.origin)} settings, {len(t.notes)} notes in the header): save it as "
          f"conf/recipe/NAME.yaml and run `raysft recipe=NAME`", file=sys.stderr)
    return 0
