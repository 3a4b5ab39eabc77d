"""Hyperparameter sweeps (``raysft sweep=...``): the sweep config, the best-trial files, and two small
Ray Tune sweeps of the tiny model on the local Ray cluster (ASHA early stopping; resuming)."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from conftest import compose
from ray.tune import Callback as TuneCallback

from raysft.cli import main
from raysft.config import config_groups
from raysft.config import compose as cli_compose
from raysft.config import to_plain
from raysft.storage.rundir import SweepDir
from raysft.sweep import results as sweep_results
from raysft.sweep import space as sweep_space
from raysft.sweep import trials as sweeps

PRESETS = config_groups()["sweep"]

# Each trial: one CPU worker, no held-out split (metric `loss`, reported every step), no samples.
TINY = ["scaling.num_workers=1", "trainer.logging_steps=1", "trainer.warmup_ratio=0", "trainer.eval_steps=null",
        "data.dataset_mixture.test_split_size=0", "monitor.sample_prompts=[]"]


def _grid(*lrs: float) -> str:
    return "sweep.space={trainer.learning_rate:{type:grid,values:[" + ",".join(map(repr, lrs)) + "]}}"


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((sweep_dir / "trials.csv").open()))


# ----------------------------------------------------------------------------- config (no Ray)


def test_presets_are_shipped():
    assert {"lr", "lora", "packing", "mixture"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_sweep_preset_composes_a_trial(preset):
    cfg = compose(f"sweep={preset}")
    assert cfg.sweep is not None and cfg.sweep.name and cfg.sweep.space
    base, _ = sweep_space.base_overrides([f"sweep={preset}"], cfg)
    sweep_space.check_space(cfg.sweep, base, config_dir=None, config_name="config")  # keys exist, a trial validates
    assert sweep_space.tune_space(cfg.sweep.space).keys() == cfg.sweep.space.keys()


def test_sweep_is_off_by_default_and_fields_override():
    assert compose().sweep is None
    cfg = compose("sweep=lr", "sweep.num_samples=3", "sweep.scheduler.grace_period=4", _grid(1e-3, 3e-3))
    assert cfg.sweep.num_samples == 3 and cfg.sweep.scheduler.grace_period == 4
    assert cfg.sweep.space["trainer.learning_rate"].values == [1e-3, 3e-3]
    # A list index in a key, added from the command line.
    cfg = compose("sweep=lr", "+sweep.space={data.dataset_mixture.datasets.1.weight:{type:uniform,low:0.02,high:0.08}}")
    assert set(cfg.sweep.space) == {"trainer.learning_rate", "data.dataset_mixture.datasets.1.weight"}


def test_a_group_can_be_swept_too():
    cfg = compose("sweep=lr", "+sweep.space={peft:{type:choice,values:[none,lora]}}")
    sweep_space.check_space(cfg.sweep, [], config_dir=None, config_name="config")
    trial = cli_compose(sweep_space.trial_overrides({"trainer.learning_rate": 1e-3, "peft": "lora"}))
    assert trial.peft.enabled and trial.peft.r == 16 and trial.trainer.learning_rate == 1e-3


def test_a_space_key_that_is_no_config_key_fails_before_ray():
    with pytest.raises(sweep_space.SweepConfigError, match="Valid keys there: .*learning_rate"):
        sweeps.run(["sweep=lr", "+sweep.space={trainer.lr:{type:uniform,low:0.1,high:0.2}}"])
    with pytest.raises(sweep_space.SweepConfigError, match="does not compose"):
        sweeps.run(["sweep=lr", "+sweep.space={data.max_length:{type:choice,values:[long]}}"])


@pytest.mark.parametrize("override,message", [
    ("sweep.space={trainer.learning_rate:{type:loguniform,low:0,high:1}}", "loguniform needs `low` > 0"),
    ("sweep.space={trainer.learning_rate:{type:lognormal}}", "type='lognormal' is not valid"),
    ("sweep.space={trainer.learning_rate:{type:choice,values:[]}}", "non-empty `values`"),
    ("sweep.mode=lowest", "sweep.mode='lowest' is not valid"),
    ("sweep.scheduler.reduction_factor=1", "reduction_factor must be > 1"),
    ("sweep.search_alg=hyperopt", "sweep.search_alg='hyperopt' is not valid"),
])
def test_bad_sweep_settings_fail_with_what_to_change(override, message):
    with pytest.raises(ValueError) as e:
        compose("sweep=lr", override)
    assert message in str(e.value)


def test_a_sweep_writes_no_secret_given_on_its_command_line():
    cfg = compose("sweep=lr")
    base, _ = sweep_space.base_overrides(["sweep=lr", "+trainer.trl_overrides.hub_token=hf_x", "trainer.max_steps=3"], cfg)
    assert base == ["trainer.max_steps=3"]  # the token reaches the trials as HF_TOKEN (the end-to-end sweep test)
    with pytest.raises(sweep_space.SweepConfigError, match="set it in the environment"):
        sweep_space.base_overrides(["sweep=lr", "+trainer.trl_overrides.hub_private_api_key=x"], cfg)


def test_optuna_search_takes_no_grid():
    pytest.importorskip("optuna")
    assert compose("sweep=lr", "sweep.search_alg=optuna").sweep.search_alg == "optuna"
    with pytest.raises(ValueError, match="cannot take grid entries"):
        compose("sweep=packing", "sweep.search_alg=optuna")


def test_eval_metric_gets_evaluations_and_needs_held_out_data():
    cfg = compose("sweep=lr", "trainer.eval_steps=null", "trainer.logging_steps=2")
    base, notes = sweep_space.base_overrides(["sweep=lr", "trainer.eval_steps=null", "trainer.logging_steps=2"], cfg)
    assert base[-1] == "trainer.eval_steps=20" and "eval_steps" in notes[0]
    cfg = compose("sweep=lr", "data.dataset_mixture.test_split_size=0")
    with pytest.raises(sweep_space.SweepConfigError, match="needs held-out data"):
        sweep_space.base_overrides([], cfg)
    # `loss` is reported every logging step: nothing to add.
    cfg = compose("sweep=lr", "sweep.metric=loss", "trainer.eval_steps=null")
    assert sweep_space.base_overrides(["sweep=lr", "trainer.eval_steps=null", "storage.name=x"], cfg) == (["trainer.eval_steps=null"], [])


@pytest.mark.parametrize("value", [1e-7, 3.0e-4, 16, True, None, "lora", "s3://bucket/runs", "a path/with space", [8, 16], "null"])
def test_sampled_values_become_overrides_that_parse_back(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (parsed,) = OverridesParser.create().parse_overrides([f"+x={sweep_space.hydra_value(value)}"])
    assert parsed.value() == value


def _fake_best(tmp_path: Path, overrides: list[str]) -> Path:
    cfg = compose("sweep=lr", *overrides)
    row = {"trial": "abc_00001", "status": "done", "steps": 6, "eval_loss": 1.5, "trainer.learning_rate": 3e-3, "run": "r"}
    best = overrides + sweep_space.trial_overrides({"trainer.learning_rate": 3e-3})
    sweep_results.write_best(cfg.sweep, SweepDir(str(tmp_path.parent), tmp_path.name), row, best, config_dir=None, config_name="config")
    return tmp_path


def test_best_files_reload_through_compose_and_the_cli(tmp_path, capsys):
    base = ["model=smollm2_135m", "data.dataset_mixture.datasets.0.weight=0.5", "+trainer.trl_overrides.optim=adafactor"]
    sweep_dir = _fake_best(tmp_path, base)
    lines = (sweep_dir / "best_overrides.txt").read_text().split()
    assert lines == [*base, "trainer.learning_rate=0.003"]
    from_overrides = cli_compose(lines)
    from_yaml = cli_compose([], config_dir=str(sweep_dir), config_name="best")
    assert from_overrides == from_yaml  # every field, the whole typed tree
    assert from_yaml.trainer.learning_rate == 3e-3 and from_yaml.model.name_or_path == "HuggingFaceTB/SmolLM2-135M"
    assert from_yaml.trainer.trl_overrides == {"optim": "adafactor"} and from_yaml.sweep is None
    assert from_yaml.data.eos_token == "<|im_end|>"  # written as is: a special token is no secret
    # More overrides on top of best.yaml, as on the command line.
    assert cli_compose(["trainer.max_steps=7"], config_dir=str(sweep_dir), config_name="best").trainer.max_steps == 7
    # The command itself accepts it (`--cfg job` prints the composed config instead of training).
    assert main(["--config-dir", str(sweep_dir), "--config-name", "best", "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["learning_rate"] == 3e-3


# ----------------------------------------------------------------------------- a sweep on Ray


class InterruptAfterFirstTrial(TuneCallback):
    """Presses Ctrl-C once, when the first trial has finished: Tune saves its state and stops."""

    fired = False

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not InterruptAfterFirstTrial.fired:
            InterruptAfterFirstTrial.fired = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_early_stops_resumes_after_an_interruption_and_its_best_config_reproduces(ray_cluster, tmp_path,
                                                                                       monkeypatch):
    """3 trials of 6 steps (a grid over learning rates, 1e-7 the hopeless one, run last), ASHA on the
    per-step loss. The sweep is interrupted after its first trial and resumed by the same call; a hub
    token given on its command line is found in none of its files.
    (One sweep for all: each trial is a full raysft run, ~1.5 min on a loaded 2-core box.)"""
    planted = "hf_plantedSweepToken0123456789"
    monkeypatch.delenv("HF_TOKEN", raising=False)  # the sweep moves the token there; restored afterwards
    overrides = [f"storage.path={tmp_path}", "sweep=lr", "sweep.name=asha", _grid(3e-3, 1e-2, 1e-7),
                 "sweep.metric=loss", "sweep.num_samples=1", "sweep.scheduler.grace_period=1",
                 "sweep.scheduler.reduction_factor=2", "trainer.max_steps=6",
                 f"+trainer.trl_overrides.hub_token={planted}", *TINY]
    sweep_dir = tmp_path / "asha"

    # Interrupted (Ctrl-C) once the first trial has finished.
    sweeps.run(overrides, callbacks=[InterruptAfterFirstTrial()])
    (first,) = [r for r in _rows(sweep_dir) if r["status"] == "done"]
    assert float(first["trainer.learning_rate"]) == 3e-3 and int(first["steps"]) == 6
    assert len(list(tmp_path.glob("asha-trial-*"))) <= 2  # at most the next trial had started
    metrics = Path(first["run"]) / "metrics.jsonl"
    before = (metrics.read_bytes(), metrics.stat().st_mtime_ns)

    # The same call again resumes the sweep: the finished trial is not run again.
    result = sweeps.run(overrides)
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before
    assert len(list(tmp_path.glob("asha-trial-*"))) == 3

    rows = {float(r["trainer.learning_rate"]): r for r in _rows(sweep_dir)}
    assert sorted(rows) == [1e-7, 3e-3, 1e-2]
    assert rows[1e-7]["status"] == "stopped early" and int(rows[1e-7]["steps"]) < 6, rows[1e-7]
    for r in rows.values():  # each trial is a raysft run of its own, next to the sweep
        assert Path(r["run"]).name == f"asha-trial-{r['trial']}" and (Path(r["run"]) / "metrics.jsonl").exists()
        assert (Path(r["run"]) / "train_summary.json").exists() == (r["status"] == "done")
        assert r["status"] in ("done", "stopped early") and (r["status"] == "done") == (int(r["steps"]) == 6)
    assert (sweep_dir / "trials.png").stat().st_size > 1000
    # The trials differ only in the learning rate: they all read one prepared data set.
    assert len(list((tmp_path / "prepared").iterdir())) == 1

    best = result.best
    assert best["status"] == "done" and best["trainer.learning_rate"] != 1e-7
    assert best["loss"] == min(float(r["loss"]) for r in rows.values() if r["status"] == "done")
    # The best trial's config, reloaded both ways, is the config that trial ran with.
    trial_cfg = yaml.safe_load((Path(best["run"]) / "config.yaml").read_text())
    assert trial_cfg.pop("derived")["run_name"] == Path(best["run"]).name  # derived values, recorded apart
    assert trial_cfg["trainer"]["learning_rate"] == best["trainer.learning_rate"]
    for cfg in (cli_compose((sweep_dir / "best_overrides.txt").read_text().split()),
                cli_compose([], config_dir=str(sweep_dir), config_name="best")):
        plain = to_plain(cfg)
        plain["storage"]["name"], plain["data"]["date"] = trial_cfg["storage"]["name"], trial_cfg["data"]["date"]
        assert plain == trial_cfg

    # Another sweep under the same name is refused rather than mixed into this one.
    assert json.loads((sweep_dir / SweepDir.SPEC).read_text())["base_overrides"][-1] == TINY[-1]
    with pytest.raises(sweep_space.SweepConfigError, match="already exists"):
        sweeps.run([*overrides, "trainer.max_steps=3"])

    # The hub token: in the trials' environment, in no file of the sweep, its trials or Tune's state.
    assert os.environ["HF_TOKEN"] == planted
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and planted.encode() in p.read_bytes()]
    assert not leaks, leaks
