"""Every key a TRL / alignment-handbook SFT recipe file may hold, and what raysft does with it.

The keys are the fields of TRL's ``ScriptArguments``, ``SFTConfig`` (with ``transformers.TrainingArguments``),
``ModelConfig`` and ``DatasetMixtureConfig`` (the four dataclasses ``trl sft --config`` parses), the
alignment-handbook's additions (``dataset_mixture``, ``chat_template``) and a few older names still found
in published recipes. ``tests/test_recipe_file.py`` introspects TRL's dataclasses and fails when a field
is in none of the tables below (a new TRL field must be classified), or when a default here is not TRL's.

Each key is in exactly one table:

- ``MAPPED``: translated to the raysft field named (``raysft/config/recipe_file.py`` does it);
- ``PASSTHROUGH``: an ``SFTConfig`` field raysft does not curate, handed to the workers' ``SFTConfig`` as
  ``trainer.trl_overrides.<key>``;
- ``NOTED``: accepted, with the one line that says why raysft does not need it;
- ``REFUSED``: refused with what to do, unless it holds one of its harmless values (TRL's default first).

``NON_SFT``: keys that only other TRL trainers read; a file with one is refused as that kind of recipe.
"""

from __future__ import annotations

from typing import Any

MAPPED: dict[str, str] = {
    # ScriptArguments
    "dataset_name": "data.dataset_mixture.datasets[0].id (one source; ignored beside a mixture, as TRL and the handbook do)",
    "dataset_config": "data.dataset_mixture.datasets[0].config",
    "dataset_train_split": "data.dataset_mixture.datasets[0].split",
    "dataset_test_split": "a separate eval split: not read (raysft holds out test_split_size of the mixture); noted",
    "dataset_streaming": "data.order=streaming",
    # DatasetMixtureConfig (`trl sft`'s own mixture)
    "datasets": "data.dataset_mixture.datasets (path -> id, name -> config; every row: weight 1.0)",
    "streaming": "data.order=streaming",
    "test_split_size": "data.dataset_mixture.test_split_size",
    # alignment-handbook
    "dataset_mixture": "data.dataset_mixture (same keys; weight missing = 1.0, seed missing = 0)",
    "chat_template": "data.chat_template (sft / mid when identical to raysft's bundled copy, else the text)",
    # ModelConfig
    "model_name_or_path": "model.name_or_path",
    "model_revision": "model.revision",
    "dtype": "model.dtype",
    "attn_implementation": "model.attn_implementation",
    "use_peft": "peft.enabled",
    "lora_r": "peft.r",
    "lora_alpha": "peft.lora_alpha",
    "lora_dropout": "peft.lora_dropout",
    "lora_target_modules": "peft.target_modules",
    "load_in_8bit": "peft.load_in_8bit",
    "load_in_4bit": "peft.load_in_4bit (peft.method=qlora)",
    "bnb_4bit_quant_type": "peft.bnb_4bit_quant_type",
    "use_bnb_nested_quant": "peft.bnb_4bit_use_double_quant",
    # SFTConfig / TrainingArguments
    "output_dir": "storage.path (its parent) + storage.name (its last part): the run directory",
    "trust_remote_code": "model.trust_remote_code",
    "use_liger_kernel": "model.use_liger_kernel",
    "chat_template_path": "data.chat_template (a .jinja file)",
    "eos_token": "data.eos_token",
    "max_length": "data.max_length",
    "packing": "data.packing",
    "packing_strategy": "data.packing_strategy (ffd -> bfd, bfd-requeue -> bfd_split)",
    "assistant_only_loss": "data.loss=assistant_only",
    "completion_only_loss": "data.loss (completion_only for prompt-completion data, all otherwise)",
    "num_train_epochs": "trainer.num_train_epochs",
    "max_steps": "trainer.max_steps",
    "per_device_train_batch_size": "trainer.per_device_train_batch_size",
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
    "learning_rate": "trainer.learning_rate",
    "lr_scheduler_type": "trainer.lr_scheduler_type",
    "lr_scheduler_kwargs": "trainer.lr_scheduler_kwargs",
    "warmup_steps": "trainer.warmup_ratio (< 1) or trainer.trl_overrides.warmup_steps (>= 1)",
    "weight_decay": "trainer.weight_decay",
    "max_grad_norm": "trainer.max_grad_norm",
    "bf16": "trainer.bf16",
    "gradient_checkpointing": "trainer.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "trainer.use_reentrant",
    "average_tokens_across_devices": "trainer.average_tokens_across_devices",
    "logging_strategy": "trainer.logging_steps (steps only)",
    "logging_steps": "trainer.logging_steps",
    "eval_strategy": "trainer.eval_steps (steps: every eval_steps; epoch / no: at the end)",
    "eval_steps": "trainer.eval_steps",
    "save_strategy": "trainer.save_strategy",
    "save_steps": "trainer.save_steps",
    "save_total_limit": "trainer.save_total_limit",
    "metric_for_best_model": "trainer.metric_for_best_model",
    "greater_is_better": "trainer.greater_is_better",
    "seed": "trainer.seed",
    "report_to": "trainer.report_to",
    "use_cpu": "scaling.use_gpu=false",
    "push_to_hub": "noted with the command that uploads the final model",
    "hub_model_id": "named in the push_to_hub note",
    # older names in published recipes
    "torch_dtype": "model.dtype (ModelConfig's old name of dtype)",
    "max_seq_length": "data.max_length (SFTConfig's old name of max_length)",
    "warmup_ratio": "trainer.warmup_ratio (TrainingArguments' old key)",
    "evaluation_strategy": "trainer.eval_steps (TrainingArguments' old name of eval_strategy)",
    "use_flash_attention_2": "model.attn_implementation=flash_attention_2 (the handbook's old key)",
    "tokenizer_name_or_path": "model.tokenizer (the handbook's old key)",
}

