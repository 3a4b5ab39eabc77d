"""The Trainer callback that hands every saved checkpoint to Ray Train (which uploads it to the run
directory in storage; see ``raysft/storage/checkpoints.py`` for what makes one complete)."""

from __future__ import annotations

from pathlib import Path

import ray.train
from transformers import TrainerCallback

from raysft.storage import files
from raysft.storage.checkpoints import write_manifest


class RayCheckpointCallback(TrainerCallback):
    """After the Trainer saves ``checkpoint-N`` (every rank, ZeRO-3 shards included), report it to Ray
    Train from every rank; Ray merges the ranks' folders into one checkpoint in storage.

    ``state_fn(trainer_state)`` gives what raysft adds (token count, data cursor; rank 0 writes it).
    The latest eval metrics travel with the report, so Ray can keep the best checkpoints by
    ``trainer.metric_for_best_model``; ``missing_score`` stands in before the first evaluation."""

    def __init__(self, rank: int, world_size: int, state_fn, *, run_uri: str, score_key: str | None = None,
                 missing_score: float = float("inf")):
        self.rank, self.world_size, self.state_fn, self.run_uri = rank, world_size, state_fn, run_uri
        self.score_key, self.missing_score = score_key, missing_score
        self.last_eval: dict[str, float] = {}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.last_eval = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        extra = self.state_fn(state) if self.rank == 0 else {}
        write_manifest(ckpt, self.rank, self.world_size, {"world_size": self.world_size, **extra})
        metrics = {"global_step": state.global_step, "checkpoint_step": state.global_step, **self.last_eval}
        if self.score_key:
            metrics.setdefault(self.score_key, self.missing_score)
        # ASYNC: training goes on while the upload runs (the stall is the local save); Ray registers the
        # checkpoint, then deletes the local copy, once the upload is done. A worker dying mid-upload
        # leaves an incomplete folder that the manifests expose (and `remove_incomplete` deletes).
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=self._upload)

    def _upload(self, checkpoint, checkpoint_dir_name: str):
        dest = files.join(self.run_uri, checkpoint_dir_name)
        files.upload_dir(checkpoint.path, dest)
        fs, path = files.filesystem(dest)
        return ray.train.Checkpoint(path=path, filesystem=fs)
