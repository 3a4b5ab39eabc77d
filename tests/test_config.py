"""Config composition: every preset composes and validates, overrides behave, typos fail fast."""

from __future__ import annotations

import dataclasses
from pathlib import Path
import math
import subprocess
import sys

import pytest
from conftest import ROOT, compose

from raysft.cli import main
from raysft.config import OverrideKeyError, check_override_keys, config_groups
from raysft.config import RaySFTConfig, from_plain, to_plain
from raysft.config.derived import steps_for
from raysft.config.secrets import redact

GROUPS = sorted(config_groups())


def _options(group: str) -> list[str]:
    return config_groups()[group]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_preset_composes_and_validates(group, option):
    cfg = compose(f"{group}={option}")
    assert isinstance(cfg, RaySFTConfig)


def test_default_is_the_tiny_local_job():
    cfg = compose()
    assert cfg.model.init == "random" and cfg.model.name_or_path == "bundled:smollm3"
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
    assert cfg.data.root == "bundled:data/smoltalk2-sample"
    assert not cfg.deepspeed.enabled and not cfg.peft.enabled


def test_overrides_reach_the_typed_config():
    cfg = compose("model=smollm3_3b", "stage=sft", "trainer.learning_rate=1e-5")
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM3-3B-Base"
    assert cfg.trainer.learning_rate == 1e-5
    assert cfg.data.max_length == 65536 and cfg.data.loss == "assistant_only"
    # Command-line group choices win over a recipe's own choices.
    cfg = compose("recipe=smollm3_sft", "model=tiny_smollm3", "scaling=local_cpu")
    assert cfg.model.init == "random" and cfg.scaling.num_workers == 2 and cfg.stage == "sft"
    cfg = compose("data.dataset_mixture.datasets.0.weight=0.5")
    assert cfg.data.dataset_mixture.datasets[0].weight == 0.5


@pytest.mark.parametrize("override,fragment", [
    ("data.nonexistent_key=1", "Valid keys there: chat_template, column_map, dataset_mixture"),
    ("trainer.lr=1", "learning_rate"),
    ("nonexistent=1", "Valid keys there: data, deepspeed, model, monitor"),
    ("data.dataset_mixture.datasets.0.wieght=2", "weight"),
])
def test_unknown_keys_fail_listing_the_valid_keys(override, fragment):
    with pytest.raises(OverrideKeyError, match="Unknown config key") as e:
        check_override_keys([override])
    assert fragment in str(e.value)


def test_free_form_dicts_accept_any_key():
    check_override_keys(["+trainer.trl_overrides.optim=adafactor", "trainer.lr_scheduler_kwargs.min_lr_rate=0.2"])
    cfg = compose("+trainer.trl_overrides.optim=adafactor")
    assert cfg.trainer.trl_overrides == {"optim": "adafactor"}


@pytest.mark.parametrize("override,message", [
    ("data.packing_strategy=zigzag", "data.packing_strategy='zigzag' is not valid"),
    ("data.dataset_mixture.datasets.0.weight=0", "weight must be > 0"),
    ("data.dataset_mixture.test_split_size=1.5", "test_split_size must be in [0, 1)"),
    ("trainer.per_device_train_batch_size=0", "per_device_train_batch_size must be > 0"),
    ("trainer.metric_for_best_model=loss", "scored by an eval metric"),
    ("scaling.min_workers=3", "scaling.min_workers must be in [1, num_workers=2]"),
    ("+deepspeed=zero3 scaling.min_workers=1", "elastic training) needs deepspeed=none"),
])
def test_bad_values_fail_with_what_to_change(override, message):
    with pytest.raises(ValueError) as e:
        compose(*override.removeprefix("+").split())
    assert message in str(e.value)


def test_checkpoint_retention_is_raysft_s_and_elastic_scaling_maps_to_ray():
    from raysft.run.driver import checkpoint_config, scaling_config

    # Ray Train deletes nothing (an abandoned upload must not push out the last complete checkpoint);
    # raysft applies save_total_limit / metric_for_best_model (tests/test_checkpoint.py).
    assert checkpoint_config().num_to_keep is None  # whatever the retention settings
    elastic = scaling_config(compose("scaling.min_workers=1", "scaling.elastic_resize_interval_s=5"))
    assert elastic.num_workers == (1, 2) and elastic.elastic_resize_monitor_interval_s == 5
    assert scaling_config(compose()).num_workers == 2


