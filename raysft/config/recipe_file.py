"""A TRL CLI / alignment-handbook SFT recipe file, translated into raysft config.

``translate(recipe, accelerate=...)`` reads the flat file (``ScriptArguments`` + ``SFTConfig`` +
``ModelConfig`` keys, see ``recipe_keys``) and returns a ``Translation``: raysft values by group, where
each value came from, and notes. Keys absent from the file take TRL's defaults (the run TRL would do),
not raysft's. ``render_preset`` writes it as a Hydra preset, ``# @package _global_`` with defaults
overrides that reset the groups it fills: ``raysft import-recipe`` prints it, ``raysft --trl-config``
composes it as ``recipe=trl_file``.

Refused (``RecipeError``, one line per reason): a non-SFT recipe (DPO, ORPO, KTO, GRPO, ...), an unknown
key (named), a refused key not at a harmless value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysft.config import recipe_data as data
from raysft.config import recipe_keys as keys
from raysft.config import recipe_training as train
from raysft.config.recipe_accelerate import translate_accelerate
from raysft.config.schema import RaySFTConfig

PRESET_NAME = "trl_file"
# group -> the top-level sections (or data.<field>s) that a choice of that group on the command line replaces
DATA_GROUP_FIELDS = ("dataset_mixture", "root", "order")
GROUPS = ("model", "data", "stage", "peft", "deepspeed", "scaling", "storage")


class RecipeError(ValueError):
    pass


@dataclass
class Translation:
    name: str
    source: str
    values: dict[str, Any] = field(default_factory=dict)
    """Nested raysft values: ``{"model": {...}, "data": {...}, "trainer": {...}, ...}``."""
    origin: dict[str, str] = field(default_factory=dict)
    """Dotted raysft key -> the recipe key it came from (or ``TRL default ...``)."""
    notes: list[str] = field(default_factory=list)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.values
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def load_yaml(path: str | os.PathLike, what: str = "recipe file") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{what} {str(path)!r}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{what} {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{what} {str(path)!r}: expected a mapping of keys, got {type(data).__name__}")
    return data


def translate_file(path: str, accelerate_path: str | None = None) -> Translation:
    recipe = load_yaml(path)
    acc = load_yaml(accelerate_path, "accelerate config") if accelerate_path else None
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).stem)
    return translate(recipe, accelerate=acc, name=name, source=str(path),
                     accelerate_source=Path(accelerate_path).name if accelerate_path else None)


# ----------------------------------------------------------------------------- refusals first


def non_sft_kind(recipe: dict[str, Any]) -> str | None:
    """``"this is a DPO recipe (...); raysft runs SFT"`` when the file is for another TRL trainer, else None."""
    evidence = [(k, keys.NON_SFT[k]) for k in recipe if k in keys.NON_SFT]
    loss = recipe.get("loss_type")
    if isinstance(loss, str) and loss in keys.PREFERENCE_LOSSES:
        evidence.append((f"loss_type={loss}", keys.PREFERENCE_LOSSES[loss]))
    columns = sorted({c for e in _entries(recipe) if isinstance(e, dict) for c in (e.get("columns") or [])}
                     & keys.PREFERENCE_COLUMNS)
    if columns:
        evidence.append((f"columns {', '.join(columns)}", ("DPO", "ORPO", "CPO", "Reward")))
    if not evidence:
        return None
    order = list(dict.fromkeys(kind for _, kinds in evidence for kind in kinds))
    common = [k for k in order if all(k in kinds for _, kinds in evidence)] or order
    named = common[0] if len(common) == 1 else ", ".join(common[:-1]) + " or " + common[-1]
    return f"this is a {named} recipe ({', '.join(m for m, _ in evidence)}); raysft runs SFT"


def _entries(recipe: dict[str, Any]) -> list[Any]:
    mix = recipe.get("dataset_mixture")
    entries = mix.get("datasets") if isinstance(mix, dict) else None
    return list(entries or []) + list(recipe.get("datasets") or [])


def _unknown(recipe: dict[str, Any]) -> list[str]:
    known = keys.known_keys()
    out = []
    for k in recipe:
        if keys.classify(k) is None:
            close = difflib.get_close_matches(k, known, n=1)
            out.append(f"unknown key {k!r}: not a TRL SFTConfig / ScriptArguments / ModelConfig key nor an "
                       f"alignment-handbook one" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return out


def _refused(recipe: dict[str, Any]) -> list[str]:
    out = []
    for k, (ok, todo) in keys.REFUSED.items():
        if k in recipe and recipe[k] not in ok and not (k == "dataset_kwargs" and _dataset_kwargs_ok(recipe[k])):
            out.append(f"{k}: {todo}")
    return out


def _dataset_kwargs_ok(v: Any) -> bool:
    return isinstance(v, dict) and all(
        (k in ("add_special_tokens", "append_concat_token") and v[k] is False) or k == "skip_prepare_dataset" for k in v)


# ----------------------------------------------------------------------------- translation


class _Builder:
    def __init__(self, recipe: dict[str, Any], t: Translation):
        self.r, self.t, self.reasons = recipe, t, []

    def has(self, k: str) -> bool:
        return k in self.r

    def get(self, k: str) -> Any:
        return self.r[k] if k in self.r else keys.TRL_DEFAULTS[k]

    def src(self, k: str) -> str:
        return k if k in self.r else f"TRL default ({k})"

    def put(self, dotted: str, value: Any, origin: str) -> None:
        node = self.t.values
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        self.t.origin[dotted] = origin

    def note(self, text: str) -> None:
        self.t.notes.append(text)

    def refuse(self, text: str) -> None:
        self.reasons.append(text)


def translate(recipe: dict[str, Any], *, accelerate: dict[str, Any] | None = None, name: str = "recipe",
              source: str = "<recipe>", accelerate_source: str | None = None) -> Translation:
    kind = non_sft_kind(recipe)
    if kind:
        raise RecipeError(kind)
    reasons = _unknown(recipe) + _refused(recipe)
    t = Translation(name=name, source=source)
    b = _Builder(recipe, t)
    b.put("stage", name, "the recipe file's name")
    train.translate_model(b)
    data.translate_data(b)
    data.translate_processing(b)
    train.translate_trainer(b)
    train.translate_peft(b)
    train.translate_storage(b)
    train.translate_hub(b)
    for k in sorted(keys.PASSTHROUGH & set(recipe)):
        b.put(f"trainer.trl_overrides.{k}", recipe[k], k)
    if accelerate is not None:
        translate_accelerate(accelerate, origin=accelerate_source or "accelerate config", recipe=recipe,
                             put=b.put, note=b.note, refuse=b.refuse)
    else:
        b.note("no accelerate config: scaling and deepspeed stay raysft's defaults (2 local CPU workers, no ZeRO); "
               "pass --accelerate-config FILE, or e.g. scaling=gpu_8x8 deepspeed=zero3")
    by_text: dict[str, list[str]] = {}
    for k in recipe:
        if k in keys.NOTED and keys.NOTED[k] != keys.HUB_NOTE:
            by_text.setdefault(keys.NOTED[k], []).append(k)
        elif k == "dataset_kwargs" and _dataset_kwargs_ok(recipe[k]) and recipe[k]:
            by_text.setdefault("raysft renders rows with the chat template alone (no special tokens added) and packs "
                               "them with position_ids (no concat token): nothing to do", []).append(k)
        elif k in keys.REFUSED and recipe[k] in keys.REFUSED[k][0]:
            by_text.setdefault("TRL's default value: nothing to translate", []).append(k)
    t.notes += [f"{', '.join(ks)}: {text}" for text, ks in by_text.items()]
    reasons += b.reasons
    if len(reasons) > 1:
        raise RecipeError(f"{source} is refused ({len(reasons)} reasons):\n  - " + "\n  - ".join(reasons))
    if reasons:
        raise RecipeError(f"{source}: {reasons[0]}")
    return t


# ----------------------------------------------------------------------------- output


def owner(dotted: str) -> str:
    """The config group whose choice on the command line replaces this translated value."""
    head, _, rest = dotted.partition(".")
    if head == "data":
        return "data" if rest.split(".")[0] in DATA_GROUP_FIELDS else "stage"
    return "stage" if head in ("trainer", "monitor", "stage") else head


def _escape(v: Any) -> Any:
    """OmegaConf would resolve ``${...}`` in a value (a template may hold one): escape it."""
    if isinstance(v, str):
        return v.replace("${", "\\${")
    if isinstance(v, list):
        return [_escape(x) for x in v]
    if isinstance(v, dict):
        return {k: _escape(x) for k, x in v.items()}
    return v


def _flow(v: Any) -> str:
    style = '"' if isinstance(v, str) and ("\n" in v or "\t" in v) else None  # one line, escaped
    text = yaml.safe_dump(_escape(v), default_flow_style=True, default_style=style, width=2**31, allow_unicode=True,
                          sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _kept(t: Translation, leave_out: set[str]) -> dict[str, Any]:
    def walk(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for k, v in node.items():
            dotted = prefix + k
            if owner(dotted) in leave_out:
                continue
            out[k] = v if dotted in t.origin else walk(v, dotted + ".")
            if out[k] == {} and dotted not in t.origin:
                del out[k]
        return out
    return walk(t.values, "")


def deletions(t: Translation, leave_out: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``~key`` overrides for schema-default dict entries the file does not have: a preset's dict merges
    into the schema's (``trainer.lr_scheduler_kwargs`` keeps ``min_lr_rate``), only an override deletes."""
    defaults = dataclasses.asdict(RaySFTConfig())
    out = []
    for dotted, value in sorted(t.origin.items()):
        value, default = t.get(dotted), defaults
        for part in dotted.split("."):
            default = default.get(part) if isinstance(default, dict) else None
        if isinstance(value, dict) and isinstance(default, dict) and owner(dotted) not in leave_out:
            out += [f"~{dotted}.{k}" for k in default if k not in value]
    return out


