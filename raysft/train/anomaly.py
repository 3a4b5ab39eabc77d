"""The loss-spike guard: a non-finite loss or grad norm, or a loss far above its recent median, is an
anomaly, and ``trainer.anomaly.policy`` says what it does (stop, rollback, warn).

Practice it follows: Megatron-LM checks every step for a NaN/Inf loss and gradient
(``check_for_nan_in_loss_and_grad``, on by default); LLM Foundry's KillLossSpike flags a loss above
2x the running median of a 50-step window; PaLM rolled back to a checkpoint before each spike and
skipped the batches around it, after which the spike did not recur. Here the check runs at every
logging step, on the loss and grad norm the Trainer logs: the mean over every rank (an all-gather)
and the global norm, so every rank decides alike with no extra collective.

On an anomaly under ``stop`` or ``rollback`` the step's checkpoint, evaluation and log are cancelled
(the spiked weights are never saved) and training ends; the worker reports it (``Anomaly``) and
the driver stops the run or rolls it back (``raysft/run/driver.py``).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass

from transformers import TrainerCallback

log = logging.getLogger("raysft")

EVENT = "anomaly"


@dataclass(frozen=True)
class Anomaly:
    step: int
    first_step: int  # the first step of the logging window it was seen in (the batches that may have caused it)
    loss: float
    grad_norm: float | None
    median: float | None  # of the losses before it (None: not enough history)
    reason: str  # "non-finite loss", "non-finite grad norm", "loss spike"
    policy: str

    def describe(self, factor: float) -> str:
        if self.reason == "loss spike":
            return (f"loss spike at step {self.step}: loss {self.loss:,.4f} is over {factor:g}x the median "
                    f"{self.median:,.4f} of the steps before")
        value = self.loss if self.reason == "non-finite loss" else self.grad_norm
        return f"{self.reason} at step {self.step} ({value})"


def detect(loss: float, grad_norm: float | None, history: list[float], *, factor: float,
           min_history: int) -> tuple[str, float | None] | None:
    """(reason, median) when this logged loss / grad norm is an anomaly given the losses before it."""
    median = statistics.median(history) if history else None
    if not math.isfinite(loss):
        return "non-finite loss", median
    if grad_norm is not None and not math.isfinite(grad_norm):
        return "non-finite grad norm", median
    if len(history) >= min_history and median is not None and loss > factor * median:
        return "loss spike", median
    return None


class AnomalyGuard(TrainerCallback):
    """``policy``: ``trainer.anomaly.policy``; ``metrics_path``: rank 0's metrics.jsonl (the event is
    recorded there); ``first_step``: the step a resume starts after."""

    def __init__(self, *, policy: str, factor: float, window: int, min_history: int, rank: int,
                 metrics_path: str | None, first_step: int = 0):
        self.policy, self.factor, self.min_history, self.rank = policy, factor, min_history, rank
        self.metrics_path = metrics_path
        self.history: deque[float] = deque(maxlen=window)
        self.last_logged = first_step
        self.tripped: Anomaly | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.policy == "off" or "loss" not in logs or self.tripped is not None:
            return control
        loss, grad_norm = float(logs["loss"]), logs.get("grad_norm")
        grad_norm = None if grad_norm is None else float(grad_norm)
        window_start, self.last_logged = self.last_logged + 1, state.global_step
        found = detect(loss, grad_norm, list(self.history), factor=self.factor, min_history=self.min_history)
        if found is None:
            self.history.append(loss)
            return control
        reason, median = found
        anomaly = Anomaly(state.global_step, window_start, loss, grad_norm, median, reason, self.policy)
        if self.rank == 0:
            self._record(anomaly)
        if self.policy == "warn":
            if self.rank == 0:
                log.warning("raysft: warning: %s (trainer.anomaly.policy=warn: training goes on)", anomaly.describe(self.factor))
            return control
        # stop / rollback: this step is not saved, evaluated or trained on from.
        self.tripped = anomaly
        control.should_save = control.should_evaluate = False
        control.should_training_stop = True
        return control

    def _record(self, a: Anomaly) -> None:
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"global_step": a.step, "event": EVENT, **asdict(a)}) + "\n")
