#!/usr/bin/env python3
"""GPU check (issue #14): raysft's GPU training path measured on one CUDA GPU, in one run.

No Ray, no network: the bundled SmolLM3-3B config.json (random init, bf16) through raysft's own code,
``resolve_accel`` and ``build_model`` (liger applied there), the recipe's gradient checkpointing and
the workers' loss (``raysft.train.loss``: TRL's fused LM head on CUDA, plain logits on CPU). Sections,
each timed:

1. equivalence: sequences packed into one row with per-sequence ``position_ids`` vs run one by one
   give the same per-sequence loss and gradients within a stated tolerance (sdpa; flash_attention_2
   when flash-attn imports; liger off and on). A contaminated control (the same row with one running
   ``position_ids``) must miss the tolerance, so the comparison could catch cross-sequence attention.
   Also: the fused loss (GPU path) vs plain logits (CPU path) on the same row.
2. throughput: tokens/s and MFU (FLOPs/token as ``raysft plan`` counts them,
   ``estimates.flops_per_token``) of full training steps (AdamW, clipping) at batch 1, one sequence
   of ``max_length`` tokens per row, liger off and on, after warm-up.
3. memory: the peak during those steps vs ``raysft plan``'s estimate (``estimates.memory_per_gpu``,
   one GPU, no ZeRO), split into model states and activations, with measured/estimated ratios.
4. one JSON (``--out``, the file ``plan.throughput_file`` reads) and a table.

The whole run keeps to ``--budget-s``; lengths that would not fit are skipped, longest first, and
the output says so. ``--dry-run``: the same sections on CPU with the tiny model and two short
lengths (CI); it checks its own outputs. Exit 0: every check passed; 1: one failed (the JSON and the
table say which); 2: usage. Commands: bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_measure, however this file is run
from gpu_measure import CONTROL_POWER, Clock, build_net, equivalence, log, loss_paths, memory_row, perf_pass, sync

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "bench" / ".vendor"
GPU_LENGTHS = (4096, 16384, 32768, 65536)
DRY_LENGTHS = (128, 256)
RECIPE = ["recipe=smollm3_sft"]
# The recipe's model is the hub's mid-training checkpoint; its architecture is the bundled config.json.
GPU_MODEL = ["model.name_or_path=bundled:smollm3", "model.tokenizer=bundled:smollm3", "model.init=random",
             "model.revision=main"]
DRY_MODEL = ["model=tiny_smollm3"]
EQ_LENS = {"gpu": (512, 1536, 128, 1920), "dry": (40, 100, 7, 60)}
# bf16 keeps 8 mantissa bits (2^-8 = 0.4% per rounding) and the packed and single-sequence runs use
# different attention kernels (masked vs causal), so they round differently; measured on CPU with 2
# real-width layers: loss 1e-4, gradients 0.7% apart, a contaminated row 4% and 114%.
TOLERANCE = {"bf16": {"seq_loss_rel": 5e-3, "grad_rel_l2": 0.1}, "fp32": {"seq_loss_rel": 1e-4, "grad_rel_l2": 1e-3}}


def _bootstrap(use_vendor: bool) -> list[str]:
    """The checkout on sys.path (raysft need not be installed) with ``conf/`` as ``raysft.conf``,
    and the pure-Python wheels of bench/vendor_gpu_deps.py first on sys.path (unpacked to /tmp)."""
    used = []
    wheels = sorted(VENDOR.glob("*.whl")) if use_vendor else []
    if wheels:
        site = Path(tempfile.gettempdir()) / "raysft-gpu-check-site"
        stamp, names = site / ".wheels", "\n".join(w.name for w in wheels)
        if not (stamp.exists() and stamp.read_text() == names):
            import shutil

            shutil.rmtree(site, ignore_errors=True)
            site.mkdir(parents=True)
            for w in wheels:
                with zipfile.ZipFile(w) as z:
                    z.extractall(site)
            stamp.write_text(names)
        sys.path.insert(0, str(site))
        used = [w.name for w in wheels]
    sys.path.insert(0, str(ROOT))
    import importlib.util

    if importlib.util.find_spec("raysft.conf") is None:  # not pip-installed: the checkout's conf/ is raysft.conf
        spec = importlib.util.spec_from_file_location("raysft.conf", ROOT / "conf" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "conf")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["raysft.conf"] = mod
        spec.loader.exec_module(mod)
    return used


def _stub_datasets_if_unimportable() -> list[str]:
    """TRL's fused LM head lives in ``trl.trainer.utils``, which imports ``datasets.IterableDataset``
    at module level and uses it for nothing the head needs. Where ``datasets`` cannot import (the GPU
    machine has no pyarrow of the version it wants, say), a stand-in module takes its place, and the
    JSON says so."""
    try:
        import datasets  # noqa: F401
        return []
    except Exception as e:  # noqa: BLE001 - any import failure
        import types

        for name in [m for m in sys.modules if m == "datasets" or m.startswith("datasets.")]:
            del sys.modules[name]
        stub = types.ModuleType("datasets")
        stub.IterableDataset = type("IterableDataset", (), {})
        stub.Dataset = type("Dataset", (), {})
        sys.modules["datasets"] = stub
        return [f"datasets ({type(e).__name__}: {str(e)[:200]}): a stand-in module for trl.trainer.utils' import"]


# ----------------------------------------------------------------------------- setup


def build_setup(args):
    import torch

    from raysft.commands import estimates as est
    from raysft.config import compose
    from raysft.train import model as models

    cuda = torch.cuda.is_available() and not args.dry_run
    overrides = RECIPE + (DRY_MODEL if args.dry_run else GPU_MODEL)
    cfg = compose(overrides)
    m = cfg.model
    config, source = est.load_model_config(m.name_or_path, init=m.init, config_overrides=dict(m.config_overrides))
    shape = est.ModelShape.from_config(config)
    accel = models.resolve_accel(m, bf16=cfg.trainer.bf16, cuda=cuda)
    dev = {"cuda": cuda, "torch": torch.__version__, "python": sys.version.split()[0], "versions": _versions()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        mem_gb = props.total_memory / est.GB
        label = est.accelerator_type_of(props.name, mem_gb)
        dev |= {"name": props.name, "accelerator_type": label, "memory_gb": round(mem_gb, 1),
                "capability": f"{props.major}.{props.minor}", "cuda_version": torch.version.cuda}
        dev["matmul_tflops"] = _matmul_tflops(torch, "cuda", torch.bfloat16, 8192)
        peak, basis = ((est.GPUS[label][1], f"{label} datasheet, dense bf16 (estimates.GPUS)") if label in est.GPUS
                       else (dev["matmul_tflops"], "measured bf16 matmul (GPU not in estimates.GPUS)"))
        torch.empty(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        dev["context_gb"] = round((total - free - torch.cuda.memory_reserved()) / est.GB, 3)
    else:
        dev |= {"name": "cpu", "accelerator_type": None, "threads": torch.get_num_threads()}
        dev["matmul_tflops"] = _matmul_tflops(torch, "cpu", torch.float32, 1024)
        peak, basis = dev["matmul_tflops"], "measured fp32 matmul on this CPU (no datasheet figure)"
    dev |= {"peak_tflops": peak, "peak_basis": basis}
    return {"cfg": cfg, "overrides": overrides, "shape": shape, "config_source": source, "accel": accel, "cuda": cuda,
            "device": dev, "lengths": tuple(args.lengths or (DRY_LENGTHS if args.dry_run else GPU_LENGTHS)),
            "tolerance": TOLERANCE["bf16" if accel.bf16 else "fp32"], "eq_lens": EQ_LENS["dry" if args.dry_run else "gpu"]}


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in ("transformers", "trl", "liger-kernel", "flash-attn", "accelerate", "hydra-core", "omegaconf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _matmul_tflops(torch, device: str, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 10 if device == "cuda" else 5
    for _ in range(3):
        a @ b
    sync(torch, device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(torch, device)
    return round(2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12, 4)


# ----------------------------------------------------------------------------- the run


def run(args, clock: Clock, out: Path) -> dict:
    import dataclasses
    import importlib.util

    import torch

    from raysft.commands.measured import SCHEMA
    from raysft.train import model as models

    s = build_setup(args)
    cfg, accel, cuda = s["cfg"], s["accel"], s["cuda"]
    torch.manual_seed(cfg.trainer.seed)
    dev = s["device"]
    log(f"raysft gpu check{' (dry run, CPU)' if args.dry_run else ''}: {dev['name']}, "
        f"{'bf16' if accel.bf16 else 'fp32'}, {s['shape'].num_params:,} params, budget {args.budget_s:.0f} s")
    for note in accel.notes:
        log(f"  note: {note}")
    attns = ["sdpa"] + (["flash_attention_2"] if cuda and importlib.util.find_spec("flash_attn") else [])
    eq = {"tolerance": s["tolerance"], "control_power": CONTROL_POWER, "results": [], "skipped": [], "seconds": 0.0}
    if len(attns) == 1:
        eq["skipped"].append({"attn": "flash_attention_2", "reason": "flash-attn is not importable here" if cuda
                              else "no CUDA device"})
    tp = {"flops_formula": "raysft.commands.estimates.flops_per_token (as raysft plan): 6P + causal attention "
                           "within each sequence, + the forward again under gradient checkpointing",
          "row": "batch 1: one sequence of max_length tokens per row (mean_seq_len = max_length)",
          "optimizer": "torch AdamW (fused on CUDA) over the model's parameters (the HF Trainer's adamw_torch_fused "
                       "without DeepSpeed), clip_grad_norm at trainer.max_grad_norm",
          "results": [], "skipped": [], "seconds": 0.0}
    mem = {"measured": ("CUDA: peak = torch max_memory_reserved + the CUDA context (device memory in use beyond "
                        "torch's pool at start); states = memory allocated before a step's forward (params, "
                        "grads kept allocated, AdamW states); activations = max_memory_allocated - states"
                        if cuda else
                        "CPU: states = bytes of parameter, gradient and AdamW-state tensors; activations = peak RSS "
                        "growth during a step over the RSS before it (sampled every 2 ms, after malloc_trim); "
                        "peak = states + activations"),
           "estimate": "raysft.commands.estimates.memory_per_gpu, world_size 1, no ZeRO, micro batch 1 (liger is not "
                       "modelled)", "results": [], "seconds": 0.0}
    failures, rate = [], {}
    liger_probe = models.resolve_accel(dataclasses.replace(cfg.model, use_liger_kernel=True), bf16=cfg.trainer.bf16,
                                       cuda=cuda)
    passes = [False] + ([True] if liger_probe.use_liger else [])
    if not liger_probe.use_liger:
        why = "; ".join(n for n in liger_probe.notes if "liger" in n)
        tp["skipped"].append({"liger": True, "reason": why})
        eq["skipped"].append({"liger": True, "reason": why})

    def section(store: dict, name: str, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - recorded, the other sections still run
            import traceback

            failures.append(f"{name}: {type(e).__name__}: {e}")
            store.setdefault("errors", []).append(traceback.format_exc()[-2000:])
            log(f"  ERROR: {type(e).__name__}: {e}")
            return None
        finally:
            store["seconds"] = round(store["seconds"] + time.perf_counter() - t0, 2)

    want = accel.attn_implementation
    report = {"schema": SCHEMA, "dry_run": args.dry_run, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": dev, "model": {"config": s["config_source"], "params": s["shape"].num_params,
                                       "dtype": "bfloat16" if accel.bf16 else "float32", "init": "random"},
              "recipe": {"overrides": s["overrides"], "gradient_checkpointing": cfg.trainer.gradient_checkpointing,
                         "use_reentrant": cfg.trainer.use_reentrant, "attn_implementation": accel.attn_implementation,
                         "use_liger_kernel": accel.use_liger, "bf16": accel.bf16, "notes": list(accel.notes)},
              "budget_s": args.budget_s, "setup_seconds": round(clock.elapsed(), 2), "lengths": list(s["lengths"]),
              "vendored": args.vendored, "stubbed": args.stubbed, "complete": False,
              "sections": {"equivalence": eq, "throughput": tp, "memory": mem}}

    def save() -> None:  # after every pass too, so a run killed at its time limit leaves what it measured
        report["total_seconds"] = round(clock.elapsed(), 1)
        out.write_text(json.dumps(report, indent=1) + "\n")

    save()
    for i, liger in enumerate(passes):
        log(f"[pass liger {'on' if liger else 'off'}]")
        pass_t0 = clock.elapsed()
        net = None
        for attn in (attns if not liger else [want]):
            def eq_one(attn=attn):
                nonlocal net
                n, _ = build_net(s, attn=attn, liger=liger)
                eq["results"].append(equivalence(s, n, attn=attn, liger=liger))
                r = eq["results"][-1]
                log(f"  equivalence {attn}, liger {'on' if liger else 'off'}: seq loss rel {r['seq_loss_rel']:.2e}, "
                    f"grad rel {r['grad_rel_l2']:.2e} (control {r['control']['grad_rel_l2']:.2e}): "
                    f"{'ok' if r['ok'] else 'FAILED'}")
                if not liger and attn == want:
                    eq["loss_paths"] = loss_paths(s, n)
                    log(f"  loss paths fused vs plain: loss rel {eq['loss_paths']['loss_rel']:.2e}, grad rel "
                        f"{eq['loss_paths']['grad_rel_l2']:.2e}")
                if attn == want:
                    net = n
                else:
                    del n
            section(eq, f"equivalence ({attn}, liger {'on' if liger else 'off'})", eq_one)
            if cuda:
                torch.cuda.empty_cache()
        if net is None:
            net = section(tp, f"model build (liger {'on' if liger else 'off'})",
                          lambda: build_net(s, attn=want, liger=liger)[0])
        if net is None:
            continue
        # The liger-off pass gets half of what is left after the liger-on pass's build and
        # equivalence (taken to cost what this pass's did); the last pass gets the rest.
        fixed = clock.elapsed() - pass_t0
        left = clock.left() - 10
        budget = (left - fixed) / 2 if i < len(passes) - 1 else left
        runs = section(tp, f"throughput (liger {'on' if liger else 'off'})",
                       lambda: perf_pass(s, net, clock, liger=liger, attn=want, budget_s=budget, rate=rate, args=args))
        if runs:
            tp["results"] += runs[0]
            tp["skipped"] += runs[1]
            section(mem, "memory", lambda: mem["results"].extend(memory_row(s, r) for r in runs[0]))
        del net
        if cuda:
            torch.cuda.empty_cache()
        save()

    failures += self_check(report, dry=args.dry_run)
    report["failures"], report["ok"], report["complete"] = failures, not failures, True
    save()
    return report


def self_check(r: dict, *, dry: bool) -> list[str]:
    """What must hold for the run to count: equivalence within tolerance with a control that
    misses it, and positive throughput and memory figures (every length on a dry run)."""
    bad = []
    sec = r["sections"]
    if not sec["equivalence"]["results"]:
        bad.append("equivalence: nothing measured")
    for e in sec["equivalence"]["results"]:
        if not e["within_tolerance"]:
            bad.append(f"equivalence {e['attn']} liger={e['liger']}: packed vs unpacked outside tolerance "
                       f"(seq loss rel {e['seq_loss_rel']:.2e}, grad rel {e['grad_rel_l2']:.2e})")
        if not e["control_detected"]:
            bad.append(f"equivalence {e['attn']} liger={e['liger']}: the contaminated control is within "
                       f"{CONTROL_POWER}x tolerance: the check cannot tell")
    lp = sec["equivalence"].get("loss_paths")
    if lp is None or not lp["ok"]:
        bad.append(f"loss paths: fused vs plain {'not measured' if lp is None else 'outside tolerance'}")
    tp, mem = sec["throughput"]["results"], sec["memory"]["results"]
    if not tp:
        bad.append("throughput: no length measured")
    for t in tp:
        for k in ("tokens_per_s", "tflops", "mfu", "step_s"):
            if not (isinstance(t.get(k), (int, float)) and t[k] > 0):
                bad.append(f"throughput max_length {t['max_length']}: {k}={t.get(k)!r} is not positive")
    if len(mem) != len(tp):
        bad.append(f"memory: {len(mem)} rows for {len(tp)} throughput runs")
    for m in mem:
        for k in ("peak_gb", "states_gb", "activations_gb", "ratio", "states_ratio", "activation_ratio"):
            if not (isinstance(m.get(k), (int, float)) and m[k] > 0):
                bad.append(f"memory max_length {m['max_length']}: {k}={m.get(k)!r} is not positive")
        if not m["estimate_gb"]["total"] > 0:
            bad.append(f"memory max_length {m['max_length']}: no estimate")
    if dry:  # a dry run must measure every length (liger is off on CPU)
        measured = {t["max_length"] for t in tp}
        missing = [L for L in r["lengths"] if L not in measured]
        if missing:
            bad.append(f"dry run: lengths {missing} not measured")
    return bad


# ----------------------------------------------------------------------------- output


def print_table(r: dict) -> None:
    sec, dev = r["sections"], r["device"]
    eq, tp, mem = sec["equivalence"], sec["throughput"], sec["memory"]
    tol = eq["tolerance"]
    log(f"\nraysft gpu check: {dev['name']} ({dev.get('accelerator_type') or '-'}), {r['model']['dtype']}, "
        f"{r['model']['params']:,} params (random init), gradient checkpointing "
        f"{'on' if r['recipe']['gradient_checkpointing'] else 'off'}; {r['date']}")
    log(f"[1] packed vs unpacked ({eq['seconds']:.1f} s): tolerance seq loss rel <= {tol['seq_loss_rel']:g}, grad rel L2 "
        f"<= {tol['grad_rel_l2']:g}; the contaminated control must miss it {eq['control_power']:g}x")
    log(f"  {'attn':<18} {'liger':<5} {'loss':<5} {'seq loss rel':>12} {'token nll max':>13} {'grad rel L2':>11} "
        f"{'control grad':>12}  ok")
    for e in eq["results"]:
        log(f"  {e['attn']:<18} {'on' if e['liger'] else 'off':<5} {e['loss_path']:<5} {e['seq_loss_rel']:>12.2e} "
            f"{e['token_nll_max_abs']:>13.2e} {e['grad_rel_l2']:>11.2e} {e['control']['grad_rel_l2']:>12.2e}  "
            f"{'yes' if e['ok'] else 'NO'}")
    if eq.get("loss_paths"):
        lp = eq["loss_paths"]
        log(f"  loss paths, fused (GPU) vs plain (CPU): loss rel {lp['loss_rel']:.2e}, token nll max "
            f"{lp['token_nll_max_abs']:.2e}, grad rel L2 {lp['grad_rel_l2']:.2e}  {'yes' if lp['ok'] else 'NO'}")
    log(f"[2] throughput ({tp['seconds']:.1f} s): {tp['row']}; MFU vs {dev['peak_tflops']:g} TFLOP/s ({dev['peak_basis']})")
    log(f"  {'max_length':>10} {'liger':<5} {'attn':<18} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7}")
    for t in tp["results"]:
        log(f"  {t['max_length']:>10,} {'on' if t['liger'] else 'off':<5} {t['attn']:<18} {t['step_s']:>8.3f} "
            f"{t['tokens_per_s']:>10,.0f} {t['tflops']:>9.3f} {t['mfu']:>7.1%}")
    log(f"[3] memory vs raysft plan ({mem['seconds']:.1f} s): {mem['measured']}")
    log(f"  {'max_length':>10} {'liger':<5} {'peak GB':>8} {'plan GB':>8} {'ratio':>6} {'states GB':>9} {'plan':>6} "
        f"{'acts GB':>8} {'plan':>6} {'acts ratio':>10}")
    for m in mem["results"]:
        e = m["estimate_gb"]
        log(f"  {m['max_length']:>10,} {'on' if m['liger'] else 'off':<5} {m['peak_gb']:>8.3f} {e['total']:>8.3f} "
            f"{m['ratio']:>6.2f} {m['states_gb']:>9.3f} {e['params'] + e['grads'] + e['optimizer']:>6.2f} "
            f"{m['activations_gb']:>8.3f} {e['activation_checkpoints'] + e['layer_activations'] + e['loss_head']:>6.2f} "
            f"{m['activation_ratio']:>10.2f}")
    seen = set()
    for sk in eq["skipped"] + tp["skipped"]:
        if sk["reason"] in seen and "max_length" not in sk:
            continue
        seen.add(sk["reason"])
        what = f"max_length {sk['max_length']:,} liger {'on' if sk.get('liger') else 'off'}" if "max_length" in sk else (
            f"attn {sk['attn']}" if "attn" in sk else "liger on")
        log(f"  skipped: {what}: {sk['reason']}")
    log(f"total {r['total_seconds']:.0f} s of {r['budget_s']:.0f} s budget: "
        + ("all checks passed" if r["ok"] else "FAILED:\n  " + "\n  ".join(r["failures"])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, the tiny model, two short lengths (CI)")
    p.add_argument("--out", default=None, help="the JSON file to write, or a folder for gpu_check.json "
                   "(default bench/results/gpu_check.json, or a temporary folder on a dry run)")
    p.add_argument("--budget-s", type=float, default=330.0, help="time for the whole run, in seconds (default 330: "
                   "two runs and a machine start fit in 15 minutes of lent GPU time)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="max_length values (default: "
                   f"{' '.join(map(str, GPU_LENGTHS))}; dry run: {' '.join(map(str, DRY_LENGTHS))})")
    p.add_argument("--steps", type=int, default=3, help="measured steps per length (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per length (default 1)")
    p.add_argument("--no-vendor", action="store_true", help="ignore bench/.vendor (use the installed packages)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.budget_s <= 0:
        p.error("--steps >= 1, --warmup >= 0, --budget-s > 0")
    clock = Clock(args.budget_s)  # the budget covers everything, imports included
    args.vendored = _bootstrap(not args.no_vendor)
    args.stubbed = _stub_datasets_if_unimportable()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu_check-")) if args.dry_run
                                            else ROOT / "bench" / "results" / "gpu_check.json")
    if out.suffix != ".json":
        out = out / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(args, clock, out)
    print_table(report)
    log(f"wrote {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
