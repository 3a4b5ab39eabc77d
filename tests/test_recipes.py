"""The SmolLM3 recipes compose to exactly the specified values (../shared/recipes/smollm3/README.md),
the SFTConfig workers build from them carries those values, and the SFT-course practice recipes
compose, on GPUs and in their local variant. Nothing trains here (tests/test_train.py trains)."""

from __future__ import annotations

import gc
import re

import pytest
from conftest import compose, shared_path

from raysft import assets

# ----------------------------------------------------------------------------- the specification

# "The 25 SFT splits and weights", in order.
SFT_SPLITS = [
    ("smoltalk_smollm3_everyday_conversations_no_think", 1.0),
    ("smoltalk_smollm3_systemchats_30k_no_think", 1.0),
    ("tulu_3_sft_personas_instruction_following_no_think", 1.0),
    ("hermes_function_calling_v1_no_think", 1.0),
    ("smoltalk_smollm3_smol_magpie_ultra_no_think", 0.5),
    ("smoltalk_multilingual_8languages_lang_5_no_think", 1.0),
    ("table_gpt_no_think", 1.0),
    ("OpenHermes_2.5_no_think", 0.5),
    ("OpenThoughts3_1.2M_no_think_no_think", 0.4),
    ("Mixture_of_Thoughts_science_no_think", 1.0),
    ("smoltalk_smollm3_explore_instruct_rewriting_no_think", 1.0),
    ("smoltalk_smollm3_smol_rewrite_no_think", 1.0),
    ("smoltalk_smollm3_smol_summarize_no_think", 1.0),
    ("LongAlign_64k_context_lang_annotated_lang_6_no_think", 1.0),
    ("multi_turn_reasoning_if_think", 1.0),
    ("smoltalk_everyday_convs_reasoning_Qwen3_32B_think", 1.0),
    ("smoltalk_systemchats_Qwen3_32B_think", 1.0),
    ("xlam_traces_no_think", 1.0),
    ("smolagents_toolcalling_traces_think", 1.0),
    ("s1k_1.1_think", 1.0),
    ("LongAlign_64k_Qwen3_32B_yarn_131k_think", 1.0),
    ("aya_dataset_Qwen3_32B_think", 1.0),
    ("smoltalk_multilingual8_Qwen3_32B_think", 0.3),
    ("OpenThoughts3_1.2M_think", 0.02),
    ("table_gpt_Qwen3_32B_think", 1.0),
]
MID_SPLITS = [("Llama_Nemotron_Post_Training_Dataset_reasoning_r1", 1.0), ("OpenThoughts3_1.2M", 1.0)]

