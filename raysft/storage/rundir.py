"""A run directory: ``<storage.path>/<run name>/``, local or ``s3://``. The one place that names its files.

    config.yaml                the composed config (secrets redacted) plus its ``derived:`` values
    data_stats.json            rows, tokens, drops and packing of the run's data
    metrics.jsonl              one line per logging step / evaluation / sample generation
    train_summary.json         what the workers report at the end of training
    attempts.jsonl             one line per attempt (driver): start, end, steps trained, why it ended
    anomalies.jsonl            loss spikes / non-finite values found, and what was done (rows skipped)
    lease.json                 the driver writing the run (``storage/lease.py``)
    summary.json, loss.png     the driver's end-of-run summary and loss curve
    model/                     the final model (Hugging Face format)
    workers/rank_<r>.json      what each worker consumed and how it was wrapped
    workers/batches_rank<r>.jsonl  per-micro-batch row hashes (``monitor.log_batch_hashes``)
    checkpoint_<timestamp>/    Ray Train checkpoints (see ``storage/checkpoints.py``)
    trackers/                  trackio / tensorboard / wandb files of ``trainer.report_to`` (``train/trackers.py``)

``Storage`` is the root (``storage.path``): it lists runs, resolves ``resume=`` and holds the
prepared data sets (``prepared/<fingerprint>/``, shared by every run and sweep trial under it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from raysft.storage import checkpoints as ckpts
from raysft.storage import files
from raysft.storage.retry import retrying_filesystem, unsaved_dir


def absolute(uri: str) -> str:
    """A local path made absolute (runs are addressed the same from every process); remote URIs as they are."""
    return uri if files.is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))


@dataclass(frozen=True)
class _NamedDir:
    """``<root>/<name>`` in storage; ``root`` is ``storage.path``, absolute when local."""

    root: str
    name: str

    @classmethod
    def at(cls, root: str, name: str):
        return cls(absolute(root), name)

    @classmethod
    def from_uri(cls, uri: str):
        root, name = absolute(uri).rstrip("/").rsplit("/", 1)
        return cls(root, name)

    @property
    def uri(self) -> str:
        return files.join(self.root, self.name)

    def file(self, name: str) -> str:
        return files.join(self.uri, name)


@dataclass(frozen=True)
class RunDir(_NamedDir):
    CONFIG = "config.yaml"
    DATA_STATS = "data_stats.json"
    METRICS = "metrics.jsonl"
    TRAIN_SUMMARY = "train_summary.json"
    SUMMARY = "summary.json"
    LOSS_PLOT = "loss.png"
    MODEL = "model"
    WORKERS = "workers"
    LOGS = "logs"
    RAY_REGISTRY = "checkpoint_manager_snapshot.json"  # Ray Train V2's checkpoint registry (its file name)
    TRACKERS = "trackers"
    LEASE = "lease.json"  # the driver that writes the run (storage/lease.py)
    ATTEMPTS = "attempts.jsonl"  # one line per attempt: start, end, steps, why it ended
    ANOMALIES = "anomalies.jsonl"  # loss spikes and what was done about them (rows skipped by a rollback)
    END = "workers/end.json"  # how the last group ended (rank 0), read by its driver

    @property
    def local_path(self) -> str | None:
        """The directory on this machine's file system, or None for object storage."""
        return None if files.is_remote(self.uri) else files.filesystem(self.uri)[1]

    def worker_record(self, rank: int) -> str:
        return files.join(self.uri, self.WORKERS, f"rank_{rank}.json")

    def batch_hashes(self, rank: int) -> str:
        return files.join(self.uri, self.WORKERS, f"batches_rank{rank}.jsonl")

    def has(self, name: str) -> bool:
        return files.exists(self.file(name))

    def finished_step(self) -> int | None:
        """The last step of a run that finished here: its ``train_summary.json`` (rank 0 writes it once
        the final model is in storage) and the model are there. None for a run that never finished."""
        if not (self.has(self.TRAIN_SUMMARY) and self.has(self.MODEL)):
            return None
        return json.loads(files.read_bytes(self.file(self.TRAIN_SUMMARY))).get("global_step")

    def kept_model(self) -> str:
        """Where a node keeps the trained model when storage is down at the final save (a local path)."""
        return os.path.join(unsaved_dir(self.name), self.MODEL)

    def upload_kept_model(self) -> str:
        """What to do with a kept model, for the error lines that name it."""
        return f"Upload it when storage is back: raysft upload {self.kept_model()} {self.file(self.MODEL)}"

    def ray_storage(self, retry_s: float) -> tuple[str, pafs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for Ray Train's RunConfig: Ray stores through the
        same pyarrow filesystem as our own files (S3 endpoint included), wrapped so that Ray's own
        calls ride out an outage too, for up to ``retry_s``."""
        if files.is_remote(self.root):
            fs, path = files.filesystem(self.root)
            return path, retrying_filesystem(fs, retry_s)
        return self.root, None

    # ------------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[ckpts.CheckpointInfo]:
        """Every ``checkpoint_*`` folder, oldest first, each checked against its manifests."""
        return ckpts.scan(self.uri)

    def latest_checkpoint(self, found: list[ckpts.CheckpointInfo] | None = None) -> ckpts.CheckpointInfo | None:
        return ckpts.latest_complete(self.uri, found)

    def remove_incomplete(self, found: list[ckpts.CheckpointInfo] | None = None) -> list[str]:
        return ckpts.remove_incomplete(self.uri, found)

    def prune(self, keep: set[str]) -> list[str]:
        """Delete checkpoint folders whose names are not in ``keep``."""
        return ckpts.prune(self.uri, keep)

    def forget_ray_registry(self) -> None:
        """Delete Ray Train's checkpoint registry before a run continues here. NOTE: raysft picks the
        checkpoint to resume from storage itself; Ray's registry still names the checkpoints raysft's
        retention removed, and Ray refuses to start a run whose registry names a missing one."""
        if self.has(self.RAY_REGISTRY):
            fs, path = files.filesystem(self.file(self.RAY_REGISTRY))
            fs.delete_file(path)

    def apply_retention(self, *, keep: int, score_key: str | None, greater_is_better: bool) -> list[str]:
        return ckpts.apply_retention(self.uri, keep=keep, score_key=score_key, greater_is_better=greater_is_better)


@dataclass(frozen=True)
class PreparedDir(_NamedDir):
    """A prepared data set, ``<storage.path>/prepared/<fingerprint>/`` (see ``raysft/data/prepared.py``):

        train/unit-<u>.parquet, eval/unit-<u>.parquet   packed rows, one shard per work unit
        data_stats.json                                 rows, tokens, drops and packing
        manifest.json                                   written last: a set without it is never used
    """

    MANIFEST = "manifest.json"
    STATS = "data_stats.json"
    FOLDER = "prepared"

    def shard(self, split: str, unit: int) -> str:
        return self.file(f"{split}/unit-{unit:05d}.parquet")

    def complete(self) -> bool:
        return files.exists(self.file(self.MANIFEST))


@dataclass(frozen=True)
class Storage:
    """``storage.path``: the folder that holds runs (and sweeps)."""

    root: str

    @classmethod
    def at(cls, root: str) -> "Storage":
        return cls(absolute(root))

    def run(self, name: str) -> RunDir:
        return RunDir(self.root, name)

    def child(self, name: str) -> str:
        return files.join(self.root, name)

    def prepared(self, fingerprint: str) -> PreparedDir:
        return PreparedDir(files.join(self.root, PreparedDir.FOLDER), fingerprint)

    def latest_run(self) -> str | None:
        """The run whose newest complete checkpoint is the most recent (Ray names checkpoint folders
        by timestamp)."""
        best: tuple[str, str] | None = None
        for e in files.list_dir(self.root):
            if e.type != pafs.FileType.Directory or e.base_name == PreparedDir.FOLDER:
                continue
            done = [c for c in self.run(e.base_name).checkpoints() if c.complete]
            if done and (best is None or done[-1].uri.rsplit("/", 1)[-1] > best[0]):
                best = (done[-1].uri.rsplit("/", 1)[-1], e.base_name)
        return best[1] if best else None

    def resolve_resume(self, resume: str | None, name: str | None) -> tuple[str | None, str | None]:
        """(run name, checkpoint URI to start from) for ``resume=`` (see ``RaySFTConfig.resume``).
        A None name means "a new run": the caller names it."""
        if resume is None:
            return name, None
        if resume == "latest":
            if name:
                if self.run(name).latest_checkpoint() is None:
                    raise ValueError(f"resume=latest: run {name!r} under {self.root} has no complete checkpoint "
                                     "to continue from")
                return name, None
            found = self.latest_run()
            if found is None:
                raise ValueError(f"resume=latest: no run under {self.root} has a complete checkpoint")
            return found, None
        return name, ckpts.resolve(absolute(resume)).uri


@dataclass(frozen=True)
class SweepDir(_NamedDir):
    """A sweep's directory, ``<storage.path>/<sweep.name>/``: Tune's experiment state plus

        raysft_sweep.json   what identifies the sweep (a resume with other settings is refused)
        trials.csv          one row per trial
        trials.png          the metric against the optimizer step, one line per trial
        best_overrides.txt  the best trial's overrides, one per line
        best.yaml           the best trial's complete config, as a Hydra primary config

    Trial ``<id>`` trains as the run ``<sweep.name>-trial-<id>`` beside it."""

    SPEC = "raysft_sweep.json"
    TRIALS_CSV = "trials.csv"
    TRIALS_PLOT = "trials.png"
    BEST_OVERRIDES = "best_overrides.txt"
    BEST_CONFIG = "best.yaml"

    def trial_run_name(self, trial_id: str) -> str:
        return f"{self.name}-trial-{trial_id}"

    def trial_run(self, trial_id: str) -> RunDir:
        return RunDir(self.root, self.trial_run_name(trial_id))

    def tune_storage(self) -> tuple[str, dict[str, Any]]:
        """(Tune's ``storage_path``, its ``storage_filesystem`` keyword) for this sweep's root."""
        if files.is_remote(self.root):
            fs, path = files.filesystem(self.root)
            return path, {"storage_filesystem": fs}
        return self.root, {}

    def tune_path(self) -> tuple[str, dict[str, Any]]:
        """The experiment folder as Tune's restore / ExperimentAnalysis want it."""
        path, kw = self.tune_storage()
        return files.join(path, self.name), kw
