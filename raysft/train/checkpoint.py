"""Checkpoints: the HF Trainer's checkpoint folders, reported to Ray Train, which uploads them to
``storage.path`` (local or S3) and hands the latest back after a restart.

Every rank writes a manifest of its files (name and size) *last*, after the Trainer has written
its shards, and the manifest travels with the upload; a restored checkpoint is used only when every
rank's manifest is present and every file it lists exists with its size, so a checkpoint whose
upload was cut short is never mistaken for a complete one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

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
    """(complete?, why not) for a downloaded checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    manifests = sorted(ckpt_dir.glob("raysft_manifest_rank*.json"))
    if not manifests:
        return False, "no manifest"
    world = json.loads(manifests[0].read_text())["world_size"]
    if len(manifests) != world:
        return False, f"{len(manifests)} of {world} rank manifests"
    for m in manifests:
        for rel, size in json.loads(m.read_text())["files"].items():
            p = ckpt_dir / rel
            if not p.is_file() or p.stat().st_size != size:
                return False, f"{rel} missing or truncated"
    return True, ""


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    p = Path(ckpt_dir) / STATE_FILE
    return json.loads(p.read_text()) if p.exists() else {}


class RayCheckpointCallback(TrainerCallback):
    """After the Trainer saves ``checkpoint-N`` (every rank, ZeRO-3 shards included), report it to Ray
    Train from every rank; Ray merges the ranks' folders into one checkpoint in storage."""

    def __init__(self, rank: int, world_size: int, state_fn):
        self.rank, self.world_size, self.state_fn = rank, world_size, state_fn

    def on_save(self, args, state, control, **kwargs):
        import ray.train

        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        write_manifest(ckpt, self.rank, self.world_size, self.state_fn(state))
        ray.train.report({"global_step": state.global_step, "checkpoint_step": state.global_step},
                         checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)))