def render_preset(t: Translation, *, leave_out: set[str] | frozenset[str] = frozenset()) -> str:
    """The translation as a ``# @package _global_`` Hydra preset (``conf/recipe/<name>.yaml``): defaults
    overrides reset the groups it fills, every value carries the recipe key it came from. Groups in
    ``leave_out`` (chosen on the command line) are left out."""
    kept = _kept(t, set(leave_out))
    out = ["# @package _global_",
           f"# raysft recipe translated from {t.source} by `raysft import-recipe` (raysft.config.recipe_file).",
           "# Each value names the recipe key it came from; \"TRL default\": the file leaves the key out, so TRL's",
           "# default applies. Use it as `raysft recipe=<this file's name>` from conf/recipe/ (or --config-dir DIR",
           "# with the file in DIR/recipe/). Values below are merged after the groups: to swap a whole group",
           "# (model=..., data=...) delete its section here, or override single fields on the command line."]
    if leave_out:
        out.append(f"# Left out (chosen on the command line): {', '.join(sorted(leave_out))}.")
    dels = deletions(t, leave_out)
    if dels:
        out.append(f"# Run it with {' '.join(dels)} on the command line (`raysft --trl-config` adds it): the schema's "
                   "default of that entry would otherwise merge into the value below.")
    out += ["# Notes:", *[f"#   {line}" for n in t.notes for line in n.splitlines()], "defaults:"]
    resets = {"model": "base_model", "data": "base_data", "stage": "null", "peft": "none", "deepspeed": "none",
              "scaling": None, "storage": None}
    for group, reset in resets.items():
        if group in leave_out:
            continue
        filled = group == "stage" or group in kept or (group == "data" and "dataset_mixture" in kept.get("data", {}))
        option = f"base_{group}" if filled and group not in ("stage", "data", "model") else reset
        if option is not None and (filled or group in ("peft", "deepspeed")):
            out.append(f"  - override /{group}: {option}")
    lines: list[str] = []
    _emit(kept, "", 0, t, lines)
    out += lines
    text = "\n".join(out) + "\n"
    back = {k: v for k, v in (yaml.safe_load(text) or {}).items() if k != "defaults"}
    assert back == _escape(kept), "raysft.config.recipe_file: the preset does not read back as written"
    return text


