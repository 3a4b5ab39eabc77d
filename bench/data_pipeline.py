"""Benchmark: raysft's data pipeline vs TRL's own dataset preparation, on the smoltalk2-mini SFT splits.

    python bench/data_pipeline.py [--lengths 4096 16384] [--rss-factor 10] [--cpus 2]

One process, both pipelines on the same rows and the same number of CPU cores:

(a) ours: local Ray (``num_cpus=--cpus``), ``build_dataset(spec, "train")`` with ``--cpus`` PrepareUnit
    actors of 1 CPU each, every packed row pulled to the driver (the pass ``collect_stats`` makes,
    but shipping the packed rows). Timed from the first pull (actor start-up included, Ray
    start-up excluded) to the last row.
(b) TRL: a ``datasets.Dataset`` of the same selected rows (messages + chat_template_kwargs, built
    before the clock starts), prepared by ``SFTTrainer._prepare_dataset`` exactly as SFTTrainer's
    constructor calls it, with SFTConfig(assistant_only_loss=True, max_length=L, packing=True,
    packing_strategy="bfd") and the same SmolLM3 SFT chat template set on the tokenizer; run with
    ``dataset_num_proc=--cpus`` (same cores as ours: the ``ratio`` line) and ``dataset_num_proc=None``
    (TRL's default: one process).

tokens/s = non-pad tokens in the packed rows / wall time. Peak RSS is sampled with psutil every
0.2 s: the driver process, and the worker processes (our PrepareUnit actors; TRL's ``num_proc``
pool), summed at each sample. CPU s = user+sys of the driver plus those workers (less sensitive to
other load on the machine than wall time). Then the RSS check: our pipeline on the input
replicated ``--rss-factor`` times (weight = factor on every source: raysft's weight > 1
repetition) vs weight 1.0.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

MINI = os.environ.get("RAYSFT_SMOLTALK2_MINI", str(ROOT.parent / "shared" / "data" / "smoltalk2-mini"))
MB = 1 << 20


# ----------------------------------------------------------------------------- measuring


class Sampler(threading.Thread):
    """Peak RSS of this process and of selected descendant processes; their last-seen CPU time."""

    def __init__(self, select, interval: float = 0.2):
        super().__init__(daemon=True)
        self.select, self.interval = select, interval
        self.me = psutil.Process()
        self.base_driver = self.me.memory_info().rss
        self.peak_driver = self.peak_workers = self.peak_total = self.peak_single = 0
        self.worker_cpu: dict[int, float] = {}
        self.worker_pids: set[int] = set()
        self._halt = threading.Event()

    def sample(self) -> None:
        drv = self.me.memory_info().rss
        workers = 0
        for p in self.me.children(recursive=True):
            try:
                # not cached: Ray turns an idle worker process (ray::IDLE) into an actor in place
                if not self.select(" ".join(p.cmdline())):
                    continue
                rss = p.memory_info().rss
                t = p.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.worker_pids.add(p.pid)
            self.worker_cpu[p.pid] = t.user + t.system
            workers += rss
            self.peak_single = max(self.peak_single, rss)
        self.peak_driver = max(self.peak_driver, drv)
        self.peak_workers = max(self.peak_workers, workers)
        self.peak_total = max(self.peak_total, drv + workers)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def is_prepare_actor(cmd: str) -> bool:
    return "PrepareUnit" in cmd


def is_not_ray(cmd: str) -> bool:
    return "ray" not in cmd.lower()


# ----------------------------------------------------------------------------- configs


def compose_cfg(max_length: int, weight: float | None = None, window_rows: int | None = None):
    from raysft.config import compose

    ov = ["data=smoltalk2_sft_mini", f"data.root={MINI}", f"data.max_length={max_length}"]
    if window_rows:
        ov.append(f"data.window_rows={window_rows}")
    if weight is not None:
        ov += [f"data.dataset_mixture.datasets.{i}.weight={weight}" for i in range(5)]
    return compose(ov)


def make_spec(cfg):
    from raysft.data.pipeline import build_spec
    from raysft.train.model import tokenizer_path

    return build_spec(cfg.data, tokenizer_path(cfg.model))


# ----------------------------------------------------------------------------- (a) ours


def run_ours(cfg, cpus: int) -> dict:
    from raysft.data.pipeline import build_dataset

    spec = make_spec(cfg)
    units = len(spec.unit_plan().units("train"))
    ds = build_dataset(spec, "train", "rows", data_cpus=1.0, concurrency=cpus)
    sampler = Sampler(is_prepare_actor)
    sampler.start()
    c0, t0 = cpu_self(), time.perf_counter()
    first = None
    rows = tokens = trained = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if first is None:
            first = time.perf_counter() - t0
        src = batch["source_ids"]
        rows += len(src)
        tokens += int(np.count_nonzero(src >= 0))
        trained += int(np.count_nonzero(batch["labels"] != -100))
    wall = time.perf_counter() - t0
    sampler.stop()
    L = cfg.data.max_length
    return {"selected": spec.plan.num_train, "units": units, "rows": rows, "tokens": tokens, "trained": trained,
            "wall": wall, "first": first or 0.0, "tok_s": tokens / wall, "eff": tokens / max(1, rows * L),
            "cpu": cpu_self() - c0 + sum(sampler.worker_cpu.values()), "workers": len(sampler.worker_pids),
            "rss_driver": sampler.peak_driver, "rss_growth": sampler.peak_driver - sampler.base_driver, "rss_workers": sampler.peak_workers,
            "rss_single": sampler.peak_single, "rss_total": sampler.peak_total}


def run_inprocess(cfg) -> dict:
    """The same work without Ray: one PrepareUnit in this process (one core), start-up excluded."""
    from raysft.data.pipeline import PrepareUnit

    spec = make_spec(cfg)
    pu = PrepareUnit(spec)
    sampler = Sampler(lambda cmd: False)
    sampler.start()
    L = cfg.data.max_length
    c0, t0 = cpu_self(), time.perf_counter()
    rows = tokens = trained = 0
    for unit in spec.unit_plan().units("train"):
        cols, _ = pu.prepare(unit)
        rows += len(cols["input_ids"])
        tokens += int(np.sum(cols["num_tokens"])) if len(cols["input_ids"]) else 0
        trained += int(np.count_nonzero(cols["labels"] != -100)) if len(cols["input_ids"]) else 0
    wall = time.perf_counter() - t0
    sampler.stop()
    return {"selected": spec.plan.num_train, "rows": rows, "tokens": tokens, "trained": trained, "wall": wall,
            "tok_s": tokens / wall, "eff": tokens / max(1, rows * L), "cpu": cpu_self() - c0, "workers": 0,
            "rss_driver": sampler.peak_driver, "rss_growth": sampler.peak_driver - sampler.base_driver,
            "rss_workers": 0, "rss_single": 0, "rss_total": sampler.peak_total}


# ----------------------------------------------------------------------------- (b) TRL


def selected_rows(spec) -> list[dict]:
    """The train rows of the mixture plan, in plan order: {messages, chat_template_kwargs}."""
    import pyarrow.parquet as pq

    out: list[dict | None] = [None] * spec.plan.num_train
    src_all, row_all = spec.plan.train_source, spec.plan.train_row
    for s, source in enumerate(spec.sources):
        pos_s = np.flatnonzero(src_all == s)
        for f, local, where in source.locate(row_all[pos_s]):
            table = pq.read_table(f.path, columns=["messages", "chat_template_kwargs"])
            for p, r in zip(pos_s[where], table.take(local).to_pylist()):
                out[int(p)] = r
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


class TRL:
    def __init__(self, cfg):
        from transformers import AutoTokenizer
        from trl import SFTConfig, SFTTrainer
        from datasets import Dataset

        from raysft import assets
        from raysft.train.model import build_model, resolve_accel, tokenizer_path

        self.tmp = tempfile.mkdtemp(prefix="bench-trl-")
        self.tok = AutoTokenizer.from_pretrained(tokenizer_path(cfg.model))
        self.tok.chat_template = (ROOT / "raysft/assets/templates/sft_chat_template.jinja").read_text()
        assert self.tok.chat_template == assets.load_chat_template(cfg.data.chat_template)
        model = build_model(cfg.model, resolve_accel(cfg.model, bf16=False))
        self.SFTConfig = SFTConfig
        args = self.args(cfg.data.max_length, None)
        small = Dataset.from_list(selected_rows(make_spec(cfg))[:8])
        # A real trainer (its constructor prepares the 8-row set): _prepare_dataset then runs with
        # exactly the state SFTTrainer gives it (chat_template, completion_only_loss, tokenizer).
        self.trainer = SFTTrainer(model=model, args=args, train_dataset=small, processing_class=self.tok)

    def args(self, max_length: int, num_proc: int | None):
        return self.SFTConfig(output_dir=self.tmp, report_to="none", bf16=False, use_cpu=True,
                              gradient_checkpointing=False, assistant_only_loss=True, max_length=max_length,
                              packing=True, packing_strategy="bfd", dataset_num_proc=num_proc)

    def run(self, dataset, max_length: int, num_proc: int | None) -> dict:
        import pyarrow.compute as pc

        args = self.args(max_length, num_proc)
        sampler = Sampler(is_not_ray)
        sampler.start()
        c0, ch0, t0 = cpu_self(), cpu_children(), time.perf_counter()
        packed = self.trainer._prepare_dataset(dataset, self.tok, args, True, None, "train")
        wall = time.perf_counter() - t0
        sampler.stop()
        cpu = cpu_self() - c0 + max(cpu_children() - ch0, sum(sampler.worker_cpu.values()))
        ids = packed.data.column("input_ids")
        tokens = int(pc.sum(pc.list_value_length(ids)).as_py())
        labels = pc.list_flatten(packed.data.column("labels"))
        trained = int(pc.sum(pc.not_equal(labels, -100)).as_py())
        rows = len(packed)
        return {"selected": len(dataset), "rows": rows, "tokens": tokens, "trained": trained, "wall": wall,
                "tok_s": tokens / wall, "eff": tokens / max(1, rows * max_length), "cpu": cpu,
                "workers": len(sampler.worker_pids), "rss_driver": sampler.peak_driver,
                "rss_growth": sampler.peak_driver - sampler.base_driver,
                "rss_workers": sampler.peak_workers, "rss_single": sampler.peak_single, "rss_total": sampler.peak_total}


# ----------------------------------------------------------------------------- report


def fmt_row(name: str, r: dict) -> str:
    return (f"{name:<22} {r['selected']:>8,} {r['rows']:>7,} {r['tokens']:>11,} {r['trained']:>10,} {r['wall']:>7.1f} "
            f"{r['tok_s']:>10,.0f} {r['tokens'] / max(r['cpu'], 1e-9):>10,.0f} {r['eff']:>6.1%} "
            f"{r['rss_driver'] / MB:>8,.0f} {r['rss_growth'] / MB:>8,.0f} {r['rss_workers'] / MB:>8,.0f} {r['rss_total'] / MB:>8,.0f}")


HEADER = (f"{'pipeline':<22} {'selected':>8} {'rows':>7} {'tokens':>11} {'trained':>10} {'wall s':>7} "
          f"{'tok/s':>10} {'tok/cpu-s':>10} {'effic':>6} {'drv MB':>8} {'drv +MB':>8} {'wrk MB':>8} {'sum MB':>8}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--rss-factor", type=float, default=10.0)
    ap.add_argument("--window-rows", type=int, default=None, help="data.window_rows (default: the config's)")
    args = ap.parse_args()
    if not Path(MINI, "SFT").is_dir():
        print(f"smoltalk2-mini not found at {MINI} (set RAYSFT_SMOLTALK2_MINI)")
        return 1

    import logging

    import datasets
    import ray
    import ray.data

    logging.getLogger("ray").setLevel(logging.WARNING)
    datasets.disable_caching()
    datasets.disable_progress_bars()
    print(f"machine: {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f}; "
          f"both pipelines get {args.cpus} CPU(s)")
    cfgs = {L: compose_cfg(L, window_rows=args.window_rows) for L in args.lengths}
    cfg0 = cfgs[args.lengths[0]]
    print(f"data: data=smoltalk2_sft_mini ({MINI}), window_rows {cfg0.data.window_rows}, "
          f"loss {cfg0.data.loss}, template {cfg0.data.chat_template}, packing {cfg0.data.packing_strategy}")

    def start_ray() -> None:
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=1 << 30, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"  ray.init: {time.perf_counter() - t:.1f} s (excluded from every number)", flush=True)

    # TRL's num_proc pool forks this process, which must not happen while it is a Ray driver: per
    # length, TRL runs first, then Ray starts for ours and stops again (keeps the runs close in time).
    trl = TRL(cfg0)
    ours, trl_res, inproc = {}, {}, {}
    for L in args.lengths:
        rows = selected_rows(make_spec(cfgs[L]))
        t = time.perf_counter()
        dataset = datasets.Dataset.from_list(rows)
        print(f"L={L}: TRL input Dataset.from_list of {len(rows):,} rows: {time.perf_counter() - t:.2f} s (not timed)",
              flush=True)
        for np_ in (args.cpus, None):
            trl_res[(L, np_)] = trl.run(dataset, L, np_)
            print(f"  TRL num_proc={np_}: {trl_res[(L, np_)]['wall']:.1f} s", flush=True)
        inproc[L] = run_inprocess(cfgs[L])
        print(f"  raysft in-process: {inproc[L]['wall']:.1f} s", flush=True)
        start_ray()
        ours[L] = r = run_ours(cfgs[L], args.cpus)
        print(f"  raysft on Ray: {r['units']} units, {r['workers']} actor processes, first packed block after "
              f"{r['first']:.1f} s, done in {r['wall']:.1f} s", flush=True)
        ray.shutdown()

    rss = {}
    L0 = args.lengths[0]
    print(f"RSS check at L={L0}:")
    start_ray()
    for label, w in (("1x", 1.0), (f"{args.rss_factor:g}x", args.rss_factor)):
        rss[label] = run_ours(compose_cfg(L0, weight=w, window_rows=args.window_rows), args.cpus)
        print(f"  raysft weight {w:g} ({label}): {rss[label]['selected']:,} rows, {rss[label]['units']} units in "
              f"{rss[label]['wall']:.1f} s", flush=True)
    ray.shutdown()

    print(f"\nload average at end {os.getloadavg()[0]:.1f} (the machine is shared: wall-clock numbers are noisy; "
          f"tok/cpu-s is the steadier comparison)")
    print("tokens = non-pad tokens in the packed rows; drv/wrk/sum MB = peak RSS of the driver, of the worker "
          "processes together (our PrepareUnit actors / TRL's num_proc pool), and of both at one sample;\n"
          "drv +MB = the driver's growth during that pass (its baseline holds the TRL trainer, model and "
          "tokenizer loaded once). Forked TRL workers share pages with the driver, so their RSS overcounts.\n")
    for L in args.lengths:
        print(f"max_length {L}")
        print("  " + HEADER)
        print("  " + fmt_row(f"raysft ({args.cpus} actors)", ours[L]))
        print("  " + fmt_row(f"TRL num_proc={args.cpus}", trl_res[(L, args.cpus)]))
        print("  " + fmt_row("TRL num_proc=None", trl_res[(L, None)]))
        print("  " + fmt_row("raysft in-process 1cpu", inproc[L]))
        o, t2, t1 = ours[L], trl_res[(L, args.cpus)], trl_res[(L, None)]
        print(f"  ratio L={L}: tokens/s ours/TRL = {o['tok_s'] / t2['tok_s']:.2f}x (same {args.cpus} cores), "
              f"{o['tok_s'] / t1['tok_s']:.2f}x vs TRL num_proc=None; "
              f"tokens/cpu-s ours/TRL = {(o['tokens'] / o['cpu']) / (t2['tokens'] / t2['cpu']):.2f}x; "
              f"packing efficiency ours {o['eff']:.1%} vs TRL {t2['eff']:.1%}")
        i1 = inproc[L]
        print(f"  ratio L={L} (no Ray, 1 core each, start-up excluded): tokens/cpu-s raysft in-process / TRL num_proc=None "
              f"= {(i1['tokens'] / i1['cpu']) / (t1['tokens'] / t1['cpu']):.2f}x")
        print()
    a, b = rss["1x"], rss[f"{args.rss_factor:g}x"]
    print(f"RSS check (ours, max_length {L0}): input x{args.rss_factor:g} via source weight {args.rss_factor:g}")
    print("  " + HEADER)
    print("  " + fmt_row("raysft weight 1.0", a))
    print("  " + fmt_row(f"raysft weight {args.rss_factor:g}", b))
    print(f"  ratio rss {args.rss_factor:g}x/1x: driver {b['rss_driver'] / a['rss_driver']:.2f}x "
          f"(growth {a['rss_growth'] / MB:,.0f} -> {b['rss_growth'] / MB:,.0f} MB), "
          f"per actor (max) {b['rss_single'] / a['rss_single']:.2f}x "
          f"({a['rss_single'] / MB:,.0f} -> {b['rss_single'] / MB:,.0f} MB), "
          f"driver+actors {b['rss_total'] / a['rss_total']:.2f}x; rows {b['selected'] / a['selected']:.2f}x, "
          f"tokens {b['tokens'] / a['tokens']:.2f}x")
    print(f"process ru_maxrss (lifetime, this process only): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
