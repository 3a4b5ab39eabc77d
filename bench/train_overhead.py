"""Ray overhead of training: the same tiny model, packed rows and steps run
(a) by plain TRL SFTTrainer in this process and (b) through raysft on local Ray with 1 worker,
then (c) raysft with 2 workers, and prints step times and ratios. Not a test: numbers only.

    python bench/train_overhead.py [--steps 30] [--warmup 5]

Plain TRL gets the same packed rows (from raysft's own data pipeline, so both train on identical
inputs) as a ``datasets.Dataset`` and uses the same loss path as raysft's CPU workers (see
``RaySFTTrainer._compute_loss_unfused``), so the ratio isolates what Ray adds: data streaming, the
worker process, reporting. Step time = median wall time between consecutive optimizer steps after
warm-up, read from each run's per-step timestamps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def step_times(times: list[float], warmup: int) -> float:
    deltas = [b - a for a, b in zip(times, times[1:])][warmup:]
    return statistics.median(deltas)


def plain_trl(cfg, rows: list[dict], steps: int) -> list[float]:
    import datasets
    import torch
    from transformers import TrainerCallback

    from raysft.train import model as models
    import numpy as np
    from torch.utils.data import IterableDataset

    from raysft.train.trainer import RaySFTTrainer, as_model_batch
    from raysft.train.worker import build_sft_args

    torch.set_num_threads(1)
    accel = models.resolve_accel(cfg.model, bf16=False)
    net = models.build_model(cfg.model, accel, seed=cfg.trainer.seed)
    tok = models.load_tokenizer(cfg.model)

    batch_size = cfg.trainer.per_device_train_batch_size

    class ListBatches(IterableDataset):  # the same micro-batches a raysft worker trains on, from memory
        def __iter__(self):
            while True:
                for i in range(0, len(rows) - batch_size + 1, batch_size):
                    chunk = rows[i:i + batch_size]
                    yield as_model_batch({k: np.stack([np.asarray(r[k]) for r in chunk])
                                          for k in ("input_ids", "labels", "position_ids", "source_ids")})

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    out = tempfile.mkdtemp()
    cfg.trainer.trl_overrides = {"ddp_backend": None}  # one process: no process group to join
    args = build_sft_args(cfg, output_dir=out, max_steps=steps, has_eval=False, bf16=False, rank=0)
    args.use_cpu, args.report_to = True, []
    placeholder = datasets.IterableDataset.from_generator(lambda: iter([{"input_ids": [0], "labels": [0]}]))
    trainer = RaySFTTrainer(model=net, args=args, train_dataset=placeholder, processing_class=tok, callbacks=[Clock()],
                            train_batches=ListBatches(),
                            eval_batches=None, source_names=["a", "b"])
    trainer.train()
    return times


def raysft_run(overrides: list[str], steps: int) -> list[float]:
    from raysft.config import compose
    from raysft.run import driver

    tmp = tempfile.mkdtemp()
    cfg = compose([*overrides, f"trainer.max_steps={steps}", f"storage.path={tmp}", "storage.name=b",
                   "trainer.eval_steps=null", "monitor.sample_prompts=[]", "trainer.logging_steps=1"])
    driver.run(cfg)
    metrics = [json.loads(l) for l in open(os.path.join(tmp, "b", "metrics.jsonl"))]
    return [m["time_s"] for m in metrics if "loss" in m]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from raysft.config import compose, derived
    from raysft.data.pipeline import build_dataset
    from raysft.run import driver

    base = ["data.dataset_mixture.datasets.0.weight=0.2", "data.dataset_mixture.datasets.1.weight=0.3"]
    cfg = compose(base)
    driver.init_ray(cfg)
    spec, _ = driver.prepare_data(cfg)
    rows = list(build_dataset(spec, "train", **derived.data_resources(cfg.scaling)).iter_rows())
    rows = [{k: list(map(int, r[k])) for k in ("input_ids", "labels", "position_ids", "source_ids")} for r in rows]

    t_plain = step_times(plain_trl(cfg, rows, a.steps), a.warmup)
    t_one = step_times(raysft_run([*base, "scaling.num_workers=1"], a.steps), a.warmup)
    t_two = step_times(raysft_run(base, a.steps), a.warmup)
    tokens = cfg.trainer.per_device_train_batch_size * cfg.data.max_length
    print(f"\n{'run':<28}{'s/step':>10}{'tokens/s':>12}")
    print(f"{'plain TRL, 1 process':<28}{t_plain:>10.3f}{tokens / t_plain:>12.0f}")
    print(f"{'raysft, 1 Ray worker':<28}{t_one:>10.3f}{tokens / t_one:>12.0f}")
    print(f"{'raysft, 2 Ray workers':<28}{t_two:>10.3f}{2 * tokens / t_two:>12.0f}")
    print(f"ratio raysft(1 worker) / plain TRL step time: {t_one / t_plain:.3f}  (goal <= 1.05)")
    print(f"ratio throughput 2 workers / 1 worker: {(2 * tokens / t_two) / (tokens / t_one):.3f}")


if __name__ == "__main__":
    main()