PASSTHROUGH: frozenset[str] = frozenset({
    "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_target_modules", "tf32",
    "torch_compile", "torch_compile_backend", "torch_compile_mode", "neftune_noise_alpha", "torch_empty_cache_steps",
    "logging_nan_inf_filter", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    "eval_delay", "eval_on_start", "bf16_full_eval", "full_determinism", "ddp_find_unused_parameters",
    "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
})

_TOKENIZE = "tokenizing and packing run once on Ray Data CPU actors, outside the training processes"
_LOGS = "raysft sets the libraries' verbosity itself: one line per logging step, from rank 0"
_METRICS = "raysft's evaluation computes the loss and token accuracy only (no compute_metrics)"
_LOADER = "rows arrive tokenized and packed from Ray Data (prepared on CPU actors), not from DataLoader workers"
HUB_NOTE = _HUB = "hub settings: one note with push_to_hub (recipe_training.translate_hub)"
_RESUME = "raysft resumes the data stream at its checkpointed position: nothing is skipped or replayed"

NOTED: dict[str, str] = {
    "ddp_timeout": f"a workaround for tokenizing inside the NCCL process group; here {_TOKENIZE}",
    "dataset_num_proc": f"{_TOKENIZE} (scaling.data_concurrency sets how many)",
    "preprocessing_num_workers": f"{_TOKENIZE} (scaling.data_concurrency sets how many)",
    "overwrite_output_dir": "a run writes its own run directory (storage.path/storage.name); re-using the name resumes it",
    "do_train": "raysft always trains",
    "do_eval": "evaluation follows eval_strategy; raysft also evaluates the held-out split at the end when there is one",
    "do_predict": "raysft has no prediction pass",
    "hub_strategy": _HUB, "hub_private_repo": _HUB, "hub_always_push": _HUB, "hub_revision": _HUB,
    "hub_token": "never read from a file: the hub token comes from the environment (HF_TOKEN)",
    "log_level": _LOGS, "log_level_replica": _LOGS, "log_on_each_node": _LOGS, "disable_tqdm": _LOGS,
    "logging_first_step": "raysft always logs the first step",
    "include_num_input_tokens_seen": "raysft logs num_tokens and tokens/s at every logging step",
    "run_name": "trackers name the run after the raysft run (storage.name); set storage.name to choose it",
    "logging_dir": "TensorBoard logs go to the run directory",
    "per_device_eval_batch_size": "raysft evaluates packed rows, per_device_train_batch_size at a time",
    "prediction_loss_only": _METRICS, "eval_do_concat_batches": _METRICS, "eval_use_gather_object": _METRICS,
    "eval_accumulation_steps": _METRICS, "include_for_metrics": _METRICS, "batch_eval_metrics": _METRICS,
    "save_only_model": "raysft checkpoints always hold the optimizer, schedule and data position, for an exact resume",
    "save_on_each_node": "checkpoints go once to storage.path (a shared filesystem or object storage)",
    "enable_jit_checkpoint": "after a failure raysft resumes from its latest checkpoint (scaling.max_failures, resume=latest)",
    "ignore_data_skip": _RESUME, "restore_callback_states_from_checkpoint": _RESUME,
    "data_seed": "raysft's row order comes from data.dataset_mixture.seed (the mixture's seeded shuffle), not a sampler",
    "shuffle_dataset": "raysft's row order is the mixture's seeded shuffle (data.order)",
    "dataloader_drop_last": "the step count is derived from the packed rows as accelerate counts them (printed at start)",
    "dataloader_num_workers": _LOADER, "dataloader_pin_memory": _LOADER, "dataloader_persistent_workers": _LOADER,
    "dataloader_prefetch_factor": _LOADER, "dataloader_multiprocessing_context": _LOADER, "dataloader_in_order": _LOADER,
    "remove_unused_columns": "rows arrive tokenized; the mixture's `columns` choose the source columns",
    "label_names": "rows arrive tokenized, with their labels", "length_column_name": "rows arrive tokenized and packed",
    "ddp_backend": "raysft uses nccl on GPUs and gloo on CPUs",
    "skip_memory_metrics": "raysft does not collect the Trainer's memory metrics",
    "local_rank": "set by the launcher; Ray Train assigns the ranks",
    "use_cache": "the training forward runs with use_cache=False",
    "padding_free": "packed rows carry position_ids restarting at 0 per sequence (padding-free attention) when packing",
    "pad_to_multiple_of": "packed rows are max_length tokens long",
    "eval_packing": "the eval split is packed like the training rows",
    "pad_token": "the last packed row is padded with the tokenizer's pad (or eos) token, without loss",
    "ignore_bias_buffers": "a DDP workaround of TRL's preference scripts; SFT does not read it",
}

