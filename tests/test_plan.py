"""`raysft plan`: counts equal an actual data pass on local data, the estimates follow their documented
formulas (checked here with independent arithmetic), and impossible configs are refused with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import compose

from raysft.cli import main
from raysft.config import derived
from raysft.commands import estimates as est
from raysft.commands import plan as planner

DATE = "data.date=2026-01-01"  # the sft template prints the date: pin it so both passes render alike


# ----------------------------------------------------------------------------- exact counts


@pytest.mark.ray
def test_plan_on_the_local_sample_matches_an_actual_data_pass(ray_cluster, tmp_path, capsys):
    from raysft.data.pipeline import DataStats, build_dataset, build_spec
    from raysft.config.derived import steps_for
    from raysft.train.model import tokenizer_path

    assert main(["plan", "--out", str(tmp_path), DATE]) == 0
    out = capsys.readouterr().out
    assert "data: exact (stats pass over the local data)" in out
    p = json.loads((tmp_path / "plan.json").read_text())
    assert (tmp_path / "mixture.png").stat().st_size > 1000

    # The rows a run would train on, read from the packed training dataset itself.
    cfg = compose(DATE)
    spec = build_spec(cfg.data, tokenizer_path(cfg.model), epochs=1)
    rows, tokens, trained = 0, np.zeros(len(spec.sources), np.int64), np.zeros(len(spec.sources), np.int64)
    for batch in build_dataset(spec, "train", **derived.data_resources(cfg.scaling)).iter_batches(batch_size=64, batch_format="numpy"):
        rows += len(batch["input_ids"])
        src, lab = batch["source_ids"], batch["labels"]
        for i in range(len(spec.sources)):
            tokens[i] += int((src == i).sum())
            trained[i] += int(((src == i) & (lab != -100)).sum())

    d = p["data"]
    assert d["train_packed_rows"] == rows > 0
    assert [s["tokens"] for s in d["sources"]] == tokens.tolist()
    assert [s["trained_tokens"] for s in d["sources"]] == trained.tolist()
    assert [s["selected_train_rows"] for s in d["sources"]] == spec.plan.train_counts()
    assert d["packing_efficiency"] == pytest.approx(tokens.sum() / (rows * cfg.data.max_length))
    t = cfg.trainer
    per_step = cfg.scaling.num_workers * t.per_device_train_batch_size * t.gradient_accumulation_steps
    assert p["steps"]["rows_per_step"] == per_step
    assert p["steps"]["total_steps"] == steps_for(rows, cfg) > 0
    assert p["steps"]["tokens_per_step"] == per_step * cfg.data.max_length


# ----------------------------------------------------------------------------- estimates


def test_smollm3_sft_offline_plan_is_labelled_estimated(tmp_path, capsys):
    assert main(["plan", "recipe=smollm3_sft", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "estimated (published split sizes; no data read)" in out and "vs H100 80 GB" in out
    p = json.loads((tmp_path / "plan.json").read_text())
    sources = p["data"]["sources"]
    assert len(sources) == 25 and {s["basis"] for s in sources} == {"estimated (dataset card)"}
    ot3 = next(s for s in sources if s["name"] == "OpenThoughts3_1.2M_think")
    assert ot3["split_rows"] == 1_133_524 and ot3["kept_rows"] == int(1_133_524 * 0.02)
    # The card's SFT mixture is ~1.8B tokens (SmolLM3 blog: 0.8B reasoning + 1B non-reasoning tokens).
    assert 1.5e9 < p["data"]["tokens"] < 2.2e9
    st = p["steps"]
    assert st["rows_per_step"] == 128 and st["tokens_per_step"] == 128 * 65536
    assert st["total_steps"] == pytest.approx(4 * p["data"]["train_packed_rows"] / 128, abs=4)  # rounding per epoch
    assert st["steps_per_epoch"] == pytest.approx(p["data"]["train_packed_rows"] / 128, abs=1)
    assert p["memory"]["fits"] is True and p["time"]["gpus"] == 64 and p["time"]["cost_usd"] > 0


def test_a_split_of_unknown_size_is_said_so():
    cfg = compose("recipe=smollm3_sft", "data.dataset_mixture.datasets.0.split=no_such_split")
    d = planner.estimated_data(cfg)
    assert d["sources"][0]["basis"] == "unknown: no published size" and d["sources"][0]["tokens"] is None
    assert any("lower bounds" in n and "no_such_split" in n for n in d["notes"])


# Independent arithmetic for SmolLM3-3B (config.json: hidden 2048, intermediate 11008, 36 layers,
# 16 heads x 128, 4 KV heads, vocab 128256, tied embeddings) at 65,536 tokens on 64 GPUs, ZeRO-3, bf16.
H, I, L, KV, V, S, N = 2048, 11008, 36, 4 * 128, 128256, 65536, 64
PARAMS = V * H + L * (H * H + 2 * H * KV + H * H + 3 * H * I + 2 * H) + H


def test_smollm3_memory_estimate_matches_the_formula():
    assert PARAMS == 3_075_098_624  # "SmolLM3-3B": 3.08B
    cfg = compose("recipe=smollm3_sft")
    config, _ = est.load_model_config(cfg.model.name_or_path)
    shape = est.ModelShape.from_config(config)
    assert shape.num_params == PARAMS and shape.tied and shape.max_position_embeddings == 65536
    mem = planner.memory_plan(cfg, shape)

    states = 16 * PARAMS / N                   # ZeRO paper: 2 + 2 + 12 bytes/param, all sharded by stage 3
    gathered = 2 * 2 * V * H                   # the embedding (largest module), gathered + prefetched, bf16
    checkpoints = L * S * H * 2                # one bf16 hidden state per layer
    layer = S * 2 * (7 * H + 3 * KV + 6 * I)   # one layer recomputed in backward
    head = S * (2 * H + 16)                    # fused LM head: final hidden states + fp32 per-token values
    total = states + gathered + checkpoints + layer + head + 2e9
    e = mem["estimate_gb"]
    assert e["params"] + e["grads"] + e["optimizer"] == pytest.approx(states / 1e9, abs=2e-3)
    assert e["activation_checkpoints"] == pytest.approx(9.664, abs=1e-3)
    assert e["total"] == pytest.approx(total / 1e9, abs=1e-3)
    assert 20 < e["total"] < 30  # 0.77 GB of model states; activations at 64k tokens dominate
    assert mem["gpu_memory_gb"] == 80 and mem["fits"] and mem["fraction"] == pytest.approx(total / 80e9, abs=1e-3)

    # Without gradient checkpointing the 36 layers' activations (~290 GB) cannot fit: flagged.
    cfg.trainer.gradient_checkpointing = False
    no_ckpt = planner.memory_plan(cfg, shape)
    assert no_ckpt["fits"] is False and "DOES NOT FIT" in no_ckpt["verdict"]
    assert no_ckpt["estimate_gb"]["layer_activations"] == pytest.approx(
        ((L - 1) * S * 2 * (7 * H + 3 * KV + 4 * I) + layer) / 1e9, abs=1e-3)


def test_derived_throughput_reproduces_the_reference_run():
    """At the reference's own conditions (6 FLOPs/param/token, H100) the derived rate is its 14.1k tokens/s."""
    shape = est.ModelShape.from_config(est.load_model_config("HuggingFaceTB/SmolLM3-3B")[0])
    ref = est.derived_tokens_per_s(shape, 989.0, mean_seq_len=0, gradient_checkpointing=False)
    assert ref == pytest.approx(11.2e12 / (384 * 24 * 86400), rel=1e-6)
    slower = est.derived_tokens_per_s(shape, 989.0, mean_seq_len=8192, gradient_checkpointing=True)
    assert slower < 0.75 * ref  # recompute (x4/3) plus attention


