"""Hyperparameter sweeps with Ray Tune, driven from Hydra: ``raysft sweep=lr [overrides]``.

Each trial is a full raysft run through the same code path as ``raysft`` itself: its config is
composed by ``raysft.config.compose`` from the sweep's command-line overrides plus the trial's sampled
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

import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from raysft.config import SweepConfig, compose, derived
from raysft.config.secrets import hub_token_to_env
from raysft.run import driver
from raysft.run.ray_init import init_ray
from raysft.storage import files
from raysft.storage.rundir import SweepDir
from raysft.sweep import results
from raysft.sweep.space import (SweepConfigError, base_overrides, check_space, hydra_value, trial_overrides,
                                tune_space)
from raysft.train import model as models

log = logging.getLogger("raysft")


# ----------------------------------------------------------------------------- the trial (runs in a Tune actor)

class MetricReport(TuneReportCallback):
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
    # Tune moves the trial into its own working directory; relative paths in the config (data
    # files, storage) mean the launch directory, as for a single run.
    if spec["cwd"] and os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])
    trial_id = tune.get_context().get_trial_id()
    overrides = [*spec["base"], *trial_overrides(values), f"storage.path={hydra_value(spec['storage_path'])}",
                 f"storage.name={SweepDir(spec['storage_path'], spec['name']).trial_run_name(trial_id)}"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"raysft sweep {spec['name']}: trial {trial_id}: {' '.join(trial_overrides(values))}", flush=True)
    cfg = compose(overrides, config_dir=spec["config_dir"], config_name=spec["config_name"])
    driver.run(cfg, callbacks=[MetricReport(spec["metric"])])


def trial_dirname(trial) -> str:
    return trial.trial_id


# ----------------------------------------------------------------------------- the sweep (driver)


class ReapOrphanPlacementGroups(tune.Callback):
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
    try:  # Ray internals (the GCS placement-group table): imported here so a Ray that moved them only skips this
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
    d = json.loads(json.dumps(dataclasses.asdict(sweep)))
    for k in ("max_concurrent_trials", "trial_cpus"):  # may change between attempts
        d.pop(k, None)
    return {"base_overrides": base, "sweep": d}


def run(overrides: list[str], *, config_dir: Optional[str] = None, config_name: str = "config",
        callbacks: Optional[list] = None) -> results.SweepResult:
    """Run (or resume) the sweep that ``overrides`` select (``sweep=<preset>`` + any config overrides).

    ``callbacks``: extra Ray Tune callbacks (loggers, ...)."""
    overrides = list(overrides)
    cfg = compose(overrides, config_dir=config_dir, config_name=config_name)
    sweep = cfg.sweep
    if sweep is None:
        raise SweepConfigError("no sweep selected: add sweep=<preset> (conf/sweep/: lr, lora, packing, mixture)")
    base, notes = base_overrides(overrides, cfg)
    if hub_token_to_env(cfg.trainer.trl_overrides):  # the trials read it there; it is not in `base`
        notes.append("trainer.trl_overrides.hub_token: the trials get it as HF_TOKEN (it is written nowhere)")
    check_space(sweep, base, config_dir=config_dir, config_name=config_name)
    if cfg.model.init == "pretrained":
        models.check_available(cfg.model)  # fail before Ray starts
    for note in notes:
        print(f"raysft sweep: {note}", flush=True)

    # A local Ray sized for the concurrent trials: each takes its workers' CPUs plus a sliver. The
    # dashboard serves the State API, through which Ray Train's cleaner frees the workers of a
    # trial that Tune stopped (ReapOrphanPlacementGroups covers a Ray started without it).
    init_ray(cfg, num_cpus=derived.local_ray_cpus(cfg, concurrent_trials=sweep.max_concurrent_trials,
                                                  trial_cpus=sweep.trial_cpus))

    sweep_dir = SweepDir.at(cfg.storage.path, sweep.name)
    sweep_uri = sweep_dir.uri
    spec = {"name": sweep.name, "base": base, "metric": sweep.metric, "storage_path": sweep_dir.root,
            "config_dir": config_dir, "config_name": config_name, "cwd": os.getcwd()}
    trainable = tune.with_resources(make_trainable(spec), {"CPU": sweep.trial_cpus})
    tune_root, fs_kw = sweep_dir.tune_storage()
    tune_path, _ = sweep_dir.tune_path()
    spec_uri = sweep_dir.file(SweepDir.SPEC)
    identity = _sweep_spec(sweep, base)

    if tune.Tuner.can_restore(tune_path, **fs_kw):
        if files.exists(spec_uri):
            saved = json.loads(files.read_bytes(spec_uri))
            if saved != identity:
                raise SweepConfigError(f"sweep '{sweep.name}' already exists in {sweep_uri} with other settings "
                                 f"(was: {saved}; now: {identity}). Resume it with the same command line, or start "
                                 f"another sweep with sweep.name=<new name>")
        print(f"raysft sweep {sweep.name}: resuming {sweep_uri} (finished trials are not run again)", flush=True)
        tuner = tune.Tuner.restore(tune_path, trainable=trainable,
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
            run_config=tune.RunConfig(name=sweep.name, storage_path=tune_root,
                                      callbacks=[ReapOrphanPlacementGroups(), *(callbacks or [])],
                                      failure_config=tune.FailureConfig(max_failures=0), **fs_kw),
        )
    tuner.fit()
    return results.summarize(sweep, sweep_dir, base, config_dir=config_dir, config_name=config_name)


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
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials)
