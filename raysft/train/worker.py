"""The function every Ray Train worker runs: setup -> data -> model -> trainer -> train -> save."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import tempfile
import time
from typing import Any

import datasets
import numpy as np
import ray.train
import torch
from transformers import PrinterCallback, TrainerState
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
from transformers.utils import logging as hf_logging
from transformers.trainer_utils import SchedulerType
from trl import SFTConfig

from raysft import logs
from raysft.config import RaySFTConfig, from_plain
from raysft.config.derived import grad_accum_for
from raysft.config.secrets import without_secrets
from raysft.data.prepared import open_prepared
from raysft.data.shards import RowStream
from raysft.storage import files
from raysft.storage.checkpoints import write_manifest
from raysft.storage import retry
from raysft.storage.retry import unsaved_dir
from raysft.storage.synced import SyncedFile
from raysft.storage.rundir import RunDir
from raysft.train import model as models
from raysft.train.checkpoint import RayCheckpointCallback, Retention
from raysft.train.deepspeed import deepspeed_config, patch_accelerate_for_cpu_deepspeed
from raysft.train import trackers
from raysft.train.metrics import MetricsCallback, SampleCallback
from raysft.train.preemption import PreemptionCallback
from raysft.train.anomaly import AnomalyGuard
from raysft.train.control import RunControl
from raysft.train.batches import EvalBatches, TrainBatches, batch_audit
from raysft.train import finish
from raysft.train.finish import StepNow, best_effort, upload_final_model
from raysft.train.steptimer import DataWait, StepTimer
from raysft.train.trainer import RaySFTTrainer
from raysft.train.loop import LoopConfig
from raysft.train.resume import broadcast, restore

log = logging.getLogger(__name__)




def build_sft_args(cfg: RaySFTConfig, *, output_dir: str, max_steps: int, has_eval: bool, bf16: bool, world: int = 1,
                   save_steps: float = 0, grad_accum: int | None = None, run_name: str | None = None):
    """SFTConfig from the curated ``trainer`` group; the data arrive packed, so TRL's own
    preparation (tokenize, pack, collate) is switched off. ``world``: the number of workers (one
    trains as a plain process, see ``_alone``)."""
    t = cfg.trainer
    cuda = torch.cuda.is_available()
    ds = deepspeed_config(cfg.deepspeed)
    eval_on = has_eval and t.eval_steps is not None
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=grad_accum or t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=scheduler_kwargs(t.lr_scheduler_type, dict(t.lr_scheduler_kwargs)),
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        # transformers 5 names them activation_checkpointing (the gradient_ names warn, deprecated)
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": t.use_reentrant} if t.gradient_checkpointing else None,
        bf16=bf16,
        average_tokens_across_devices=t.average_tokens_across_devices,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_on else "no",
        eval_steps=t.eval_steps if eval_on else None,
        # The Trainer writes checkpoint-N locally; RayCheckpointCallback reports it to Ray Train storage.
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or None,
        save_total_limit=None,  # Ray Train deletes each local checkpoint once it is uploaded
        seed=t.seed,
        # The data stream itself starts at the checkpoint's cursor: the Trainer must not skip batches.
        ignore_data_skip=True,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        run_name=run_name,  # stable across restarts: trackio resumes the run by name
        project=trackers.PROJECT,  # trackio's project (trl_overrides.project names another)
        deepspeed=ds,
        # No CUDA: plain DDP needs use_cpu + gloo; DeepSpeed brings its own CPU accelerator (gloo too).
        use_cpu=not cuda and ds is None,
        ddp_backend=None if cuda or (world == 1 and ds is None) else "gloo",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        packing=False,
        padding_free=False,
        max_length=None,
        dataloader_num_workers=0,
        disable_tqdm=True,  # raysft prints one line per logging step (metrics.py), on rank 0
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="no",
    )
    # NOTE: no secret in the SFTConfig: the Trainer pickles it into training_args.bin of every
    # checkpoint and of the model. hub_token reaches the hub client as HF_TOKEN (config/secrets.py).
    kwargs.update(without_secrets(t.trl_overrides))
    return SFTConfig(**kwargs)


def scheduler_kwargs(kind: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's own keyword arguments out of ``trainer.lr_scheduler_kwargs``.

    NOTE: a dict in the schema merges with what a preset or override gives (OmegaConf merges dicts),
    so the recipe default ``{min_lr_rate: 0.1}`` stays when only ``lr_scheduler_type`` changes;
    transformers then fails on an unexpected keyword. Arguments the chosen schedule does not take
    are left out, with one log line."""
    fn = TYPE_TO_SCHEDULER_FUNCTION.get(SchedulerType(kind))
    if fn is None:
        return kwargs
    accepted = inspect.signature(fn).parameters
    dropped = sorted(k for k in kwargs if k not in accepted)
    if dropped:
        log.info("raysft: trainer.lr_scheduler_kwargs %s do not apply to lr_scheduler_type=%s (left out)", dropped, kind)
    return {k: v for k, v in kwargs.items() if k in accepted}


