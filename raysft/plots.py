"""Every figure raysft draws, as PNG bytes (the caller writes them wherever the run lives)."""

from __future__ import annotations

import io
from typing import Any, Callable, Optional

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from raysft.config import SweepConfig  # noqa: E402


def _png(fig, *, dpi: int) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def loss_curves(metrics: list[dict[str, Any]]) -> bytes:
    """Train loss (overall and per source) and eval loss against the optimizer step."""

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
    return _png(fig, dpi=110)


def data_shares(report: dict[str, Any]) -> bytes:
    """`raysft data stats`: each source's share of trained tokens and of all tokens."""

    names = list(report["shares"])
    trained = [report["shares"][n]["trained_tokens"] * 100 for n in names]
    tokens = [report["shares"][n]["tokens"] * 100 for n in names]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.55 * len(names)))
    ax.barh(y - 0.2, trained, height=0.4, label="trained tokens")
    ax.barh(y + 0.2, tokens, height=0.4, label="all tokens")
    for yy, a, b in zip(y, trained, tokens):
        ax.text(a, yy - 0.2, f" {a:.1f}%", va="center", fontsize=8)
        ax.text(b, yy + 0.2, f" {b:.1f}%", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("share of the mixture (%)")
    ax.set_xlim(0, max(trained + tokens + [1]) * 1.15)
    ax.set_title(f"data mixture: {report['train_packed_rows']:,} packed rows x {report['max_length']} tokens, "
                 f"efficiency {report['packing_efficiency']:.1%}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig, dpi=100)


def plan_tokens(p: dict[str, Any]) -> bytes:
    """`raysft plan`: horizontal bars of each source's tokens and trained tokens; unknown sources marked."""

    sources = p["data"]["sources"]
    names = [s["name"] for s in sources]
    tokens = [(s["tokens"] or 0) / 1e6 for s in sources]
    trained = [(s["trained_tokens"] or 0) / 1e6 for s in sources]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.38 * len(names)))
    ax.barh(y - 0.2, tokens, height=0.4, label="tokens")
    ax.barh(y + 0.2, trained, height=0.4, label="trained tokens")
    top = max(tokens + [1e-9])
    for yy, s, v in zip(y, sources, tokens):
        label = "unknown size" if s["tokens"] is None else f" {v:,.2f}M"
        ax.text(v, yy - 0.2, label, va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("millions of tokens")
    ax.set_title(f"mixture by tokens: {p['data']['basis']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig, dpi=100)


def sweep_trials(curves: dict[str, list[tuple[int, float]]], rows: list[dict[str, Any]], sweep: SweepConfig,
                 best: Optional[dict[str, Any]], fmt: Callable[[Any], str]) -> bytes:
    """A sweep's metric against the optimizer step, one line per trial (dashed: stopped early)."""

    status = {r["trial"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for trial_id, pts in curves.items():
        if not pts:
            continue
        r = status[trial_id]
        label = f"{trial_id}: " + ", ".join(f"{k.rsplit('.', 1)[-1]}={fmt(r[k])}" for k in sweep.space)
        is_best = best is not None and trial_id == best["trial"]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=2.5 if is_best else 1.2, ls="--" if r["status"] == "stopped early" else "-",
                marker="o" if len(pts) < 30 else None, ms=3, label=label + (" (best)" if is_best else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"sweep {sweep.name} (dashed: stopped early)", fontsize=10)
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize=7)
    return _png(fig, dpi=110)
