"""Benchmark: prepare once (``raysft/data/prepared.py``) against tokenising on every pass.

    python bench/prepare.py [--weight 9] [--max-length 4096] [--cpus 2] [--parts abcdef]

One process, local Ray with ``--cpus`` logical CPUs, the smoltalk2-mini SFT splits with every source
weight set to ``--weight`` (weight > 1 repeats a source: >= 10M tokens at the default), side by side:

(a) the data phase of a first run (prepare: tokenise, pack, write shards) vs a second run of the
    same config (the set is found by its fingerprint and reused);
(b) tokenisation CPU-seconds for a 3-epoch run: before this change a run made a stats pass and then
    tokenised every epoch again (4 passes through the same pipeline, measured here as 1 stats pass
    + 3 row passes); now it prepares once;
(c) a 4-trial learning-rate sweep: the data phase of each trial (the first prepares, the others reuse);
(d) prepare tokens/s against a TRL-style baseline on the same cores (``SFTTrainer._prepare_dataset``
    with ``dataset_num_proc=--cpus``: datasets.map + pack; from bench/data_pipeline.py);
(e) peak RSS of the driver and the data actors preparing 1x vs 5x the input (flat = bounded memory),
    each in a fresh process of its own (``--rss-probe``), so nothing else this script did counts;
(f) what a training worker waits for data per micro-batch reading the set directly: one synchronous
    read, and the wait left with read-ahead behind a simulated 0.5 s step.

CPU s = user+sys of this process and of the PrepareUnit actors (psutil), less sensitive to other
load on the machine than wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import MB, TRL, Sampler, compose_cfg, cpu_self, is_prepare_actor, make_spec, selected_rows  # noqa: E402

import numpy as np  # noqa: E402


def data_kw(cfg) -> dict:
    from raysft.config import derived

    return derived.data_resources(cfg.scaling)


def timed(fn) -> tuple[object, dict]:
    sampler = Sampler(is_prepare_actor)
    sampler.start()
    c0, t0 = cpu_self(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    sampler.stop()
    return out, {"wall": wall, "cpu": cpu_self() - c0 + sum(sampler.worker_cpu.values()),
                 "rss_driver": sampler.peak_driver, "rss_workers": sampler.peak_workers, "rss_single": sampler.peak_single}


def prepare_in(root: str, cfg, spec):
    from raysft.data.prepared import prepare
    from raysft.storage.rundir import Storage

    return prepare(spec, Storage.at(root), **data_kw(cfg))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weight", type=float, default=9.0)  # >= 10M packed tokens at --max-length 4096
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--parts", default="abcdef", help="which of (a)-(f) to run, e.g. 'ad' ((a) always runs: the others use it)")
    ap.add_argument("--rss-probe", action="store_true", help="only prepare once and print its peak RSS as JSON (for (e))")
    a = ap.parse_args()

    import ray

    from raysft.data.pipeline import build_dataset, collect_stats

    ray.init(num_cpus=a.cpus, include_dashboard=False, object_store_memory=512 << 20,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = compose_cfg(a.max_length, weight=a.weight)
    cfg.scaling.data_cpus_per_task, cfg.scaling.data_concurrency = 1.0, a.cpus  # every core preparing
    spec = make_spec(cfg)
    work = tempfile.mkdtemp(prefix="bench-prepare-")
    if a.rss_probe:
        prepared, m = timed(lambda: prepare_in(f"{work}/probe", cfg, spec))
        print("RSS " + json.dumps({"tokens": prepared.stats().train_packed_tokens, "wall": m["wall"],
                                   "driver": m["rss_driver"], "single": m["rss_single"], "workers": m["rss_workers"]}))
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
        return 0
    print(f"input: smoltalk2-mini SFT x weight {a.weight}, {spec.plan.num_train:,} train rows, max_length "
          f"{a.max_length}, {a.cpus} CPUs; storage {work}")

    # (a) first run vs second run
    first, m_first = timed(lambda: prepare_in(f"{work}/a", cfg, spec))
    second, m_second = timed(lambda: prepare_in(f"{work}/a", cfg, spec))
    st = first.stats()
    tokens = st.train_packed_tokens
    print(f"\n(a) data phase, first run (prepare): {m_first['wall']:.1f} s wall, {m_first['cpu']:.1f} CPU s, "
          f"{tokens:,} packed tokens ({st.train_packed_rows:,} rows)")
    print(f"    second run, same config (reused={second.reused}): {m_second['wall']:.2f} s wall -> "
          f"{m_first['wall'] / max(m_second['wall'], 1e-9):,.0f}x faster")

    part = a.parts.__contains__

    # (b) 3-epoch run: before (stats pass + 3 tokenised epochs) vs after (prepare once)
    if part("b"):
        def old_three_epochs() -> None:
            collect_stats(spec, **data_kw(cfg))
            for _ in range(3):  # the old stream tokenised and packed each epoch again
                for _ in build_dataset(spec, "train", **data_kw(cfg)).iter_batches(batch_size=None, batch_format="numpy"):
                    pass

        _, m_old = timed(old_three_epochs)
        print(f"\n(b) tokenisation for a 3-epoch run: before {m_old['cpu']:.1f} CPU s ({m_old['wall']:.1f} s wall, "
              f"4 passes); after {m_first['cpu']:.1f} CPU s (1 pass) -> {m_old['cpu'] / m_first['cpu']:.2f}x less CPU")

    # (c) a 4-trial learning-rate sweep: each trial composes its own config and prepares
    if part("c"):
        trials = []
        root = f"{work}/sweep"
        for lr in (1e-5, 3e-5, 1e-4, 3e-4):
            tcfg = compose_cfg(a.max_length, weight=a.weight)
            tcfg.trainer.learning_rate = lr
            tspec = make_spec(tcfg)
            p, m = timed(lambda: prepare_in(root, cfg, tspec))
            trials.append((lr, p.reused, m["wall"]))
        sets = len(list(Path(root, "prepared").iterdir()))
        print(f"\n(c) 4-trial sweep over the learning rate: {sets} prepared set(s); data phase per trial: " +
              ", ".join(f"lr {lr:g}: {'reused' if r else 'prepared'} {w:.1f} s" for lr, r, w in trials))

    # (d) prepare tokens/s vs the TRL-style baseline, same cores
    if part("d"):
        from datasets import Dataset

        trl = TRL(cfg)
        ds = Dataset.from_list(selected_rows(spec))
        base = trl.run(ds, a.max_length, a.cpus)
        ours_tok_s = tokens / m_first["wall"]
        print(f"\n(d) prepare, end to end: ours {ours_tok_s:,.0f} tokens/s ({m_first['wall']:.1f} s, shards written); "
              f"TRL-style datasets.map(num_proc={a.cpus}) + pack {base['tok_s']:,.0f} tokens/s ({base['wall']:.1f} s, "
              f"in memory) -> ratio {ours_tok_s / base['tok_s']:.2f}x (goal >= 1.5x)")

    # (e) RSS with 5x the input, each in a fresh process
    if part("e"):
        def probe(weight: float) -> dict:
            out = subprocess.run([sys.executable, __file__, "--rss-probe", "--weight", str(weight), "--max-length",
                                  str(a.max_length), "--cpus", str(a.cpus)], capture_output=True, text=True, check=True).stdout
            return json.loads(next(x for x in out.splitlines() if x.startswith("RSS "))[4:])

        one, five = probe(a.weight), probe(a.weight * 5)
        print(f"\n(e) peak RSS preparing 1x vs 5x the input ({one['tokens']:,} vs {five['tokens']:,} tokens), each in a fresh "
              f"process: driver {one['driver'] / MB:,.0f} vs {five['driver'] / MB:,.0f} MB "
              f"({five['driver'] / one['driver']:.2f}x), one data actor {one['single'] / MB:,.0f} vs "
              f"{five['single'] / MB:,.0f} MB ({five['single'] / one['single']:.2f}x), actors together "
              f"{one['workers'] / MB:,.0f} vs {five['workers'] / MB:,.0f} MB ({five['workers'] / one['workers']:.2f}x)")

    # (f) data wait per micro-batch when a worker reads the set directly
    if part("f"):
        from raysft.data.shards import RowStream

        rows = first.rows()
        sync = RowStream(rows, rank=0, world=2, batch=1, start=0, seed=42, timeout_s=60)
        t0 = time.perf_counter()
        for k in range(50):
            sync.batch_at(k)
        per_read = (time.perf_counter() - t0) / 50
        waits = []
        it = iter(RowStream(first.rows(), rank=1, world=2, batch=1, start=0, seed=42, timeout_s=60))
        next(it)
        for _ in range(20):
            time.sleep(0.5)  # the step
            t0 = time.perf_counter()
            next(it)
            waits.append(time.perf_counter() - t0)
        print(f"\n(f) a worker reading its micro-batch straight from the set (local disk): {per_read * 1e3:.1f} ms per "
              f"synchronous read; with read-ahead behind a 0.5 s step it waits {np.mean(waits) * 1e3:.2f} ms "
              f"(max {max(waits) * 1e3:.2f} ms) per micro-batch")
    shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
