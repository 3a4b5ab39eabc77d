"""The driver: composed config -> Ray -> data plan and stats -> TorchTrainer -> run directory."""

from __future__ import annotations

import json
import logging
import re
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import yaml

from raysft.config import RaySFTConfig, to_plain
from raysft.launch import report
from raysft.data.pipeline import DataSpec, DataStats, build_dataset, build_spec, collect_stats
from raysft.storage import files
from raysft.train import model as models

log = logging.getLogger("raysft")

EVAL_MATERIALIZE_MAX_TOKENS = 200_000_000  # ~2.4 GB of packed int32/int16 columns
# Keys whose string values are secrets (hub_token, wandb api_key, aws_secret_access_key, ...);
# "max_new_tokens" or "average_tokens_across_devices" are not.
# Tokenizer special tokens (data.eos_token, pad_token, ...) are not secrets either.
SECRET_KEY = re.compile(r"(?<!eos_)(?<!bos_)(?<!pad_)(?<!unk_)(?<!sep_)(?<!cls_)(?<!mask_)"
                        r"(token|secret|password|passwd|api_key|access_key|credentials?)$", re.IGNORECASE)


@dataclass
class RunResult:
    run_uri: str
    max_steps: int
    stats: DataStats
    metrics: dict[str, Any]


def init_ray(cfg: RaySFTConfig, dashboard: bool = True) -> None:
    """Connect to a cluster (``scaling.address`` or ``RAY_ADDRESS``) or start Ray in-process
    (with the dashboard if ``dashboard``: sweeps need its State API to free stopped trials' workers)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    s = cfg.scaling
    # Ray schedules by logical CPUs: with exactly as many as the train workers take, Ray Data gets
    # none and the run hangs. Oversubscribe by default (the data tasks use fractional CPUs).
    num_cpus = s.local_num_cpus or int(math.ceil(s.num_workers * s.cpus_per_worker)) + 2
    # NOTE: the dashboard is on by default: Ray Train V2's PlacementGroupCleaner asks the State API
    # whether the controller is alive and, when the answer comes back empty (no dashboard, or an
    # overloaded one), removes the workers' placement group and kills a healthy run (seen here).
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", object_store_memory=512 << 20,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}})


def run_name(cfg: RaySFTConfig) -> str:
    if cfg.storage.name:
        return cfg.storage.name
    model = os.path.basename(cfg.model.name_or_path.rstrip("/")).replace("bundled:", "")
    return f"{model}-{cfg.stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_uri_of(cfg: RaySFTConfig, name: str) -> str:
    base = cfg.storage.path
    if not files.is_remote(base):
        base = os.path.abspath(base)
    return files.join(base, name)


def steps_for(stats: DataStats, cfg: RaySFTConfig) -> int:
    """Optimizer steps, exactly as a plain ``accelerate launch`` of the same config would count them
    on the same packed rows: each of W ranks gets ``ceil(rows / W)`` rows per epoch (the distributed
    sampler pads), in ``ceil(. / batch)`` micro-batches, and an epoch is ``ceil(micro-batches / GA)``
    steps (HF ``Trainer.set_initial_training_values``). When the stream runs out before the last step,
    the trainer starts another pass over it, as the distributed sampler repeats rows to pad."""
    t, w = cfg.trainer, cfg.scaling.num_workers
    micro_batches = math.ceil(math.ceil(stats.train_packed_rows / w) / t.per_device_train_batch_size)
    steps_per_epoch = max(math.ceil(micro_batches / t.gradient_accumulation_steps), 1)
    if stats.train_packed_rows < w * t.per_device_train_batch_size:
        raise ValueError(f"the data give {stats.train_packed_rows} packed rows per epoch, fewer than one micro-batch "
                         f"on every worker needs ({w} workers x {t.per_device_train_batch_size} rows): add data, raise "
                         "source weights or lower the batch")
    return math.ceil(t.num_train_epochs * steps_per_epoch)


def save_steps_for(cfg: RaySFTConfig, max_steps: int) -> float:
    """Checkpoint interval in steps (0 = none). ``epoch`` becomes steps: the stream has no epoch ends."""
    t = cfg.trainer
    if t.save_strategy == "no":
        return 0
    if t.save_strategy == "epoch":
        return max(1, math.ceil(max_steps / max(t.num_train_epochs, 1e-9)))
    return t.save_steps if t.save_steps >= 1 else max(1, math.ceil(t.save_steps * max_steps))


def redact(obj: Any) -> Any:
    """Drop any secret-looking value before a config is written anywhere."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) and isinstance(v, str) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def prepare_data(cfg: RaySFTConfig) -> tuple[DataSpec, DataStats]:
    spec = build_spec(cfg.data, models.tokenizer_path(cfg.model), epochs=max(1, math.ceil(cfg.trainer.num_train_epochs)))
    cfg.data.date = spec.date  # pinned for every worker and recorded in the saved config
    stats = collect_stats(spec, data_cpus=cfg.scaling.data_cpus_per_task, concurrency=cfg.scaling.data_concurrency)
    return spec, stats


