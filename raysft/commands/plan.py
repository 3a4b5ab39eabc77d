"""``raysft plan [--out DIR] [overrides...]``: what a run would cost, before anything trains.

For the config composed exactly as training composes it, prints and writes (``DIR/plan.json``,
``DIR/mixture.png``; default ``outputs/plan/<timestamp>``):

- per source: rows kept and tokens. **Exact** when every source is local (a ``path``, or hub ids
  under ``data.root``): the same stats pass a run starts with (local Ray). Otherwise **estimated**
  from smoltalk2's published split sizes (``estimates.SMOLTALK2_SPLITS``), or "unknown";
- trained tokens (after the loss mask), packed rows and packing efficiency;
- optimizer steps per epoch and in total, tokens per step;
- the per-GPU memory under the configured ZeRO stage against the GPU's memory (``estimates.GPUS``),
  flagged when it cannot fit;
- wall time, GPU-hours and cost at ``plan.tokens_per_s_per_gpu`` and ``plan.usd_per_gpu_hour``.

It refuses impossible configs (exit 2, each reason on its own line): a source weight <= 0,
``data.max_length`` beyond the model's ``max_position_embeddings``, a local source missing a listed
column, a global batch that differs from ``plan.global_batch_rows`` (or cannot divide it), fewer
packed rows than one optimizer step. Exit codes as ``raysft data``: 0 ok, 1 data could not be
read, 2 usage, config or refusal, 3 too many malformed rows.
"""

from __future__ import annotations

import datetime
import sys
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raysft import assets, plots
from raysft.commands import estimates as est
from raysft.commands import measured as measured_file
from raysft.commands.output import write_command_output
from raysft.commands.plan_report import print_plan
from raysft.config import RaySFTConfig, compose, derived
from raysft.data.mixture import plan_mixture
from raysft.data.pipeline import DataQualityError
from raysft.data.sources import DataSourceError, resolve_files
from raysft.run.driver import count_data
from raysft.run.ray_init import init_ray

USAGE = "usage: raysft plan [--out DIR] [overrides...]"


class PlanRefused(ValueError):
    def __init__(self, reasons: list[str]):
        super().__init__("\n".join(reasons))
        self.reasons = reasons


# ----------------------------------------------------------------------------- command


