"""The training half of a recipe file's translation (``recipe_file.translate``): the model, the trainer
hyperparameters and strategies, PEFT / quantization, the run directory and hub settings."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from raysft.config import recipe_keys as keys
from raysft.config.training import TrainerConfig

if TYPE_CHECKING:
    from raysft.config.recipe_file import _Builder


def translate_model(b: _Builder) -> None:
    if not b.has("model_name_or_path"):
        b.refuse("model_name_or_path is not set: add it to the file")
        return
    b.put("model.name_or_path", b.get("model_name_or_path"), "model_name_or_path")
    b.put("model.revision", b.get("model_revision") or "main", b.src("model_revision"))
    dtype_key = "dtype" if b.has("dtype") else ("torch_dtype" if b.has("torch_dtype") else "dtype")
    if b.has("dtype") and b.has("torch_dtype") and b.r["dtype"] != b.r["torch_dtype"]:
        b.refuse(f"dtype={b.r['dtype']!r} and torch_dtype={b.r['torch_dtype']!r} disagree: keep one (dtype)")
    dtype = b.r.get(dtype_key, keys.TRL_DEFAULTS["dtype"]) or "float32"
    b.put("model.dtype", dtype, b.src(dtype_key) if dtype_key != "torch_dtype" else "torch_dtype (old name of dtype)")
    if b.has("torch_dtype"):
        b.note("torch_dtype: ModelConfig's old name of dtype: model.dtype")
    attn = b.get("attn_implementation")
    if b.r.get("use_flash_attention_2"):
        attn = attn or "flash_attention_2"
    b.put("model.attn_implementation", attn or "sdpa",
          b.src("attn_implementation") + ("" if attn else ": transformers picks sdpa"))
    b.put("model.trust_remote_code", bool(b.get("trust_remote_code")), b.src("trust_remote_code"))
    b.put("model.use_liger_kernel", bool(b.get("use_liger_kernel")), b.src("use_liger_kernel"))
    if b.has("tokenizer_name_or_path"):
        b.put("model.tokenizer", b.r["tokenizer_name_or_path"], "tokenizer_name_or_path")


def translate_trainer(b: _Builder) -> None:
    r = b.r
    for k in ("num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
              "learning_rate", "lr_scheduler_type", "weight_decay", "max_grad_norm", "average_tokens_across_devices",
              "gradient_checkpointing", "seed"):
        b.put(f"trainer.{k}", b.get(k), b.src(k))
    sched_kwargs = dict(b.get("lr_scheduler_kwargs") or {})
    b.put("trainer.lr_scheduler_kwargs", sched_kwargs, b.src("lr_scheduler_kwargs"))
    if set(TrainerConfig().lr_scheduler_kwargs) - set(sched_kwargs):
        # NOTE: a dict merges into the schema's default ({min_lr_rate: 0.1}), here and again when the workers
        # rebuild the config; trl_overrides is applied last, so the file's kwargs reach the scheduler as they are.
        b.put("trainer.trl_overrides.lr_scheduler_kwargs", sched_kwargs,
              "lr_scheduler_kwargs (as given: raysft's default min_lr_rate must not merge into it)")
    steps, ratio = r.get("warmup_steps"), r.get("warmup_ratio")
    if steps is not None and steps >= 1:
        b.put("trainer.trl_overrides.warmup_steps", int(steps), "warmup_steps (a step count)")
        b.put("trainer.warmup_ratio", 0.0, "warmup_steps (a step count: trainer.trl_overrides.warmup_steps)")
    elif steps:
        b.put("trainer.warmup_ratio", float(steps), "warmup_steps (< 1: a ratio of the steps)")
    else:
        b.put("trainer.warmup_ratio", float(ratio or 0.0), "warmup_ratio" if ratio is not None else b.src("warmup_steps"))
    if steps and ratio:
        b.note("warmup_steps and warmup_ratio both set: warmup_steps wins (as TrainingArguments)")
    bf16 = b.get("bf16")
    b.put("trainer.bf16", bool(bf16) if bf16 is not None else not r.get("fp16", False),
          b.src("bf16") + ("" if b.has("bf16") else ": true unless fp16"))
    kwargs = b.get("gradient_checkpointing_kwargs") or {}
    for k in sorted(set(kwargs) - {"use_reentrant"}):
        b.refuse(f"gradient_checkpointing_kwargs.{k}: raysft passes use_reentrant only")
    b.put("trainer.use_reentrant", bool(kwargs.get("use_reentrant", False)),
          "gradient_checkpointing_kwargs.use_reentrant" if "use_reentrant" in kwargs else
          ("gradient_checkpointing_kwargs without use_reentrant" if b.has("gradient_checkpointing_kwargs") else
           "TRL default (gradient_checkpointing_kwargs)") + ": transformers' default use_reentrant false")
    if b.get("logging_strategy") != "steps":
        b.note(f"logging_strategy={b.get('logging_strategy')}: raysft logs every trainer.logging_steps steps")
    b.put("trainer.logging_steps", _steps(b, "logging_steps"), b.src("logging_steps") +
          (", logging_strategy: steps" if b.has("logging_strategy") else ""))
    _eval(b)
    strategy = b.get("save_strategy")
    if strategy not in ("steps", "epoch", "no"):
        b.refuse(f"save_strategy={strategy!r}: use steps, epoch or no (best checkpoints: save_strategy: steps with "
                 "metric_for_best_model)")
    b.put("trainer.save_strategy", strategy, b.src("save_strategy"))
    if strategy == "steps":
        b.put("trainer.save_steps", b.get("save_steps"), b.src("save_steps"))
    if b.get("save_total_limit") is not None:
        b.put("trainer.save_total_limit", b.get("save_total_limit"), "save_total_limit")
    elif strategy != "no":
        b.note("save_total_limit unset: TRL keeps every checkpoint; raysft keeps trainer.save_total_limit=1")
    metric = b.get("metric_for_best_model")
    if metric is not None:
        metric = metric if str(metric).startswith("eval_") else f"eval_{metric}"
        b.put("trainer.metric_for_best_model", metric, "metric_for_best_model")
        better = b.get("greater_is_better")
        b.put("trainer.greater_is_better", bool(better) if better is not None else not metric.endswith("loss"),
              b.src("greater_is_better"))
    report = b.get("report_to")
    report = [report] if isinstance(report, str) else list(report or ["none"])
    if "all" in report:
        b.refuse("report_to: all: list the trackers (wandb, tensorboard, trackio, ...) or none")
    b.put("trainer.report_to", report or ["none"], b.src("report_to"))
    if b.get("use_cpu"):
        b.put("scaling.use_gpu", False, "use_cpu")


def _steps(b: _Builder, key: str) -> int:
    v = b.get(key)
    if isinstance(v, float) and not v.is_integer():
        b.refuse(f"{key}={v}: raysft takes {key} in steps (a ratio of the run is not supported): give a step count")
        return 1
    return int(v)


def _eval(b: _Builder) -> None:
    r = b.r
    if b.has("eval_strategy") and b.has("evaluation_strategy") and r["eval_strategy"] != r["evaluation_strategy"]:
        b.refuse("eval_strategy and evaluation_strategy (its old name) disagree: keep eval_strategy")
    strategy = r.get("eval_strategy", r.get("evaluation_strategy", "no"))
    key = "eval_strategy" if b.has("eval_strategy") or not b.has("evaluation_strategy") else "evaluation_strategy"
    has_split = b.t.get("data.dataset_mixture.test_split_size", 0) > 0
    if strategy == "steps":
        every = _steps(b, "eval_steps") if r.get("eval_steps") else _steps(b, "logging_steps")
        b.put("trainer.eval_steps", every, f"{key}: steps, every " + ("eval_steps" if r.get("eval_steps") else
                                                                         "logging_steps (TrainingArguments' fallback)"))
    elif strategy == "epoch":
        epochs = b.get("num_train_epochs")
        b.put("trainer.eval_steps", None, f"{key}: epoch")
        b.note(f"{key}=epoch: raysft evaluates the held-out split at the end of training" +
               (" (the end of the only epoch)" if epochs <= 1 else
                "; to evaluate every epoch set trainer.eval_steps to the steps per epoch `raysft plan` prints"))
    elif strategy in ("no", None):
        b.put("trainer.eval_steps", None, b.src(key))
        if has_split:
            b.note(f"{key}=no: no evaluation during training; raysft evaluates the held-out split once at the end")
    else:
        b.refuse(f"{key}={strategy!r}: use steps, epoch or no")
    if b.has("eval_steps") and strategy != "steps":
        b.note(f"eval_steps: not used ({key}={strategy})")


def translate_peft(b: _Builder) -> None:
    lora_keys = [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit",
                             "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant") if b.has(k)]
    if not b.get("use_peft"):
        if b.get("load_in_4bit") or b.get("load_in_8bit"):
            b.refuse("load_in_4bit / load_in_8bit without use_peft: quantized weights train only through adapters: "
                     "add use_peft: true")
        elif lora_keys:
            b.note(f"{', '.join(lora_keys)}: not used (use_peft is false)")
        return
    if b.get("load_in_4bit") and b.get("load_in_8bit"):
        b.refuse("load_in_4bit and load_in_8bit both true: keep one")
    b.put("peft.enabled", True, "use_peft")
    b.put("peft.method", "qlora" if b.get("load_in_4bit") else "lora", b.src("load_in_4bit"))
    for k, field_ in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"),
                      ("lora_target_modules", "target_modules"), ("load_in_4bit", "load_in_4bit"),
                      ("load_in_8bit", "load_in_8bit"), ("bnb_4bit_quant_type", "bnb_4bit_quant_type"),
                      ("use_bnb_nested_quant", "bnb_4bit_use_double_quant")):
        v = b.get(k)
        origin = b.src(k) + (": peft picks the architecture's default modules" if k == "lora_target_modules" and v is None else "")
        b.put(f"peft.{field_}", list(v) if isinstance(v, (list, tuple)) else v, origin)


def translate_storage(b: _Builder) -> None:
    out = b.r.get("output_dir")
    if not out:
        return
    out = str(out).rstrip("/")
    parent, leaf = os.path.split(out)
    b.put("storage.path", parent or ".", "output_dir (its parent)")
    b.put("storage.name", leaf, "output_dir (its last part: the run's name; re-using it resumes the run)")


def translate_hub(b: _Builder) -> None:
    present = [k for k in ("push_to_hub", "hub_model_id", *sorted(k for k, v in keys.NOTED.items() if v == keys.HUB_NOTE))
               if b.has(k)]
    if not present:
        return
    out = str(b.r.get("output_dir") or "<run dir>").rstrip("/")
    if b.get("push_to_hub"):
        repo = b.get("hub_model_id") or os.path.basename(out)
        b.note(f"{', '.join(present)}: raysft does not push from the training workers; after the run upload the "
               f"final model: `hf upload {repo} {out}/model`")
    else:
        b.note(f"{', '.join(present)}: not used (push_to_hub is false)")