def print_data_summary(stats: DataStats) -> None:
    for name, st in stats.sources.items():
        bad = sum(st["bad"].values())
        print(f"  source {name}: {st['kept']:,} rows kept of {st['selected']:,} selected, {st['tokens']:,} tokens "
              f"({st['trained_tokens']:,} trained), truncated {st['truncated']}, dropped {st['dropped_too_long']}, bad {bad}")
    print(f"  packed: {stats.train_packed_rows:,} train rows x {stats.max_length} tokens, efficiency "
          f"{stats.packing_efficiency:.1%}; {stats.eval_packed_rows:,} eval rows; template date {stats.date}")


def run(cfg: RaySFTConfig, callbacks: list | None = None) -> RunResult:
    """One training run. ``callbacks``: extra Ray Train callbacks for the TorchTrainer's RunConfig
    (a sweep trial passes the one that reports to Ray Tune)."""
    import ray
    import ray.train
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raysft.train.worker import LoopConfig, train_loop

    from raysft.data.stream import RowDealer
    from raysft.train import checkpoint as ckpts

    if cfg.model.init == "pretrained":
        models.check_available(cfg.model)  # fail before Ray starts
    name, init_checkpoint = resolve_resume(cfg)
    run_uri = run_uri_of(cfg, name)
    print(f"raysft: run {name} -> {run_uri}", flush=True)
    resume_from = ckpts.latest_complete(run_uri) or (ckpts.inspect(init_checkpoint) if init_checkpoint else None)
    if resume_from:
        from raysft.train.worker import check_world_size

        check_world_size(resume_from.world_size, cfg.scaling.num_workers, cfg, resume_from.uri)  # fail before Ray starts
        print(f"raysft: resuming from step {resume_from.step} ({resume_from.uri})", flush=True)
    init_ray(cfg)

    spec, stats = prepare_data(cfg)
    print_data_summary(stats)
    max_steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else steps_for(stats, cfg)
    t = cfg.trainer
    print(f"raysft: {cfg.scaling.num_workers} workers x {t.per_device_train_batch_size} rows x "
          f"{t.gradient_accumulation_steps} accumulation = {cfg.scaling.num_workers * t.per_device_train_batch_size * t.gradient_accumulation_steps} "
          f"rows/step ({cfg.data.max_length} tokens each) => {max_steps} optimizer steps", flush=True)

    files.write_bytes(files.join(run_uri, "config.yaml"), yaml.safe_dump(redact(to_plain(cfg)), sort_keys=False).encode())
    files.write_bytes(files.join(run_uri, "data_stats.json"), json.dumps(stats.to_json(), indent=1).encode())

    data_kw = dict(data_cpus=cfg.scaling.data_cpus_per_task, concurrency=cfg.scaling.data_concurrency)
    # The train rows are dealt by one actor in a fixed global order (exact resume, see data/stream.py);
    # the eval split goes through Ray Train's own split (its order does not matter).
    dealer = ray.remote(RowDealer).options(num_cpus=0, max_concurrency=cfg.scaling.num_workers + 4).remote(spec, **data_kw)
    datasets = {}
    has_eval = stats.eval_packed_rows >= cfg.scaling.num_workers
    if has_eval:
        eval_ds = build_dataset(spec, "eval", **data_kw)
        # A small eval split is prepared once and kept in the object store: otherwise every
        # evaluation re-runs the pipeline (actor start-up, tokenizer load) for a handful of rows.
        if stats.eval_packed_rows * cfg.data.max_length <= EVAL_MATERIALIZE_MAX_TOKENS:
            eval_ds = eval_ds.materialize()
        datasets["eval"] = eval_ds
    loop = LoopConfig(cfg=to_plain(cfg), run_uri=run_uri, max_steps=max_steps, source_names=spec.source_names,
                      has_eval=has_eval, dealer=dealer, save_steps=save_steps_for(cfg, max_steps),
                      init_checkpoint=init_checkpoint)
    storage_path, _ = run_uri.rsplit("/", 1)
    # Ray Train stores through the same pyarrow filesystem as our own files (S3 endpoint included).
    storage_fs, storage_path = files.filesystem(storage_path) if files.is_remote(storage_path) else (None, storage_path)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop.to_dict(),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             worker_runtime_env={"env_vars": files.forwarded_env()}, callbacks=callbacks,
                             checkpoint_config=checkpoint_config(cfg)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        ray.kill(dealer)
    kept = {c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint:
        kept.add(result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    for uri in ckpts.prune(run_uri, kept):
        print(f"raysft: removed checkpoint {uri} (not kept by Ray Train: an orphan or an incomplete upload)", flush=True)
    summary = report.summarize(run_uri, time.perf_counter() - started)
    print(f"raysft: {summary['steps']} steps, {summary['tokens']:,.0f} tokens in {summary['wall_time_s']:.0f} s "
          f"({summary['tokens_per_s']} tokens/s); train loss {summary['first_train_loss']} -> "
          f"{summary['final_train_loss']}, eval loss {summary['final_eval_loss']}", flush=True)
    print(f"raysft: done. Run directory: {run_uri}", flush=True)
    return RunResult(run_uri, max_steps, stats, dict(result.metrics or {}))


def resolve_resume(cfg: RaySFTConfig) -> tuple[str, str | None]:
    """(run name, checkpoint URI to start from) for ``cfg.resume`` (see ``RaySFTConfig.resume``)."""
    from raysft.train import checkpoint as ckpts

    if cfg.resume is None:
        return run_name(cfg), None
    if cfg.resume == "latest":
        if cfg.storage.name:
            if ckpts.latest_complete(run_uri_of(cfg, cfg.storage.name)) is None:
                raise ValueError(f"resume=latest: run {cfg.storage.name!r} under {cfg.storage.path} has no complete "
                                 "checkpoint to continue from")
            return cfg.storage.name, None
        name = latest_run(cfg.storage.path if files.is_remote(cfg.storage.path) else os.path.abspath(cfg.storage.path))
        if name is None:
            raise ValueError(f"resume=latest: no run under {cfg.storage.path} has a complete checkpoint")
        cfg.storage.name = name
        return name, None
    return run_name(cfg), ckpts.resolve(cfg.resume if files.is_remote(cfg.resume) else os.path.abspath(cfg.resume)).uri


def latest_run(storage_path: str) -> str | None:
    """The run under ``storage_path`` whose newest checkpoint is the most recent (Ray names
    checkpoint folders by timestamp), among runs with a complete one."""
    import pyarrow.fs as pafs

    from raysft.train import checkpoint as ckpts

    fs, path = files.filesystem(storage_path)
    best: tuple[str, str] | None = None
    for e in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if e.type != pafs.FileType.Directory:
            continue
        done = [c for c in ckpts.scan(files.join(storage_path, e.base_name)) if c.complete]
        if done and (best is None or done[-1].uri.rsplit("/", 1)[-1] > best[0]):
            best = (done[-1].uri.rsplit("/", 1)[-1], e.base_name)
    return best[1] if best else None


def checkpoint_config(cfg: RaySFTConfig):
    from ray.train import CheckpointConfig

    t = cfg.trainer
    if t.metric_for_best_model:
        return CheckpointConfig(num_to_keep=t.save_total_limit, checkpoint_score_attribute=t.metric_for_best_model,
                                checkpoint_score_order="max" if t.greater_is_better else "min")
    return CheckpointConfig(num_to_keep=t.save_total_limit)


def scaling_config(cfg: RaySFTConfig):
    from ray.train import ScalingConfig

    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    if s.memory_per_worker_gb:
        resources["memory"] = s.memory_per_worker_gb * (1 << 30)
    elastic = {"num_workers": (s.min_workers, s.num_workers), "elastic_resize_monitor_interval_s": s.elastic_resize_interval_s}
    return ScalingConfig(**(elastic if s.min_workers is not None else {"num_workers": s.num_workers}),
                         use_gpu=s.use_gpu, resources_per_worker=resources,
                         placement_strategy=s.placement_strategy, accelerator_type=s.accelerator_type)