def test_wrong_type_fails():
    with pytest.raises(Exception, match="learning_rate"):
        compose("trainer.learning_rate=fast")


def test_cli_exit_code_and_message_for_a_typo(capsys):
    assert main(["data.nonexistent_key=1"]) == 2
    err = capsys.readouterr().err
    assert "nonexistent_key" in err and "max_length" in err


def test_cli_as_a_process_fails_before_ray_starts():
    out = subprocess.run([sys.executable, "-m", "raysft", "data.nonexistent_key=1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Valid keys there" in out.stderr and "Started a local Ray" not in out.stderr + out.stdout


def test_config_roundtrips_through_plain_dicts():
    cfg = compose("recipe=smollm3_sft")
    assert from_plain(to_plain(cfg)) == cfg


def test_secrets_never_written():
    d = redact({"trainer": {"trl_overrides": {"hub_token": "hf_abc", "push_to_hub": True}}, "x": [{"api_key": "k"}]})
    assert d["trainer"]["trl_overrides"]["hub_token"] == "<redacted>"
    assert d["x"][0]["api_key"] == "<redacted>" and d["trainer"]["trl_overrides"]["push_to_hub"] is True


def test_config_surface_is_frozen():
    """Every key with its type and default is frozen in tests/assets/config_surface.txt
    (tests/test_layout.py::test_config_surface_is_frozen); here, the groups and the unset sweep."""
    schema = {f.name: f.type for f in dataclasses.fields(RaySFTConfig)}
    cfg = compose()
    assert set(schema) == {"model", "data", "trainer", "scaling", "storage", "deepspeed", "peft", "monitor", "plan",
                           "resume", "stage", "sweep", "preflight"}
    # The sweep group (conf/sweep/): unset unless `sweep=<preset>` is given.
    assert cfg.sweep is None
    surface = (Path(__file__).parent / "assets" / "config_surface.txt").read_text()
    for group in ("model", "data", "trainer", "plan"):
        keys = sorted(line.split(":")[0].split(".")[1] for line in surface.splitlines() if line.startswith(group + "."))
        assert sorted(f.name for f in dataclasses.fields(getattr(cfg, group))) == sorted(set(keys)), group


@pytest.mark.parametrize("rows,workers,batch,ga,epochs", [
    (100, 2, 2, 3, 2.0), (48, 2, 1, 1, 1.0), (7, 1, 2, 2, 1.0), (1000, 64, 1, 2, 4.0), (130, 8, 1, 2, 0.5), (9, 2, 1, 4, 3.0),
])
def test_step_count_matches_a_plain_trl_launch(rows, workers, batch, ga, epochs, tmp_path):
    """Our derived max_steps equals what HF Trainer computes for each rank's dataloader in a plain
    accelerate launch (DistributedSampler: ceil(rows / world) rows per rank, drop_last=False)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainingArguments

    from raysft.data.pipeline import DataStats

    cfg = compose(f"trainer.per_device_train_batch_size={batch}", f"trainer.gradient_accumulation_steps={ga}",
                  f"trainer.num_train_epochs={epochs}", f"scaling.num_workers={workers}")
    stats = DataStats(sources={}, train_packed_rows=rows, train_packed_tokens=0, eval_packed_rows=0, max_length=512, date="2026-01-01")
    per_rank = DataLoader(list(range(math.ceil(rows / workers))), batch_size=batch)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                             num_train_epochs=epochs, use_cpu=True, report_to=[])
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args)
    hf_max_steps = trainer.set_initial_training_values(args, per_rank)[-1]
    assert steps_for(stats.train_packed_rows, cfg) == hf_max_steps


def test_too_little_data_for_one_step_is_refused():
    from raysft.data.pipeline import DataStats

    cfg = compose("trainer.per_device_train_batch_size=4")
    stats = DataStats(sources={}, train_packed_rows=5, train_packed_tokens=0, eval_packed_rows=0, max_length=512, date="2026-01-01")
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        steps_for(stats.train_packed_rows, cfg)
