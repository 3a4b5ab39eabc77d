"""The trackers of ``trainer.report_to``: the HF Trainer's own callbacks (trackio, TensorBoard, wandb)
on rank 0, their files in the run directory, one tracker run continued across restarts and re-runs,
and the sample generations sent to each. Under ``<run>/trackers/`` (``RunDir.TRACKERS``):

    trackio/raysft.db    trackio's project database (TRACKIO_DIR); project ``raysft``, run = the run's name
    tensorboard/         TensorBoard event files (TENSORBOARD_LOGGING_DIR), appended to by a resume
    wandb/               wandb's run folders (WANDB_DIR); offline unless WANDB_MODE is set, project ``raysft``

A variable the user set wins (that folder is theirs: nothing is copied from it). A run in object
storage keeps the folder in rank 0's scratch: fetched from storage at the start, uploaded at the end.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os

from transformers.integrations.integration_utils import (TensorBoardCallback, TrackioCallback, WandbCallback,
                                                         rewrite_logs)

from raysft.storage import files
from raysft.storage.rundir import RunDir

log = logging.getLogger("raysft")

PROJECT = "raysft"  # trackio's project and wandb's (WANDB_PROJECT) unless the user names one
# HF's TrackioCallback leaves these run totals out of trackio (one value per run, not a curve).
_RUN_TOTALS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"}


def tracker_env(report_to: list[str], folder: str) -> dict[str, str]:
    """The variables that put each tracker's files under ``folder``; those the user set are left out."""
    env: dict[str, str] = {}
    if "trackio" in report_to:
        env["TRACKIO_DIR"] = os.path.join(folder, "trackio")
    if "tensorboard" in report_to:
        env["TENSORBOARD_LOGGING_DIR"] = os.path.join(folder, "tensorboard")
    if "wandb" in report_to:
        # wandb adds wandb/ under WANDB_DIR; silent: its banner would reach the console on every start
        env.update(WANDB_DIR=folder, WANDB_MODE="offline", WANDB_PROJECT=PROJECT, WANDB_SILENT="true")
        os.makedirs(folder, exist_ok=True)
    return {k: v for k, v in env.items() if k not in os.environ}


def open_folder(rundir: RunDir, scratch: str, report_to: list[str], rank: int) -> tuple[str, str | None]:
    """Point the trackers at ``<run>/trackers`` (env, before the Trainer builds its callbacks) and
    return (the local folder, the storage URI to upload it to at the end, None for a local run). In
    object storage rank 0 first gets back the files an earlier attempt uploaded, so it continues them."""
    uri, local_run = rundir.file(RunDir.TRACKERS), rundir.local_path
    local = os.path.join(local_run or scratch, RunDir.TRACKERS)
    if rank == 0 and not local_run and set(report_to) & {"trackio", "tensorboard", "wandb"} and files.list_dir(uri):
        files.download_dir(uri, local)
    os.environ.update(tracker_env(report_to, local))
    return local, None if local_run else uri


class StepTrackioCallback(TrackioCallback):
    """HF's TrackioCallback, with trackio's step = the optimizer step (HF's lets trackio count its
    own log calls, so evaluations, samples and a resumed run would land on other steps), its
    console lines kept out, and the run closed by ``finish`` (after the final evaluation and samples)."""

    def setup(self, args, state, model, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):
            super().setup(args, state, model, **kwargs)
        if state.is_world_process_zero:
            log.info("trackio: run %s, project %s in %s", args.run_name, args.project, os.environ.get("TRACKIO_DIR"))

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        if state.is_world_process_zero:
            values = rewrite_logs({k: v for k, v in (logs or {}).items() if k not in _RUN_TOTALS})
            self._trackio.log({**values, "train/global_step": state.global_step}, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        pass  # finish() closes the run

    def finish(self) -> None:
        if self._initialized:
            with contextlib.redirect_stdout(io.StringIO()):
                self._trackio.finish()
            self._initialized = False


def attach(trainer) -> list:
    """Swap in the step-aligned trackio callback and put every tracker callback after raysft's own
    (SampleCallback's last samples reach a tracker before it closes at the end of training).
    Returns the tracker callbacks, for ``log_samples`` and ``finish``."""
    out = []
    for cls in (TrackioCallback, TensorBoardCallback, WandbCallback):
        cb = trainer.pop_callback(cls)
        if cb is not None:
            cb = StepTrackioCallback() if cls is TrackioCallback else cb
            trainer.add_callback(cb)
            out.append(cb)
    return out


def log_samples(trackers: list, step: int, samples: list[dict[str, str]]) -> None:
    """Sample generations (rank 0) to every tracker, at the optimizer step."""
    rows = [[s["prompt"], s["completion"]] for s in samples]
    for cb in trackers:
        if isinstance(cb, StepTrackioCallback) and cb._initialized:
            cb._trackio.log({"samples": cb._trackio.Table(columns=["prompt", "completion"], data=rows),
                             "train/global_step": step}, step=step)
        elif isinstance(cb, TensorBoardCallback):
            text = "\n\n".join(f"**{p}** -> {c}" for p, c in rows)
            if cb.tb_writer is None and cb.logging_dir:  # closed at the end of training: reopen the same folder
                cb._init_summary_writer(None)
            if cb.tb_writer is not None:
                cb.tb_writer.add_text("samples", text, step)
                cb.tb_writer.flush()
        elif isinstance(cb, WandbCallback):
            import wandb

            if wandb.run is not None:  # WandbCallback steps wandb by train/global_step (define_metric)
                wandb.log({"samples": wandb.Table(columns=["prompt", "completion"], data=rows), "train/global_step": step})


def finish(trackers: list, local: str, upload_to: str | None) -> None:
    """Close every tracker's run (its files complete), then copy the folder to object storage."""
    for cb in trackers:
        if isinstance(cb, StepTrackioCallback):
            cb.finish()
        elif isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
            cb.tb_writer.close()
            cb.tb_writer = None
        elif isinstance(cb, WandbCallback):
            import wandb

            if wandb.run is not None:
                wandb.finish()
    if upload_to and os.path.isdir(local):
        files.upload_dir(local, upload_to)
