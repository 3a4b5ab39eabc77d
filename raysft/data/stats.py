"""The data's counts: per source (rows selected, kept, malformed by reason, duplicates, special-token
rows, tokens, trained tokens, truncations, drops) and per split (packed rows and tokens), merged from
the per-unit counts the pipeline reports, and the quality gate that stops a run on malformed data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # type hints only: the pipeline module imports this one
    from raysft.data.pipeline import DataSpec

log = logging.getLogger(__name__)
MAX_EXAMPLES = 3  # bad-row examples kept per source and reason


def new_source_stats() -> dict[str, Any]:
    """Per-source counts. ``bad``: malformed rows by reason; ``duplicates``: repeats by reason (skipped,
    not malformed); ``special_tokens``: rows whose text holds a special token (skipped or kept, as
    ``data.special_tokens_in_text`` says)."""
    return {"selected": 0, "kept": 0, "bad": {}, "duplicates": {}, "special_tokens": 0, "examples": [], "tokens": 0,
            "trained_tokens": 0, "truncated": 0, "dropped_too_long": 0}


@dataclass
class DataStats:
    sources: dict[str, dict[str, Any]]
    train_packed_rows: int
    train_packed_tokens: int
    eval_packed_rows: int
    max_length: int
    date: str
    per_epoch_units: int = 0
    eval_sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def packing_efficiency(self) -> float:
        return self.train_packed_tokens / max(1, self.train_packed_rows * self.max_length)

    def to_json(self) -> dict[str, Any]:
        return {"sources": self.sources, "eval_sources": self.eval_sources, "train_packed_rows": self.train_packed_rows,
                "train_packed_tokens": self.train_packed_tokens, "eval_packed_rows": self.eval_packed_rows,
                "max_length": self.max_length, "packing_efficiency": self.packing_efficiency, "date": self.date}


    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DataStats":
        return cls(d["sources"], d["train_packed_rows"], d["train_packed_tokens"], d["eval_packed_rows"], d["max_length"],
                   d["date"], eval_sources=d.get("eval_sources", {}))


class DataQualityError(RuntimeError):
    """Too many malformed rows in a source: the message lists counts per reason and examples."""


def merge_unit_stats(spec: DataSpec, unit_stats: Iterator[dict[str, Any]]) -> DataStats:
    """The run's data stats from per-unit counts (a stats pass, or the footers of prepared shards)."""
    merged: dict[str, dict] = {"train": {n: new_source_stats() for n in spec.source_names},
                               "eval": {n: new_source_stats() for n in spec.source_names}}
    packed = {"train": [0, 0], "eval": [0, 0]}
    for st in unit_stats:
        split = st["split"]
        packed[split][0] += st["packed_rows"]
        packed[split][1] += st["packed_tokens"]
        for name, s in st["sources"].items():
            _merge(merged[split][name], s)
    return DataStats(merged["train"], packed["train"][0], packed["train"][1], packed["eval"][0],
                     spec.data.max_length, spec.date, eval_sources=merged["eval"])


def _merge(into: dict, add: dict) -> None:
    for k, v in add.items():
        if k in ("bad", "duplicates"):
            for reason, n in v.items():
                into[k][reason] = into[k].get(reason, 0) + n
        elif k == "examples":
            for e in v:
                if sum(1 for x in into["examples"] if x["reason"] == e["reason"]) < MAX_EXAMPLES:
                    into["examples"].append(e)
        else:
            into[k] += v


def where_in_file(path: str | None, row: int) -> str:
    """'line N' (1-based, as editors count) for JSON Lines files, 'row N' (0-based) for tables."""
    if path and path.endswith((".jsonl", ".ndjson", ".json")):
        return f"line {row + 1}"
    return f"row {row}"


def check_quality(stats: DataStats, max_bad_fraction: float) -> None:
    """Raise ``DataQualityError`` when a source has more malformed rows than ``max_bad_fraction``;
    log what was skipped otherwise. Duplicates and special-token rows are reported, not malformed."""
    problems = []
    for split_sources in (stats.sources, stats.eval_sources):
        for name, st in split_sources.items():
            bad = sum(st["bad"].values())
            if st["selected"] and bad / st["selected"] > max_bad_fraction:
                lines = [f"  {reason}: {n}" for reason, n in sorted(st["bad"].items())]
                if st.get("duplicates"):
                    lines.append("  duplicates (skipped, not malformed): " +
                                 ", ".join(f"{r}: {n}" for r, n in sorted(st["duplicates"].items())))
                ex = [f"  e.g. {e['file'] or name} {where_in_file(e['file'], e['row'])}, field {e['field']}: {e['message']}"
                      for e in st["examples"][:5]]
                problems.append(f"source {name!r}: {bad} of {st['selected']} selected rows are malformed "
                                f"({bad / st['selected']:.1%} > data.max_bad_fraction={max_bad_fraction}):\n" + "\n".join(lines + ex))
    if problems:
        raise DataQualityError("\n".join(problems) + "\nFix or drop these rows, or raise data.max_bad_fraction to train anyway.")
    for split_sources in (stats.sources, stats.eval_sources):
        for name, st in split_sources.items():
            if st["bad"]:
                log.warning("source %r: skipped %d malformed rows %s; first: %s", name, sum(st["bad"].values()),
                            dict(st["bad"]), st["examples"][:1])
            if st.get("duplicates"):
                log.warning("source %r: skipped %d duplicate rows %s (data.dedupe=false keeps them)", name,
                            sum(st["duplicates"].values()), dict(st["duplicates"]))
            if st.get("special_tokens"):
                log.warning("source %r: %d rows hold special tokens in their text (data.special_tokens_in_text)",
                            name, st["special_tokens"])
