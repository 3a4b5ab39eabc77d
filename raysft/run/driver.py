"""The driver: composed config -> Ray -> data plan and stats -> TorchTrainer -> run directory."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import yaml
from ray.train import CheckpointConfig, RunConfig
from ray.train import ScalingConfig as RayScalingConfig
from ray.train.torch import TorchTrainer

from raysft import logs
from raysft.config import RaySFTConfig, derived, to_plain
from raysft.config.derived import Derived
from raysft.config.secrets import hub_token_to_env, redact
from raysft.data.pipeline import DataSpec, DataStats, build_spec, collect_stats
from raysft.data.prepared import PreparedSet, prepare
from raysft.data.prepared import describe as describe_prepared
from raysft.run import anomalies, console, preflight, records, restarts
from raysft.run import summary as summaries
from raysft.run.failures import EXIT_LEASE, Failure, RunFailedError, RunStopped, explain, with_kept_model, write_traceback
from raysft.run.ray_init import init_ray, ray_logging
from raysft.run.stop import SignalStop, exit_code
from raysft.storage import checkpoints as ckpts
from raysft.storage import files, retry
from raysft.storage.lease import Lease
from raysft.storage.retry import unsaved_dir
from raysft.storage.rundir import RunDir, Storage
from raysft.train import model as models
from raysft.train.loop import LoopConfig, check_world_size, train_loop

log = logging.getLogger("raysft")

@dataclass
class RunResult:
    run_uri: str
    max_steps: int
    stats: DataStats
    metrics: dict[str, Any]


def count_data(cfg: RaySFTConfig) -> tuple[DataSpec, DataStats]:
    """The data plan and a stats pass over it (every row read, rendered and packed; counts only,
    nothing written): what `raysft plan` and `raysft data stats` report."""
    spec = build_spec(cfg.data, models.tokenizer_path(cfg.model))
    return spec, collect_stats(spec, **derived.data_resources(cfg.scaling))


def prepare_data(cfg: RaySFTConfig, *, date: str | None = None) -> tuple[DataSpec, PreparedSet]:
    """The run's prepared data set under ``storage.path``: reused when one with the same fingerprint
    is complete, else tokenised and packed now (Ray Data). ``date``: the template date to pin (a
    resumed run's own)."""
    spec = build_spec(cfg.data, models.tokenizer_path(cfg.model), date=date)
    return spec, prepare(spec, Storage.at(cfg.storage.path), **derived.data_resources(cfg.scaling),
                         retry_timeout_s=cfg.storage.retry_timeout_s)


def pinned_date(rundir: RunDir) -> str | None:
    """The template date a run was started with (a resume renders any new rows with the same date)."""
    if not rundir.has(RunDir.CONFIG):
        return None
    saved = yaml.safe_load(files.read_bytes(rundir.file(RunDir.CONFIG))) or {}
    return (saved.get("derived") or {}).get("template_date")


def print_data_summary(stats: DataStats) -> None:
    for name, st in stats.sources.items():
        bad, dups = sum(st["bad"].values()), sum(st.get("duplicates", {}).values())
        print(f"  source {name}: {st['kept']:,} rows kept of {st['selected']:,} selected, {st['tokens']:,} tokens "
              f"({st['trained_tokens']:,} trained), truncated {st['truncated']}, dropped {st['dropped_too_long']}, "
              f"malformed {bad}, duplicates {dups}, special tokens {st.get('special_tokens', 0)}")
    print(f"  packed: {stats.train_packed_rows:,} train rows x {stats.max_length} tokens, efficiency "
          f"{stats.packing_efficiency:.1%}; {stats.eval_packed_rows:,} eval rows; template date {stats.date}")


def write_config(run: RunDir, cfg: RaySFTConfig, d: Derived) -> None:
    """The run's ``config.yaml``: the composed config as the user gave it (secrets redacted), then the
    values derived from it."""
    body = {**redact(to_plain(cfg)), "derived": d.to_dict()}
    files.write_bytes(run.file(RunDir.CONFIG), yaml.safe_dump(body, sort_keys=False).encode())


def run(cfg: RaySFTConfig, callbacks: list | None = None, *, ray_cpus: int | None = None) -> RunResult:
    """One training run. ``callbacks``: extra Ray Train callbacks for the TorchTrainer's RunConfig
    (a sweep trial passes the one that reports to Ray Tune). ``ray_cpus``: logical CPUs of an
    in-process local Ray, when the caller sizes it (a sweep)."""
    retry.configure(cfg.storage.retry_timeout_s)
    preflight.run_checks(cfg)  # fail before Ray starts
    storage = Storage.at(cfg.storage.path)
    name, init_checkpoint = storage.resolve_resume(cfg.resume, cfg.storage.name)
    name = name or derived.default_run_name(cfg)
    rundir = storage.run(name)
    held = None
    try:
        with SignalStop() as stop:
            # One writer per run, refused here before anything is written or Ray starts (storage/lease.py).
            # A sweep trial waits out a lease its own interrupted predecessor may still hold.
            held, took_over = Lease.acquire(rundir.uri, name, cfg.storage.lease_timeout_s,
                                            wait_s=1.25 * cfg.storage.lease_timeout_s if callbacks else 0)
            stop.lease = held.start()
            attempt = records.Attempt(rundir)
            return _run(cfg, callbacks, ray_cpus, rundir, init_checkpoint, held, took_over, stop, attempt)
    finally:
        if held is not None:
            held.release()


def _run(cfg: RaySFTConfig, callbacks, ray_cpus, rundir: RunDir, init_checkpoint: str | None, held: Lease,
         took_over: str | None, stop: SignalStop, attempt: records.Attempt) -> RunResult:
    name = rundir.name
    driver_log = console_log(rundir)
    print(f"raysft: run {name} -> {rundir.uri}", flush=True)
    if took_over:
        print(f"raysft: {took_over}", flush=True)
    print(f"raysft: survives {restarts.survives(cfg)}", flush=True)
    choice = choose_checkpoint(rundir, init_checkpoint)  # checksums checked before Ray starts
    resume_from = choice.chosen
    if resume_from:
        check_world_size(resume_from.world_size, cfg.scaling.num_workers, cfg, resume_from.uri)  # fail before Ray starts
        attempt.record["from_step"] = resume_from.step
    # NOTE: a hub token given as an override reaches the workers as HF_TOKEN in the environment only
    # (raysft.config.secrets): set here, before a local Ray starts, its workers inherit it.
    if hub_token_to_env(cfg.trainer.trl_overrides):
        remote = ray.is_initialized() or cfg.scaling.address or os.environ.get("RAY_ADDRESS")
        print("raysft: warning: trainer.trl_overrides.hub_token on a command line shows in `ps` and in Ray's job list "
              "(the job's entrypoint): prefer HF_TOKEN in the environment"
              + ("; on a running Ray or a cluster the workers read only their own HF_TOKEN (job runtime_env or "
                 "node environment)" if remote else ""), flush=True)
    init_ray(cfg, num_cpus=ray_cpus)
    stop.reinstall()  # Ray's own SIGTERM handler would kill the driver without a checkpoint

    spec, prepared = prepare_data(cfg, date=cfg.data.date or pinned_date(rundir))
    print(f"raysft: {describe_prepared(prepared)}", flush=True)
    stats = prepared.stats()
    print_data_summary(stats)
    d = derived.derive(cfg, run_name=name, date=spec.date, train_packed_rows=stats.train_packed_rows)
    t = cfg.trainer
    print(f"raysft: {logs.count(cfg.scaling.num_workers, 'worker')} x {logs.count(t.per_device_train_batch_size, 'row')} x "
          f"{t.gradient_accumulation_steps} accumulation = {d.global_batch_rows} "
          f"rows/step ({cfg.data.max_length} tokens each) => {logs.count(d.max_steps, 'optimizer step')}", flush=True)
    finished = rundir.finished_step()
    if finished is not None and finished >= d.max_steps and not callbacks:
        # The same command run again (a retried job, a resubmit): no worker group, no GPUs, no re-upload
        # of the model. A sweep trial still goes through Ray Train, which reports it to Tune.
        print(f"raysft: run {name} already finished at step {finished} (model in {rundir.file(RunDir.MODEL)}): "
              "nothing to train. To train again, choose another storage.name", flush=True)
        attempt.end("already finished", finished)
        upload_console_log(rundir, driver_log)
        return RunResult(rundir.uri, d.max_steps, stats, {})
    if resume_from:
        print(f"raysft: resuming from step {resume_from.step} ({resume_from.uri})", flush=True)
    write_config(rundir, cfg, d)
    files.write_bytes(rundir.file(RunDir.DATA_STATS), json.dumps(stats.to_json(), indent=1).encode())

    # Once training starts, the workers need nothing but storage: each reads its own rows of the
    # prepared set (no data actor to lose with its node).
    has_eval = stats.eval_packed_rows >= cfg.scaling.num_workers
    # Redacted: Ray Train keeps train_loop_config in its run state (dashboard, export events).
    loop = LoopConfig(cfg=redact(to_plain(cfg)), run_root=rundir.root, run_name=name, max_steps=d.max_steps,
                      source_names=spec.source_names, has_eval=has_eval, prepared_uri=prepared.uri,
                      save_steps=d.save_steps, init_checkpoint=init_checkpoint, report_metrics=bool(callbacks),
                      live_progress=console.live_progress_wanted(cfg.monitor.verbose),
                      verified_checkpoint=resume_from.uri if resume_from else None,
                      corrupt_checkpoints=tuple(c.uri for c, _ in choice.corrupt),
                      data_skips=tuple(records.data_skips(rundir)),
                      rollbacks_left=max(0, t.anomaly.max_rollbacks - records.rollbacks(rundir)), lease_token=held.token)
    started, started_unix = time.perf_counter(), time.time()
    restarted = 0
    while True:  # one Ray Train run; again after a rollback or a controller restart
        if stop.signal and restarted == 0:  # signalled before training started: nothing to checkpoint
            step = resume_from.step if resume_from else 0
            attempt.end(f"stopped by {stop.signal} before training", step)
            raise RunStopped(exit_code(stop.signal), f"stopped before training started (step {step}) — run the "
                             "same command to resume")
        rundir.forget_ray_registry()
        storage_path, storage_fs = rundir.ray_storage(d.ray_state_retry_s)
        trainer = (_OwnSignals if stop.installed else TorchTrainer)(
            train_loop,
            train_loop_config=loop.to_dict(),
            scaling_config=scaling_config(cfg),
            run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=restarts.failure_config(cfg),
                                 worker_runtime_env={"env_vars": worker_env(cfg)}, callbacks=callbacks,
                                 checkpoint_config=checkpoint_config(), logging_config=ray_logging(cfg, train=True)),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - turned into one line; the traceback goes to a file
            console.progress.close()
            if held.lost_to is not None:
                raise RunFailedError(lost_lease(rundir, held)) from e
            if controller_died(e) and restarts.allowed(cfg.scaling.max_failures, restarted):
                restarted += 1
                print(f"raysft: {controller_line(e, rundir)}: restarting the run from it "
                      f"({restarted} of scaling.max_failures={cfg.scaling.max_failures})", flush=True)
                continue
            failure = with_kept_model(explain(e, save_traceback(e, rundir)), rundir, started_unix)
            if controller_died(e):
                failure = Failure(failure.code, f"{controller_line(e, rundir)} — run the same command to resume from it")
            attempt.end("failed", _newest_step(rundir), error=failure.line)
            upload_console_log(rundir, driver_log)
            raise RunFailedError(failure) from e
        console.progress.close()
        if held.lost_to is not None:
            raise RunFailedError(lost_lease(rundir, held))
        end = read_end(rundir)
        if end.get("reason") == "stopped":
            step = end["step"]
            attempt.end(f"stopped by {end.get('signal') or stop.signal}", step)
            upload_console_log(rundir, driver_log)
            last = rundir.latest_checkpoint()
            where = f"checkpoint at step {last.step} in {last.uri}" if last else "no checkpoint"
            raise RunStopped(exit_code(stop.signal or end.get("signal") or "SIGTERM"),
                             f"stopped at step {step} ({where}) — run the same command to resume")
        if end.get("reason") == "anomaly":
            loop = anomalies.handle(end, rundir, cfg, loop, attempt)  # raises RunFailedError unless it rolls back
            upload_console_log(rundir, driver_log)
            continue
        break
    removed = end.get("removed_checkpoints", 0)
    for uri in rundir.apply_retention(keep=t.save_total_limit, score_key=t.metric_for_best_model,
                                      greater_is_better=t.greater_is_better):
        log.info("raysft: removed checkpoint %s (retention, or an upload that never completed)", uri, extra=logs.LOG_ONLY)
        removed += 1
    if removed:
        print(f"raysft: retention removed {logs.count(removed, 'checkpoint')} (trainer.save_total_limit="
              f"{t.save_total_limit}; each is named in {RunDir.LOGS}/)", flush=True)
    summary = summaries.summarize(rundir, time.perf_counter() - started)
    print(f"raysft: {logs.count(summary['steps'], 'step')}, {summary['tokens']:,.0f} tokens in {summary['wall_time_s']:.0f} s "
          f"({_round(summary['tokens_per_s'], 1)} tokens/s); train loss {_round(summary['first_train_loss'])} -> "
          f"{_round(summary['final_train_loss'])}, eval loss {_round(summary['final_eval_loss'])}", flush=True)
    attempt.end("finished", summary["steps"])
    print(f"raysft: done. Run directory: {rundir.uri} (logs in {RunDir.LOGS}/)", flush=True)
    upload_console_log(rundir, driver_log)
    return RunResult(rundir.uri, d.max_steps, stats, dict(result.metrics or {}))


class _OwnSignals(TorchTrainer):
    """NOTE: Ray Train's ``fit()`` installs a SIGINT handler that aborts the run at once, with no
    checkpoint; the driver's own (run/stop.py) checkpoints at the end of the current step first."""

    def _register_sigint_handler(self, controller) -> None:
        pass


def choose_checkpoint(rundir: RunDir, init_checkpoint: str | None) -> ckpts.Choice:
    """The checkpoint the run resumes from: its own newest one whose checksums pass in storage (each
    corrupted one named and skipped), else ``resume=<uri>``'s, checked the same way."""
    choice = ckpts.latest_verified(rundir.uri)
    if choice.chosen is None and not choice.corrupt and init_checkpoint:
        info = ckpts.inspect(init_checkpoint)
        bad = ckpts.verify_stored(info)
        if bad:
            raise ckpts.CorruptCheckpointError(f"checkpoint {init_checkpoint} (resume=) is corrupt: {bad[0]} — "
                                               "resume from another checkpoint")
        choice = ckpts.Choice(info, [], bad is None)
    for line in choice.lines():
        print(f"raysft: {line}", flush=True)
    choice.raise_if_none_left(rundir.uri)
    return choice


def read_end(rundir: RunDir) -> dict[str, Any]:
    """How the group ended (``workers/end.json``, rank 0): finished, stopped (a signal) or an anomaly."""
    uri = rundir.file(RunDir.END)
    return json.loads(files.read_bytes(uri)) if files.exists(uri) else {}


def controller_died(e: BaseException) -> bool:
    """Ray Train's controller actor died (its process killed, its node lost): ``fit()`` raises Ray's own
    actor error, not a training failure (a worker's error comes wrapped in ``TrainingFailedError``)."""
    return isinstance(e, ray.exceptions.RayActorError)


def controller_line(e: BaseException, rundir: RunDir) -> str:
    last = rundir.latest_checkpoint()
    where = f"step {last.step} ({last.uri})" if last else "none yet"
    return f"Ray Train's controller process died ({type(e).__name__}); the newest complete checkpoint is {where}"


def lost_lease(rundir: RunDir, held: Lease) -> Failure:
    return Failure(EXIT_LEASE, f"run {rundir.name} was taken over by {held.lost_to.holder} (this driver's lease had gone "
                               "unrenewed): this driver stopped its workers and wrote nothing more")


def _newest_step(rundir: RunDir) -> int | None:
    try:
        last = rundir.latest_checkpoint()
    except Exception:  # noqa: BLE001 - storage may be what failed
        return None
    return last.step if last else None


def worker_env(cfg: RaySFTConfig) -> dict[str, str]:
    """What the workers get on top of their node's environment (never a secret: secrets.py)."""
    env = files.forwarded_env()
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would probe for CUDA and say so on every worker
    return env


def _round(v, digits: int = 3):
    return "-" if v is None else f"{v:,.{digits}f}" if isinstance(v, float) else v


def console_log(rundir: RunDir) -> str:
    """From here on, the driver's console also goes to ``<run>/logs/driver.log`` (on this machine,
    copied to object storage at the end for a remote run), with every library record."""
    local = os.path.join(rundir.local_path or unsaved_dir(rundir.name), RunDir.LOGS, "driver.log")
    logs.tee_console(local)
    logs.add_file_log(local)
    return local


def upload_console_log(rundir: RunDir, local: str) -> None:
    if not rundir.local_path:
        try:
            files.write_bytes(rundir.file(f"{RunDir.LOGS}/driver.log"), open(local, "rb").read())
        except Exception:  # noqa: BLE001 - the local copy stays where it is
            log.warning("raysft: the driver log stays at %s (storage did not take it)", local)


def save_traceback(e: BaseException, rundir: RunDir) -> str | None:
    """The failure's full traceback in the run's ``logs/`` (on this machine when the run lives in
    object storage, then copied there if storage answers)."""
    local = rundir.local_path or unsaved_dir(rundir.name)
    path = write_traceback(e, os.path.join(local, RunDir.LOGS, "driver-error.txt"))
    if path and not rundir.local_path:
        try:
            retry.retrying("upload the traceback", lambda: files.write_bytes(rundir.file(f"{RunDir.LOGS}/driver-error.txt"),
                                                                          open(path, "rb").read()), timeout_s=10)
        except Exception:  # noqa: BLE001 - the local copy is named in the error line
            pass
    return path


def checkpoint_config() -> CheckpointConfig:
    """Ray Train keeps every checkpoint it registers: raysft applies ``trainer.save_total_limit`` /
    ``metric_for_best_model`` itself (``storage.checkpoints.apply_retention``), because Ray would
    count an abandoned upload as a checkpoint and delete the last complete one for it."""
    return CheckpointConfig(num_to_keep=None)


def scaling_config(cfg: RaySFTConfig) -> RayScalingConfig:
    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    if s.memory_per_worker_gb:
        resources["memory"] = s.memory_per_worker_gb * (1 << 30)
    elastic = {"num_workers": (s.min_workers, s.num_workers), "elastic_resize_monitor_interval_s": s.elastic_resize_interval_s}
    return RayScalingConfig(**(elastic if s.min_workers is not None else {"num_workers": s.num_workers}),
                            use_gpu=s.use_gpu, resources_per_worker=resources,
                            placement_strategy=s.placement_strategy, accelerator_type=s.accelerator_type)
