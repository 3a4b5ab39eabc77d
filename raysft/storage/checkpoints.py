"""Checkpoints in storage: the HF Trainer's checkpoint folders, uploaded by Ray Train (through our
upload function) to ``<run>/checkpoint_<timestamp>/``, local or S3.

Every rank writes a manifest of its files (name and size) *last*, after the Trainer has written
its shards, and the manifest travels with the upload; a checkpoint counts as complete only when
every rank's manifest is present and every file it lists exists with its size, so a checkpoint
whose upload was cut short is never mistaken for a complete one.

Which checkpoint to resume from is decided here, from what is in storage, not from Ray Train's
registry alone: Ray Train V2 (2.60) can leave a checkpoint that was uploaded just before a worker
died unregistered (it then resumes from an older one, and ``num_to_keep`` never prunes the orphan).
``latest_complete`` picks the newest complete checkpoint by global step, registered or not, and
``prune`` removes what Ray no longer tracks once a run has finished.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raysft.storage import files

log = logging.getLogger(__name__)

STATE_FILE = "raysft_state.json"


def manifest_name(rank: int) -> str:
    return f"raysft_manifest_rank{rank}.json"


def write_manifest(ckpt_dir: str | Path, rank: int, world_size: int, state: dict[str, Any]) -> None:
    ckpt_dir = Path(ckpt_dir)
    if rank == 0:
        (ckpt_dir / STATE_FILE).write_text(json.dumps(state))
    entries = {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in sorted(ckpt_dir.rglob("*"))
               if p.is_file() and not p.name.startswith("raysft_manifest_rank")}
    tmp = ckpt_dir / f".{manifest_name(rank)}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "world_size": world_size, "files": entries}))
    os.replace(tmp, ckpt_dir / manifest_name(rank))


def verify(ckpt_dir: str | Path) -> tuple[bool, str]:
    """(complete?, why not) for a local (or downloaded) checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    sizes = {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in ckpt_dir.rglob("*") if p.is_file()}
    return _check(sizes, lambda rel: (ckpt_dir / rel).read_text())


def _check(sizes: dict[str, int], read) -> tuple[bool, str]:
    """Completeness from a listing (relative path -> size) and a reader of small files."""
    manifests = sorted(rel for rel in sizes if rel.startswith("raysft_manifest_rank") and rel.endswith(".json"))
    if not manifests:
        return False, "no manifest"
    world = json.loads(read(manifests[0]))["world_size"]
    if len(manifests) != world:
        return False, f"{len(manifests)} of {world} rank manifests"
    for m in manifests:
        for rel, size in json.loads(read(m))["files"].items():
            if sizes.get(rel) != size:
                return False, f"{rel} missing or truncated"
    return True, ""


@dataclass(frozen=True)
class CheckpointInfo:
    uri: str
    complete: bool
    why: str = ""
    state: dict | None = None  # raysft_state.json: global_step, num_tokens, data cursor, world_size

    @property
    def step(self) -> int:
        return int((self.state or {}).get("global_step", -1))

    @property
    def world_size(self) -> int | None:
        return (self.state or {}).get("world_size")


def inspect(uri: str) -> CheckpointInfo:
    """A checkpoint folder in storage (local or S3), checked without downloading its shards."""
    path = files.filesystem(uri)[1]
    listing = files.list_dir(uri, recursive=True)
    sizes = {i.path[len(path):].lstrip("/"): i.size for i in listing if i.type == pafs.FileType.File}

    def read(rel: str) -> str:
        return files.read_bytes(files.join(uri, rel)).decode()

    ok, why = _check(sizes, read)
    state = json.loads(read(STATE_FILE)) if STATE_FILE in sizes else None
    return CheckpointInfo(uri, ok, why, state)


def scan(run_uri: str) -> list[CheckpointInfo]:
    """Every ``checkpoint_*`` folder of a run, oldest first (Ray names them by timestamp)."""
    entries = files.list_dir(run_uri)
    names = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_"))
    return [inspect(files.join(run_uri, n)) for n in names]


def latest_complete(run_uri: str, found: list[CheckpointInfo] | None = None) -> CheckpointInfo | None:
    """The complete checkpoint with the highest global step (registered with Ray Train or not).
    ``found``: the run's ``scan`` when the caller already has it (each scan reads every manifest)."""
    done = [c for c in (scan(run_uri) if found is None else found) if c.complete]
    return max(done, key=lambda c: (c.step, c.uri)) if done else None


def resolve(uri: str) -> CheckpointInfo:
    """``uri`` names a checkpoint folder or a run folder (its newest complete checkpoint)."""
    info = inspect(uri)
    if info.complete:
        return info
    latest = latest_complete(uri)
    if latest is None:
        raise ValueError(f"{uri} is neither a complete raysft checkpoint ({info.why}) nor a run folder with one; "
                         "pass a run folder (storage.path/<name>) or one of its checkpoint_* folders")
    return latest


def remove_incomplete(run_uri: str, found: list[CheckpointInfo] | None = None) -> list[str]:
    """Delete the run's checkpoint folders that can never be resumed from (an upload cut short)."""
    removed = []
    for c in (scan(run_uri) if found is None else found):
        if not c.complete:
            log.warning("removing incomplete checkpoint %s (%s)", c.uri, c.why)
            _delete(c.uri)
            removed.append(c.uri)
    return removed


def prune(run_uri: str, keep: set[str]) -> list[str]:
    """After a run: delete checkpoint folders whose names are not in ``keep`` (Ray's kept set):
    orphans Ray Train lost track of, and incomplete uploads."""
    removed = []
    for c in scan(run_uri):
        if c.uri.rstrip("/").rsplit("/", 1)[-1] not in keep:
            _delete(c.uri)
            removed.append(c.uri)
    return removed


def apply_retention(run_uri: str, *, keep: int, score_key: str | None = None, greater_is_better: bool = False,
                    found: list[CheckpointInfo] | None = None) -> list[str]:
    """Delete what the retention policy does not keep, and return the URIs deleted: keep the newest
    complete checkpoint and the ``keep`` newest complete ones (or the ``keep`` best by ``score_key``,
    from each checkpoint's state); delete the others and every incomplete folder, but only among
    those older than the newest complete one, so an upload still in flight is never touched.

    NOTE: raysft keeps its checkpoints itself rather than through Ray Train's ``num_to_keep``: Ray
    counts an abandoned (never completed) upload as a checkpoint and would delete the last complete
    one to make room for it."""
    found = scan(run_uri) if found is None else found
    complete = [c for c in found if c.complete]
    if not complete:
        return []
    newest = max(complete, key=lambda c: (c.step, c.uri))
    if score_key:
        scored = [c for c in complete if (c.state or {}).get("score") is not None]
        ranked = sorted(scored, key=lambda c: c.state["score"], reverse=greater_is_better)
    else:
        ranked = sorted(complete, key=lambda c: (c.step, c.uri), reverse=True)
    kept = {newest.uri, *(c.uri for c in ranked[:keep])}
    horizon = newest.uri.rstrip("/").rsplit("/", 1)[-1]
    removed = []
    for c in found:
        if c.uri not in kept and c.uri.rstrip("/").rsplit("/", 1)[-1] < horizon:
            _delete(c.uri)
            removed.append(c.uri)
    return removed


def _delete(uri: str) -> None:
    files.delete_dir(uri)


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    p = Path(ckpt_dir) / STATE_FILE
    return json.loads(p.read_text()) if p.exists() else {}
