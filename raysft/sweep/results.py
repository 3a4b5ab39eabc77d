"""A sweep's results: the trials table (printed, ``trials.csv``), the metric plot (``trials.png``) and
the best trial's overrides (``best_overrides.txt``) and complete config (``best.yaml``)."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from ray import tune

from raysft import plots
from raysft.config import SweepConfig, compose, to_plain
from raysft.config.secrets import redact
from raysft.storage import files
from raysft.storage.rundir import RunDir, SweepDir
from raysft.sweep.space import trial_overrides


@dataclass
class SweepResult:
    sweep_uri: str
    trials: list[dict[str, Any]]
    best: Optional[dict[str, Any]]
    best_overrides: list[str] = field(default_factory=list)


def summarize(sweep: SweepConfig, sweep_dir: SweepDir, base: list[str], *, config_dir: Optional[str] = None,
              config_name: str = "config") -> SweepResult:
    """The trials table (printed, trials.csv), the metric plot (trials.png) and the best trial's
    overrides (best_overrides.txt) and config (best.yaml)."""
    sweep_uri = sweep_dir.uri
    path, fs_kw = sweep_dir.tune_path()
    analysis = tune.ExperimentAnalysis(path, default_metric=sweep.metric, default_mode=sweep.mode, **fs_kw)
    frames = analysis.trial_dataframes
    rows, curves = [], {}
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        df = frames.get(trial.trial_id)
        points = []
        if df is not None and sweep.metric in df and "global_step" in df:
            points = [(int(s), float(v)) for s, v in zip(df["global_step"], df[sweep.metric]) if v == v and s == s]
        curves[trial.trial_id] = points
        run = sweep_dir.trial_run(trial.trial_id)
        run_uri = run.uri
        if trial.status == "ERROR":
            status = "error"
        elif run.has(RunDir.TRAIN_SUMMARY):
            status = "done"
        elif trial.status == "TERMINATED" and points:
            status = "stopped early"
        else:
            status = trial.status.lower()
        values = {k: _plain(trial.config.get(k)) for k in sweep.space}
        rows.append({"trial": trial.trial_id, "status": status, "steps": points[-1][0] if points else 0,
                     sweep.metric: points[-1][1] if points else None, **values, "run": run_uri})

    best = pick_best(rows, sweep)
    result = SweepResult(sweep_uri, rows, best)
    print_table(rows, sweep, best)
    files.write_bytes(sweep_dir.file(SweepDir.TRIALS_CSV), to_csv(rows).encode())
    files.write_bytes(sweep_dir.file(SweepDir.TRIALS_PLOT), plots.sweep_trials(curves, rows, sweep, best, _fmt))
    if best is not None:
        result.best_overrides = base + trial_overrides({k: best[k] for k in sweep.space})
        write_best(sweep, sweep_dir, best, result.best_overrides, config_dir=config_dir, config_name=config_name)
        print(f"raysft sweep {sweep.name}: best trial {best['trial']} ({sweep.metric} {best[sweep.metric]:.4g} at step "
              f"{best['steps']}): {' '.join(trial_overrides({k: best[k] for k in sweep.space}))}", flush=True)
        print(f"  rerun it:  raysft $(cat {sweep_dir.file(SweepDir.BEST_OVERRIDES)})\n"
              f"         or  raysft --config-dir {sweep_uri} --config-name {SweepDir.BEST_CONFIG.removesuffix('.yaml')}", flush=True)
    else:
        print(f"raysft sweep {sweep.name}: no trial reported {sweep.metric}", flush=True)
    print(f"raysft sweep {sweep.name}: done. Sweep directory: {sweep_uri}", flush=True)
    return result


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def pick_best(rows: list[dict[str, Any]], sweep: SweepConfig) -> Optional[dict[str, Any]]:
    """The best last-reported metric among trials that ran to the end (among all, if none did)."""
    scored = [r for r in rows if r[sweep.metric] is not None and math.isfinite(r[sweep.metric])]
    pool = [r for r in scored if r["status"] == "done"] or scored
    if not pool:
        return None
    return (min if sweep.mode == "min" else max)(pool, key=lambda r: r[sweep.metric])


def print_table(rows: list[dict[str, Any]], sweep: SweepConfig, best: Optional[dict[str, Any]]) -> None:
    cols = ["trial", "status", "steps", sweep.metric, *sweep.space]
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    print(f"raysft sweep {sweep.name}: {len(rows)} trial(s)", flush=True)
    print("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r, row in zip(rows, cells):
        mark = "*" if best is not None and r["trial"] == best["trial"] else " "
        print(mark + " " + "  ".join(v.ljust(w) for v, w in zip(row, widths)), flush=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def write_best(sweep: SweepConfig, sweep_dir: SweepDir, best: dict[str, Any], overrides: list[str], *,
               config_dir: Optional[str], config_name: str) -> None:
    """``best_overrides.txt`` (the overrides, one a line) and ``best.yaml`` (the composed config of
    those overrides, complete, as a Hydra primary config over the ``base_config`` schema)."""
    files.write_bytes(sweep_dir.file(SweepDir.BEST_OVERRIDES), ("\n".join(overrides) + "\n").encode())
    cfg = compose(overrides, config_dir=config_dir, config_name=config_name)
    # The trial's own run name and the sweep are what the sweep added: a rerun is a new single run.
    cfg = dataclasses.replace(cfg, sweep=None, storage=dataclasses.replace(cfg.storage, name=None))
    header = (f"# Best trial of sweep '{sweep.name}': {best['trial']}, {sweep.metric} {best[sweep.metric]:.6g} at step "
              f"{best['steps']} (run {best['run']}).\n"
              f"# The complete config of: raysft {' '.join(overrides)}\n"
              f"# Train it: raysft --config-dir {sweep_dir.uri} --config-name best [more overrides]\n"
              "defaults:\n  - base_config\n  - _self_\n\n"
              "hydra:\n  run:\n    dir: outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}\n  job:\n    chdir: false\n\n")
    body = yaml.safe_dump(redact(to_plain(cfg)), sort_keys=False)
    files.write_bytes(sweep_dir.file(SweepDir.BEST_CONFIG), (header + body).encode())
