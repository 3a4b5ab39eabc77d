"""Prepare once: tokenise and pack a data config once, into ``<storage.path>/prepared/<fingerprint>/``;
every run, epoch, resume and sweep trial with the same fingerprint reads that set.

The fingerprint is a hash of everything that changes the packed tokens (source files and their
version stamps, the mixture and its seed, the chat template text, the tokenizer files, the template
date when the template prints it, ``max_length``, the packing strategy, the loss mode, dedupe and
the other row filters, and the prepared format's version) and of nothing that does not (learning
rate, workers, steps, epochs). The set is written by the Ray Data pipeline, one shard per work unit
(bounded memory whatever the data size), then its stats, then ``manifest.json`` last: a set without
a manifest is never read, and preparing it again skips the shards already written.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raysft import assets, logs
from raysft.config import derived
from raysft.data import shards
from raysft.data.pipeline import DataSpec, DataStats, build_dataset, check_quality, merge_unit_stats
from raysft.data.readers import file_stamp
from raysft.storage import checksums, files
from raysft.storage.rundir import PreparedDir, Storage

log = logging.getLogger("raysft")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def template_text(spec: DataSpec) -> str:
    """The chat template the rows are rendered with: the configured one, else the tokenizer's."""
    text = assets.load_chat_template(spec.data.chat_template)
    if text is not None:
        return text
    d = Path(spec.tokenizer_path)
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text()
    if (d / "tokenizer_config.json").exists():
        return str(json.loads((d / "tokenizer_config.json").read_text()).get("chat_template") or "")
    return ""


def fingerprint_inputs(spec: DataSpec) -> dict[str, Any]:
    """Everything that changes the prepared rows, as plain JSON."""
    d, mix = spec.data, spec.data.dataset_mixture
    tok = Path(spec.tokenizer_path)
    tokenizer = ({n: _sha((tok / n).read_bytes()) for n in _TOKENIZER_FILES if (tok / n).is_file()}
                 if tok.is_dir() else {"name": spec.tokenizer_path})
    template = template_text(spec)
    return {
        "format_version": shards.FORMAT_VERSION,
        "sources": [{"name": s.name, "weight": s.weight, "columns": list(s.columns) if s.columns else None,
                     "files": [{"path": f.path, "format": f.format, "rows": f.num_rows, **file_stamp(f.path)}
                               for f in s.files]} for s in spec.sources],
        "mixture_seed": mix.seed, "test_split_size": mix.test_split_size,
        "template": _sha(template.encode()),
        # The date changes the tokens only through a template that prints it (strftime_now).
        "template_date": spec.date if "strftime_now" in template else None,
        "tokenizer": tokenizer,
        "max_length": d.max_length, "packing_strategy": derived.packing_strategy(d), "loss": d.loss,
        "eos_token": d.eos_token, "format": d.format, "column_map": d.column_map, "overlong": d.overlong,
        "window_rows": d.window_rows, "order": d.order, "dedupe": d.dedupe,
        "special_tokens_in_text": d.special_tokens_in_text,
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    return _sha(json.dumps(inputs, sort_keys=True).encode())[:16]


@dataclass(frozen=True)
class PreparedSet:
    """A complete prepared set (its manifest was read)."""

    dir: PreparedDir
    manifest: dict[str, Any]
    reused: bool = False

    @property
    def uri(self) -> str:
        return self.dir.uri

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    def shard_uris(self) -> dict[str, list[tuple[str, int]]]:
        return {split: [(self.dir.file(name), rows) for name, rows in entries]
                for split, entries in self.manifest["shards"].items()}

    def rows(self) -> shards.PreparedRows:
        return shards.PreparedRows(self.shard_uris(), self.max_length)

    def stats(self) -> DataStats:
        return DataStats.from_json(self.manifest["stats"])


def open_prepared(uri: str) -> PreparedSet:
    """A prepared set by URI (a folder with a manifest); ``ValueError`` naming what is missing."""
    pdir = PreparedDir.from_uri(uri)
    if not pdir.complete():
        raise ValueError(f"{uri} is not a complete prepared set (no {PreparedDir.MANIFEST}): run `raysft data prepare`")
    return PreparedSet(pdir, json.loads(files.read_bytes(pdir.file(PreparedDir.MANIFEST))), reused=True)


def prepare(spec: DataSpec, storage: Storage, *, data_cpus: float, concurrency: int,
            retry_timeout_s: float | None = None) -> PreparedSet:
    """The prepared set of ``spec`` under ``storage``: reused when complete and intact, else (re)built,
    skipping the shards a killed prepare already wrote and re-preparing only the shards that fail
    their checksums. Raises ``DataQualityError`` (no manifest) when too many rows are malformed. Ray
    must be initialised (the pipeline runs on Ray Data)."""
    spec = dataclasses.replace(spec, epochs=1)  # pack once: later epochs permute the packed rows
    inputs = fingerprint_inputs(spec)
    pdir = storage.prepared(fingerprint(inputs))
    known: dict[str, str] = {}  # shard -> CRC32 already checked
    if pdir.complete():
        prepared = PreparedSet(pdir, json.loads(files.read_bytes(pdir.file(PreparedDir.MANIFEST))), reused=True)
        check_quality(prepared.stats(), spec.data.max_bad_fraction)  # this run's threshold
        bad = verify_shards(prepared)
        if not bad:
            return prepared
        known = {rel: crc for rel, crc in prepared.manifest["checksums"].items() if rel not in {b.file for b in bad}}
        for b in bad:  # never trained on: deleted, then prepared again below (only they)
            log.warning("raysft: warning: prepared shard %s is corrupt (%s): re-preparing it", pdir.file(b.file), b)
            files.delete_file(pdir.file(b.file))
        files.delete_file(pdir.file(PreparedDir.MANIFEST))
    plan = spec.unit_plan()
    units = [(u.split, u.index) for split in ("train", "eval") for u in plan.units(split)]
    done, crcs = _finished_units(pdir, units, known)
    if done and len(done) < len(units) and not known:
        log.info("raysft: prepared set %s: %d of %d shards already written, preparing the rest", pdir.uri,
                 len(done), len(units))
    missing = {u for u in units if u not in done}
    if missing:
        ds = build_dataset(spec, "all", mode="write", only=missing, out=pdir, data_cpus=data_cpus, concurrency=concurrency,
                           retry_timeout_s=retry_timeout_s)
        for row in ds.iter_rows():
            st = json.loads(row["stats"])
            crcs[(st["split"], st["unit"])] = st.pop("crc32")
            done[(st["split"], st["unit"])] = st
    stats = merge_unit_stats(spec, (done[u] for u in units))
    check_quality(stats, spec.data.max_bad_fraction)  # raises before the manifest: the set stays incomplete
    rel = {u: pdir.shard(*u)[len(pdir.uri) + 1:] for u in units}
    manifest = {
        "fingerprint": pdir.name, "format_version": shards.FORMAT_VERSION, "max_length": spec.data.max_length,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shards": {split: [[rel[(s, i)], done[(s, i)]["packed_rows"]] for s, i in units if s == split]
                   for split in ("train", "eval")},
        "checksums": {rel[u]: crcs[u] for u in units}, "checksum_algorithm": checksums.ALGORITHM,
        "stats": stats.to_json(), "inputs": inputs,
    }
    files.write_bytes(pdir.file(PreparedDir.STATS), json.dumps(stats.to_json(), indent=1).encode())
    files.write_bytes(pdir.file(PreparedDir.MANIFEST), json.dumps(manifest, indent=1).encode())  # last
    return PreparedSet(pdir, manifest)