# key -> (harmless values, TRL's default first; what to do instead)
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "label_smoothing_factor": ((0.0, 0), "raysft's loss is the plain token NLL: remove the key"),
    "fp16": ((False,), "raysft trains in bf16 (bf16: true) or fp32: use bf16"),
    "fp16_full_eval": ((False,), "raysft evaluates in the training precision: remove the key"),
    "activation_checkpointing": ((None, False), "use gradient_checkpointing: true"),
    "activation_checkpointing_kwargs": ((None,), "use gradient_checkpointing with gradient_checkpointing_kwargs"),
    "liger_kernel_config": ((None,), "raysft applies liger-kernel's default kernels (use_liger_kernel: true)"),
    "auto_find_batch_size": ((False,), "the global batch is part of the recipe: set per_device_train_batch_size"),
    "load_best_model_at_end": ((False,), "raysft's model is the last step's: keep the best checkpoints with "
                               "metric_for_best_model and make a model of one with `raysft export CHECKPOINT OUT`"),
    "accelerator_config": ((None,), "raysft runs data parallel (DDP or DeepSpeed ZeRO) on Ray Train workers: remove the key"),
    "parallelism_config": ((None,), "raysft runs data parallel (DDP or DeepSpeed ZeRO) on Ray Train workers: remove the key"),
    "fsdp": ((None, "", False, ()), "raysft shards with DeepSpeed ZeRO: pass a DeepSpeed accelerate config "
             "(--accelerate-config) or deepspeed=zero3"),
    "fsdp_config": ((None,), "raysft shards with DeepSpeed ZeRO: pass a DeepSpeed accelerate config "
                    "(--accelerate-config) or deepspeed=zero3"),
    "deepspeed": ((None,), "give DeepSpeed as an accelerate config (--accelerate-config) or deepspeed=zero3|zero2|"
                  "zero3_offload (other JSON keys: deepspeed.extra)"),
    "debug": (("", None, ()), "transformers' debug modes are not wired through raysft: remove the key"),
    "resume_from_checkpoint": ((None,), "raysft resumes its own runs: resume=latest, or resume=<run or checkpoint "
                               "URI>; to start from other weights set model_name_or_path to them"),
    "model_init_kwargs": ((None,), "set dtype, attn_implementation, model_revision and trust_remote_code as top-level keys"),
    "router_aux_loss_coef": ((None,), "raysft adds no MoE router loss: remove the key"),
    "dataset_text_field": (("text",), "raysft reads plain-text rows from a `text` column: rename the column"),
    "truncation_mode": (("keep_start",), "raysft keeps the start of an over-long sequence (data.overlong=truncate) "
                        "or drops it (data.overlong=drop)"),
    "loss_type": (("nll",), "raysft trains with the token NLL (loss_type: nll)"),
    "activation_offloading": ((False,), "offload with DeepSpeed instead (deepspeed=zero3_offload)"),
    "train_sampling_strategy": (("random",), "raysft trains in the mixture's order (data.order): remove the key"),
    "lora_target_parameters": ((None,), "raysft's LoRA targets modules: use lora_target_modules"),
    "lora_modules_to_save": ((None,), "raysft's LoRA trains the adapters only: remove the key"),
    "lora_task_type": (("CAUSAL_LM",), "raysft trains causal LMs (lora_task_type: CAUSAL_LM)"),
    "use_rslora": ((False,), "raysft's LoRA is plain LoRA: remove the key"),
    "use_dora": ((False,), "raysft's LoRA is plain LoRA: remove the key"),
    "bnb_4bit_quant_storage": ((None,), "raysft stores 4-bit weights in bitsandbytes' default dtype: remove the key"),
    "dataset_kwargs": ((None,), "only add_special_tokens: false, append_concat_token: false and skip_prepare_dataset "
                       "are understood (raysft renders with the template and packs with position_ids)"),
    "dataset_mixer": ((None,), "the handbook's old mixture format: rewrite it as dataset_mixture: {datasets: "
                      "[{id, config, split, columns, weight}]}"),
    "dataset_splits": ((None,), "the handbook's old mixture format: rewrite it as dataset_mixture (above)"),
    "base_model_revision": ((None,), "set model_revision"),
    "model_code_revision": ((None,), "set model_revision"),
}

