"""Checkpoints in storage: the HF Trainer's checkpoint folders, uploaded by Ray Train (through our
upload function) to ``<run>/checkpoint_<timestamp>/``, local or S3.

Every rank writes a manifest of its files (name, size and CRC32: ``checksums.py``) *last*, after the
Trainer has written its shards (on the upload thread: hashing does not stall training), and the
manifest travels with the upload; a checkpoint counts as complete only when every rank's manifest
is present and every file it lists exists with its size, so a checkpoint whose upload was cut short
is never mistaken for a complete one. Before a run resumes from one, its files' checksums in storage
are compared with the manifests (``latest_verified``: one HEAD per file on S3): a corrupted
checkpoint is skipped for the previous one, and the downloaded bytes are checked again (``verify``).

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

from raysft.logs import LOG_ONLY
from raysft.storage import checksums, files
from raysft.storage.checksums import Mismatch

log = logging.getLogger(__name__)

STATE_FILE = "raysft_state.json"


def manifest_name(rank: int) -> str:
    return f"raysft_manifest_rank{rank}.json"


class CorruptCheckpointError(RuntimeError):
    """No checkpoint that a run could resume from passes its checksums."""


def write_manifest(ckpt_dir: str | Path, rank: int, world_size: int, state: dict[str, Any] | None = None) -> None:
    """This rank's manifest (rank 0 also writes ``state`` first, when given): every file's size and CRC32."""
    ckpt_dir = Path(ckpt_dir)
    if rank == 0 and state is not None:
        write_state(ckpt_dir, state)
    entries = {str(p.relative_to(ckpt_dir)): {"size": p.stat().st_size, checksums.ALGORITHM: checksums.of_file(p)}
               for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and not p.name.startswith("raysft_manifest_rank")
               and not p.name.startswith(".")}
    tmp = ckpt_dir / f".{manifest_name(rank)}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "world_size": world_size, "files": entries}))
    os.replace(tmp, ckpt_dir / manifest_name(rank))


def write_state(ckpt_dir: str | Path, state: dict[str, Any]) -> None:
    (Path(ckpt_dir) / STATE_FILE).write_text(json.dumps(state))


def manifest_checksums(ckpt_dir: str | Path) -> dict[str, str]:
    """relative path -> CRC32 of every file this folder's manifests list (an older manifest has none)."""
    out = {}
    for m in sorted(Path(ckpt_dir).glob("raysft_manifest_rank*.json")):
        out.update(_checksums(json.loads(m.read_text())["files"]))
    return out


def _size(entry) -> int:
    return entry if isinstance(entry, int) else entry["size"]  # older manifests: the size alone


def _checksums(entries: dict[str, Any]) -> dict[str, str]:
    return {rel: e[checksums.ALGORITHM] for rel, e in entries.items() if isinstance(e, dict) and checksums.ALGORITHM in e}


def verify(ckpt_dir: str | Path) -> tuple[bool, str]:
    """(complete and intact?, why not) for a local (or downloaded) checkpoint folder: every rank's
    manifest, every file with its size and, where the manifest has one, its checksum."""
    ckpt_dir = Path(ckpt_dir)
    sizes = {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in ckpt_dir.rglob("*") if p.is_file()}
    ok, why, entries = _check(sizes, lambda rel: (ckpt_dir / rel).read_text())
    if not ok:
        return ok, why
    bad = checksums.compare_local(ckpt_dir, _checksums(entries))
    return (False, str(bad[0])) if bad else (True, "")


def _check(sizes: dict[str, int], read) -> tuple[bool, str, dict[str, Any]]:
    """Completeness from a listing (relative path -> size) and a reader of small files; with the
    manifests' merged file entries."""
    manifests = sorted(rel for rel in sizes if rel.startswith("raysft_manifest_rank") and rel.endswith(".json"))
    if not manifests:
        return False, "no manifest", {}
    world = json.loads(read(manifests[0]))["world_size"]
    if len(manifests) != world:
        return False, f"{len(manifests)} of {world} rank manifests", {}
    entries: dict[str, Any] = {}
    for m in manifests:
        listed = json.loads(read(m))["files"]
        for rel, entry in listed.items():
            if sizes.get(rel) != _size(entry):
                return False, f"{rel} missing or truncated", {}
        entries.update(listed)
    return True, "", entries


