"""TRL CLI / alignment-handbook recipe files run as they are (`raysft --trl-config`, `raysft import-recipe`).

The three published handbook files (tests/assets/handbook/, provenance in its README) translate, compose,
validate and plan; the SmolLM3 SFT file equals `recipe=smollm3_sft` except where the specification says
raysft differs; every TRL field is classified; non-SFT recipes and unknown keys are refused; a shrunk
variant of each file trains 2 steps on local Ray.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose

from raysft.cli import main
from raysft.commands.recipe import compose_recipe
from raysft.config import recipe_keys as keys
from raysft.config import to_plain
from raysft.config.recipe_file import RecipeError, deletions, load_yaml, render_preset, translate, translate_file

HANDBOOK = Path(__file__).parent / "assets" / "handbook"
DPO = Path(__file__).parent / "assets" / "recipes" / "dpo_small.yaml"
ZERO3 = str(HANDBOOK / "accelerate_zero3.yaml")
FILES = ["smollm3_sft", "smollm3_mid", "zephyr-7b-beta_sft_qlora"]


def recipe(name: str) -> str:
    return str(HANDBOOK / f"{name}.yaml")


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("lr_scheduler_kwargs", "config_overrides", "extra"):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ----------------------------------------------------------------------------- the key table


def _trl_fields() -> dict[str, dataclasses.Field]:
    trl = pytest.importorskip("trl")
    fields = {}
    for cls in (trl.ScriptArguments, trl.SFTConfig, trl.ModelConfig, trl.DatasetMixtureConfig):
        fields.update({f.name: f for f in dataclasses.fields(cls)})
    return fields


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def test_every_trl_field_is_classified_once():
    """A new TRL field fails here until it is mapped, passed through, noted or refused."""
    tables = {"mapped": set(keys.MAPPED), "passthrough": set(keys.PASSTHROUGH), "noted": set(keys.NOTED),
              "refused": set(keys.REFUSED)}
    unclassified = sorted(k for k in _trl_fields() if not any(k in t for t in tables.values()))
    assert not unclassified, f"TRL fields in no table of raysft/config/recipe_keys.py: {unclassified}"
    names = list(tables)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not tables[a] & tables[b], f"in both {a} and {b}: {tables[a] & tables[b]}"
    assert not set(keys.NON_SFT) & set(keys.known_keys())


def test_defaults_and_harmless_values_are_trls():
    fields = _trl_fields()
    for k, v in keys.TRL_DEFAULTS.items():
        assert k in fields, f"TRL_DEFAULTS[{k!r}]: not a TRL field"
        assert _default(fields[k]) == v, f"{k}: TRL's default is {_default(fields[k])!r}, the table says {v!r}"
    for k, (ok, _) in keys.REFUSED.items():
        if k in fields:
            assert _default(fields[k]) in ok, f"REFUSED[{k!r}] refuses TRL's own default {_default(fields[k])!r}"
    sft = {f.name for f in dataclasses.fields(pytest.importorskip("trl").SFTConfig)}
    assert keys.PASSTHROUGH <= sft, "trainer.trl_overrides only takes SFTConfig fields"


def test_non_sft_markers_belong_to_the_trainers_they_name():
    trl = pytest.importorskip("trl")
    sft = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    script_keys = {"reward_funcs", "reward_model_name_or_path", "ref_model_init_kwargs", "rpo_alpha", "max_prompt_length",
                   "label_pad_token_id", "is_encoder_decoder", "cpo_alpha", "simpo_gamma", "lmbda",
                   "teacher_model_name_or_path"}  # script arguments or older / experimental trainers' fields
    for key, kinds in keys.NON_SFT.items():
        assert key not in sft, key
        for kind in kinds:
            cls = getattr(trl, f"{kind}Config", None)
            if cls is not None and dataclasses.is_dataclass(cls) and key not in script_keys:
                assert key in {f.name for f in dataclasses.fields(cls)}, f"{key} is not a {kind}Config field"


# ----------------------------------------------------------------------------- the handbook files


@pytest.mark.parametrize("name", FILES)
def test_handbook_file_translates_composes_and_validates(name, tmp_path):
    t = translate_file(recipe(name))
    raw = load_yaml(recipe(name))
    # Nothing silently dropped: every key of the file is named by a value it set or by a note.
    said = " ".join([*t.origin.values(), *t.notes])
    assert [k for k in raw if not re.search(rf"\b{re.escape(k)}\b", said)] == []
    cfg = compose_recipe(recipe(name))  # composes and validates (every validate() check)
    assert cfg.model.name_or_path == raw["model_name_or_path"] and cfg.stage == name
    assert cfg.data.dataset_mixture.datasets[0].id == raw["dataset_mixture"]["datasets"][0]["id"]
    # The kept preset (`raysft import-recipe F > conf/recipe/NAME.yaml`) composes to the same config.
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(render_preset(t))
    kept = compose(f"hydra.searchpath=[file://{tmp_path}]", "recipe=mine", *deletions(t))
    assert to_plain(kept) == to_plain(cfg)


def test_the_qlora_file_and_its_particular_keys():
    cfg = compose_recipe(recipe("zephyr-7b-beta_sft_qlora"))
    p, d = cfg.peft, cfg.data
    assert (p.enabled, p.method, p.r, p.lora_alpha, p.lora_dropout, p.load_in_4bit) == (True, "qlora", 16, 16, 0.05, True)
    assert p.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert p.bnb_4bit_use_double_quant is False  # use_bnb_nested_quant: TRL's default false (raysft's own: true)
    assert d.max_length == 2048  # max_seq_length, the old name
    assert d.dataset_mixture.test_split_size == 1000  # a row count, as datasets reads an int
    assert d.dataset_mixture.seed == 0 and d.packing is False and d.loss == "all"  # TRL: every token of conversations
    assert d.chat_template.startswith("{% for message in messages %}")  # inline text, no {% generation %}
    t = cfg.trainer
    assert (t.lr_scheduler_type, t.learning_rate, t.warmup_ratio, t.per_device_train_batch_size) == ("cosine", 2e-4, 0.1, 4)
    assert t.lr_scheduler_kwargs == {} and t.trl_overrides == {"lr_scheduler_kwargs": {}}  # no min_lr_rate merged in
    assert t.use_reentrant is False and t.eval_steps is None and t.report_to == ["tensorboard"]
    assert (cfg.storage.path, cfg.storage.name) == ("data", "zephyr-7b-sft-qlora")
    notes = " ".join(translate_file(recipe("zephyr-7b-beta_sft_qlora")).notes)
    assert "hf upload zephyr-7b-sft-qlora data/zephyr-7b-sft-qlora/model" in notes
    assert "max_seq_length: SFTConfig's old name" in notes


# Where the specification (../shared/recipes/smollm3/README.md) says raysft's recipe differs from the
# published file: the spec's value in recipe=smollm3_sft, the published one in the translation.
SPEC_DIFFERS = {
    "data.dataset_mixture.seed": (42, 0),
    "data.dataset_mixture.test_split_size": (0.005, 0.0),  # published: no eval split
    "trainer.num_train_epochs": (4.0, 5.0),
    "trainer.learning_rate": (3.0e-5, 2.0e-5),
}
# In neither file nor the spec's table: raysft's own recipe choices, and what the translation does for
# fidelity to a TRL run.
RAYSFT_DIFFERS = {
    "stage": ("sft", "smollm3_sft"),  # the name of the preset that set the stage
    "data.order": ("streaming", "handbook"),  # raysft's hub recipes stream; the file's order is the handbook's
    "storage.path": (None, "data"),  # raysft's recipe writes to S3 (conf/storage/s3.yaml); the file to data/
    "plan.global_batch_rows": (128, None),  # `raysft plan`'s check of the 8-node batch ("GBS 128" is a comment)
    "data.dedupe": (True, False),  # TRL and the handbook train duplicate rows too
    "data.special_tokens_in_text": ("skip", "keep"),  # ... and rows with special tokens in their text
}


def test_smollm3_sft_file_is_our_recipe_except_where_the_spec_differs():
    # The accelerate file is one node's (8 processes); the published run launched 8 of them (8 x 8 H100 =
    # raysft's scaling=gpu_8x8), which `accelerate launch --num_machines 8` sets on the command line.
    ours = flat(to_plain(compose("recipe=smollm3_sft")))
    theirs = flat(to_plain(compose_recipe(recipe("smollm3_sft"), ZERO3, ["scaling=gpu_8x8"])))
    differ = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    assert differ == set(SPEC_DIFFERS) | set(RAYSFT_DIFFERS)
    for k, (spec, published) in SPEC_DIFFERS.items():
        assert (ours[k], theirs[k]) == (spec, published), k
    for k, (raysft, file) in RAYSFT_DIFFERS.items():
        assert theirs[k] == file and (raysft is None or ours[k] == raysft), k
    assert ours["data.chat_template"] == theirs["data.chat_template"] == "sft"  # the inline text, verbatim


def test_the_accelerate_config_maps_to_deepspeed_and_workers():
    cfg = compose_recipe(recipe("smollm3_sft"), ZERO3)
    ds, s = cfg.deepspeed, cfg.scaling
    assert (ds.enabled, ds.stage, ds.zero3_init, ds.save_16bit_model, ds.offload_optimizer, ds.offload_param) == \
        (True, 3, True, True, False, False)
    assert (s.num_workers, s.use_gpu) == (8, True) and cfg.trainer.bf16 is True
    ignored = next(n for n in translate_file(recipe("smollm3_sft"), ZERO3).notes if "ignored (Ray Train" in n)
    for key in ("machine_rank", "num_machines", "rdzv_backend", "deepspeed_config.deepspeed_multinode_launcher"):
        assert key in ignored
    # Without it, raysft's defaults stay, said so.
    cfg = compose_recipe(recipe("smollm3_sft"))
    assert cfg.deepspeed.enabled is False and cfg.scaling.num_workers == 2
    assert any("no accelerate config" in n for n in translate_file(recipe("smollm3_sft")).notes)


@pytest.mark.parametrize("acc, fragment", [
    ({"distributed_type": "FSDP", "num_processes": 8}, "distributed_type FSDP: raysft shards with DeepSpeed ZeRO"),
    ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"offload_param_device": "nvme"}}, "offloads to CPU only"),
    ({"distributed_type": "MULTI_GPU", "mixed_precision": "fp16"}, "mixed_precision fp16"),
])
def test_unsupported_accelerate_settings_are_refused(acc, fragment):
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        translate(load_yaml(recipe("smollm3_sft")), accelerate=acc)


def test_overrides_win_and_a_group_choice_replaces_the_files_section():
    cfg = compose_recipe(recipe("smollm3_sft"), ZERO3, ["trainer.learning_rate=1e-4", "model=tiny_smollm3",
                                                        "deepspeed=none", "data.max_length=512"])
    assert cfg.trainer.learning_rate == 1e-4 and cfg.data.max_length == 512 and cfg.deepspeed.enabled is False
    assert cfg.model.name_or_path == "bundled:smollm3" and cfg.model.init == "random"
    assert cfg.model.revision == "main" and cfg.model.dtype == "float32"  # the file's model section left out
    assert cfg.data.chat_template == "sft" and cfg.trainer.num_train_epochs == 5  # the rest is the file's
    cfg = compose_recipe(recipe("smollm3_sft"), overrides=["data=sample_sft"])
    assert cfg.data.root == "bundled:data/smoltalk2-sample" and len(cfg.data.dataset_mixture.datasets) == 2
    assert cfg.data.loss == "assistant_only"  # processing keys are the stage's, still the file's


# ----------------------------------------------------------------------------- plan


@pytest.mark.parametrize("name", FILES)
def test_plan_runs_on_each_handbook_file(name, tmp_path, capsys):
    assert main(["plan", "--trl-config", recipe(name), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "raysft: recipe file" in out.err  # the translation, printed first
    p = json.loads((tmp_path / "plan.json").read_text())
    assert p["stage"] == name and p["data"]["basis"].startswith("estimated")  # hub data: published sizes
    if name.startswith("smollm3"):  # SmolLM3-3B's architecture is bundled
        assert p["model"]["params"] == 3_075_098_624 and p["memory"]["estimate_gb"]
        return
    # Mistral-7B's config.json is not here: the plan says exactly that ...
    assert "is not available offline" in p["model"]["config"] and p["memory"]["estimate"] is None
    assert "model config.json not available offline: no memory estimate" in out.out
    # ... and completes with a local config in its place.
    assert main(["plan", "--trl-config", recipe(name), "--out", str(tmp_path / "local"),
                 "model.name_or_path=bundled:smollm3"]) == 0
    p = json.loads((tmp_path / "local" / "plan.json").read_text())
    assert p["memory"]["estimate_gb"]["total"] > 0 and p["memory"]["peft"] == "qlora"


# ----------------------------------------------------------------------------- refusals


def test_a_dpo_recipe_is_refused_in_one_line(capsys):
    for argv in (["--trl-config", str(DPO)], ["import-recipe", str(DPO)], ["plan", "--trl-config", str(DPO)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("raysft: error: ") and "this is a DPO recipe" in err and "raysft runs SFT" in err
        assert len(err.splitlines()) == 1 or argv[0] == "import-recipe"  # (import-recipe adds its usage)


def test_an_unknown_key_is_refused_with_its_name(tmp_path, capsys):
    raw = load_yaml(recipe("smollm3_mid"))
    raw["learnin_rate"] = 1e-5
    f = tmp_path / "typo.yaml"
    f.write_text(yaml.safe_dump(raw))
    assert main(["--trl-config", str(f), "--cfg", "job"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'learnin_rate'" in err and "did you mean 'learning_rate'?" in err


@pytest.mark.parametrize("extra, fragment", [
    ({"fp16": True}, "fp16: raysft trains in bf16"),
    ({"fsdp": "full_shard"}, "fsdp: raysft shards with DeepSpeed ZeRO"),
    ({"load_best_model_at_end": True}, "load_best_model_at_end"),
    ({"save_strategy": "best"}, "save_strategy='best'"),
    ({"report_to": "all"}, "report_to: all"),
    ({"max_seq_length": 4096}, "max_length=32768 and max_seq_length=4096 disagree"),
    ({"packing_strategy": "ffd2"}, "packing_strategy='ffd2'"),
    ({"load_in_4bit": True}, "without use_peft"),
    ({"logging_steps": 0.1}, "logging_steps=0.1"),
    ({"dataset_kwargs": {"add_special_tokens": True}}, "dataset_kwargs"),
])
def test_unsupported_settings_are_refused_saying_what_to_do(extra, fragment):
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        translate({**load_yaml(recipe("smollm3_mid")), **extra})


def test_several_reasons_are_listed_together():
    with pytest.raises(RecipeError) as e:
        translate({**load_yaml(recipe("smollm3_mid")), "fp16": True, "foo": 1})
    assert "(2 reasons)" in str(e.value) and "unknown key 'foo'" in str(e.value) and "fp16:" in str(e.value)


# ----------------------------------------------------------------------------- other shapes of file


def test_a_trl_cli_file_with_datasets_and_other_keys(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    raw = {
        "model_name_or_path": "Qwen/Qwen2-0.5B", "dtype": "bfloat16",
        "datasets": [{"path": "trl-lib/Capybara", "split": "train", "columns": ["prompt", "completion"]}],
        "test_split_size": 0.1, "streaming": True, "dataset_name": "ignored/here",
        "use_peft": True, "lora_r": 32, "lora_alpha": 16,
        "chat_template_path": str(template), "packing": True, "packing_strategy": "bfd-requeue",
        "optim": "adamw_torch", "adam_beta2": 0.95, "warmup_steps": 100, "report_to": "wandb",
        "eval_strategy": "steps", "metric_for_best_model": "loss", "save_steps": 0.25, "fsdp": "",
        "ddp_timeout": 600, "do_train": True, "per_device_train_batch_size": 2,
    }
    t = translate(raw, name="capybara", source="capybara.yaml")
    said = " ".join([*t.origin.values(), *t.notes])
    assert [k for k in raw if not re.search(rf"\b{re.escape(k)}\b", said)] == []
    f = tmp_path / "capybara.yaml"
    f.write_text(yaml.safe_dump(raw))
    cfg = compose_recipe(str(f))
    src = cfg.data.dataset_mixture.datasets[0]
    assert (src.id, src.split, src.columns, src.weight) == ("trl-lib/Capybara", "train", ["prompt", "completion"], 1.0)
    assert cfg.data.order == "streaming" and cfg.data.dataset_mixture.test_split_size == 0.1
    assert cfg.data.loss == "completion_only" and cfg.data.packing_strategy == "bfd_split"
    assert cfg.data.chat_template == str(template)
    assert cfg.peft.enabled and cfg.peft.method == "lora" and cfg.peft.r == 32 and cfg.peft.target_modules is None
    tr = cfg.trainer
    assert tr.trl_overrides == {"optim": "adamw_torch", "adam_beta2": 0.95, "warmup_steps": 100,
                                "lr_scheduler_kwargs": {}}
    assert tr.warmup_ratio == 0.0 and tr.report_to == ["wandb"] and tr.eval_steps == 10  # logging_steps' default
    assert tr.metric_for_best_model == "eval_loss" and tr.greater_is_better is False and tr.save_steps == 0.25
    assert tr.lr_scheduler_type == "linear" and tr.per_device_train_batch_size == 2
    assert cfg.model.dtype == "bfloat16" and cfg.model.attn_implementation == "sdpa"


def test_a_single_dataset_name_file():
    raw = {"model_name_or_path": "HuggingFaceTB/SmolLM2-1.7B", "dataset_name": "HuggingFaceTB/smoltalk",
           "dataset_config": "all", "dataset_train_split": "train", "dataset_test_split": "test",
           "eval_strategy": "epoch", "max_seq_length": 8192, "num_train_epochs": 2}
    t = translate(raw)
    (src,) = t.values["data"]["dataset_mixture"]["datasets"]
    assert src == {"id": "HuggingFaceTB/smoltalk", "config": "all", "split": "train", "weight": 1.0}
    assert any("dataset_test_split='test'" in n and "not a separate split" in n for n in t.notes)
    assert any("eval_strategy=epoch" in n and "raysft plan" in n for n in t.notes)  # 2 epochs: said what to do


@pytest.mark.parametrize("value, ok", [(1000, True), (0.05, True), (1000.0, False), (-1, False), (True, False)])
def test_test_split_size_is_read_as_datasets_reads_it(value, ok):
    raw = {**load_yaml(recipe("smollm3_mid")), "dataset_mixture": {
        **load_yaml(recipe("smollm3_mid"))["dataset_mixture"], "test_split_size": value}}
    if ok:
        assert translate(raw).values["data"]["dataset_mixture"]["test_split_size"] == value
    else:
        with pytest.raises(RecipeError, match="test_split_size"):
            translate(raw)


def test_weight_missing_is_one_and_revision_is_kept():
    raw = load_yaml(recipe("smollm3_mid"))
    del raw["dataset_mixture"]["datasets"][0]["weight"]
    raw["dataset_mixture"]["datasets"][1]["revision"] = "v1.0"
    mix = translate(raw).values["data"]["dataset_mixture"]
    assert mix["datasets"][0]["weight"] == 1.0 and mix["datasets"][1]["revision"] == "v1.0"


# ----------------------------------------------------------------------------- the command line


def test_import_recipe_prints_a_preset_to_keep(tmp_path, capsys):
    assert main(["import-recipe", recipe("zephyr-7b-beta_sft_qlora")]) == 0
    out = capsys.readouterr()
    text = out.out
    assert text.startswith("# @package _global_\n") and "  - override /stage: null" in text
    assert "model_name_or_path" in text and "save it as conf/recipe/NAME.yaml" in out.err
    assert main(["import-recipe"]) == 2 and main(["import-recipe", "a.yaml", "b.yaml"]) == 2


def test_help_names_the_recipe_commands():
    out = subprocess.run([sys.executable, "-m", "raysft", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "--trl-config" in out.stdout and "import-recipe" in out.stdout


def test_cfg_job_shows_the_translated_config_and_the_translation():
    out = subprocess.run([sys.executable, "-m", "raysft", "--trl-config", recipe("smollm3_sft"), "--accelerate-config",
                          ZERO3, "trainer.seed=7", "--cfg", "job"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    job = yaml.safe_load(out.stdout)
    assert job["model"]["revision"] == "it-mid-training" and job["trainer"]["seed"] == 7
    assert job["deepspeed"]["stage"] == 3 and job["scaling"]["num_workers"] == 8
    err = out.stderr
    assert "  model: name_or_path=HuggingFaceTB/SmolLM3-3B-checkpoints" in err
    assert "packing_strategy: 'ffd' is TRL's old name" in err and "ddp_timeout:" in err


# ----------------------------------------------------------------------------- training


SHRINK = ["model=tiny_smollm3", "data=sample_sft", "scaling=local_cpu", "storage=local", "trainer.max_steps=2",
          "trainer.report_to=[none]", "data.max_length=512", "trainer.per_device_train_batch_size=1",
          "trainer.gradient_checkpointing=false", "trainer.save_strategy=no"]


# The handbook's SmolLM3 SFT recipe trains under DeepSpeed ZeRO-3, so its shrunk run does too: the
# suite's ZeRO-3 run on two CPU workers (the others run DDP, as scaling=local_cpu does).
EXTRA = {"smollm3_sft": ["deepspeed=zero3"]}
# The handbook's QLoRA file, shrunk, is the suite's LoRA run: on a random init the 4-bit load does not
# apply (it quantizes pretrained weights), so its adapters train on the fp32 tiny model.
LORA_FILE = "zephyr-7b-beta_sft_qlora"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_shrunk_handbook_file_trains_two_steps(name, ray_cluster, tmp_path, tokenizer):
    from test_train import _generate, check_lora_run

    from raysft.run import driver

    cfg = compose_recipe(recipe(name), overrides=[*SHRINK, *EXTRA.get(name, []), f"storage.path={tmp_path}",
                                                  "storage.name=run"])
    raw = load_yaml(recipe(name))
    assert cfg.trainer.learning_rate == float(raw["learning_rate"])  # the file's, under the shrink
    result = driver.run(cfg)
    assert result.max_steps == 2
    run_dir = tmp_path / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics) and max(m.get("global_step", 0) for m in metrics) == 2
    assert (run_dir / "model").is_dir()
    assert cfg.peft.enabled == (name == LORA_FILE)
    if cfg.peft.enabled:  # the suite's LoRA run: adapter only, export --merge
        check_lora_run(run_dir, cfg, tmp_path, tokenizer)
    if "deepspeed=zero3" in EXTRA.get(name, []):
        workers = [json.loads((run_dir / "workers" / f"rank_{r}.json").read_text()) for r in (0, 1)]
        assert {w["wrapped_model"] for w in workers} == {"DeepSpeedEngine"}
        _generate(run_dir / "model", tokenizer)  # ZeRO-3's 16-bit gather on save gives a full model