# The values an absent key takes in TRL (checked against TRL's dataclasses by the tests).
TRL_DEFAULTS: dict[str, Any] = {
    "dataset_train_split": "train", "dataset_test_split": "test", "dataset_streaming": False,
    "model_revision": "main", "dtype": "float32", "attn_implementation": None, "use_peft": False, "lora_r": 16,
    "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": None, "load_in_8bit": False, "load_in_4bit": False,
    "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": False,
    "streaming": False, "test_split_size": None,
    "trust_remote_code": False, "use_liger_kernel": False, "chat_template_path": None, "eos_token": None,
    "max_length": 1024, "packing": False, "packing_strategy": "bfd", "assistant_only_loss": False,
    "completion_only_loss": None, "num_train_epochs": 3.0, "max_steps": -1, "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1, "learning_rate": 2e-5, "lr_scheduler_type": "linear", "lr_scheduler_kwargs": None,
    "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "bf16": None, "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": None, "average_tokens_across_devices": True, "logging_strategy": "steps",
    "logging_steps": 10, "eval_strategy": "no", "eval_steps": None, "save_strategy": "steps", "save_steps": 500,
    "save_total_limit": None, "metric_for_best_model": None, "greater_is_better": None, "seed": 42,
    "report_to": "none", "use_cpu": False, "push_to_hub": False, "hub_model_id": None,
}

