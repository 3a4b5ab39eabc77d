"""The end of a worker's run: the step in progress for error messages, the final evaluation, and
uploads that must not lose the model (and those that may be lost with a warning)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import socket

from transformers import TrainerCallback

from raysft.storage import files
from raysft.storage.retry import StorageUnavailableError
from raysft.storage.rundir import RunDir

log = logging.getLogger("raysft")


class StepNow(TrainerCallback):
    """The optimizer step in progress, for an error message: the step being computed, or the step
    just finished while its evaluation, checkpoint and logging run."""

    step = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step


def why_ended(control, guard) -> dict | None:
    """The end record of a group that stopped before its last step (None when it trained them all):
    a stop the driver asked for (a signal), or an anomaly (``trainer.anomaly``)."""
    if guard.tripped is not None:
        return {"reason": "anomaly", "step": guard.tripped.step, "anomaly": dataclasses.asdict(guard.tripped)}
    if control.stopped_at is not None:
        return {"reason": "stopped", "step": control.stopped_at, "signal": control.signal}
    return None


def final_eval(trainer) -> dict[str, float]:
    """The end-of-run evaluation, unless the Trainer has just evaluated at the last step."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def best_effort(write, what: str) -> None:
    """A record that is not the model: when storage stays down past the retries it is lost with a
    warning, and the run's outcome is the model's (rank 0 keeps it locally and fails with one line)."""
    try:
        write()
    except StorageUnavailableError as e:
        log.warning("raysft: %s was not written: %s", what, e)


def upload_final_model(model_dir: str, rundir: RunDir) -> None:
    """Upload the trained model; when storage stays down past the retries, keep it on this node under
    a name a person can find and fail the run with one line that says how to upload it later."""
    dest = rundir.file(RunDir.MODEL)
    try:
        files.upload_dir(model_dir, dest)
    except StorageUnavailableError as e:
        kept = rundir.kept_model()
        shutil.rmtree(kept, ignore_errors=True)
        shutil.move(model_dir, kept)
        raise StorageUnavailableError(f"the trained model could not be uploaded to {dest} ({e}); it is kept at "
                                      f"{kept} on node {socket.gethostname()}. {rundir.upload_kept_model()}") from None
