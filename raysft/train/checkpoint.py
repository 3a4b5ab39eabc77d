"""The Trainer callback that hands every saved checkpoint to Ray Train, which uploads it (through
our upload function) into the run directory in storage; see ``raysft/storage/checkpoints.py`` for
what makes one complete and which are kept.

A storage outage does not end the run: each upload is retried up to ``storage.retry_timeout_s``;
a checkpoint whose upload still fails is abandoned (a warning names it, it never counts as
complete, its local copy is kept until a later checkpoint uploads) and training goes on, until
``storage.max_failed_checkpoints`` in a row have failed.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import ray.train
from transformers import TrainerCallback

from raysft.logs import LOG_ONLY
from raysft.storage import files
from raysft.storage.checkpoints import manifest_checksums, write_manifest, write_state
from raysft.storage.retry import StorageUnavailableError
from raysft.storage.rundir import RunDir

log = logging.getLogger("raysft")


@dataclass(frozen=True)
class Retention:
    keep: int
    """``trainer.save_total_limit``: complete checkpoints kept (the newest one always)."""
    score_key: str | None = None
    """``trainer.metric_for_best_model``: keep the best by this eval metric instead of the newest."""
    greater_is_better: bool = False


class RayCheckpointCallback(TrainerCallback):
    """After the Trainer saves ``checkpoint-N`` (every rank, ZeRO-3 shards included), report it to Ray
    Train from every rank; the ranks' folders land in one checkpoint folder in storage.

    ``state_fn(trainer_state)`` gives what raysft adds (token count, data cursor; rank 0 writes it);
    the latest value of the retention metric travels in the state as ``score``."""

    on_uploaded = None
    """``f(step, uri)``, called on the upload thread once this rank's part of checkpoint ``step`` is in
    storage (the preemption callback times its just-in-time checkpoint with it)."""

    def __init__(self, rank: int, world_size: int, state_fn, *, run: RunDir, retention: Retention,
                 max_failed: int, keep_dir: str):
        self.rank, self.world_size, self.state_fn, self.run = rank, world_size, state_fn, run
        self.retention, self.max_failed, self.keep_dir = retention, max_failed, Path(keep_dir)
        self.last_eval: dict[str, float] = {}
        self.failed_in_a_row = 0
        self.urgent_step: int | None = None  # a preemption checkpoint's step (see ``put_first``)
        self.synced: list = []  # SyncedFiles brought up to date in storage after each checkpoint upload
        self.removed = 0  # checkpoints this rank deleted by retention

    def put_first(self, step: int) -> None:
        """A preemption notice: checkpoint ``step`` is taken now and must reach storage before the
        deadline. Ray uploads one checkpoint at a time, so an older one still uploading stops at its
        next file (left without manifests: never complete) and this one goes next."""
        self.urgent_step = step

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.last_eval = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        extra = self.state_fn(state) if self.rank == 0 else {}
        if self.rank == 0 and self.retention.score_key:
            extra["score"] = self.last_eval.get(self.retention.score_key)
        if self.rank == 0:
            write_state(ckpt, {"world_size": self.world_size, **extra})
        metrics = {"global_step": state.global_step, "checkpoint_step": state.global_step, **self.last_eval}
        # ASYNC: training goes on while the upload runs (the stall is the local save); Ray registers the
        # checkpoint, then deletes the local copy, once the upload is done. A worker dying mid-upload
        # leaves an incomplete folder that the manifests expose (and `remove_incomplete` deletes).
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=self._upload)

    def _upload(self, checkpoint, checkpoint_dir_name: str):
        dest = self.run.file(checkpoint_dir_name)
        step = int(Path(checkpoint.path).name.rsplit("-", 1)[-1])  # the Trainer's folder is checkpoint-<step> (on_save)
        # The manifest (sizes and checksums) on this thread: hashing the shards does not stall training.
        write_manifest(checkpoint.path, self.rank, self.world_size)
        try:
            files.upload_dir(checkpoint.path, dest, stop=lambda: (self.urgent_step or 0) > step,
                             known=manifest_checksums(checkpoint.path))
        except files.UploadStopped:
            log.warning("raysft: upload of checkpoint %s (step %d) stopped: the preemption checkpoint at step %d goes "
                        "first; the partial copy has no manifest and is deleted at the next resume", checkpoint_dir_name,
                        step, self.urgent_step)
        except StorageUnavailableError as e:
            self._abandon(checkpoint.path, checkpoint_dir_name, e)
        else:
            self.failed_in_a_row = 0
            shutil.rmtree(self.keep_dir, ignore_errors=True)  # a later checkpoint is safe in storage
            for f in self.synced:  # storage went away again: the rest wait for the next checkpoint
                if not f.try_push():
                    break
            if self.on_uploaded is not None:
                self.on_uploaded(step, dest)
            if self.rank == 0:
                r = self.retention
                for uri in self.run.apply_retention(keep=r.keep, score_key=r.score_key, greater_is_better=r.greater_is_better):
                    self.removed += 1  # the console gets one count at the end of the run
                    log.info("raysft: removed checkpoint %s (retention: trainer.save_total_limit=%d)", uri, r.keep,
                             extra=LOG_ONLY)
        # Ray checks the checkpoint lives on its own storage filesystem (ours retries Ray's calls too).
        storage = ray.train.get_context().get_storage()
        return ray.train.Checkpoint(path=files.filesystem(dest)[1], filesystem=storage.storage_filesystem)

    def _abandon(self, local: str, name: str, error: Exception) -> None:
        self.failed_in_a_row += 1
        kept = self.keep_dir / name
        shutil.rmtree(self.keep_dir, ignore_errors=True)  # only the newest abandoned one is kept
        shutil.copytree(local, kept)
        log.warning("raysft: checkpoint %s abandoned (%s); it is not resumable from storage. Training goes on; its "
                    "local copy stays at %s until a later checkpoint uploads (%d of storage.max_failed_checkpoints=%d "
                    "in a row)", name, error, kept, self.failed_in_a_row, self.max_failed)
        if self.failed_in_a_row >= self.max_failed:
            raise StorageUnavailableError(
                f"{self.failed_in_a_row} checkpoints in a row could not be uploaded to {self.run.uri}; the newest is "
                f"kept at {kept} on this node. Restore storage access, then upload it with: raysft upload {kept} "
                f"{self.run.file(name)}") from error