@dataclass(frozen=True)
class CheckpointInfo:
    uri: str
    complete: bool
    why: str = ""
    state: dict | None = None  # raysft_state.json: global_step, num_tokens, data cursor, world_size
    checksums: dict[str, str] | None = None  # the manifests' CRC32 per file (None: written without them)

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

    try:
        ok, why, entries = _check(sizes, read)
    except ValueError as e:  # a manifest that is not JSON any more: nothing in the folder can be checked
        return CheckpointInfo(uri, False, f"unreadable manifest ({e})")
    try:
        state = json.loads(read(STATE_FILE)) if STATE_FILE in sizes else None
    except ValueError:
        state = None  # corrupted: its checksum fails (verify_stored) and it is never resumed from
    sums = _checksums(entries)
    return CheckpointInfo(uri, ok, why, state, sums if sums or not entries else None)


def verify_stored(info: CheckpointInfo) -> list[Mismatch] | None:
    """The files of a complete checkpoint whose checksum in storage is not its manifest's (S3: one
    HEAD per file, no download); None when its manifests have no checksums (an older raysft)."""
    if info.checksums is None:
        return None
    return checksums.compare(info.uri, info.checksums)


@dataclass
class Choice:
    """The checkpoint to resume from, and what was passed over on the way."""

    chosen: CheckpointInfo | None
    corrupt: list[tuple[CheckpointInfo, Mismatch]]
    unverified: bool = False  # the chosen one has no checksums to check

    def lines(self) -> list[str]:
        """What the console says about it: one warning per corrupted checkpoint, one line when the
        chosen one cannot be verified."""
        out = []
        for i, (c, bad) in enumerate(self.corrupt):
            then = self.corrupt[i + 1][0] if i + 1 < len(self.corrupt) else self.chosen
            nxt = f"using the previous complete checkpoint (step {then.step})" if then else "no earlier checkpoint"
            out.append(f"warning: checkpoint {c.uri} (step {c.step}) is corrupt: {bad} — skipped; {nxt}")
        if self.chosen is not None and self.unverified:
            out.append(f"checkpoint {self.chosen.uri} (step {self.chosen.step}) has no checksums (written by an older "
                       "raysft): it cannot be verified, resuming from it as it is")
        return out

    def raise_if_none_left(self, run_uri: str) -> None:
        if self.chosen is None and self.corrupt:
            newest, bad = self.corrupt[0]
            raise CorruptCheckpointError(
                f"every complete checkpoint of {run_uri} failed its checksums (newest: {newest.uri}, {bad}): nothing "
                "trustworthy to resume from — restore the files from a copy, or delete the checkpoint_* folders to "
                "start the run over")


def latest_verified(run_uri: str, found: list[CheckpointInfo] | None = None, *, trusted: str | None = None,
                    skip: tuple[str, ...] | list[str] = (), before_step: int | None = None) -> Choice:
    """The newest complete checkpoint (by global step) whose files pass their checksums in storage;
    the corrupted ones newer than it are passed over. ``trusted``: a URI already verified (by the
    driver, just before); ``skip``: URIs already found corrupt; ``before_step``: only checkpoints
    older than this step (a rollback past a loss spike)."""
    done = [c for c in (scan(run_uri) if found is None else found) if c.complete and c.uri not in skip
            and (before_step is None or c.step < before_step)]
    corrupt = []
    for c in sorted(done, key=lambda c: (c.step, c.uri), reverse=True):
        if c.uri == trusted:
            return Choice(c, corrupt, c.checksums is None)
        bad = verify_stored(c)
        if not bad:
            return Choice(c, corrupt, bad is None)
        # Every mismatch in the logs; the console gets the one line per checkpoint of Choice.lines().
        log.warning("raysft: checkpoint %s fails its checksums: %s", c.uri, "; ".join(map(str, bad)), extra=LOG_ONLY)
        corrupt.append((c, bad[0]))
    return Choice(None, corrupt)


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
    choice = latest_verified(uri)
    for line in choice.lines():
        log.warning("raysft: %s", line)
    choice.raise_if_none_left(uri)
    latest = choice.chosen
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