def _emit(node: dict[str, Any], prefix: str, indent: int, t: Translation, out: list[str]) -> None:
    pad = "  " * indent
    for k, v in node.items():
        dotted = prefix + k
        if dotted not in t.origin:
            out.append(f"{pad}{k}:")
            _emit(v, dotted + ".", indent + 1, t, out)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append(f"{pad}{k}:  # {t.origin[dotted]}")
            block = yaml.safe_dump(_escape(v), default_flow_style=None, width=2**31, allow_unicode=True, sort_keys=False)
            out += [f"{pad}  {line}" for line in block.rstrip("\n").splitlines()]
        else:
            out.append(f"{pad}{k}: {_flow(v)}  # {t.origin[dotted]}")


def _short(v: Any) -> str:
    if isinstance(v, str) and len(v) > 60:
        return f"<{len(v)} characters of template text>" if "{%" in v or "{{" in v else v[:57] + "..."
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        ids = sorted({str(x.get("id") or x.get("path")) for x in v})
        return f"{len(v)} source(s) of {', '.join(ids)}"
    return _flow(v)


def summary_lines(t: Translation, *, leave_out: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """What the run gets from the recipe file: one line per raysft group, then the notes."""
    kept = _kept(t, set(leave_out))
    lines = [f"raysft: recipe file {t.source} translated ({len(t.origin)} settings; `raysft import-recipe` writes them "
             "as a preset):"]
    for section, node in kept.items():
        if not isinstance(node, dict):
            lines.append(f"  {section}: {_short(node)}")
            continue
        flat: list[str] = []

        def walk(n: dict[str, Any], prefix: str) -> None:
            for k, v in n.items():
                if f"{section}.{prefix}{k}" in t.origin:
                    flat.append(f"{prefix}{k}={_short(v)}")
                else:
                    walk(v, f"{prefix}{k}.")
        walk(node, "")
        lines.append(f"  {section}: {', '.join(flat)}")
    if leave_out:
        lines.append(f"  (from the command line instead: {', '.join(sorted(leave_out))})")
    lines += [f"  note: {n}" for n in t.notes]
    return lines