# Keys only other TRL trainers read -> the trainers (the first named is the likeliest).
_PREF = ("DPO", "ORPO", "KTO", "CPO")
_RL = ("GRPO", "RLOO")
NON_SFT: dict[str, tuple[str, ...]] = {
    "beta": ("DPO", "ORPO", "KTO", "CPO", "GRPO", "RLOO"),
    "max_prompt_length": ("DPO", "ORPO", "KTO", "CPO"),
    "precompute_ref_log_probs": ("DPO", "KTO"), "precompute_ref_batch_size": ("DPO", "KTO"),
    "sync_ref_model": ("DPO", "KTO", "GRPO", "RLOO"), "ref_model_mixup_alpha": ("DPO", "KTO", "GRPO", "RLOO"),
    "ref_model_sync_steps": ("DPO", "KTO", "GRPO", "RLOO"), "ref_model_init_kwargs": ("DPO",),
    "rpo_alpha": ("DPO",), "f_divergence_type": ("DPO",), "f_alpha_divergence_coef": ("DPO",),
    "use_weighting": ("DPO",), "loss_weights": ("DPO",), "ld_alpha": ("DPO",), "discopop_tau": ("DPO",),
    "disable_dropout": (*_PREF, *_RL), "label_pad_token_id": _PREF, "is_encoder_decoder": _PREF,
    "desirable_weight": ("KTO",), "undesirable_weight": ("KTO",),
    "cpo_alpha": ("CPO",), "simpo_gamma": ("CPO",),
    "reward_funcs": _RL, "reward_weights": _RL, "num_generations": _RL, "max_completion_length": _RL,
    "use_vllm": _RL, "vllm_mode": _RL, "generation_kwargs": _RL, "scale_rewards": ("GRPO",), "epsilon": _RL,
    "num_iterations": _RL, "steps_per_generation": _RL, "importance_sampling_level": ("GRPO",),
    "mask_truncated_completions": _RL, "reward_model_name_or_path": ("PPO", "RLOO", "GRPO"),
    "center_rewards_coefficient": ("Reward",),
    "teacher_model_name_or_path": ("Distillation", "GKD"), "lmbda": ("GKD",),
}
# loss_type values of other trainers (SFT's are nll and dft) -> the trainers that take them.
_DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_pair",
               "apo_zero", "apo_down", "discopop", "sft")
_GRPO_LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo")
PREFERENCE_LOSSES: dict[str, tuple[str, ...]] = {
    **{k: ("DPO",) for k in _DPO_LOSSES}, **{k: ("GRPO",) for k in _GRPO_LOSSES},
    "simpo": ("CPO",), "kto": ("KTO",), "apo_zero_unpaired": ("KTO",),
}
PREFERENCE_COLUMNS = frozenset({"chosen", "rejected"})


def classify(key: str) -> str | None:
    """``mapped`` / ``passthrough`` / ``noted`` / ``refused`` / ``non_sft``, or None for an unknown key."""
    for kind, table in (("mapped", MAPPED), ("passthrough", PASSTHROUGH), ("noted", NOTED), ("refused", REFUSED),
                        ("non_sft", NON_SFT)):
        if key in table:
            return kind
    return None


def known_keys() -> list[str]:
    return sorted({*MAPPED, *PASSTHROUGH, *NOTED, *REFUSED})
