"""Hyperparameter sweeps with Ray Tune, driven from Hydra: ``raysft sweep=lr [overrides]``.

Each trial is a full raysft run through the same code path as ``raysft`` itself: its config is
composed by ``raysft.cli.compose`` from the sweep's command-line overrides plus the trial's sampled
``key=value`` overrides, then ``driver.run`` trains it under the run name ``<sweep>-trial-<id>`` in the
same ``storage.path``. The trial's TorchTrainer forwards every report of the sweep metric to Tune
(``TuneReportCallback``), so ASHA compares trials at every rung and stops the trailing ones.

The sweep directory ``<storage.path>/<sweep.name>`` holds Tune's experiment state (re-running the same
command resumes an interrupted sweep; finished trials are not run again) and, at the end:

    trials.csv          one row per trial: id, status, steps, metric, sampled values, run directory
    trials.png          the metric against the optimizer step, one line per trial
    best_overrides.txt  the best trial's overrides, one per line: ``raysft $(cat best_overrides.txt)``
    best.yaml           the best trial's complete config as a Hydra primary config:
                        ``raysft --config-dir <sweep dir> --config-name best``
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from raysft.config import DistributionConfig, RaySFTConfig, SweepConfig, to_plain
from raysft.storage import files

log = logging.getLogger("raysft")

SPEC_FILE = "raysft_sweep.json"
EVAL_EVERY_LOGGING_STEPS = 10
"""With an eval metric and ``trainer.eval_steps=null``, trials evaluate every this many logging steps."""


class SweepConfigError(ValueError):
    """The sweep cannot start as configured (raised before Ray starts)."""


@dataclass
class SweepResult:
    sweep_uri: str
    trials: list[dict[str, Any]]
    best: Optional[dict[str, Any]]
    best_overrides: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- overrides


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value that parses back to the same value."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()  # numpy scalars from Tune's samplers
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][\w\-./:@]*", text) and text.lower() not in ("null", "true", "false", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_key(override: str) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([override])[0].key_or_group


def trial_overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={hydra_value(v)}" for k, v in values.items()]


def base_overrides(overrides: list[str], cfg: RaySFTConfig) -> tuple[list[str], list[str]]:
    """The overrides every trial shares: the command line minus the sweep's own keys, the run name
    and the keys the space samples; plus what the metric needs. Returns (overrides, notes)."""
    sweep = cfg.sweep
    assert sweep is not None
    drop = set(sweep.space) | {"storage.name"}
    base = []
    for o in overrides:
        key = override_key(o)
        if key == "sweep" or key.startswith("sweep.") or key in drop:
            continue
        base.append(o)
    notes = []
    if sweep.metric.startswith("eval_") and "trainer.eval_steps" not in sweep.space:
        if "data.dataset_mixture.test_split_size" not in sweep.space and cfg.data.dataset_mixture.test_split_size <= 0:
            raise SweepConfigError(f"sweep.metric={sweep.metric} needs held-out data: set data.dataset_mixture.test_split_size > 0 "
                             "or sweep.metric=loss")
        if cfg.trainer.eval_steps is None:
            every = EVAL_EVERY_LOGGING_STEPS * cfg.trainer.logging_steps
            base.append(f"trainer.eval_steps={every}")
            notes.append(f"sweep.metric={sweep.metric} is only reported at evaluations and trainer.eval_steps is null: "
                         f"trials evaluate every {every} steps (trainer.eval_steps={every}) so the scheduler can compare them")
    return base, notes


def sample_values(space: dict[str, DistributionConfig]) -> dict[str, Any]:
    """One value of each distribution (for the dry-run composition before Ray starts)."""
    out = {}
    for key, d in space.items():
        out[key] = d.values[0] if d.type in ("choice", "grid") else (int(d.low) if d.type == "randint" else d.low)
    return out


def check_space(sweep: SweepConfig, base: list[str], *, config_dir: Optional[str], config_name: str) -> None:
    """Every key in the space must be a config key, and a trial's config must compose and validate."""
    from raysft.cli import check_override_keys, compose

    for key in sweep.space:
        try:
            check_override_keys([f"{key}=0"])
        except ValueError as e:
            raise SweepConfigError(f"sweep.space key '{key}' is not a config key: {e}") from None
    try:
        compose(base + trial_overrides(sample_values(sweep.space)), config_dir=config_dir, config_name=config_name)
    except Exception as e:
        raise SweepConfigError(f"a trial of sweep '{sweep.name}' does not compose ({sample_values(sweep.space)}): {e}") from e


