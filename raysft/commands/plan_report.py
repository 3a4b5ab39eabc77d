"""How ``raysft plan`` reads on the console: one short block per part of the plan."""

from __future__ import annotations

from typing import Any


def _n(v, fmt="{:,}") -> str:
    return "?" if v is None else fmt.format(v)


def _g(v: float) -> str:
    """Two decimals below 10, thousands separators above: small runs are not rounded to 0."""
    return f"{v:,.2f}" if abs(v) < 10 else f"{v:,.0f}"


def print_plan(p: dict[str, Any]) -> None:
    d, st, mem, tm = p["data"], p["steps"], p["memory"], p["time"]
    m = p["model"]
    print(f"raysft plan: stage {p['stage']}, model {m['name_or_path']} ({_n(m['params'])} params; "
          f"max_position_embeddings {_n(m['max_position_embeddings'])})")
    print(f"data: {d['basis']}")
    w = max([6] + [len(s["name"]) for s in d["sources"]])
    print(f"  {'source':<{w}}  {'weight':>6}  {'split rows':>12}  {'train rows':>12}  {'tokens':>15}  {'trained':>15}  basis")
    for s in d["sources"]:
        print(f"  {s['name']:<{w}}  {s['weight']:>6g}  {_n(s['split_rows']):>12}  {_n(s['train_rows']):>12}  "
              f"{_n(s['tokens']):>15}  {_n(s['trained_tokens']):>15}  {s['basis']}")
    frac = f" ({d['trained_fraction']:.1%} of tokens)" if d["trained_fraction"] is not None else ""
    print(f"  total: {d['train_rows']:,} train rows, {d['tokens']:,} tokens, {d['trained_tokens']:,} trained after "
          f"masking{frac}")
    print(f"  packed: {d['train_packed_rows']:,} rows x {d['max_length']:,} tokens ({d['packing_strategy']}), efficiency "
          f"{d['packing_efficiency']:.1%}; {d['eval_packed_rows']:,} eval rows")
    for note in d["notes"]:
        print(f"  note: {note}")
    print(f"steps: {st['workers']} workers x {st['per_device_train_batch_size']} rows x {st['gradient_accumulation_steps']} "
          f"accumulation = {st['rows_per_step']} rows/step; {_n(st['steps_per_epoch'])} steps/epoch, "
          f"{_n(st['total_steps'])} in total ({st['epochs']:g} epoch(s))")
    print(f"  tokens/step: {st['tokens_per_step']:,} processed, {_n(st['real_tokens_per_step'])} real, "
          f"{_n(st['trained_tokens_per_step'])} trained")
    if mem.get("estimate_gb"):
        e = mem["estimate_gb"]
        print(f"memory per {'GPU' if mem['gpu_memory_gb'] or p['time']['gpus'] else 'worker'} ({mem['precision']}, "
              f"ZeRO stage {mem['zero_stage'] if mem['zero_stage'] is not None else '- (DDP)'}, "
              f"{'gradient checkpointing' if mem['gradient_checkpointing'] else 'no checkpointing'}"
              f"{', ' + mem['peft'] if mem['peft'] else ''}): {e['total']:.1f} GB = params {e['params']:.2f} + grads "
              f"{e['grads']:.2f} + optimizer {e['optimizer']:.2f} + gathered params {e['gathered_params']:.2f} + "
              f"checkpoints {e['activation_checkpoints']:.2f} + layer activations {e['layer_activations']:.2f} + loss head "
              f"{e['loss_head']:.2f} + overhead {e['overhead']:.1f}")
        mc = mem.get("measured")
        if mc:
            print(f"  corrected by measurement: {mc['total_gb']:.1f} GB ({mc['basis']})" if mc["applied"]
                  else f"  note: {mc['note']}")
        if mem["gpu_memory_gb"]:
            print(f"  vs {mem['accelerator_type']} {mem['gpu_memory_gb']:.0f} GB: {mem['fraction']:.0%}: {mem['verdict']}")
    if mem.get("note"):
        print(f"  note: {mem['note']}")
    if tm["wall_hours"] is not None:
        line = (f"time: {tm['processed_tokens']:,} processed tokens at {tm['tokens_per_s_per_gpu']:,} tokens/s per "
                f"{'GPU' if tm['gpus'] else 'worker'} ({tm['throughput_basis']}) = {_g(tm['wall_hours'])} h wall")
        if tm["gpu_hours"] is not None:
            line += f", {_g(tm['gpu_hours'])} GPU-hours"
            if tm["cost_usd"] is not None:
                line += f", ~${_g(tm['cost_usd'])} at ${tm['usd_per_gpu_hour']}/GPU-hour ({tm['price_basis']})"
        print(line)
    if tm.get("note"):
        print(f"time: {tm['note']}")
