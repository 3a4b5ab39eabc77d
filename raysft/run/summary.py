"""End-of-run report: a summary (``summary.json``) and the loss curve (``loss.png``) in the run directory."""

from __future__ import annotations

import json
from typing import Any

from raysft import plots
from raysft.run import records
from raysft.storage import files
from raysft.storage.rundir import RunDir


def read_metrics(run: RunDir) -> list[dict[str, Any]]:
    uri = run.file(RunDir.METRICS)
    if not files.exists(uri):
        return []
    return [json.loads(line) for line in files.read_bytes(uri).decode().splitlines() if line.strip()]


def summarize(run: RunDir, wall_s: float) -> dict[str, Any]:
    """``wall_time_s`` and ``tokens_per_s``: this attempt's training; ``attempts``, ``run_wall_time_s``
    and ``anomalies``: the whole run's."""
    metrics = read_metrics(run)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    tokens = max((m.get("num_tokens", 0) for m in train), default=0)
    # The whole run's, over every attempt (records.py): this one's training time plus the earlier ones'.
    earlier = records.read(run, RunDir.ATTEMPTS)
    summary = {
        "steps": max((m.get("global_step", 0) for m in metrics), default=0),
        "tokens": tokens,
        "wall_time_s": round(wall_s, 1),
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s else None,
        "attempts": len(earlier) + 1,
        "run_wall_time_s": round(wall_s + sum(a.get("wall_time_s") or 0 for a in earlier), 1),
        "anomalies": len(records.read(run, RunDir.ANOMALIES)),
        "first_train_loss": train[0]["loss"] if train else None,
        "final_train_loss": train[-1]["loss"] if train else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
    }
    files.write_bytes(run.file(RunDir.SUMMARY), json.dumps(summary, indent=1).encode())
    files.write_bytes(run.file(RunDir.LOSS_PLOT), plots.loss_curves(metrics))
    return summary