# Values both stages share ("batch, schedule, memory: as stage 1"; the launch paragraph).
COMMON = {
    "model.dtype": "bfloat16", "model.attn_implementation": "flash_attention_2", "model.trust_remote_code": True,
    "model.use_liger_kernel": True,
    "data.packing": True, "data.eos_token": "<|im_end|>",
    "trainer.learning_rate": 3.0e-5, "trainer.lr_scheduler_type": "cosine_with_min_lr",
    "trainer.lr_scheduler_kwargs": {"min_lr_rate": 0.1}, "trainer.warmup_ratio": 0.03, "trainer.max_grad_norm": 0.2,
    "trainer.per_device_train_batch_size": 1, "trainer.gradient_accumulation_steps": 2,
    "trainer.gradient_checkpointing": True, "trainer.use_reentrant": True, "trainer.bf16": True,
    "trainer.average_tokens_across_devices": True, "trainer.logging_steps": 1, "trainer.report_to": ["wandb"],
    "trainer.save_total_limit": 1,
    "scaling.num_workers": 64, "scaling.use_gpu": True, "scaling.gpus_per_worker": 1.0,
    "deepspeed.enabled": True, "deepspeed.stage": 3, "deepspeed.zero3_init": True, "deepspeed.save_16bit_model": True,
    "deepspeed.offload_optimizer": False, "deepspeed.offload_param": False,
    "plan.global_batch_rows": 128,
}
SPEC = {
    "smollm3_mid": {
        **COMMON,
        "stage": "mid",
        "model.name_or_path": "HuggingFaceTB/SmolLM3-3B-Base", "model.revision": "main",
        "data.dataset_mixture.seed": 42, "data.dataset_mixture.test_split_size": 0.01,
        "data.chat_template": "mid", "data.max_length": 32768, "data.packing_strategy": "wrapped",
        "trainer.num_train_epochs": 5.0, "trainer.save_strategy": "steps", "trainer.save_steps": 0.05,
        "storage.name": "SmolLM3-Mid",
    },
    "smollm3_sft": {
        **COMMON,
        "stage": "sft",
        "model.name_or_path": "HuggingFaceTB/SmolLM3-3B-checkpoints", "model.revision": "it-mid-training",
        "data.dataset_mixture.seed": 42, "data.dataset_mixture.test_split_size": 0.005,
        "data.chat_template": "sft", "data.loss": "assistant_only", "data.max_length": 65536,
        "data.packing_strategy": "bfd",  # "ffd" in TRL <= 0.19, renamed "bfd" (best-fit decreasing)
        "trainer.num_train_epochs": 4.0, "trainer.save_strategy": "epoch",
    },
}
MIXTURES = {
    "smollm3_mid": ("Mid", ["messages"], MID_SPLITS),
    "smollm3_sft": ("SFT", ["messages", "chat_template_kwargs"], SFT_SPLITS),
}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.fixture(scope="module", params=sorted(SPEC))
def recipe(request):
    return request.param, compose(f"recipe={request.param}")


def test_recipe_has_every_specified_value(recipe):
    name, cfg = recipe
    wrong = {k: (_get(cfg, k), v) for k, v in SPEC[name].items() if _get(cfg, k) != v}
    assert not wrong, f"{name}: composed != specified: {wrong}"
    t = cfg.trainer
    assert cfg.scaling.num_workers * t.per_device_train_batch_size * t.gradient_accumulation_steps == 128


def test_recipe_mixture_is_the_specified_splits_in_order(recipe):
    name, cfg = recipe
    config, columns, splits = MIXTURES[name]
    got = [(s.id, s.config, s.split, s.columns, s.weight) for s in cfg.data.dataset_mixture.datasets]
    assert got == [("HuggingFaceTB/smoltalk2", config, split, columns, w) for split, w in splits]
    assert cfg.data.root is None  # the hub dataset, not the bundled sample


def test_spec_tables_match_the_specification_file():
    """The tables above are the spec's own (when ../shared is present)."""
    text = shared_path("recipes", "smollm3", "README.md").read_text()
    table = text.split("## The 25 SFT splits and weights")[1].split("##")[0]
    rows = re.findall(r"^\| (\S+) \| ([\d.]+) \|$", table, flags=re.M)
    assert [(s, float(w)) for s, w in rows] == SFT_SPLITS
    for split, _ in MID_SPLITS:
        assert f"`{split}` (weight 1.0)" in text


@pytest.mark.parametrize("name", ["mid", "sft"])
def test_chat_templates_are_the_spec_files_verbatim(name):
    spec = shared_path("recipes", "smollm3", f"{name}_chat_template.jinja").read_text()
    assert assets.load_chat_template(name) == spec


