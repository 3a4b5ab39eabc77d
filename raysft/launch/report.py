"""End-of-run report: a summary line and a loss-curve PNG in the run directory."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from raysft.storage import files


def read_metrics(run_uri: str) -> list[dict[str, Any]]:
    uri = files.join(run_uri, "metrics.jsonl")
    if not files.exists(uri):
        return []
    return [json.loads(line) for line in files.read_bytes(uri).decode().splitlines() if line.strip()]


def summarize(run_uri: str, wall_s: float) -> dict[str, Any]:
    metrics = read_metrics(run_uri)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    tokens = max((m.get("num_tokens", 0) for m in train), default=0)
    summary = {
        "steps": max((m.get("global_step", 0) for m in metrics), default=0),
        "tokens": tokens,
        "wall_time_s": round(wall_s, 1),
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s else None,
        "first_train_loss": train[0]["loss"] if train else None,
        "final_train_loss": train[-1]["loss"] if train else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
    }
    files.write_bytes(files.join(run_uri, "summary.json"), json.dumps(summary, indent=1).encode())
    write_loss_plot(run_uri, metrics)
    return summary


def write_loss_plot(run_uri: str, metrics: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series = {"train loss": [(m["global_step"], m["loss"]) for m in metrics if "loss" in m],
              "eval loss": [(m["global_step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]}
    for source in sorted({k[5:] for m in metrics for k in m if k.startswith("loss/")}):
        series[f"train loss: {source}"] = [(m["global_step"], m[f"loss/{source}"]) for m in metrics if f"loss/{source}" in m]
    for label, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if label == "eval loss" else None, lw=2 if ":" not in label else 1,
                    alpha=1 if ":" not in label else 0.6, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    files.write_bytes(files.join(run_uri, "loss.png"), buf.getvalue())


def write_command_output(out: str | None, kind: str, filename: str, data: dict[str, Any],
                         plot: Callable[[dict[str, Any], Path], None]) -> Path:
    """What `raysft data stats` and `raysft plan` leave behind: ``filename`` (JSON) and mixture.png in
    ``out`` (default outputs/<kind>/<timestamp>), each announced on stdout."""
    out_dir = Path(out or os.path.join("outputs", kind, time.strftime("%Y%m%d-%H%M%S")))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / filename).write_text(json.dumps(data, indent=1))
    plot(data, out_dir / "mixture.png")
    print(f"wrote {out_dir / filename}\nwrote {out_dir / 'mixture.png'}")
    return out_dir