def test_tiny_model_parameter_count_matches_the_built_model():
    from raysft.train import model as models

    cfg = compose()
    config, _ = est.load_model_config(cfg.model.name_or_path, init="random", config_overrides=dict(cfg.model.config_overrides))
    net = models.build_model(cfg.model, models.resolve_accel(cfg.model, bf16=False))
    assert est.ModelShape.from_config(config).num_params == sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("overrides,fragment", [
    (["recipe=smollm3_sft", "data.max_length=131072"], "exceeds the model's max_position_embeddings=65,536"),
    (["data.dataset_mixture.datasets.0.columns=[messages,no_such_column]"], "column(s) ['no_such_column'] not in"),
    (["recipe=smollm3_sft", "scaling=gpu_1x8"], "set trainer.gradient_accumulation_steps=16"),
    (["recipe=smollm3_sft", "scaling.num_workers=48"], "is not divisible by 48 workers"),
    (["data.dataset_mixture.datasets.0.weight=0"], "weight must be > 0"),  # refused as the config composes
    (["recipe=sft_single_gpu", "trainer.per_device_train_batch_size=1000"], "fewer than one"),  # ~300 packed rows
])
def test_impossible_configs_are_refused_with_exit_2(overrides, fragment, capsys, tmp_path):
    assert main(["plan", "--out", str(tmp_path), *overrides]) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert not (tmp_path / "plan.json").exists()


def test_refusals_list_every_reason_including_a_zero_weight():
    cfg = compose("recipe=smollm3_sft", "scaling=gpu_1x8", "data.max_length=131072")
    cfg.data.dataset_mixture.datasets[3].weight = 0.0  # past validation, as a programmatic caller could
    shape = est.ModelShape.from_config(est.load_model_config(cfg.model.name_or_path)[0])
    reasons = planner.refusals(cfg, shape, "bundled config")
    assert len(reasons) == 3
    assert "hermes_function_calling_v1_no_think" in reasons[0] and "weight 0.0 <= 0" in reasons[0]


def test_plan_usage_errors(capsys):
    assert main(["plan", "--bogus"]) == 2
    assert main(["plan", "data.max_lenght=3"]) == 2
    assert main(["plan", "--help"]) == 0
    assert "usage: raysft plan" in capsys.readouterr().out