def main(argv: list[str]) -> int:
    out, overrides = None, []
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            print(__doc__.split("\n\n")[0] + "\n" + USAGE)
            return 0
        if a == "--out" or a.startswith("--out="):
            out = a.partition("=")[2] or next(it, None)
            if not out:
                return _error("--out needs a directory")
        elif a.startswith("-"):
            return _error(f"unknown option {a!r}; valid here: --out")
        else:
            overrides.append(a)
    try:
        cfg = compose(overrides)
    except Exception as e:  # noqa: BLE001 - any composition failure is a config/usage error
        return _error(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")

    try:
        plan = build_plan(cfg)
    except PlanRefused as e:
        print("raysft plan: refused, this config cannot run as given:", file=sys.stderr)
        for r in e.reasons:
            print(f"  - {r}", file=sys.stderr)
        return 2
    except (DataSourceError, FileNotFoundError) as e:
        print(f"raysft: error: {e}", file=sys.stderr)
        return 1
    except DataQualityError as e:
        print(f"raysft: data quality check failed:\n{e}", file=sys.stderr)
        return 3
    print_plan(plan)
    write_command_output(out, "plan", "plan.json", plan, plots.plan_tokens)
    return 0


def _error(msg: str) -> int:
    print(f"raysft: error: {msg}\n{USAGE}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- the plan


def build_plan(cfg: RaySFTConfig) -> dict[str, Any]:
    """The whole plan as a JSON-able dict; raises ``PlanRefused`` listing every reason it cannot run."""
    m = cfg.model
    model_config, model_source = est.load_model_config(m.name_or_path, revision=m.revision, init=m.init,
                                                       config_overrides=dict(m.config_overrides))
    shape = est.ModelShape.from_config(model_config) if model_config else None
    reasons = refusals(cfg, shape, model_source)
    measurement = None
    if cfg.plan.throughput_file:
        try:
            measurement = measured_file.load(cfg.plan.throughput_file)
        except measured_file.MeasurementError as e:
            reasons.append(str(e))
        if measurement and shape and measurement.params != shape.num_params:
            reasons.append(f"plan.throughput_file measured a model of {measurement.params:,} params, this config's has "
                           f"{shape.num_params:,}: measure this model (bench/gpu_check.py) or unset plan.throughput_file")
    if reasons:
        raise PlanRefused(reasons)

    data = exact_data(cfg) if all_local(cfg) else estimated_data(cfg)
    t, s = cfg.trainer, cfg.scaling
    rows_per_step = derived.global_batch_rows(cfg)
    packed = data["train_packed_rows"]
    steps = {"rows_per_step": rows_per_step, "workers": s.num_workers,
             "per_device_train_batch_size": t.per_device_train_batch_size,
             "gradient_accumulation_steps": t.gradient_accumulation_steps, "epochs": t.num_train_epochs,
             "steps_per_epoch": None, "total_steps": None, "tokens_per_step": rows_per_step * cfg.data.max_length,
             "real_tokens_per_step": None, "trained_tokens_per_step": None}
    if packed:
        try:  # the run's own derivation, so the plan and the run agree
            total = t.max_steps if t.max_steps > 0 else derived.steps_for(packed, cfg)
        except ValueError as e:
            raise PlanRefused([f"{e} ({data['basis']})"]) from None
        try:
            per_epoch = derived.steps_for(packed, cfg, epochs=1.0)
        except ValueError:
            per_epoch = 0
        steps |= {"steps_per_epoch": per_epoch, "total_steps": total,
                  "real_tokens_per_step": round(rows_per_step * cfg.data.max_length * data["packing_efficiency"]),
                  "trained_tokens_per_step": round(rows_per_step * data["trained_tokens"] / packed)}
        if derived.packing_strategy(cfg.data) == "none":
            steps["tokens_per_step"] = round(rows_per_step * data["tokens"] / packed)
    plan = {"generated": datetime.datetime.now().isoformat(timespec="seconds"), "stage": cfg.stage,
            "model": {"name_or_path": m.name_or_path, "revision": m.revision, "config": model_source,
                      "params": shape.num_params if shape else None,
                      "max_position_embeddings": shape.max_position_embeddings if shape else None},
            "data": data, "steps": steps}
    plan["memory"] = memory_plan(cfg, shape, measurement)
    plan["time"] = time_plan(cfg, shape, data, steps, measurement)
    return plan


def refusals(cfg: RaySFTConfig, shape: est.ModelShape | None, model_source: str) -> list[str]:
    """Every reason the config cannot run, checked without reading any row."""
    reasons = []
    for src in cfg.data.dataset_mixture.datasets:
        if not src.weight > 0:
            reasons.append(f"source {src.label!r}: weight {src.weight} <= 0; a weight is the fraction of the split's rows "
                           f"kept, so it must be > 0 (drop the source to leave it out)")
    t, s, want = cfg.trainer, cfg.scaling, cfg.plan.global_batch_rows
    micro = s.num_workers * t.per_device_train_batch_size
    if want is not None and derived.global_batch_rows(cfg) != want:
        got = (f"{s.num_workers} workers x {t.per_device_train_batch_size} rows x {t.gradient_accumulation_steps} "
               f"accumulation = {derived.global_batch_rows(cfg)}")
        if want % micro:
            reasons.append(f"global batch: plan.global_batch_rows={want} is not divisible by {s.num_workers} workers x "
                           f"{t.per_device_train_batch_size} rows = {micro}, so no gradient_accumulation_steps gives it "
                           f"(now {got}): change scaling.num_workers or trainer.per_device_train_batch_size")
        else:
            reasons.append(f"global batch: {got} rows per step, but plan.global_batch_rows={want}: set "
                           f"trainer.gradient_accumulation_steps={want // micro}")
    if shape is not None and shape.max_position_embeddings and cfg.data.max_length > shape.max_position_embeddings:
        reasons.append(f"data.max_length={cfg.data.max_length:,} exceeds the model's max_position_embeddings="
                       f"{shape.max_position_embeddings:,} (from {model_source}): a sequence that long has positions "
                       f"the model was not trained for; use data.max_length<={shape.max_position_embeddings}")
    reasons += column_refusals(cfg)
    return reasons


def column_refusals(cfg: RaySFTConfig) -> list[str]:
    """Local sources whose files lack a listed column (parquet / arrow schemas: footers only)."""
    reasons = []
    for src in cfg.data.dataset_mixture.datasets:
        if not src.columns or not _source_is_local(cfg, src):
            continue
        files = resolve_files(id=src.id, path=assets.resolve(src.path), config=src.config, split=src.split,
                              data_root=assets.resolve(cfg.data.root))
        for f in files:
            if f.format == "parquet":
                names = pq.read_schema(f.path).names
            elif f.format == "arrow":
                with pa.memory_map(f.path) as mm:
                    try:
                        names = pa.ipc.open_file(mm).schema.names
                    except pa.ArrowInvalid:
                        names = pa.ipc.open_stream(mm).schema.names
            else:
                continue  # jsonl / json: no schema to read without reading rows
            missing = [c for c in src.columns if c not in names]
            if missing:
                reasons.append(f"source {src.label!r}: column(s) {missing} not in {f.path} (it has {names}); fix "
                               f"data.dataset_mixture.datasets[].columns or the data")
                break
    return reasons


# ----------------------------------------------------------------------------- data


def _source_is_local(cfg: RaySFTConfig, src) -> bool:
    where = assets.resolve(src.path) if src.path else assets.resolve(cfg.data.root)
    return where is not None and "://" not in where


def all_local(cfg: RaySFTConfig) -> bool:
    return all(_source_is_local(cfg, s) for s in cfg.data.dataset_mixture.datasets)


def exact_data(cfg: RaySFTConfig) -> dict[str, Any]:
    """The real stats pass (``driver.prepare_data``) on local Ray: the counts a run would print."""
    started = not ray.is_initialized()
    init_ray(cfg)
    try:
        spec, stats = count_data(cfg)
    finally:
        if started:
            ray.shutdown()
    sources = []
    for src, cfg_src in zip(spec.sources, cfg.data.dataset_mixture.datasets):
        st, ev = stats.sources[src.name], stats.eval_sources[src.name]
        sources.append({"name": src.name, "weight": cfg_src.weight, "basis": "exact", "split_rows": src.num_rows,
                        "kept_rows": st["kept"] + ev["kept"], "train_rows": st["kept"], "eval_rows": ev["kept"],
                        "selected_train_rows": st["selected"], "tokens": st["tokens"], "trained_tokens": st["trained_tokens"],
                        "truncated": st["truncated"], "dropped_too_long": st["dropped_too_long"],
                        "bad_rows": sum(st["bad"].values())})
    return _data_totals(cfg, sources, basis="exact (stats pass over the local data)",
                        packed=stats.train_packed_rows, efficiency=stats.packing_efficiency,
                        eval_packed=stats.eval_packed_rows, notes=[])


def estimated_data(cfg: RaySFTConfig) -> dict[str, Any]:
    """Row and token counts from published split sizes (no network, no rows read)."""
    d, mix = cfg.data, cfg.data.dataset_mixture
    notes = [f"estimated from {est.SMOLTALK2_SOURCE}: token counts are the conversations' before the chat template "
             f"(the sft template adds a system block per row), trained tokens = rows x mean response tokens (an "
             f"undercount for multi-turn rows, which train every assistant turn)"]
    rows, facts = [], []
    for src in mix.datasets:
        fact = est.known_split(src.id, src.config, src.split)
        n = fact[0] if fact else None
        if _source_is_local(cfg, src):  # row counts from file footers; tokens unknown without the stats pass
            n = sum(f.num_rows for f in resolve_files(id=src.id, path=assets.resolve(src.path), config=src.config,
                                                       split=src.split, data_root=assets.resolve(d.root)))
        rows.append(n)
        facts.append(fact)
    if all(n is not None for n in rows):  # the handbook's selection, exactly, on the known row counts
        mp = plan_mixture(rows, [s.weight for s in mix.datasets], mix.seed, mix.test_split_size)
        kept, train = mp.kept_per_source, mp.train_counts()
    else:
        kept = [int(n * s.weight) if n is not None else None for n, s in zip(rows, mix.datasets)]
        # test_split_size: a fraction, or (>= 1) a row count of the whole known mixture, spread pro rata
        total = sum(k for k in kept if k is not None) or 1
        held = mix.test_split_size if mix.test_split_size < 1 else min(1.0, mix.test_split_size / total)
        train = [round(k * (1 - held)) if k is not None else None for k in kept]
    sources = []
    for src, n, k, tr, fact in zip(mix.datasets, rows, kept, train, facts):
        row = {"name": src.label, "weight": src.weight, "split_rows": n, "kept_rows": k, "train_rows": tr,
               "eval_rows": (k - tr) if k is not None else None, "tokens": None, "trained_tokens": None}
        if fact is None:
            row["basis"] = "rows exact (local files), tokens unknown" if n is not None else "unknown: no published size"
        else:
            per_row = min(fact[1], d.max_length)  # truncation caps a row (the means cannot tell how many)
            trained_per_row = per_row if d.loss == "all" else min(fact[2], per_row)
            row |= {"basis": "estimated (dataset card)", "tokens": round(tr * per_row),
                    "trained_tokens": round(tr * trained_per_row), "mean_tokens_per_row": fact[1]}
        sources.append(row)
    unknown = [s["name"] for s in sources if s["tokens"] is None]
    if unknown:
        notes.append(f"{len(unknown)} source(s) without a known token count are left out of the totals, so the totals, "
                     f"steps and time are lower bounds: {', '.join(unknown)}")
    tokens = sum(s["tokens"] or 0 for s in sources)
    train_rows = sum(s["train_rows"] or 0 for s in sources if s["tokens"] is not None)
    strategy = derived.packing_strategy(d)
    strategy = "bfd" if strategy == "bfd_split" else strategy  # the same efficiency for the estimate
    packed, eff = est.packed_rows_estimate(tokens, train_rows, d.max_length, strategy) if tokens else (0, 0.0)
    if tokens and strategy != "none":
        notes.append(f"packing efficiency assumed {eff:.0%} ({strategy}); exact with local data")
    eval_rows = sum(s["eval_rows"] or 0 for s in sources if s["tokens"] is not None)
    eval_tokens = sum((s["eval_rows"] or 0) * min(s["mean_tokens_per_row"], d.max_length)
                      for s in sources if s["tokens"] is not None)
    eval_packed = est.packed_rows_estimate(eval_tokens, eval_rows, d.max_length, strategy)[0] if eval_tokens else 0
    return _data_totals(cfg, sources, basis="estimated (published split sizes; no data read)", packed=packed,
                        efficiency=eff, eval_packed=eval_packed, notes=notes)


def _data_totals(cfg, sources, *, basis, packed, efficiency, eval_packed, notes) -> dict[str, Any]:
    tokens = sum(s["tokens"] or 0 for s in sources)
    trained = sum(s["trained_tokens"] or 0 for s in sources)
    rows = sum(s["train_rows"] or 0 for s in sources if s["tokens"] is not None)
    # Attention cost grows with sequence length: token-weighted mean of the sources' mean lengths.
    mean_len = sum((s["tokens"] ** 2) / s["train_rows"] for s in sources if s["tokens"] and s["train_rows"])
    return {"basis": basis, "sources": sources, "train_rows": rows, "tokens": tokens, "trained_tokens": trained,
            "trained_fraction": trained / tokens if tokens else None,
            "token_weighted_mean_seq_len": mean_len / tokens if tokens else None,
            "max_length": cfg.data.max_length, "packing_strategy": derived.packing_strategy(cfg.data),
            "train_packed_rows": packed, "packing_efficiency": efficiency, "eval_packed_rows": eval_packed, "notes": notes}


# ----------------------------------------------------------------------------- memory and time


def memory_plan(cfg: RaySFTConfig, shape: est.ModelShape | None, measurement=None) -> dict[str, Any]:
    s, t, ds = cfg.scaling, cfg.trainer, cfg.deepspeed
    if shape is None:
        return {"estimate": None, "note": "model config.json not available offline: no memory estimate"}
    gpu = s.use_gpu
    bf16 = gpu and (t.bf16 or cfg.model.dtype == "bfloat16")
    mem = est.memory_per_gpu(
        shape, world_size=s.num_workers, micro_batch=t.per_device_train_batch_size, seq_len=cfg.data.max_length,
        bf16=bf16, gradient_checkpointing=t.gradient_checkpointing, zero_stage=ds.stage if ds.enabled else None,
        offload_optimizer=ds.enabled and ds.offload_optimizer, offload_param=ds.enabled and ds.offload_param,
        peft=cfg.peft.method if cfg.peft.enabled else None, lora_r=cfg.peft.r, fused_lm_head=gpu, gpu=gpu)
    out: dict[str, Any] = {"estimate_gb": mem.to_json(), "zero_stage": ds.stage if ds.enabled else None,
                           "precision": "bf16" if bf16 else "fp32", "gradient_checkpointing": t.gradient_checkpointing,
                           "peft": cfg.peft.method if cfg.peft.enabled else None,
                           "trainable_params": shape.lora_params(cfg.peft.r) if cfg.peft.enabled else shape.num_params,
                           "accelerator_type": s.accelerator_type, "gpu_memory_gb": None, "fits": None,
                           "formula": "raysft.commands.estimates.memory_per_gpu (ZeRO paper's 16 bytes/param; activations "
                                      "after Korthikanti et al. 2022)"}
    total = mem.total
    if measurement is not None:  # a correction only from a measurement (plan.throughput_file)
        out["measured"] = measured_file.memory_correction(
            measurement, mem, max_length=cfg.data.max_length, liger=cfg.model.use_liger_kernel, gpu=gpu,
            zero_stage=ds.stage if ds.enabled else None, peft=cfg.peft.enabled)
        total = out["measured"]["total_gb"] * est.GB if out["measured"]["applied"] else total
    if not gpu:
        out["note"] = "CPU workers: the estimate is host memory per worker; no GPU to compare with"
        return out
    if s.accelerator_type not in est.GPUS:
        out["note"] = (f"scaling.accelerator_type={s.accelerator_type!r}: no memory figure for it (known: "
                       f"{', '.join(est.GPUS)}), not compared")
        return out
    cap = est.GPUS[s.accelerator_type][0]
    use = total / est.GB / cap
    out |= {"gpu_memory_gb": cap, "fraction": round(use, 3), "fits": use <= 1.0,
            "verdict": "fits" if use <= 0.9 else ("tight: within 10% of the GPU's memory" if use <= 1.0 else
                                                  "DOES NOT FIT: needs more memory than the GPU has")}
    return out


def time_plan(cfg: RaySFTConfig, shape, data, steps, measurement=None) -> dict[str, Any]:
    s, t = cfg.scaling, cfg.trainer
    gpus = s.num_workers * (s.gpus_per_worker if s.use_gpu else 0)
    gpu_facts = est.GPUS.get(s.accelerator_type or "")
    tps, basis = cfg.plan.tokens_per_s_per_gpu, "plan.tokens_per_s_per_gpu"
    detail = None
    if measurement is not None and shape is not None:
        tps, basis, detail = measured_file.throughput(
            measurement, shape=shape, max_length=cfg.data.max_length, liger=cfg.model.use_liger_kernel,
            mean_seq_len=data["token_weighted_mean_seq_len"], gradient_checkpointing=t.gradient_checkpointing,
            peft=cfg.peft.enabled, gpu=s.use_gpu, accelerator_type=s.accelerator_type)
    elif tps is None and s.use_gpu and gpu_facts and shape and data["token_weighted_mean_seq_len"]:
        tps = est.derived_tokens_per_s(shape, gpu_facts[1], mean_seq_len=data["token_weighted_mean_seq_len"],
                                       gradient_checkpointing=t.gradient_checkpointing, peft=cfg.peft.enabled)
        basis = (f"derived: SmolLM3 pretraining MFU {est.REFERENCE_MFU:.1%} on {s.accelerator_type} "
                 f"({gpu_facts[1]:.0f} TFLOP/s) for this model's FLOPs/token")
    out: dict[str, Any] = {"tokens_per_s_per_gpu": round(tps) if tps else None, "throughput_basis": basis if tps else None,
                           "gpus": gpus, "processed_tokens": None, "wall_hours": None, "gpu_hours": None,
                           "usd_per_gpu_hour": None, "cost_usd": None, "measured": detail}
    if steps["total_steps"] is None:
        out["note"] = "no step count (no token counts for the data): no time estimate"
        return out
    processed = steps["total_steps"] * steps["tokens_per_step"]
    out["processed_tokens"] = processed
    if tps is None:
        out["note"] = ("no throughput figure: set plan.tokens_per_s_per_gpu (a short run logs tokens/s)"
                       + ("" if s.use_gpu else "; on CPU workers it is per worker"))
        return out
    workers = s.num_workers
    wall_s = processed / (tps * workers)
    out |= {"wall_hours": round(wall_s / 3600, 3), "processed_tokens": processed}
    if gpus:
        price = cfg.plan.usd_per_gpu_hour if cfg.plan.usd_per_gpu_hour is not None else (gpu_facts[2] if gpu_facts else None)
        gpu_hours = wall_s / 3600 * gpus
        price_basis = ("plan.usd_per_gpu_hour" if cfg.plan.usd_per_gpu_hour is not None
                       else "rough list price (estimates.GPUS)")
        out |= {"gpu_hours": round(gpu_hours, 3), "usd_per_gpu_hour": price, "price_basis": price_basis,
                "cost_usd": round(gpu_hours * price, 2) if price is not None else None}
    return out


# ----------------------------------------------------------------------------- output