@pytest.mark.parametrize("name", sorted(SPEC))
def test_sft_config_the_workers_build_carries_the_recipe(name, tmp_path):
    import torch
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from raysft.train.worker import build_sft_args

    cfg = compose(f"recipe={name}")
    kw = dict(output_dir=str(tmp_path), max_steps=100, has_eval=True, world=2)
    if not torch.cuda.is_available():  # transformers refuses bf16 without a GPU; the workers pass accel.bf16=False
        with pytest.raises(ValueError, match="bf16"):
            build_sft_args(cfg, bf16=True, **kw)
    args = build_sft_args(cfg, bf16=torch.cuda.is_available(), **kw)
    try:
        assert args.learning_rate == 3.0e-5
        assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "cosine_with_min_lr"
        assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
        assert args.warmup_steps == 0.03 and args.get_warmup_steps(100) == 3  # transformers 5: a float is a ratio
        assert args.max_grad_norm == 0.2
        assert args.gradient_accumulation_steps == 2 and args.per_device_train_batch_size == 1
        assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": True}
        assert args.average_tokens_across_devices and args.logging_steps == 1 and args.report_to == ["wandb"]
        assert args.max_steps == 100 and args.seed == 42
        zero = args.hf_deepspeed_config.config["zero_optimization"]
        assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert "offload_optimizer" not in zero and "offload_param" not in zero
        assert args.hf_deepspeed_config.config["bf16"]["enabled"] == (True if torch.cuda.is_available() else False)
    finally:
        # SFTConfig registers a process-global ZeRO-3 config (weakly referenced): drop it so later tests
        # in this process do not build their models partitioned.
        del args
        gc.collect()
    assert not is_deepspeed_zero3_enabled()


# ----------------------------------------------------------------------------- SFT-course practice recipes

COURSE = {
    "sft_single_gpu": {"model.name_or_path": "HuggingFaceTB/SmolLM2-135M", "peft.enabled": False,
                       "trainer.gradient_checkpointing": False},
    "lora": {"model.name_or_path": "HuggingFaceTB/SmolLM3-3B-Base", "peft.enabled": True, "peft.method": "lora",
             "peft.load_in_4bit": False, "trainer.gradient_checkpointing": True, "trainer.learning_rate": 2.0e-4},
    "qlora": {"model.name_or_path": "HuggingFaceTB/SmolLM3-3B-Base", "peft.enabled": True, "peft.method": "qlora",
              "peft.load_in_4bit": True, "trainer.gradient_checkpointing": True, "trainer.learning_rate": 2.0e-4},
}
# stage=tiny too: the course stage's 4 x 2048-token micro-batches need ~13 GB per CPU worker (128k-vocab logits).
LOCAL = ("model=tiny_smollm3", "scaling=local_cpu", "data=sample_sft", "stage=tiny")


@pytest.mark.parametrize("name", sorted(COURSE))
def test_course_recipe_composes_for_one_gpu(name):
    cfg = compose(f"recipe={name}")
    wrong = {k: (_get(cfg, k), v) for k, v in COURSE[name].items() if _get(cfg, k) != v}
    assert not wrong, wrong
    assert cfg.scaling.num_workers == 1 and cfg.scaling.use_gpu and cfg.scaling.gpus_per_worker == 1
    assert not cfg.deepspeed.enabled  # one GPU: plain training; with PEFT only the adapter is saved
    (src,) = cfg.data.dataset_mixture.datasets  # one chat dataset ...
    assert src.id == "HuggingFaceTB/smoltalk2" and src.columns[0] == "messages"
    assert cfg.data.dataset_mixture.test_split_size > 0 and cfg.trainer.eval_steps  # ... with an eval split
    assert cfg.data.loss == "assistant_only" and cfg.trainer.save_strategy == "epoch"


@pytest.mark.parametrize("name", sorted(COURSE))
def test_course_recipe_local_variant_composes(name):
    cfg = compose(f"recipe={name}", *LOCAL)
    assert cfg.model.init == "random" and cfg.model.name_or_path == "bundled:smollm3"
    assert not cfg.scaling.use_gpu and cfg.scaling.num_workers == 2 and cfg.scaling.accelerator_type is None
    assert cfg.data.root == "bundled:data/smoltalk2-sample" and len(cfg.data.dataset_mixture.datasets) == 2
    assert cfg.stage == "tiny" and cfg.data.max_length == 512 and cfg.trainer.per_device_train_batch_size == 1
    # The recipe's own choices survive the local overrides.
    assert cfg.peft.enabled == COURSE[name]["peft.enabled"] and cfg.peft.method == COURSE[name].get("peft.method", "lora")
    assert cfg.trainer.gradient_checkpointing == COURSE[name]["trainer.gradient_checkpointing"]