def tune_space(space: dict[str, DistributionConfig]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.type == "loguniform":
            out[key] = tune.loguniform(d.low, d.high)
        elif d.type == "uniform":
            out[key] = tune.uniform(d.low, d.high)
        elif d.type == "randint":
            out[key] = tune.randint(int(d.low), int(d.high))
        elif d.type == "choice":
            out[key] = tune.choice(list(d.values))
        else:
            out[key] = tune.grid_search(list(d.values))
    return out


# ----------------------------------------------------------------------------- the trial (runs in a Tune actor)

try:
    from ray.tune.integration.ray_train import TuneReportCallback as _TuneReportCallback
except ImportError:  # pragma: no cover - a Ray without Train V2
    _TuneReportCallback = object  # type: ignore[assignment,misc]


class MetricReport(_TuneReportCallback):  # type: ignore[misc,valid-type]
    """Forward to Tune only the reports that carry the sweep metric, so every Tune result has it
    and ``training_iteration`` counts its reports (every logging step for ``loss``, every evaluation
    for ``eval_loss``); the other reports (eval, end-of-training) stay in metrics.jsonl."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def make_trainable(spec: dict[str, Any]):
    """The Tune function trainable: compose the trial's config, then one raysft run."""

    def raysft_trial(config: dict[str, Any]) -> None:
        run_trial(config, spec)

    return raysft_trial


def run_trial(values: dict[str, Any], spec: dict[str, Any]) -> None:
    from ray import tune

    from raysft.cli import compose
    from raysft.launch import driver

    # Tune moves the trial into its own working directory; relative paths in the config (data
    # files, storage) mean the launch directory, as for a single run.
    if spec["cwd"] and os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])
    trial_id = tune.get_context().get_trial_id()
    overrides = [*spec["base"], *trial_overrides(values), f"storage.path={hydra_value(spec['storage_path'])}",
                 f"storage.name={spec['name']}-trial-{trial_id}"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"raysft sweep {spec['name']}: trial {trial_id}: {' '.join(trial_overrides(values))}", flush=True)
    cfg = compose(overrides, config_dir=spec["config_dir"], config_name=spec["config_name"])
    driver.run(cfg, callbacks=[MetricReport(spec["metric"])])


def trial_dirname(trial) -> str:
    return trial.trial_id


# ----------------------------------------------------------------------------- the sweep (driver)


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover
    _TuneCallback = object  # type: ignore[assignment,misc]


class ReapOrphanPlacementGroups(_TuneCallback):  # type: ignore[misc,valid-type]
    """Free the workers' placement group of a trial that Tune stopped (ASHA) or that failed.

    Tune ends a stopped trial by ending its actor; the trial's Train controller dies with it, before
    it can remove the placement group of its workers. Train's own cleaner actor watches the
    controller through the State API, which needs the Ray dashboard (``include_dashboard=False``
    locally): without it the group stays reserved and the next trial waits forever for CPUs. So
    the sweep removes, every couple of seconds, the placement groups of this job whose creating
    actor is dead (read from the GCS, no dashboard needed)."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._last = 0.0

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            reap_orphan_placement_groups()

    def on_trial_complete(self, iteration, trials, trial, **info):
        reap_orphan_placement_groups()

    def on_trial_error(self, iteration, trials, trial, **info):
        reap_orphan_placement_groups()


def reap_orphan_placement_groups() -> int:
    """Remove this job's non-detached placement groups whose creator actor is dead. Returns how many."""
    try:
        import ray
        from ray._private.state import state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        job = ray.get_runtime_context().get_job_id()
        removed = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if (pg.is_detached or not pg.creator_actor_dead or pg.state == gcs_pb2.PlacementGroupTableData.REMOVED
                    or ray.ActorID(pg.creator_actor_id).is_nil() or pg.creator_job_id.hex() != job):
                continue
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
        if removed:
            log.info("raysft sweep: freed %d placement group(s) of stopped trials", removed)
        return removed
    except Exception as e:  # best effort: never fail a sweep over housekeeping
        log.debug("raysft sweep: placement group reaper skipped: %s", e)
        return 0


def _sweep_spec(sweep: SweepConfig, base: list[str]) -> dict[str, Any]:
    """What identifies a sweep: resuming with anything else changed would mix two experiments."""
    d = to_plain_sweep(sweep)
    for k in ("max_concurrent_trials", "trial_cpus"):  # may change between attempts
        d.pop(k, None)
    return {"base_overrides": base, "sweep": d}


def to_plain_sweep(sweep: SweepConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(sweep)))


