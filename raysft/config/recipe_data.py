"""The data half of a recipe file's translation (``recipe_file.translate``): the sources (a handbook
``dataset_mixture``, ``trl sft``'s ``datasets`` or one ``dataset_name``), the mixture's seed and held-out
split, and the processing keys (chat template, eos, length, packing, loss mask)."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Iterator

from raysft import assets
from raysft.config import recipe_keys as keys
from raysft.config.data import STRATEGY_ALIASES

if TYPE_CHECKING:
    from raysft.config.recipe_file import _Builder

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_HANDBOOK_ENTRY = {"id", "config", "split", "columns", "weight", "revision"}
_TRL_ENTRY = {"path", "name", "data_dir", "data_files", "split", "columns", "fraction"}


def source_entry(b: _Builder, where: str, **entry: Any) -> dict[str, Any]:
    loc = entry.pop("id")
    if not isinstance(loc, str) or not loc:
        b.refuse(f"{where}: no dataset id / path")
        loc = "?"
    local = loc.startswith(("/", "./", "../", "~")) or os.path.exists(loc)
    return {("path" if local else "id"): loc, **{k: v for k, v in entry.items() if v is not None}}


def _entries(b: _Builder, entries: list, where: str, valid: set[str]) -> Iterator[tuple[int, dict]]:
    """The mapping entries of a recipe's source list, each other item and unknown key refused by name."""
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            b.refuse(f"{where}[{i}]: expected a mapping")
            continue
        for k in sorted(set(e) - valid):
            b.refuse(f"{where}[{i}].{k}: unknown key (valid: {', '.join(sorted(valid))})")
        yield i, e