def run_worker(loop_config: dict[str, Any]) -> None:
    """One training worker (Ray Train runs it through ``raysft.train.loop.train_loop``)."""
    # ---------------------------------------------------------------- setup
    lc = LoopConfig(**loop_config)
    cfg = from_plain(lc.cfg)
    retry.configure(cfg.storage.retry_timeout_s)
    rundir = RunDir(lc.run_root, lc.run_name)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # The console gets raysft's lines (rank 0) and errors; this worker's log file gets everything.
    logging.getLogger("raysft").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logs.quiet_libraries(cfg.monitor.verbose)
    logs.filter_console_handlers(logging.getLogger(), cfg.monitor.verbose)
    if not cfg.monitor.verbose:
        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    # A run in object storage keeps these three files current in storage (storage/synced.py).
    worker_log = SyncedFile(os.path.join(rundir.local_path or tempfile.mkdtemp(prefix="raysft-logs-"), RunDir.LOGS,
                                         f"worker-rank{rank}.log"),
                            None if rundir.local_path else rundir.file(f"{RunDir.LOGS}/worker-rank{rank}.log"))
    worker_log.pull()
    logs.add_file_log(worker_log.local)
    _quiet_ray_reports()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        if cfg.deepspeed.enabled:
            patch_accelerate_for_cpu_deepspeed()
    accel = models.resolve_accel(cfg.model, bf16=cfg.trainer.bf16)
    local_run = rundir.local_path
    scratch = tempfile.mkdtemp(prefix=f"raysft-rank{rank}-")
    batch = cfg.trainer.per_device_train_batch_size
    grad_accum = grad_accum_for(cfg, world)

    # ---------------------------------------------------------------- resume point
    resume_dir, restored = restore(lc, cfg, scratch, rank, world)
    step0 = int(restored.get("global_step", 0))
    # The data cursor: how many positions of the global row order the run has consumed.
    cursor0 = int((restored.get("data_cursor") or {}).get("global_row", 0))

    # ---------------------------------------------------------------- data
    # Every worker reads its own round-robin share of the prepared rows straight from storage.
    rows = open_prepared(lc.prepared_uri).rows()
    session = broadcast(time.time_ns() // 1000)  # tells this attempt's lines apart in the audit log
    audit = batch_audit(cfg.monitor.log_batch_hashes, rundir, scratch, rank, session)
    stream = RowStream(rows, rank=rank, world=world, batch=batch, start=cursor0, seed=cfg.trainer.seed,
                       timeout_s=cfg.scaling.data_timeout_s, skips=[tuple(r) for r in lc.data_skips])
    train_batches = TrainBatches(stream, grad_accum=grad_accum, first_step=step0, on_batch=audit.write if audit else None)
    eval_batches = (EvalBatches(rows, rank=rank, world=world, batch_size=batch, timeout_s=cfg.scaling.data_timeout_s)
                    if lc.has_eval else None)

    def checkpoint_state(st) -> dict[str, Any]:
        # Every rank took grad_accum micro-batches of `batch` rows per step since the resume point.
        consumed = cursor0 + (st.global_step - step0) * grad_accum * batch * world
        return {"global_step": st.global_step, "num_tokens": trainer._total_train_tokens,
                "data_cursor": {"global_row": consumed}}

    # ---------------------------------------------------------------- model
    # The SFTConfig goes first: with ZeRO-3 it registers the DeepSpeed config that makes
    # from_pretrained / from_config build the model already partitioned (zero3_init).
    run_name = lc.run_name
    tracker_dir, tracker_upload = _continue_tracker_runs(cfg, rundir, scratch, rank)
    if world == 1 and not cfg.deepspeed.enabled:
        _alone()
    args = build_sft_args(cfg, output_dir=scratch, max_steps=lc.max_steps, has_eval=lc.has_eval, bf16=accel.bf16, world=world,
                          save_steps=lc.save_steps, grad_accum=grad_accum, run_name=run_name)
    tokenizer = models.load_tokenizer(cfg.model)
    net = models.build_model(cfg.model, accel, peft=cfg.peft, seed=cfg.trainer.seed)

    # ---------------------------------------------------------------- trainer
    # SFTTrainer insists on a datasets object; the real rows come from the prepared set (TrainBatches).
    placeholder = datasets.IterableDataset.from_generator(_placeholder_rows)
    cuda = torch.cuda.is_available()
    metrics_file = SyncedFile(os.path.join(local_run or scratch, RunDir.METRICS),
                              None if local_run or rank else rundir.file(RunDir.METRICS))
    metrics_file.pull()
    metrics = MetricsCallback(metrics_file.local, report_to_ray=lc.report_metrics,
                              world_size=world, flops_per_token=6.0 * _param_counts(net)[1] if cuda else None,
                              peak_flops_per_device=cfg.monitor.peak_tflops_per_gpu * 1e12 if cuda else None,
                              live_progress=lc.live_progress)
    samples = SampleCallback(tokenizer, list(cfg.monitor.sample_prompts), every_steps=cfg.monitor.sample_every_steps,
                             max_new_tokens=cfg.monitor.sample_max_new_tokens, metrics=metrics)
    t = cfg.trainer
    saver = RayCheckpointCallback(rank, world, checkpoint_state, run=rundir,
                                  retention=Retention(t.save_total_limit, t.metric_for_best_model, t.greater_is_better),
                                  max_failed=cfg.storage.max_failed_checkpoints,
                                  keep_dir=os.path.join(unsaved_dir(run_name), f"checkpoint-rank{rank}"))
    # On a preemption notice: save now (a just-in-time checkpoint through `saver`), timed to complete.
    preempt = PreemptionCallback(cfg.scaling.preemption_check_steps, rank=rank, metrics_path=metrics.path)
    saver.on_uploaded, preempt.on_notice = preempt.checkpoint_uploaded, saver.put_first
    # Each checkpoint in storage brings the run's files there up to date (a restart continues them).
    saver.synced = [metrics_file, worker_log, *([audit.synced] if audit else [])]
    preempt.after_record = metrics_file.try_push
    step_now = StepNow()
    # The driver's word through the lease (a signal: checkpoint and stop; another driver: stop), and
    # the loss-spike guard (trainer.anomaly).
    control = RunControl(rundir.uri, lc.lease_token, rank=rank, world=world)
    a = cfg.trainer.anomaly
    guard = AnomalyGuard(policy=a.policy if lc.rollbacks_left or a.policy != "rollback" else "stop", factor=a.loss_factor,
                         window=a.window, min_history=a.min_history, rank=rank,
                         metrics_path=metrics.path if rank == 0 else None, first_step=step0)
    fed = DataWait(train_batches) if cfg.monitor.step_breakdown else train_batches
    timer = [StepTimer(fed, metrics.path, rank)] if cfg.monitor.step_breakdown else []
    trainer = RaySFTTrainer(
        model=net, args=args, train_dataset=placeholder, eval_dataset=placeholder if lc.has_eval else None,
        processing_class=tokenizer, peft_config=models.lora_config(cfg.peft) if cfg.peft.enabled else None,
        callbacks=[metrics, guard, samples, saver, preempt, control, step_now, *timer], train_batches=fed, eval_batches=eval_batches,
        source_names=lc.source_names,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict raw; metrics.py prints one line per step
    samples.trackers = trackers.attach(trainer)
    if rank == 0 and cfg.peft.enabled:
        trainable, total = _param_counts(trainer.model)
        log.info("PEFT %s: trainable params %s / %s (%.2f%%)", cfg.peft.method, f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # ---------------------------------------------------------------- train
    if resume_dir:
        # TRL counts tokens from 0 in every process; continue the count where the checkpoint left it.
        trainer._total_train_tokens = metrics.resume_tokens = restored.get("num_tokens", 0)
        log.info("resuming from step %d, data position %s (%s)", step0, cursor0, resume_dir)
    try:
        if resume_dir and step0 >= lc.max_steps and not cfg.deepspeed.enabled:
            # NOTE: the HF Trainer resumed at max_steps trains on past it with an endless stream.
            log.info("raysft: the run already reached step %d of %d: nothing left to train", step0, lc.max_steps)
            trainer._load_from_checkpoint(resume_dir)
            trainer.state = TrainerState.load_from_json(os.path.join(resume_dir, "trainer_state.json"))
            train_loss, train_runtime = None, 0.0
        else:
            result = trainer.train(resume_from_checkpoint=resume_dir)
            train_loss, train_runtime = result.training_loss, result.metrics.get("train_runtime")
        ended = finish.why_ended(control, guard)
        final_eval = finish.final_eval(trainer) if lc.has_eval and ended is None else {}
    except Exception as e:
        e.add_note(f"raysft: rank {rank}, step {step_now.step}")  # named in the one-line error
        raise

    if control.lost:
        return  # another driver owns the run now: nothing more is written
    if ended is not None:
        # Stopped early (a signal, an anomaly): the checkpoint (if any) is the record; no final model.
        rows_per_step = grad_accum * batch * world

        def raw(step: int) -> int:  # the global-order position after `step` steps
            return int(stream.raw(np.array([cursor0 + (step - step0) * rows_per_step]))[0])

        if rank == 0:
            ended["removed_checkpoints"] = saver.removed
            if guard.tripped is not None:
                ended["skip_rows"] = [raw(guard.tripped.first_step - 1), raw(guard.tripped.step)]
            best_effort(lambda: files.write_bytes(rundir.file(RunDir.END), json.dumps(ended).encode()), "the end record")
            best_effort(metrics_file.push, "metrics")
        if audit:
            best_effort(audit.finish, "the batch audit log")
        best_effort(worker_log.push, "the worker log")
        return

    # ---------------------------------------------------------------- save
    model_dir = os.path.join(scratch, RunDir.MODEL)
    trainer.save_model(model_dir)  # every rank: ZeRO-3 gathers the shards, rank 0 writes
    if rank == 0:
        best_effort(lambda: trackers.finish(samples.trackers, tracker_dir, tracker_upload), "the tracker files")
        tokenizer.save_pretrained(model_dir)
        write_manifest(model_dir, 0, 1)  # checksums: `raysft export` and `raysft upload` check the model too
        summary = {"global_step": trainer.state.global_step, "train_loss_mean": train_loss,
                   "train_runtime_s": train_runtime, "num_tokens": trainer._total_train_tokens,
                   "rows_consumed_rank0": train_batches.rows_consumed, "resumed_from_step": step0, **final_eval}
        upload_final_model(model_dir, rundir)
        if trainer.state.global_step > step0 or not rundir.has(RunDir.TRAIN_SUMMARY):
            # An attempt that trained nothing (the run was already at its last step) keeps the record.
            files.write_bytes(rundir.file(RunDir.TRAIN_SUMMARY), json.dumps(summary, indent=1).encode())
        best_effort(lambda: files.write_bytes(rundir.file(RunDir.END), json.dumps({"reason": "finished", "step": trainer.state.global_step, "removed_checkpoints": saver.removed}).encode()), "the end record")
        best_effort(metrics_file.push, "metrics")
    if audit:
        best_effort(audit.finish, "the batch audit log")
    # Per-rank record: what this worker consumed and how it was wrapped (DDP / DeepSpeed).
    record = json.dumps({
        "rank": rank, "world_size": world, "rows_consumed": train_batches.rows_consumed,
        "global_step": trainer.state.global_step, "wrapped_model": type(trainer.model_wrapped).__name__,
        "attn_implementation": accel.attn_implementation, "gradient_accumulation_steps": grad_accum,
    }).encode()
    best_effort(lambda: files.write_bytes(rundir.worker_record(rank), record), f"workers/rank_{rank}.json")
    best_effort(worker_log.push, "the worker log")


def _continue_tracker_runs(cfg: RaySFTConfig, rundir: RunDir, scratch: str, rank: int) -> tuple[str, str | None]:
    """A restarted or re-run job logs into the same tracker run, in ``<run>/trackers/``: wandb by a
    run id derived from the run name (unless the user set one), trackio by run name (``run_name`` in
    the SFTConfig), tensorboard by its folder. Returns (local folder, storage URI to upload it to)."""
    os.environ.setdefault("WANDB_RUN_ID", re.sub(r"[^A-Za-z0-9_-]", "-", rundir.name)[:64])
    os.environ.setdefault("WANDB_RESUME", "allow")
    return trackers.open_folder(rundir, scratch, list(cfg.trainer.report_to), rank)


def _alone() -> None:
    """A 1-worker run trains as one plain process.

    NOTE: accelerate takes any process with LOCAL_RANK set (Ray Train sets it, with RANK and
    WORLD_SIZE) for a distributed one and wraps the model in DDP even when the world is one: every
    step then copies all gradients through DDP's buckets for nothing (bench/train_overhead.py). Ray
    Train's own ``prepare_model`` skips DDP at world size 1; so does this, by taking the variables
    out before the Trainer reads them. Ray's process group stays up (``_broadcast`` sees one rank).
    DeepSpeed needs them, so a DeepSpeed run keeps them."""
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"):
        os.environ.pop(key, None)


def _quiet_ray_reports() -> None:
    """Ray Train V2 logs every ``ray.train.report`` at INFO ("Reporting training result ..."), under a
    logger named after its source file; our progress line already says it once per step."""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # a Ray without Train V2: nothing to quiet
        pass


def _placeholder_rows():
    yield {"input_ids": [0], "labels": [0]}


def _param_counts(model) -> tuple[int, int]:
    # Under ZeRO-3 a parameter is partitioned (numel() == 0 locally); ds_numel is its full size.
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return trainable, total
