"""The data pipeline on Ray Data: mixture plan -> work units -> packed, model-ready rows.

    sources.resolve_files ─► mixture.plan_mixture ─► units.UnitPlan
        ─► ray.data.from_items(units) ─► map_batches(PrepareUnit): read ► validate ► render+mask ► pack
        ─► one parquet shard per unit (``mode="write"``, driven by ``prepared.prepare``), read by the workers

Everything heavy runs inside ``PrepareUnit``, one unit (a bounded window of rows) per call, so
Ray Data streams units through a pool of actors with bounded memory, and the packed rows depend
only on the config and the seed (``preserve_order``), not on the number of CPUs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import ray.data

from raysft import assets
from raysft.config import DataConfig, derived
from raysft.data import pack as packing
from raysft.data import shards
from raysft.data.mixture import MixturePlan, plan_mixture
from raysft.data.render import ChatRenderer
from raysft.data.sources import SourceFile, read_rows, resolve_files
# DataQualityError and DataStats are part of this module's interface (collect_stats returns / raises them).
from raysft.data.stats import (MAX_EXAMPLES, DataQualityError, DataStats, check_quality,  # noqa: F401
                               merge_unit_stats, new_source_stats)
from raysft.data.units import Unit, UnitPlan
from raysft.data.validate import ColumnMap, DuplicateFilter, RowError, detect_format, normalize
from raysft.storage import retry

log = logging.getLogger(__name__)

PACKED_COLUMNS = ("input_ids", "labels", "position_ids", "source_ids", "unit")


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ResolvedSource:
    name: str
    files: tuple[SourceFile, ...]
    columns: tuple[str, ...] | None
    weight: float

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def locate(self, rows: np.ndarray) -> Iterator[tuple[SourceFile, np.ndarray, np.ndarray]]:
        """Split source-level rows into (file, rows in file, positions in ``rows``)."""
        starts = np.cumsum([0] + [f.num_rows for f in self.files])
        which = np.searchsorted(starts, rows, side="right") - 1
        for i, f in enumerate(self.files):
            pos = np.flatnonzero(which == i)
            if len(pos):
                yield f, rows[pos] - starts[i], pos


def resolve_sources(data: DataConfig) -> list[ResolvedSource]:
    root = assets.resolve(data.root)
    out, seen = [], Counter()
    for s in data.dataset_mixture.datasets:
        files = resolve_files(id=s.id, path=assets.resolve(s.path), config=s.config, split=s.split, data_root=root,
                              revision=s.revision)
        name = s.label
        seen[name] += 1
        if seen[name] > 1:  # the same split listed twice stays two sources with distinct names
            name = f"{name}#{seen[name]}"
        out.append(ResolvedSource(name, tuple(files), tuple(s.columns) if s.columns else None, s.weight))
    if len(out) > 32767:
        raise ValueError("more than 32767 sources do not fit the int16 source_ids column")
    return out


# ----------------------------------------------------------------------------- spec


@dataclass
class DataSpec:
    """Everything a PrepareUnit actor needs: plain, picklable, built once on the driver."""

    data: DataConfig
    sources: list[ResolvedSource]
    plan: MixturePlan
    tokenizer_path: str
    date: str
    epochs: int = 1

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def unit_plan(self) -> UnitPlan:
        return UnitPlan(self.plan, order=self.data.order, window_rows=self.data.window_rows,
                        seed=self.data.dataset_mixture.seed, epochs=self.epochs)


def build_spec(data: DataConfig, tokenizer_path: str, *, epochs: int = 1, date: str | None = None) -> DataSpec:
    """The data plan of ``data``; the template date is pinned here: ``date``, else ``derived.template_date``."""
    sources = resolve_sources(data)
    mix = data.dataset_mixture
    plan = plan_mixture([s.num_rows for s in sources], [s.weight for s in sources], mix.seed, mix.test_split_size)
    return DataSpec(data, sources, plan, tokenizer_path, date or derived.template_date(data), epochs)


# ----------------------------------------------------------------------------- one unit


def load_fast_tokenizer(path: str):
    """The fast tokenizer, without importing torch when possible.

    NOTE: ``AutoTokenizer`` imports torch (~3 s of CPU per data actor here); every data actor loads
    a tokenizer, so a local ``tokenizer.json`` is loaded through ``PreTrainedTokenizerFast``, which is
    what rendering needs (a fast backend with offsets). Anything else goes through ``AutoTokenizer``.
    Both are imported here, on use, for that reason."""
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)



SPECIAL_TOKENS_REASON = "special_tokens_in_text"


def special_token_finder(tokenizer) -> re.Pattern | None:
    """A pattern matching any of the tokenizer's special tokens (None when it has none)."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(tokenizer.all_special_tokens)
    specials = sorted((t for t in specials if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


class PrepareUnit:
    """Ray Data callable class: unit ids in, packed rows (or per-unit stats) out.

    ``mode="rows"`` yields the packed columns; ``mode="stats"`` yields one row per unit holding its
    counts as JSON (the stats pass that sizes the run reads no tensors back); ``mode="write"`` writes
    each unit's rows as a shard of the prepared set ``out`` (a ``PreparedDir``) and yields its counts."""

    def __init__(self, spec: DataSpec, mode: str = "rows", out=None, retry_timeout_s: float | None = None):
        self.out = out
        if retry_timeout_s is not None:
            retry.configure(retry_timeout_s)  # this actor's storage writes ride out outages as the run's do
        self.spec, self.mode = spec, mode
        self.unit_plan = spec.unit_plan()  # built once per actor: in streaming order it sorts the whole plan
        self.units = {u.index: u for u in self.unit_plan.units("train")}
        self.eval_units = {u.index: u for u in self.unit_plan.units("eval")}
        data = spec.data
        self.tokenizer = load_fast_tokenizer(spec.tokenizer_path)
        self.renderer = ChatRenderer(self.tokenizer, assets.load_chat_template(data.chat_template),
                                     date=datetime.date.fromisoformat(spec.date), loss=data.loss,
                                     eos_token=data.eos_token)
        self.cmap = ColumnMap.named(data.column_map)
        self.specials = special_token_finder(self.tokenizer)
        self.strategy = derived.packing_strategy(data)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.formats: dict[int, str] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        for split, index in zip(batch["split"], batch["unit"]):
            unit = (self.eval_units if split == "eval" else self.units)[int(index)]
            columns, stats = self.prepare(unit)
            if self.mode == "write":
                _, crc = shards.write_shard(self.out.shard(unit.split, unit.index), columns, stats, self.spec.data.max_length)
                stats = {**stats, "crc32": crc}  # for the manifest (a file cannot hold its own checksum)
            if self.mode in ("stats", "write"):
                yield {"unit": np.array([unit.index]), "split": np.array([unit.split]),
                       "stats": np.array([json.dumps(stats)])}
                continue
            if len(columns["input_ids"]):
                yield {k: columns[k] for k in PACKED_COLUMNS}

    def prepare(self, unit: Unit) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.pack_unit(unit, *self.read_unit(unit))

    def read_unit(self, unit: Unit) -> tuple[np.ndarray, np.ndarray, list[dict | None], dict[str, dict]]:
        """A unit's (source indices, physical rows), the normalized example at each position (None for
        a bad row) and the per-source stats so far. ``raysft data preview`` renders from this too."""
        src_idx, rows = self.unit_plan.rows(unit)
        names = self.spec.source_names
        per_source = {n: new_source_stats() for n in names}
        examples: list[dict | None] = [None] * len(rows)
        for s in np.unique(src_idx):
            self._read_source(int(s), rows, src_idx, examples, per_source[names[s]])
        return src_idx, rows, examples, per_source

    def pack_unit(self, unit: Unit, src_idx: np.ndarray, rows: np.ndarray, examples: list[dict | None],
                  per_source: dict[str, dict]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Render, mask, truncate and pack what ``read_unit`` returned: (packed columns, unit stats)."""
        names = self.spec.source_names
        ok = [i for i, e in enumerate(examples) if e is not None]
        rendered = self.renderer.render_batch([examples[i] for i in ok], on_error="return")
        seqs: list[packing.Sequence] = []
        for i, r in zip(ok, rendered):
            s = int(src_idx[i])
            st = per_source[names[s]]
            if isinstance(r, ValueError):
                self._bad(st, RowError("render", "messages", str(r)), s, int(rows[i]))
                continue
            seq = packing.Sequence(r.input_ids, r.labels, s)
            if len(seq.input_ids) > self.spec.data.max_length and self.strategy != "wrapped":
                trimmed = packing.truncate_or_drop(seq, self.spec.data.max_length, self.spec.data.overlong)
                # A truncation that cut away every trained token is a drop, not a truncation.
                if trimmed is None or not (trimmed.labels != -100).any():
                    st["dropped_too_long"] += 1
                    continue
                st["truncated"] += 1
                seq = trimmed
            st["kept"] += 1
            st["tokens"] += len(seq.input_ids)
            st["trained_tokens"] += int((seq.labels != -100).sum())
            seqs.append(seq)

        columns = packing.pack(seqs, self.spec.data.max_length, self.strategy, self.pad_id)
        n_rows = len(columns["input_ids"])
        columns["unit"] = np.full(n_rows, unit.index, dtype=np.int32)  # the stream cursor counts rows per unit
        stats = {"unit": unit.index, "split": unit.split, "epoch": unit.epoch, "sources": per_source,
                 "packed_rows": n_rows, "packed_tokens": int(np.sum(columns["num_tokens"])) if n_rows else 0}
        return columns, stats

    def _read_source(self, s: int, rows: np.ndarray, src_idx: np.ndarray, examples: list, st: dict) -> None:
        source = self.spec.sources[s]
        pos = np.flatnonzero(src_idx == s)
        st["selected"] += len(pos)
        wanted = rows[pos]
        # Each physical row is read and validated once even when weight > 1 repeats it; rows are
        # checked in file order so the *first* occurrence of a duplicate is the one kept.
        unique, inverse = np.unique(wanted, return_inverse=True)
        results: dict[int, dict | RowError] = {}
        dups = DuplicateFilter(self.cmap) if self.spec.data.dedupe else None
        repeats = np.bincount(inverse, minlength=len(unique))  # > 1 only when weight > 1
        for f, local, where in source.locate(unique):
            for (row_in_file, raw), phys, n in zip(read_rows(f, local, list(source.columns) if source.columns else None),
                                                   unique[where], repeats[where]):
                r = self._normalize(s, raw, dups) if not isinstance(raw, RowError) else raw
                hit = self._special_token(r) if not isinstance(r, RowError) else None
                if hit is not None:
                    st["special_tokens"] += int(n)
                    err = RowError(SPECIAL_TOKENS_REASON, "messages", f"the text holds the special token {hit!r}, which the "
                                   "tokenizer reads as a control token (a fake turn boundary); data.special_tokens_in_text="
                                   f"{self.spec.data.special_tokens_in_text}")
                    self._example(st, err, int(phys), f.path, int(row_in_file))
                    if self.spec.data.special_tokens_in_text == "skip":
                        r = err
                elif isinstance(r, RowError):  # counted once per selected position
                    self._bad(st, r, s, int(phys), f.path, int(row_in_file), count=int(n))
                results[int(phys)] = r
        for p, u in zip(pos, inverse):
            r = results[int(unique[u])]
            examples[p] = None if isinstance(r, RowError) else r

    def _special_token(self, example: dict) -> str | None:
        if self.specials is None:
            return None
        for text in _strings(example):
            m = self.specials.search(text)
            if m:
                return m.group(0)
        return None

    def _normalize(self, s: int, raw: dict, dups: DuplicateFilter | None) -> dict | RowError:
        try:
            fmt = self.formats.get(s)
            if fmt is None and self.spec.data.format == "auto":
                fmt = self.formats.setdefault(s, detect_format(raw.keys(), self.cmap) or "auto")
            out = normalize(raw, fmt or self.spec.data.format, self.cmap)
            if not isinstance(out, RowError) and dups is not None:
                out = dups.check(raw) or out
            return out
        except Exception as e:  # a row must never crash the pipeline: it is counted and reported
            return RowError("unreadable", "row", f"{type(e).__name__}: {e}")

    def _bad(self, st: dict, err: RowError, s: int, row: int, path: str | None = None, row_in_file: int | None = None,
             count: int = 1) -> None:
        kind = "duplicates" if err.reason.startswith("duplicate") else "bad"  # a repeat is not malformed
        st[kind][err.reason] = st[kind].get(err.reason, 0) + count
        self._example(st, err, row, path, row_in_file)

    def _example(self, st: dict, err: RowError, row: int, path: str | None, row_in_file: int | None) -> None:
        if sum(1 for e in st["examples"] if e["reason"] == err.reason) < MAX_EXAMPLES:
            st["examples"].append({"reason": err.reason, "file": path, "row": row_in_file if row_in_file is not None else row,
                                   "field": err.field, "message": err.message})


# ----------------------------------------------------------------------------- datasets


def build_dataset(spec: DataSpec, split: str = "train", mode: str = "rows", *, data_cpus: float,
                  concurrency: int, only: set[tuple[str, int]] | None = None, out=None,
                  retry_timeout_s: float | None = None):
    """A lazily executed Ray Dataset of packed rows (or per-unit stats) for ``split``
    (``"train"``, ``"eval"``, or ``"all"`` = both, for the stats pass).

    ``only``: just these ``(split, unit)`` pairs (a resumed prepare); ``out``: the ``PreparedDir`` that
    ``mode="write"`` writes shards into."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic row order, whatever the CPU count
    ctx.enable_progress_bars = False
    plan = spec.unit_plan()
    units = [u for s in (("train", "eval") if split == "all" else (split,)) for u in plan.units(s)]
    units = [u for u in units if only is None or (u.split, u.index) in only]
    if not units:
        return None
    items = [{"unit": u.index, "split": u.split} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        # NOTE: Ray 2.60 has no named parameter for max_restarts (its docs say pass it as here) yet
        # warns that such extra keywords are deprecated; the warning is about this call only.
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return ds.map_batches(PrepareUnit, fn_constructor_kwargs={"spec": spec, "mode": mode, "out": out,
                                                                  "retry_timeout_s": retry_timeout_s},
                              batch_size=1, num_cpus=data_cpus,
                              compute=ray.data.ActorPoolStrategy(min_size=1, max_size=concurrency),
                              # NOTE: no actor restarts. Ray warns (an error line on the console) about
                              # restartable actors with constructor arguments in the object store; a data
                              # actor that dies fails the prepare instead, and the next run resumes it from
                              # the shards already written.
                              max_restarts=0)


def collect_stats(spec: DataSpec, *, data_cpus: float, concurrency: int) -> DataStats:
    """One pass over epoch 0 and the eval split, returning counts only (no tensors)."""
    one_epoch = dataclasses.replace(spec, epochs=1)
    rows = build_dataset(one_epoch, "all", mode="stats", data_cpus=data_cpus, concurrency=concurrency).iter_rows()
    stats = merge_unit_stats(spec, (json.loads(row["stats"]) for row in rows))
    check_quality(stats, spec.data.max_bad_fraction)
    return stats
