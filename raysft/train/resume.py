"""The resume point of a worker: which checkpoint (rank 0 chooses, from storage, by checksums), its
bytes on this worker (downloaded and checked against the manifests), and the raysft state in it."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch.distributed as dist

from raysft.config import RaySFTConfig
from raysft.storage import checkpoints as ckpts
from raysft.storage import files
from raysft.storage.rundir import RunDir
from raysft.train.loop import LoopConfig, check_world_size

log = logging.getLogger(__name__)


def restore(lc: LoopConfig, cfg: RaySFTConfig, scratch: str, rank: int, world: int) -> tuple[str | None, dict[str, Any]]:
    """(local checkpoint folder, raysft state) to resume from; (None, {}) on a fresh start.

    Rank 0 chooses, from storage: the newest complete checkpoint of this run whose checksums pass
    (after a restart or a re-run under the same name; newer than Ray's registered one when Ray lost
    track of an upload), else ``resume=<uri>``'s. Incomplete uploads are deleted. Every rank then
    fetches it and checks the bytes it got against the manifests."""
    rundir = RunDir(lc.run_root, lc.run_name)
    chosen = None
    if rank == 0:
        found = rundir.checkpoints()  # one listing of storage for both
        rundir.remove_incomplete(found)
        choice = ckpts.latest_verified(rundir.uri, found, trusted=lc.verified_checkpoint, skip=lc.corrupt_checkpoints)
        for line in choice.lines():
            log.warning("raysft: %s", line)
        choice.raise_if_none_left(rundir.uri)
        chosen = choice.chosen.uri if choice.chosen else lc.init_checkpoint
    chosen = broadcast(chosen)
    if chosen is None:
        return None, {}
    got = chosen  # a local checkpoint is read in place: rank 0 (or the driver) has just checked its bytes
    if files.is_remote(chosen):
        got = _download_checked(chosen, os.path.join(scratch, "resume"), rank)
    state = ckpts.read_state(got)
    check_world_size(state.get("world_size"), world, cfg, chosen)
    return got, state


def _download_checked(uri: str, local: str, rank: int) -> str:
    """Download a checkpoint and check the bytes against its manifests; once more when they did not
    arrive intact."""
    for attempt in (1, 2):
        got = str(files.download_dir(uri, local))
        ok, why = ckpts.verify(got)
        if ok:
            return got
        log.warning("raysft: checkpoint %s did not download intact on rank %d (%s)%s", uri, rank, why,
                    ": downloading it again" if attempt == 1 else "")
        shutil.rmtree(local, ignore_errors=True)
    raise ckpts.CorruptCheckpointError(f"checkpoint {uri} fails its checksums on rank {rank} after two downloads "
                                       f"({why}); it cannot be resumed from. Delete it from storage to resume from "
                                       "the previous one.")


def broadcast(obj: Any) -> Any:
    """Rank 0's value on every rank (Ray Train has set up the torch process group)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


