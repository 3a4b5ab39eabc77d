"""Training end to end on a local Ray cluster (2 CPU workers): the default job (DDP), export. The
ZeRO-3 and LoRA runs are the shrunk handbook recipe files of test_recipe_file (check_lora_run here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose

from raysft.run import driver
from raysft.commands.export import export

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _run(tmp_path: Path, *overrides: str):
    cfg = compose(f"storage.path={tmp_path}", "storage.name=run", *overrides)
    result = driver.run(cfg)
    run_dir = tmp_path / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    workers = [json.loads(p.read_text()) for p in sorted((run_dir / "workers").glob("rank_*.json"))]
    return result, run_dir, metrics, workers


def _losses(metrics):
    return [m["loss"] for m in metrics if "loss" in m and "eval_loss" not in m]


def _expected_lrs(steps: int, lr: float) -> list[float]:
    """The learning rate each step trains with, from transformers' scheduler, built independently."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    warmup = TrainingArguments(output_dir="unused", warmup_steps=0.03, use_cpu=True, report_to=[]).get_warmup_steps(steps)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=warmup, num_training_steps=steps,
                          scheduler_specific_kwargs={"min_lr_rate": 0.1})
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def _generate(model_dir: Path, tokenizer) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
    return tokenizer.decode(out[0])


def test_default_run_trains_saves_and_reports(clean_run, tmp_path, tokenizer):
    # 6 steps, 2 micro-batches each, eval and samples every 3 steps, checkpoints every 2 (conftest.CLEAN_RUN).
    result, run_dir = clean_run
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    workers = [json.loads(p.read_text()) for p in sorted((run_dir / "workers").glob("rank_*.json"))]
    losses = _losses(metrics)
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses  # the loss goes down

    # The LR schedule is HF's own on the step count: cosine_with_min_lr, warmup_ratio 0.03.
    assert [m["learning_rate"] for m in metrics if "learning_rate" in m] == pytest.approx(_expected_lrs(6, 3e-3))

    step = next(m for m in metrics if m.get("global_step") == 4 and "loss" in m)
    for key in ("loss", "learning_rate", "grad_norm", "num_tokens", "mean_token_accuracy", "entropy", "epoch",
                "global_step", "tokens_per_s", "tokens_per_s_per_device"):
        assert key in step, key
    # Per-source losses: a step reports the sources its batch held; over the run, every source.
    for source in ("gsm8k_think", "glaive_toolcall_en_demo_no_think"):
        assert any(f"loss/{source}" in m for m in metrics), source
    assert any("eval_loss" in m for m in metrics)
    samples = [m for m in metrics if m.get("event") == "samples"]
    assert {m["global_step"] for m in samples} >= {3, 6} and samples[0]["samples"][0]["prompt"] == "What is 12 + 30?"

    # Each worker took exactly the rows its steps needed (6 steps x 2 micro-batches x 1 row), no more.
    assert [w["rows_consumed"] for w in workers] == [12, 12]
    assert {w["wrapped_model"] for w in workers} == {"DistributedDataParallel"}

    _generate(run_dir / "model", tokenizer)
    exported = export(str(run_dir), str(tmp_path / "exported"))
    assert (exported / "model.safetensors").exists() and "Composed config" in (exported / "README.md").read_text()
    _generate(exported, tokenizer)
    assert (run_dir / "loss.png").stat().st_size > 1000 and json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    saved = (run_dir / "config.yaml").read_text()
    assert "date: '20" in saved or "date: 20" in saved  # the pinned template date is recorded
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["train_packed_rows"] == result.stats.train_packed_rows > 0


def check_lora_run(run_dir: Path, cfg, tmp_path: Path, tokenizer) -> None:
    """A LoRA run (test_recipe_file's shrunk QLoRA handbook file: on a random init the base stays
    fp32) saved only its trained adapter; export refuses it without --merge and with it writes the
    base plus B @ A x alpha / r, layer by layer, which generates and scores as base + adapter does."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from raysft.cli import main
    from raysft.train import model as models

    files = {p.name for p in (run_dir / "model").iterdir()}
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert "model.safetensors" not in files
    with pytest.raises(SystemExit, match="--merge"):
        export(str(run_dir), str(tmp_path / "no-merge"))
    assert main(["export", str(run_dir), str(tmp_path / "merged"), "--merge"]) == 0
    _generate(tmp_path / "merged", tokenizer)

    base = models.build_model(cfg.model, models.resolve_accel(cfg.model, bf16=False), seed=cfg.trainer.seed)
    base_w = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged_w = load_file(tmp_path / "merged" / "model.safetensors")
    adapter = load_file(run_dir / "model" / "adapter_model.safetensors")
    scale = cfg.peft.lora_alpha / cfg.peft.r
    deltas = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        assert b.abs().max() > 0, f"{key}: lora_B is still its zero init (the adapter did not train)"
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        delta = (b @ a) * scale
        torch.testing.assert_close(merged_w[name], base_w[name] + delta, atol=1e-6, rtol=0, msg=name)
        assert (merged_w[name] - base_w[name]).abs().max() > 10 * 1e-6, name  # the merge is not a no-op
        deltas += 1
    targets = None if isinstance(cfg.peft.target_modules, str) else set(cfg.peft.target_modules)  # or all-linear
    if targets:  # every targeted layer got an adapter, and the merge wrote it
        assert deltas == sum(1 for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in targets) > 0
    assert deltas > 0
    peft_model = PeftModel.from_pretrained(base, run_dir / "model").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[9906, 1917, 11, 1268]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_export_of_a_run_without_its_final_model_takes_the_newest_checkpoint(clean_run, tmp_path, capsys):
    """A run that stopped before its final save exports its newest complete checkpoint (and says so);
    a source that does not exist is one line and leaves no partial output."""
    import shutil

    from raysft.cli import main

    _, clean = clean_run
    stopped = tmp_path / "stopped"
    shutil.copytree(clean, stopped, ignore=shutil.ignore_patterns("model"))
    assert main(["export", str(stopped), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "has no final model" in out and "newest complete checkpoint" in out and "step 6" in out
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer_config.json").exists()

    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raysft: error: ") and "does not exist" in err[0]
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2-*"))
