"""An accelerate config (``accelerate launch --config_file zero3.yaml``) given beside a recipe file:
what raysft takes from it (DeepSpeed ZeRO settings, precision, the process count) and what it ignores.

Defaults are accelerate's own (``accelerate.commands.config``): an absent ``zero_stage`` is 2, absent
``zero3_init_flag`` / ``zero3_save_16bit_model`` are false, absent offload devices are ``none``.
"""

from __future__ import annotations

from typing import Any, Callable

# distributed_type -> (deepspeed on, GPUs unless use_cpu)
_DISTRIBUTED = {"DEEPSPEED": (True, True), "MULTI_GPU": (False, True), "NO": (False, True), "MULTI_CPU": (False, False)}
_REFUSED_TYPES = {"FSDP": "raysft shards with DeepSpeed ZeRO: use a DeepSpeed accelerate config or deepspeed=zero3",
                  "MEGATRON_LM": "raysft runs data parallel (DDP or ZeRO): use a DeepSpeed accelerate config",
                  "XLA": "raysft runs on GPUs or CPUs", "TPU": "raysft runs on GPUs or CPUs"}
_DS_MAPPED = {"zero_stage", "offload_optimizer_device", "offload_param_device", "zero3_init_flag",
              "zero3_save_16bit_model", "gradient_accumulation_steps", "gradient_clipping"}
_DS_IGNORED = {"deepspeed_multinode_launcher", "deepspeed_hostfile", "deepspeed_exclusion_filter",
               "deepspeed_inclusion_filter", "deepspeed_moe_layer_cls_names"}
_MAPPED = {"distributed_type", "num_processes", "mixed_precision", "use_cpu", "deepspeed_config"}
_EMPTY = (None, {}, [], "", "no", False)


def translate_accelerate(acc: dict[str, Any], *, origin: str, recipe: dict[str, Any],
                         put: Callable[[str, Any, str], None], note: Callable[[str], None],
                         refuse: Callable[[str], None]) -> None:
    """Adds the accelerate config's settings through ``put(dotted key, value, origin)`` (deepspeed,
    scaling, trainer.bf16), one note listing what it ignores, and a refusal per unsupported setting."""
    if not isinstance(acc, dict):
        refuse(f"{origin}: not an accelerate config (a YAML mapping of accelerate's keys)")
        return
    kind = str(acc.get("distributed_type", "NO")).upper()
    if kind in _REFUSED_TYPES:
        refuse(f"{origin}: distributed_type {kind}: {_REFUSED_TYPES[kind]}")
        return
    if kind not in _DISTRIBUTED:
        refuse(f"{origin}: distributed_type {kind!r} is not one raysft can run (DEEPSPEED, MULTI_GPU, MULTI_CPU, NO)")
        return
    ds_on, gpu = _DISTRIBUTED[kind]
    gpu = gpu and not acc.get("use_cpu", False)
    workers = 1 if kind == "NO" else int(acc.get("num_processes", 1))
    if workers < 1:
        refuse(f"{origin}: num_processes={workers}: give the total number of training processes (>= 1)")
        return
    put("scaling.num_workers", workers, f"{origin}: num_processes (all machines' processes)")
    put("scaling.use_gpu", gpu, f"{origin}: use_cpu / distributed_type {kind}")

    precision = str(acc.get("mixed_precision", "no")).lower()
    if precision == "bf16":
        if recipe.get("bf16") is False:
            put("trainer.bf16", True, f"{origin}: mixed_precision bf16 (the recipe's bf16: false defers to it)")
    elif precision not in ("no", "none"):
        refuse(f"{origin}: mixed_precision {precision}: raysft trains in bf16 or fp32: use mixed_precision: bf16 or no")

    ds = acc.get("deepspeed_config") or {}
    if ds_on:
        stage = int(ds.get("zero_stage", 2))
        put("deepspeed.enabled", True, f"{origin}: distributed_type DEEPSPEED")
        put("deepspeed.stage", stage, f"{origin}: deepspeed_config.zero_stage" + ("" if "zero_stage" in ds else " (accelerate default)"))
        for key, field in (("offload_optimizer_device", "offload_optimizer"), ("offload_param_device", "offload_param")):
            device = str(ds.get(key, "none")).lower()
            if device not in ("none", "cpu"):
                refuse(f"{origin}: deepspeed_config.{key}={device}: raysft offloads to CPU only (cpu or none)")
            put(f"deepspeed.{field}", device == "cpu", f"{origin}: deepspeed_config.{key}")
        for key, field in (("zero3_init_flag", "zero3_init"), ("zero3_save_16bit_model", "save_16bit_model")):
            put(f"deepspeed.{field}", bool(ds.get(key, False)),
                f"{origin}: deepspeed_config.{key}" + ("" if key in ds else " (accelerate default)"))
        if "deepspeed_config_file" in ds:
            refuse(f"{origin}: deepspeed_config.deepspeed_config_file: give the ZeRO settings as keys (zero_stage, "
                   "offload_*_device, zero3_*) or use deepspeed=zero3 with deepspeed.extra for other JSON keys")
        for key in ("gradient_accumulation_steps", "gradient_clipping"):
            if key in ds and ds[key] != "auto":
                note(f"{origin}: deepspeed_config.{key}={ds[key]}: the recipe's "
                     f"{'gradient_accumulation_steps' if key.startswith('gradient_acc') else 'max_grad_norm'} decides")
        unknown = sorted(set(ds) - _DS_MAPPED - _DS_IGNORED - {"deepspeed_config_file"})
        if unknown:
            refuse(f"{origin}: deepspeed_config key(s) {', '.join(unknown)} not understood: give them as deepspeed.extra")
    else:
        put("deepspeed.enabled", False, f"{origin}: distributed_type {kind}")
        if ds:
            note(f"{origin}: deepspeed_config ignored: distributed_type is {kind}, not DEEPSPEED")
    for key in ("fsdp_config", "megatron_lm_config"):
        if acc.get(key) not in _EMPTY:
            refuse(f"{origin}: {key}: raysft shards with DeepSpeed ZeRO only: remove it")
    ignored = sorted(set(acc) - _MAPPED - {"fsdp_config", "megatron_lm_config"})
    ignored += sorted(f"deepspeed_config.{k}" for k in set(ds) & _DS_IGNORED)
    if ignored:
        note(f"{origin}: ignored (Ray Train launches, places and connects the workers; num_processes is the total "
             f"across machines): {', '.join(ignored)}")