def run(overrides: list[str], *, config_dir: Optional[str] = None, config_name: str = "config",
        callbacks: Optional[list] = None) -> SweepResult:
    """Run (or resume) the sweep that ``overrides`` select (``sweep=<preset>`` + any config overrides).

    ``callbacks``: extra Ray Tune callbacks (loggers, ...)."""
    import ray
    from ray import tune

    from raysft.cli import compose
    from raysft.launch import driver
    from raysft.train import model as models

    overrides = list(overrides)
    cfg = compose(overrides, config_dir=config_dir, config_name=config_name)
    sweep = cfg.sweep
    if sweep is None:
        raise SweepConfigError("no sweep selected: add sweep=<preset> (conf/sweep/: lr, lora, packing, mixture)")
    base, notes = base_overrides(overrides, cfg)
    check_space(sweep, base, config_dir=config_dir, config_name=config_name)
    if cfg.model.init == "pretrained":
        models.check_available(cfg.model)  # fail before Ray starts
    for note in notes:
        print(f"raysft sweep: {note}", flush=True)

    # A local Ray sized for the concurrent trials: each takes its workers' CPUs plus a sliver.
    if not ray.is_initialized() and not (cfg.scaling.address or os.environ.get("RAY_ADDRESS")) and cfg.scaling.local_num_cpus is None:
        s = cfg.scaling
        cfg.scaling.local_num_cpus = int(math.ceil(sweep.max_concurrent_trials * (s.num_workers * s.cpus_per_worker + sweep.trial_cpus))) + 2
    # The dashboard serves the State API, through which Ray Train's cleaner frees the workers of a
    # trial that Tune stopped (ReapOrphanPlacementGroups covers a Ray started without it).
    driver.init_ray(cfg, dashboard=True)

    storage_path = cfg.storage.path if files.is_remote(cfg.storage.path) else os.path.abspath(cfg.storage.path)
    sweep_uri = files.join(storage_path, sweep.name)
    spec = {"name": sweep.name, "base": base, "metric": sweep.metric, "storage_path": storage_path,
            "config_dir": config_dir, "config_name": config_name, "cwd": os.getcwd()}
    trainable = tune.with_resources(make_trainable(spec), {"CPU": sweep.trial_cpus})
    fs, fs_path = files.filesystem(storage_path)
    fs_kw = {"storage_filesystem": fs} if files.is_remote(storage_path) else {}
    spec_uri = files.join(sweep_uri, SPEC_FILE)
    identity = _sweep_spec(sweep, base)

    if tune.Tuner.can_restore(files.join(fs_path, sweep.name) if fs_kw else sweep_uri, **fs_kw):
        if files.exists(spec_uri):
            saved = json.loads(files.read_bytes(spec_uri))
            if saved != identity:
                raise SweepConfigError(f"sweep '{sweep.name}' already exists in {sweep_uri} with other settings "
                                 f"(was: {saved}; now: {identity}). Resume it with the same command line, or start "
                                 f"another sweep with sweep.name=<new name>")
        print(f"raysft sweep {sweep.name}: resuming {sweep_uri} (finished trials are not run again)", flush=True)
        tuner = tune.Tuner.restore(files.join(fs_path, sweep.name) if fs_kw else sweep_uri, trainable=trainable,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False, **fs_kw)
    else:
        files.write_bytes(spec_uri, json.dumps(identity, indent=1).encode())
        print(f"raysft sweep {sweep.name}: {describe(sweep)} -> {sweep_uri}", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(sweep.space),
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                        # The random/grid generator limits concurrency itself (Tune
                                        # ignores max_concurrent_trials for it); a Searcher gets a limiter.
                                        max_concurrent_trials=sweep.max_concurrent_trials if sweep.search_alg != "random" else None,
                                        scheduler=make_scheduler(sweep), search_alg=make_search_alg(sweep),
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=sweep.name, storage_path=fs_path if fs_kw else storage_path,
                                      callbacks=[ReapOrphanPlacementGroups(), *(callbacks or [])],
                                      failure_config=tune.FailureConfig(max_failures=0), **fs_kw),
        )
    tuner.fit()
    return summarize(sweep, sweep_uri, base, config_dir=config_dir, config_name=config_name)


def describe(sweep: SweepConfig) -> str:
    space = ", ".join(f"{k} ~ {d.type}({', '.join(map(str, d.values)) if d.values else f'{d.low}, {d.high}'})"
                      for k, d in sweep.space.items())
    sched = (f"ASHA on {sweep.scheduler.time_attr} (grace {sweep.scheduler.grace_period}, "
             f"reduction {sweep.scheduler.reduction_factor:g})" if sweep.scheduler.type == "asha" else "no early stopping")
    return (f"{space}; {sweep.num_samples} sample(s), {sweep.search_alg} search, {sched}, "
            f"{sweep.mode} {sweep.metric}, {sweep.max_concurrent_trials} at a time")


