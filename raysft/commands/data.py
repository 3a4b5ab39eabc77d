"""Offline ``raysft`` subcommands: look at the data a run would see, without a GPU.

    raysft data preview [--rows N] [--no-color] [overrides...]
        The first N rendered training examples of the first unit, masked tokens marked, then the
        first packed row. Pure modules only: no Ray.
    raysft data stats [--out DIR] [overrides...]
        A full stats pass (local Ray; nothing written but the report), printed per source and
        written to DIR/stats.json and DIR/mixture.png.
    raysft data prepare [overrides...]
        Tokenise and pack the data once into <storage.path>/prepared/<fingerprint>/ (what a run
        does first when no complete set with its fingerprint exists); prints where it is.

The config is composed exactly as training composes it (``raysft.config.compose``).
Exit codes: 0 ok, 1 data could not be read, 2 bad usage or config, 3 too many malformed rows.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import numpy as np
import ray

from raysft import plots
from raysft.commands.output import write_command_output
from raysft.config import compose
from raysft.data.pipeline import DataQualityError, PrepareUnit, build_spec
from raysft.data.render import IGNORE_INDEX, format_masked
from raysft.data.sources import DataSourceError
from raysft.data.prepared import describe as describe_prepared
from raysft.run.driver import count_data, prepare_data
from raysft.run.ray_init import init_ray
from raysft.train.model import tokenizer_path

USAGE = ("usage: raysft data preview [--rows N] [--no-color] [overrides...]\n"
         "       raysft data stats [--out DIR] [overrides...]\n"
         "       raysft data prepare [overrides...]")


class UsageError(ValueError):
    pass


def dispatch(argv: list[str]) -> int:
    """``argv`` starts with the subcommand group, e.g. ``["data", "preview", "--rows", "2"]``."""
    if argv[:1] == ["data"] and argv[1:2] in (["-h"], ["--help"], ["help"]):
        print(USAGE)
        return 0
    if len(argv) < 2 or argv[0] != "data":
        return _usage_error(f"expected 'data preview', 'data stats' or 'data prepare', got {' '.join(argv) or 'nothing'}")
    action, rest = argv[1], argv[2:]
    if action not in ("preview", "stats", "prepare"):
        return _usage_error(f"unknown command 'data {action}'")
    try:
        opts, overrides = _parse(rest, {"preview": {"--rows": int, "--no-color": bool},
                                        "stats": {"--out": str}, "prepare": {}}[action])
    except UsageError as e:
        return _usage_error(str(e))
    if opts.get("help"):
        print(USAGE)
        return 0
    try:
        cfg = compose(overrides)
    except Exception as e:  # noqa: BLE001 - any composition failure is a config/usage error
        msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        if e.__cause__ is not None and str(e.__cause__) not in msg:
            msg += f"\n  caused by: {str(e.__cause__).splitlines()[0]}"
        return _usage_error(msg)

    try:
        if action == "preview":
            rows = opts.get("--rows", 3)
            if rows < 1:
                return _usage_error("--rows must be >= 1")
            color = sys.stdout.isatty() and not opts.get("--no-color", False)
            return preview(cfg, rows=rows, color=color)
        if action == "prepare":
            return prepare(cfg)
        return stats(cfg, out=opts.get("--out"))
    except (DataSourceError, FileNotFoundError) as e:
        print(f"raysft: error: {e}", file=sys.stderr)
        return 1


def _usage_error(msg: str) -> int:
    print(f"raysft: error: {msg}", file=sys.stderr)
    print(USAGE, file=sys.stderr)
    return 2


def _parse(args: list[str], spec: dict[str, type]) -> tuple[dict[str, Any], list[str]]:
    """Our few ``--options`` anywhere on the line; every other word is a Hydra override."""
    opts: dict[str, Any] = {}
    overrides: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("-h", "--help"):
            opts["help"] = True
            continue
        if not a.startswith("--"):
            if a.startswith("-"):
                raise UsageError(f"unknown option {a!r}")
            overrides.append(a)
            continue
        name, eq, value = a.partition("=")
        if name not in spec:
            raise UsageError(f"unknown option {name!r}; valid here: {', '.join(spec)}")
        kind = spec[name]
        if kind is bool:
            if eq:
                raise UsageError(f"{name} takes no value")
            opts[name] = True
            continue
        if not eq:
            value = next(it, None)
            if value is None:
                raise UsageError(f"{name} needs a value")
        try:
            opts[name] = kind(value)
        except ValueError:
            raise UsageError(f"{name} needs {kind.__name__}, got {value!r}") from None
    return opts, overrides


# ----------------------------------------------------------------------------- preview


def preview(cfg, *, rows: int = 3, color: bool = False) -> int:
    data = cfg.data
    spec = build_spec(data, tokenizer_path(cfg.model))
    units = spec.unit_plan().units("train")
    print(f"raysft data preview: {len(spec.sources)} source(s) ({', '.join(spec.source_names)}); "
          f"{spec.plan.num_train:,} train rows in {len(units)} unit(s); max_length {data.max_length}, "
          f"loss {data.loss}, template {data.chat_template or '(tokenizer)'}, date {spec.date}")
    if not units:
        print("no training rows selected (check the source weights)")
        return 0
    unit = units[0]
    pu = PrepareUnit(spec, mode="rows")  # a plain class: used directly, no Ray
    src_idx, row_ids, examples, per_source = pu.read_unit(unit)
    mark = "dimmed" if color else "«…»"
    print(f"unit 0: {len(row_ids):,} rows; masked (not trained) tokens shown {mark}\n")

    shown, skipped = 0, 0
    for pos, ex in enumerate(examples):
        if shown >= rows:
            break
        s = int(src_idx[pos])
        where = _where(spec.sources[s], int(row_ids[pos]))
        if ex is None:
            skipped += 1
            continue
        (r,) = pu.renderer.render_batch([ex], on_error="return")
        if isinstance(r, ValueError):
            skipped += 1
            print(f"(skipped a row that does not render: {spec.source_names[s]} {where}: {r})\n")
            continue
        shown += 1
        n, trained = r.num_tokens, int(np.count_nonzero(r.labels != IGNORE_INDEX))
        note = ""
        if n > data.max_length:
            note = (f"; longer than max_length: {'truncated to' if data.overlong == 'truncate' else 'dropped, was'} "
                    f"{data.max_length if data.overlong == 'truncate' else n} tokens")
        header = f"── example {shown}/{rows} · source {spec.source_names[s]} · {where} · {n:,} tokens, {trained:,} trained{note} "
        print(header + "─" * max(0, 100 - len(header)))
        print(format_masked(pu.tokenizer, r.input_ids, r.labels, color=color))
        print()
    if skipped:
        print(f"({skipped} bad row(s) skipped before these; `raysft data stats` counts them per reason)\n")

    columns, _ = pu.pack_unit(unit, src_idx, row_ids, examples, per_source)
    n_rows = len(columns["input_ids"])
    if not n_rows:
        print("the first unit packs into no rows")
        return 0
    lengths = [int(x) for x in columns["seq_lengths"][0]]
    starts = np.cumsum([0] + lengths[:-1])
    srcs = [spec.source_names[int(columns["source_ids"][0][i])] for i in starts]
    num = int(columns["num_tokens"][0])
    pad = data.max_length - num
    print(f"── packed row 0 of {n_rows} in unit 0 ({pu.strategy}): {len(lengths)} sequence(s), {num:,} tokens "
          f"+ {pad:,} pad = {data.max_length:,}")
    print(f"  sequence lengths: {lengths}")
    print(f"  sources:          {srcs}")
    eff = float(np.sum(columns["num_tokens"])) / (n_rows * data.max_length)
    print(f"  pad tokens: {pad:,}; unit 0 packing efficiency {eff:.1%} over {n_rows} rows")
    return 0


def _where(source, row: int) -> str:
    for f, local, _ in source.locate(np.array([row])):
        return f"{os.path.basename(f.path)} row {int(local[0])}"
    return f"row {row}"


# ----------------------------------------------------------------------------- stats


def _on_local_ray(cfg, fn, failed: str):
    """``fn()`` on Ray (started here if needed, and then stopped); a data quality failure is one
    message and exit code 3 (``None`` is returned for it)."""
    started = not ray.is_initialized()
    init_ray(cfg)
    try:
        return fn()
    except DataQualityError as e:
        print(f"raysft: {failed}:\n{e}", file=sys.stderr)
        return None
    finally:
        if started:
            ray.shutdown()


def stats(cfg, *, out: str | None = None) -> int:
    counted = _on_local_ray(cfg, lambda: count_data(cfg), "data quality check failed")
    if counted is None:
        return 3
    report = stats_report(counted[1])
    print_stats(report)
    write_command_output(out, "data-stats", "stats.json", report, plots.data_shares)
    return 0


def prepare(cfg) -> int:
    done = _on_local_ray(cfg, lambda: prepare_data(cfg), "data quality check failed (nothing marked complete)")
    if done is None:
        return 3
    prepared = done[1]
    print_stats(stats_report(prepared.stats()))
    print(f"raysft: {describe_prepared(prepared)}")
    return 0


def stats_report(st) -> dict[str, Any]:
    """``DataStats.to_json()`` plus the derived numbers the command prints (shares, totals)."""
    report = st.to_json()
    tokens = sum(s["tokens"] for s in st.sources.values())
    trained = sum(s["trained_tokens"] for s in st.sources.values())
    report["totals"] = {k: sum(s[k] for s in st.sources.values())
                        for k in ("selected", "kept", "tokens", "trained_tokens", "truncated", "dropped_too_long")}
    report["totals"]["bad"] = sum(sum(s["bad"].values()) for s in st.sources.values())
    report["shares"] = {name: {"tokens": s["tokens"] / tokens if tokens else 0.0,
                               "trained_tokens": s["trained_tokens"] / trained if trained else 0.0}
                        for name, s in st.sources.items()}
    report["eval_totals"] = {k: sum(s[k] for s in st.eval_sources.values())
                             for k in ("selected", "kept", "tokens", "trained_tokens")}
    report["generated"] = datetime.datetime.now().isoformat(timespec="seconds")
    return report


def print_stats(report: dict[str, Any]) -> None:
    w = max([len("source")] + [len(n) for n in report["sources"]])
    cols = ("selected", "kept", "tokens", "trained", "truncated", "dropped", "bad")
    print(f"{'source':<{w}}  " + "  ".join(f"{c:>12}" for c in cols))
    rows = list(report["sources"].items()) + [("total", {**report["totals"], "bad": {"": report["totals"]["bad"]}})]
    for name, s in rows:
        vals = (s["selected"], s["kept"], s["tokens"], s["trained_tokens"], s["truncated"], s["dropped_too_long"],
                sum(s["bad"].values()))
        print(f"{name:<{w}}  " + "  ".join(f"{v:>12,}" for v in vals))
    for name, s in report["sources"].items():
        if s["bad"]:
            print(f"  {name}: bad rows by reason: " + ", ".join(f"{r}={n}" for r, n in sorted(s["bad"].items())))
            for e in s["examples"][:3]:
                print(f"    e.g. {e['file'] or name} row {e['row']}, field {e['field']}: {e['message']}")
    for name, sh in report["shares"].items():
        print(f"  share {name}: {sh['trained_tokens']:.1%} of trained tokens, {sh['tokens']:.1%} of tokens")
    print(f"packed: {report['train_packed_rows']:,} train rows x {report['max_length']:,} tokens; "
          f"packing efficiency {report['packing_efficiency']:.1%} (non-pad tokens / total)")
    ev = report["eval_totals"]
    print(f"eval: {report['eval_packed_rows']:,} packed rows ({ev['kept']:,} rows kept of {ev['selected']:,} selected, "
          f"{ev['tokens']:,} tokens); template date {report['date']}")