def verify_shards(prepared: PreparedSet) -> list[checksums.Mismatch]:
    """The shards whose checksum in storage is not the manifest's (S3: one HEAD each; local: the bytes
    read once). A set from an older raysft has none: said once, and used as it is."""
    expected = prepared.manifest.get("checksums")
    if expected is None:
        log.info("raysft: prepared set %s has no checksums (an older raysft): it cannot be verified", prepared.uri)
        return []
    return checksums.compare(prepared.uri, expected)


def _finished_units(pdir: PreparedDir, units: list[tuple[str, int]], known: dict[str, str]):
    """Units whose shard a previous prepare wrote completely (one listing per split, then footers),
    with each shard's checksum (``known``'s, else storage's)."""
    present = set()
    for split in ("train", "eval"):
        for e in files.list_dir(files.join(pdir.uri, split)):
            if e.type == pafs.FileType.File and e.base_name.endswith(".parquet"):
                present.add(f"{split}/{e.base_name}")
    out, crcs = {}, {}
    for split, i in units:
        uri = pdir.shard(split, i)
        rel = uri[len(pdir.uri) + 1:]
        if rel in present and (st := shards.shard_stats(uri)) is not None:
            out[(split, i)] = st
            crcs[(split, i)] = known.get(rel) or checksums.stored(uri)
    return out, crcs


def describe(prepared: PreparedSet) -> str:
    n = sum(rows for _, rows in prepared.manifest["shards"]["train"])
    where = prepared.uri
    if not files.is_remote(where) and not (rel := os.path.relpath(where)).startswith(".."):
        where = rel  # short when under the working directory, else the absolute path (never ../../x)
    return (f"{'reusing' if prepared.reused else 'prepared'} data set {prepared.fingerprint} ({n:,} packed train rows, "
            f"{logs.count(len(prepared.manifest['shards']['train']), 'shard')}) at {where}")