def make_scheduler(sweep: SweepConfig):
    if sweep.scheduler.type == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = sweep.scheduler
    return ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def make_search_alg(sweep: SweepConfig):
    if sweep.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        sampler = None
        if sweep.seed is not None:
            import optuna

            sampler = optuna.samplers.TPESampler(seed=sweep.seed)
        return OptunaSearch(sampler=sampler)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials)


# ----------------------------------------------------------------------------- results


def summarize(sweep: SweepConfig, sweep_uri: str, base: list[str], *, config_dir: Optional[str] = None,
              config_name: str = "config") -> SweepResult:
    """The trials table (printed, trials.csv), the metric plot (trials.png) and the best trial's
    overrides (best_overrides.txt) and config (best.yaml)."""
    from ray import tune

    fs_kw = {}
    path = sweep_uri
    if files.is_remote(sweep_uri):
        fs, path = files.filesystem(sweep_uri)
        fs_kw = {"storage_filesystem": fs}
    analysis = tune.ExperimentAnalysis(path, default_metric=sweep.metric, default_mode=sweep.mode, **fs_kw)
    frames = analysis.trial_dataframes
    storage_path = sweep_uri.rsplit("/", 1)[0]
    rows, curves = [], {}
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        df = frames.get(trial.trial_id)
        points = []
        if df is not None and sweep.metric in df and "global_step" in df:
            points = [(int(s), float(v)) for s, v in zip(df["global_step"], df[sweep.metric]) if v == v and s == s]
        curves[trial.trial_id] = points
        run_uri = files.join(storage_path, f"{sweep.name}-trial-{trial.trial_id}")
        if trial.status == "ERROR":
            status = "error"
        elif files.exists(files.join(run_uri, "train_summary.json")):
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
    files.write_bytes(files.join(sweep_uri, "trials.csv"), to_csv(rows).encode())
    files.write_bytes(files.join(sweep_uri, "trials.png"), plot(curves, rows, sweep, best))
    if best is not None:
        result.best_overrides = base + trial_overrides({k: best[k] for k in sweep.space})
        write_best(sweep, sweep_uri, best, result.best_overrides, config_dir=config_dir, config_name=config_name)
        print(f"raysft sweep {sweep.name}: best trial {best['trial']} ({sweep.metric} {best[sweep.metric]:.4g} at step "
              f"{best['steps']}): {' '.join(trial_overrides({k: best[k] for k in sweep.space}))}", flush=True)
        print(f"  rerun it:  raysft $(cat {files.join(sweep_uri, 'best_overrides.txt')})\n"
              f"         or  raysft --config-dir {sweep_uri} --config-name best", flush=True)
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


def plot(curves: dict[str, list[tuple[int, float]]], rows: list[dict[str, Any]], sweep: SweepConfig,
         best: Optional[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    status = {r["trial"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for trial_id, pts in curves.items():
        if not pts:
            continue
        r = status[trial_id]
        label = f"{trial_id}: " + ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(r[k])}" for k in sweep.space)
        is_best = best is not None and trial_id == best["trial"]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=2.5 if is_best else 1.2, ls="--" if r["status"] == "stopped early" else "-",
                marker="o" if len(pts) < 30 else None, ms=3, label=label + (" (best)" if is_best else ""))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"sweep {sweep.name} (dashed: stopped early)", fontsize=10)
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_best(sweep: SweepConfig, sweep_uri: str, best: dict[str, Any], overrides: list[str], *,
               config_dir: Optional[str], config_name: str) -> None:
    """``best_overrides.txt`` (the overrides, one a line) and ``best.yaml`` (the composed config of
    those overrides, complete, as a Hydra primary config over the ``base_config`` schema)."""
    from raysft.cli import compose

    files.write_bytes(files.join(sweep_uri, "best_overrides.txt"), ("\n".join(overrides) + "\n").encode())
    cfg = compose(overrides, config_dir=config_dir, config_name=config_name)
    cfg.sweep = None
    cfg.storage.name = None
    header = (f"# Best trial of sweep '{sweep.name}': {best['trial']}, {sweep.metric} {best[sweep.metric]:.6g} at step "
              f"{best['steps']} (run {best['run']}).\n"
              f"# The complete config of: raysft {' '.join(overrides)}\n"
              f"# Train it: raysft --config-dir {sweep_uri} --config-name best [more overrides]\n"
              "defaults:\n  - base_config\n  - _self_\n\n"
              "hydra:\n  run:\n    dir: outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}\n  job:\n    chdir: false\n\n")
    body = yaml.safe_dump(driver_redact(to_plain(cfg)), sort_keys=False)
    files.write_bytes(files.join(sweep_uri, "best.yaml"), (header + body).encode())


def driver_redact(d: dict[str, Any]) -> dict[str, Any]:
    from raysft.launch.driver import redact

    return redact(d)