def translate_data(b: _Builder) -> None:
    r = b.r
    if "dataset_mixture" in r and "datasets" in r:
        b.refuse("dataset_mixture (alignment-handbook) and datasets (TRL) both set: keep one")
    mixture = "dataset_mixture" in r or "datasets" in r
    streaming = bool(b.get("streaming")) if mixture else bool(b.get("dataset_streaming"))
    sources, seed, test, where = [], None, None, ""
    if "dataset_mixture" in r:
        mix, where = r["dataset_mixture"], "dataset_mixture"
        if not isinstance(mix, dict) or not isinstance(mix.get("datasets"), list) or not mix["datasets"]:
            b.refuse("dataset_mixture: expected {datasets: [{id, config, split, columns, weight}, ...], seed, test_split_size}")
            return
        for k in sorted(set(mix) - {"datasets", "seed", "test_split_size"}):
            b.refuse(f"dataset_mixture.{k}: unknown key (valid: datasets, seed, test_split_size)")
        for i, e in _entries(b, mix["datasets"], "dataset_mixture.datasets", _HANDBOOK_ENTRY):
            weight = e.get("weight", 1.0)
            if weight is None:
                b.note(f"dataset_mixture.datasets[{i}].weight: null keeps the split unshuffled in the handbook; raysft "
                       "keeps every row too (weight 1.0) after its seeded shuffle: the same rows, in another order")
            sources.append(source_entry(b, f"dataset_mixture.datasets[{i}]", id=e.get("id"), config=e.get("config"),
                                        split=e.get("split", "train"), revision=e.get("revision"),
                                        columns=e.get("columns"), weight=float(1.0 if weight is None else weight)))
        seed, test = mix.get("seed", 0), mix.get("test_split_size")
        b.t.origin["data.dataset_mixture.seed"] = "dataset_mixture.seed" if "seed" in mix else "handbook default (seed 0)"
    elif "datasets" in r:
        where = "datasets"
        if not isinstance(r["datasets"], list) or not r["datasets"]:
            b.refuse("datasets: expected a list of {path, name, split, columns}")
            return
        for i, e in _entries(b, r["datasets"], "datasets", _TRL_ENTRY):
            for k, todo in (("fraction", "TRL's fraction (normalised shares, capped) has no raysft equivalent: raysft's "
                             "weight is the fraction of a source's rows kept; use dataset_mixture with weights"),
                            ("data_dir", "point path at the local directory or file"),
                            ("data_files", "point path at the local directory or file")):
                if e.get(k) is not None:
                    b.refuse(f"datasets[{i}].{k}: {todo}")
            sources.append(source_entry(b, f"datasets[{i}]", id=e.get("path"), config=e.get("name"),
                                        split=e.get("split", "train"), columns=e.get("columns"), weight=1.0))
        seed, test = 42, b.get("test_split_size")
        b.t.origin["data.dataset_mixture.seed"] = "raysft's (TRL concatenates unshuffled; its test split is unseeded)"
    elif b.has("dataset_name"):
        where = "dataset_name"
        sources.append(source_entry(b, "dataset_name", id=r["dataset_name"], config=r.get("dataset_config"),
                                    split=b.get("dataset_train_split"), weight=1.0))
        seed = 42
        b.t.origin["data.dataset_mixture.seed"] = "raysft's (TRL trains the split unshuffled; every row is kept)"
        if b.has("dataset_test_split") or b.get("eval_strategy") not in ("no", None):
            b.note(f"dataset_test_split={b.get('dataset_test_split')!r}: raysft evaluates a held-out part of the "
                   "training rows (data.dataset_mixture.test_split_size, 0 here: no eval set), not a separate split")
    else:
        b.refuse("no data: set dataset_mixture (alignment-handbook), datasets (trl sft) or dataset_name")
        return
    ignored = [k for k in ("dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split",
                           "dataset_streaming") if b.has(k) and where != "dataset_name"]
    if ignored:
        b.note(f"{', '.join(ignored)}: ignored beside {where} (as TRL and the handbook do); the mixture's held-out "
               "split is the eval set")
    b.put("data.dataset_mixture.datasets", sources, where)
    origin = b.t.origin.pop("data.dataset_mixture.seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        b.refuse(f"dataset_mixture.seed={seed!r}: give an int (raysft's mixture is always seeded)")
        seed = 0
    b.put("data.dataset_mixture.seed", seed, origin)
    b.put("data.dataset_mixture.test_split_size", _test_split(b, test), f"{where}: test_split_size" if test is not None
          else "no test split (test_split_size unset)")
    if streaming:
        b.put("data.order", "streaming", "dataset_streaming" if where == "dataset_name" else "streaming")


def _test_split(b: _Builder, v: Any) -> float:
    """As ``datasets.train_test_split`` reads ``test_size``: an int is a row count, a float a fraction in (0, 1)."""
    if v is None:
        return 0.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        b.refuse(f"test_split_size={v!r}: give a fraction in (0, 1) or a row count (an int >= 1)")
        return 0.0
    if isinstance(v, float) and v >= 1:
        b.refuse(f"test_split_size={v}: datasets reads a float as a fraction in (0, 1); write {int(v)} for a row count")
        return 0.0
    if v == 0:
        b.note("test_split_size: 0: no eval split")
    return float(v)


def translate_processing(b: _Builder) -> None:
    r = b.r
    if b.has("chat_template") and b.has("chat_template_path"):
        b.refuse("chat_template and chat_template_path both set: keep one")
    if b.has("chat_template") and r["chat_template"] is not None:
        text = r["chat_template"]
        same = next((n for n, p in assets.TEMPLATES.items() if p.read_text() == text), None)
        if not isinstance(text, str) or not assets.is_inline_template(text):
            b.refuse("chat_template: expected the Jinja template text")
        elif same:
            b.put("data.chat_template", same, f"chat_template (the text is raysft's bundled '{same}' template, verbatim)")
        else:
            b.put("data.chat_template", text, "chat_template (inline text)")
            if b.get("assistant_only_loss") and not _GENERATION.search(text):
                b.note("chat_template has no {% generation %} markers: with assistant_only_loss raysft finds the assistant "
                       "turns by rendering prefixes")
    elif b.has("chat_template_path") and r["chat_template_path"] is not None:
        path = str(r["chat_template_path"])
        if os.path.isdir(path):
            b.refuse(f"chat_template_path={path!r} is a directory: give the .jinja file")
        b.put("data.chat_template", path, "chat_template_path")
    else:
        b.put("data.chat_template", None, "TRL default: the tokenizer's template")
    b.put("data.eos_token", b.get("eos_token"), b.src("eos_token") + ("" if b.has("eos_token") else
                                                                      ": the tokenizer's (raysft: none appended)"))
    if b.has("max_length") and b.has("max_seq_length") and r["max_length"] != r["max_seq_length"]:
        b.refuse(f"max_length={r['max_length']} and max_seq_length={r['max_seq_length']} disagree: keep max_length")
    length_key = "max_length" if b.has("max_length") or not b.has("max_seq_length") else "max_seq_length"
    length = r.get(length_key, keys.TRL_DEFAULTS["max_length"])
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        b.refuse(f"{length_key}={length!r}: raysft packs fixed-length rows: give max_length in tokens")
    b.put("data.max_length", length, b.src(length_key) if length_key == "max_length" else "max_seq_length (old name)")
    if b.has("max_seq_length"):
        b.note("max_seq_length: SFTConfig's old name of max_length: data.max_length")
    b.put("data.packing", bool(b.get("packing")), b.src("packing"))
    strategy = str(b.get("packing_strategy"))
    if b.get("packing"):
        new = STRATEGY_ALIASES.get(strategy, strategy)
        if new not in ("bfd", "bfd_split", "wrapped"):
            b.refuse(f"packing_strategy={strategy!r}: raysft packs with bfd, bfd_split or wrapped")
        b.put("data.packing_strategy", new, b.src("packing_strategy") + (f" ({strategy!r} renamed)" if new != strategy else ""))
        if new != strategy:
            b.note(f"packing_strategy: {strategy!r} is TRL's old name (TRL <= 0.19) of best-fit decreasing packing: "
                   f"data.packing_strategy={new}")
    elif r.get("padding_free"):
        b.note("padding_free without packing: raysft (data.packing=false) gives each sequence its own row; set packing: "
               "true for padding-free rows")
    b.put("data.loss", *_loss(b))
    b.put("data.dedupe", False, "TRL and the handbook train every row, duplicates included")
    b.put("data.special_tokens_in_text", "keep", "TRL and the handbook train every row, special tokens in text included")


def _loss(b: _Builder) -> tuple[str, str]:
    if b.get("assistant_only_loss"):
        return "assistant_only", "assistant_only_loss"
    if b.get("completion_only_loss") is False:
        return "all", "completion_only_loss"
    cols = {c for e in b.t.get("data.dataset_mixture.datasets", []) for c in (e.get("columns") or [])}
    src = "completion_only_loss" if b.has("completion_only_loss") else "TRL default (completion_only_loss unset)"
    if {"prompt", "completion"} <= cols:
        return "completion_only", f"{src}: prompt-completion columns train the completion only"
    if not cols & {"messages", "text", "conversations"}:
        b.note("completion_only_loss: TRL trains only the completions of prompt-completion rows and every token of "
               "conversations; the columns do not say which this data is: data.loss=all (data.loss=completion_only "
               "for prompt/completion data)")
    return "all", f"{src}: TRL trains every token of conversations"
