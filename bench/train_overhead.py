"""Ray overhead of training, like for like: the same tiny model, the same packed rows in the same order,
the same loss path and the same number of intra-op threads, trained (a) by plain TRL ``SFTTrainer``
in this process and (b) through raysft on local Ray with 1 worker; then (c) raysft with 2 workers.
Not a test: numbers only.

    python bench/train_overhead.py [--steps 40] [--warmup 5] [--threads 1]

Both sides record where each step's time goes (``monitor.step_breakdown``, raysft/train/steptimer.py):
waiting for data, forward+backward, the optimizer step, and the rest (callbacks, logging, reporting).
Each column is the median over the steps after warm-up; the ratio line compares step times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARTS = ("step_s", "data_wait_s", "forward_backward_s", "optimizer_s", "other_s")


def medians(records: list[dict], warmup: int) -> dict[str, float]:
    rs = [r for r in records if r["global_step"] > warmup]
    return {k: statistics.median(r[k] for r in rs) for k in PARTS}


def plain_trl(cfg, prepared, steps: int, threads: int) -> list[dict]:
    """The rows a 1-worker raysft run trains on, in its order, fed from memory to the same trainer."""
    import datasets
    import torch
    from torch.utils.data import IterableDataset

    from raysft.data.shards import RowStream
    from raysft.train import model as models
    from raysft.train.batches import as_model_batch
    from raysft.train.steptimer import DataWait, StepTimer
    from raysft.train.trainer import RaySFTTrainer
    from raysft.train.worker import build_sft_args

    torch.set_num_threads(threads)
    stream = RowStream(prepared.rows(), rank=0, world=1, batch=cfg.trainer.per_device_train_batch_size, start=0,
                       seed=cfg.trainer.seed, timeout_s=600)
    batches = [stream.batch_at(k) for k in range(steps * cfg.trainer.gradient_accumulation_steps + 2)]

    class InMemory(IterableDataset):
        def __iter__(self):
            for b in batches:
                yield as_model_batch(b)

    accel = models.resolve_accel(cfg.model, bf16=False)
    net = models.build_model(cfg.model, accel, seed=cfg.trainer.seed)
    tok = models.load_tokenizer(cfg.model)
    args = build_sft_args(cfg, output_dir=tempfile.mkdtemp(), max_steps=steps, has_eval=False, bf16=False)
    args.use_cpu, args.report_to = True, []
    fed = DataWait(InMemory())
    timer = StepTimer(fed, None, 0)
    placeholder = datasets.IterableDataset.from_generator(lambda: iter([{"input_ids": [0], "labels": [0]}]))
    trainer = RaySFTTrainer(model=net, args=args, train_dataset=placeholder, processing_class=tok, callbacks=[timer],
                            train_batches=fed, eval_batches=None, source_names=list(prepared.stats().sources))
    trainer.train()
    return timer.records


def raysft_run(overrides: list[str], steps: int) -> list[dict]:
    from raysft.config import compose
    from raysft.run import driver

    tmp = tempfile.mkdtemp()
    cfg = compose([*overrides, f"trainer.max_steps={steps}", f"storage.path={tmp}", "storage.name=b",
                   "trainer.eval_steps=null", "monitor.sample_prompts=[]", "monitor.step_breakdown=true"])
    driver.run(cfg)
    lines = [json.loads(x) for x in open(os.path.join(tmp, "b", "metrics.jsonl"))]
    return [m for m in lines if m.get("event") == "step_breakdown"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each side (raysft: cpus_per_worker)")
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from raysft.config import compose
    from raysft.run import driver, ray_init

    base = ["data.dataset_mixture.datasets.0.weight=0.2", "data.dataset_mixture.datasets.1.weight=0.3",
            f"scaling.cpus_per_worker={a.threads}", "storage.path=" + tempfile.mkdtemp()]
    cfg = compose(base)
    ray_init.init_ray(cfg)
    _, prepared = driver.prepare_data(cfg)

    rows = {"plain TRL, 1 process": medians(plain_trl(cfg, prepared, a.steps, a.threads), a.warmup),
            "raysft, 1 Ray worker": medians(raysft_run([*base, "scaling.num_workers=1"], a.steps), a.warmup),
            "raysft, 2 Ray workers": medians(raysft_run(base, a.steps), a.warmup)}
    print(f"\n{a.threads} intra-op thread(s) per side; medians over steps {a.warmup + 1}-{a.steps} (seconds)")
    print(f"{'run':<24}" + "".join(f"{k.removesuffix('_s'):>18}" for k in PARTS))
    for name, m in rows.items():
        print(f"{name:<24}" + "".join(f"{m[k]:>18.4f}" for k in PARTS))
    one, plain = rows["raysft, 1 Ray worker"], rows["plain TRL, 1 process"]
    print(f"ratio raysft (1 worker) / plain TRL step time: {one['step_s'] / plain['step_s']:.3f}  (goal <= 1.03)")
    for k in PARTS[1:]:
        print(f"  {k.removesuffix('_s'):<18} {one[k] - plain[k]:+.4f} s/step")


if __name__ == "__main__":
    main()
