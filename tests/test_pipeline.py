"""raysft.data.pipeline end to end on a local Ray: configs in, packed rows out (read on the driver).

Every packed output is checked against sequences rendered here, independently, with ChatRenderer
on the same rows (read with pyarrow/json, not through raysft.data.sources) and the same pinned date.

Each Ray Data execution starts a fresh actor pool, and each actor spends seconds of CPU importing
transformers (and torch, through AutoTokenizer); so the module runs its 12 executions once, three
at a time from driver threads (fixture ``runs``), and the tests read their results.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from raysft import assets
from raysft.config import DataConfig, MixtureConfig, ScalingConfig, SourceConfig, derived
from raysft.data.pipeline import (
    PACKED_COLUMNS,
    DataQualityError,
    DataSpec,
    PrepareUnit,
    build_dataset,
    build_spec,
    collect_stats,
)
from raysft.data.render import IGNORE_INDEX, ChatRenderer
from raysft.data.validate import ColumnMap, normalize

DATA = derived.data_resources(ScalingConfig())
DATA_CPUS = DATA["data_cpus"]

pytestmark = pytest.mark.ray

DATE = "2025-03-04"
TOKENIZER = assets.resolve("bundled:smollm3")
TEST_ASSETS = Path(__file__).resolve().parent / "assets"
BAD_ROWS = TEST_ASSETS / "bad_rows.jsonl"
EOS = "<|im_end|>"
WINDOW = 10  # rows per unit for the sample: 49 train rows -> 5 units, so concurrency=2 has work to share


# ----------------------------------------------------------------------------- configs


def data_config(sources: list[dict], *, seed: int = 42, test_split_size: float = 0.0, **kw) -> DataConfig:
    kw.setdefault("chat_template", "sft")
    kw.setdefault("date", DATE)
    d = DataConfig(dataset_mixture=MixtureConfig(datasets=[SourceConfig(**s) for s in sources], seed=seed,
                                                 test_split_size=test_split_size), **kw)
    d.validate()
    d.dataset_mixture.validate()
    for s in d.dataset_mixture.datasets:
        s.validate()
    return d


def sample_config(**overrides) -> DataConfig:
    """conf/data/sample_sft.yaml under the default stage (sft template, 512 tokens), composed as the CLI does."""
    from raysft.config import compose

    args = [f"data.date={DATE}", f"data.window_rows={WINDOW}"] + [f"data.{k}={v}" for k, v in overrides.items()]
    return compose(args).data


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- expected sequences


@dataclass
class Seq:
    ids: np.ndarray
    labels: np.ndarray
    source: int
    example: dict
    full_length: int  # before truncation

    def key(self) -> tuple:
        return (self.ids.astype(np.int32).tobytes(), self.labels.astype(np.int32).tobytes(), self.source)


def read_source_rows(spec: DataSpec, s: int) -> list:
    """All physical rows of source ``s`` (a dict, or None for a line that is not a JSON object)."""
    out: list = []
    for f in spec.sources[s].files:
        if f.format == "parquet":
            import pyarrow.parquet as pq

            cols = list(spec.sources[s].columns) if spec.sources[s].columns else None
            out += pq.read_table(f.path, columns=cols).to_pylist()
        else:
            assert f.format == "jsonl"
            for line in Path(f.path).read_bytes().split(b"\n")[: f.num_rows]:
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                out.append(obj if isinstance(obj, dict) else None)
    return out


def renderer_for(spec: DataSpec, tokenizer) -> ChatRenderer:
    d = spec.data
    return ChatRenderer(tokenizer, assets.load_chat_template(d.chat_template), date=datetime.date.fromisoformat(DATE),
                        loss=d.loss, eos_token=d.eos_token)


def expected_sequences(spec: DataSpec, tokenizer, split: str = "train") -> list[Seq]:
    """The plan's rows of ``split`` in plan order, rendered and truncated as the pipeline should."""
    plan = spec.plan
    src, rows = (plan.train_source, plan.train_row) if split == "train" else (plan.eval_source, plan.eval_row)
    raw = {s: read_source_rows(spec, s) for s in set(src.tolist())}
    cmap = ColumnMap.named(spec.data.column_map)
    examples = []
    for s, r in zip(src.tolist(), rows.tolist()):
        ex = normalize(raw[s][r], spec.data.format, cmap)
        assert isinstance(ex, dict), f"test data row {s}/{r} is not valid: {ex}"
        examples.append(ex)
    rendered = renderer_for(spec, tokenizer).render_batch(examples)
    L, wrapped = spec.data.max_length, spec.data.packing_strategy == "wrapped"
    out = []
    for s, ex, r in zip(src.tolist(), examples, rendered):
        ids, labels = r.input_ids, r.labels
        if len(ids) > L and not wrapped:
            assert spec.data.overlong == "truncate"
            ids, labels = ids[:L], labels[:L]
            if not (labels != IGNORE_INDEX).any():
                continue  # nothing left to train: dropped
        out.append(Seq(ids, labels, s, ex, r.num_tokens))
    return out


# ----------------------------------------------------------------------------- packed rows


def row_digests(rows: list[dict]) -> list[str]:
    """A digest of each packed row: its arrays and the unit it came from (a scalar: hashed by value)."""
    arrays = [k for k in PACKED_COLUMNS if k != "unit"]
    return [hashlib.sha256(b"".join(np.ascontiguousarray(r[k]).tobytes() for k in arrays) + str(int(r["unit"])).encode()).hexdigest()
            for r in rows]


def segments(rows: list[dict], max_length: int, pad_id: int) -> list[list[tuple[np.ndarray, np.ndarray, int]]]:
    """Per packed row: its (ids, labels, source) runs split where position_ids restart at 0.
    Checks the row layout on the way: right padding, positions, padding labels and sources."""
    out = []
    for r in rows:
        ids, labels, pos, src = (np.asarray(r[k]) for k in ("input_ids", "labels", "position_ids", "source_ids"))
        assert ids.shape == labels.shape == pos.shape == src.shape == (max_length,)
        assert ids.dtype == labels.dtype == pos.dtype == np.int32 and src.dtype == np.int16
        n = int((src != -1).sum())
        assert n > 0 and (src[:n] != -1).all(), "real tokens first, then padding"
        assert (ids[n:] == pad_id).all() and (labels[n:] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(pos[n:], np.arange(max_length - n))  # padding: its own run from 0
        starts = np.flatnonzero(pos[:n] == 0)
        assert starts.size and starts[0] == 0
        row = []
        for a, b in zip(starts, np.append(starts[1:], n)):
            np.testing.assert_array_equal(pos[a:b], np.arange(b - a))  # positions restart at 0 per sequence
            assert (src[a:b] == src[a]).all(), "one sequence, one source"
            row.append((ids[a:b], labels[a:b], int(src[a])))
        out.append(row)
    return out


def check_packed(rows: list[dict], expected: list[Seq], spec: DataSpec, pad_id: int) -> list:
    L, strategy = spec.data.max_length, spec.data.packing_strategy
    segs = segments(rows, L, pad_id)
    flat = [s for row in segs for s in row]
    # The multiset of non-pad tokens out is the multiset of rendered tokens in.
    tokens_out = Counter(np.concatenate([s[0] for s in flat]).tolist())
    tokens_in = Counter(np.concatenate([e.ids for e in expected]).tolist())
    assert tokens_out == tokens_in
    if strategy in ("bfd", "none"):
        # Whole sequences, each with its labels and source, nothing split or merged.
        assert Counter((i.tobytes(), l.tobytes(), s) for i, l, s in flat) == Counter(e.key() for e in expected)
        if strategy == "none":
            assert all(len(row) == 1 for row in segs) and len(rows) == len(expected)
    else:
        assert strategy == "wrapped"
        # The token stream in unit (= plan, for handbook) order, cut every max_length tokens.
        def stream(parts):  # ids, labels and per-token sources of (ids, labels, source) parts, concatenated
            return [np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    np.concatenate([np.full(len(p[0]), p[2]) for p in parts])]

        for got, want in zip(stream(flat), stream([(e.ids, e.labels, e.source) for e in expected])):
            np.testing.assert_array_equal(got, want)
        # Positions restart exactly at sequence starts and at row starts.
        seq_starts = set(np.cumsum([0] + [len(e.ids) for e in expected])[:-1].tolist())
        row_starts, seg_starts, offset = set(), set(), 0
        for row in segs:
            row_starts.add(offset)
            for s in row:
                seg_starts.add(offset)
                offset += len(s[0])
        assert seg_starts == seq_starts | row_starts
    return segs


def trained_runs(ids: np.ndarray, labels: np.ndarray, tokenizer) -> list[str]:
    keep = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[keep], ids[keep])  # labels are the ids (not shifted)
    cuts = np.flatnonzero(np.diff(keep.astype(np.int8))) + 1
    return [tokenizer.decode(ids[seg].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for seg in np.split(np.arange(len(keep)), cuts) if keep[seg[0]]]


def all_trained_runs(segs, tokenizer) -> Counter:
    return Counter(run for row in segs for ids, labels, _ in row for run in trained_runs(ids, labels, tokenizer))


# ----------------------------------------------------------------------------- fixtures

SHAREGPT_ROWS = [
    {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello! How can I help?"}]},
    {"conversations": [{"from": "system", "value": "Answer with a number."}, {"from": "human", "value": "2+2?"},
                       {"from": "gpt", "value": "4"}, {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "6"}],
     "chat_template_kwargs": {"enable_thinking": False}},
    {"conversations": [{"from": "human", "value": "Name a planet."}, {"from": "gpt", "value": "Mars."}], "id": "x"},
]
PC_STRINGS = [
    {"prompt": "Question: what is 2+2?\nAnswer:", "completion": " 4, because two plus two is four."},
    {"prompt": "Translate to French: cat\n", "completion": "chat"},
]
PC_CONVERSATIONAL = [
    {"prompt": [{"role": "user", "content": "Name a colour."}], "completion": [{"role": "assistant", "content": "Blue."}]},
    {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of Italy?"}],
     "completion": [{"role": "assistant", "content": "Rome."}], "chat_template_kwargs": {"enable_thinking": False}},
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Ray Data streams blocks through actors.",
         "Packing puts several documents into one row."]


def bad_rows_config(**kw) -> DataConfig:
    return data_config([{"path": str(BAD_ROWS)}], max_length=65536, overlong="drop", **kw)


@pytest.fixture(scope="module")
def pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, DataSpec]:
    d = tmp_path_factory.mktemp("data")
    sharegpt = write_jsonl(d / "chat.jsonl", SHAREGPT_ROWS)
    pc = [{"path": write_jsonl(d / "strings.jsonl", PC_STRINGS), "name": "strings"},
          {"path": write_jsonl(d / "conv.jsonl", PC_CONVERSATIONAL), "name": "conv"}]
    text = write_jsonl(d / "docs.jsonl", [{"text": t} for t in TEXTS])
    # NOTE: without chat_template_kwargs the SFT template defaults to reasoning mode and its long
    # default system prompt (~400 tokens): max_length leaves room for it.
    return {
        "bfd": build_spec(sample_config(), TOKENIZER),
        "wrapped": build_spec(sample_config(packing_strategy="wrapped"), TOKENIZER),
        "none": build_spec(sample_config(packing_strategy="none"), TOKENIZER),
        "streaming": build_spec(sample_config(order="streaming"), TOKENIZER),
        "sharegpt": build_spec(data_config([{"path": sharegpt}], column_map="sharegpt", max_length=1024), TOKENIZER),
        "pc": build_spec(data_config(pc, loss="completion_only", max_length=1024), TOKENIZER),
        "text": build_spec(data_config([{"path": text}], loss="all", max_length=64), TOKENIZER),
        "bad": build_spec(bad_rows_config(max_bad_fraction=1.0), TOKENIZER),
        "bad_default": build_spec(bad_rows_config(), TOKENIZER),
    }


def _rows(spec: DataSpec, split: str = "train", concurrency: int = 1) -> list[dict]:
    ds = build_dataset(spec, split, data_cpus=DATA_CPUS, concurrency=concurrency)
    return [] if ds is None else list(ds.iter_rows())


@pytest.fixture(scope="module")
def runs(ray_cluster, specs):
    """Every Ray Data execution of this module, started together on a few driver threads.

    An execution mostly waits for its actor to start and import transformers; running three at a
    time overlaps that (independent Datasets execute concurrently on one cluster). A test reads
    ``runs[name].result()``, which returns the rows (or stats) or re-raises what the execution raised."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = {  # in the order the tests read them
        "bfd": lambda: _rows(specs["bfd"]),
        "wrapped": lambda: _rows(specs["wrapped"]),
        "none": lambda: _rows(specs["none"]),
        "bfd@2": lambda: _rows(specs["bfd"], concurrency=2),
        "streaming@2": lambda: _rows(specs["streaming"], concurrency=2),
        "eval": lambda: _rows(specs["bfd"], "eval"),
        "stats": lambda: collect_stats(specs["bfd"], **DATA),
        "sharegpt": lambda: _rows(specs["sharegpt"]),
        "pc": lambda: _rows(specs["pc"]),
        "text": lambda: _rows(specs["text"]),
        "bad": lambda: collect_stats(specs["bad"], **DATA),
        "bad_default": lambda: collect_stats(specs["bad_default"], **DATA),
    }
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="build")
    yield {name: pool.submit(fn) for name, fn in jobs.items()}
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def expected(specs, tokenizer) -> dict[str, list[Seq]]:
    """Rendered here, independently of the pipeline (no Ray)."""
    out = {name: expected_sequences(specs[name], tokenizer) for name in ("bfd", "wrapped", "sharegpt", "pc", "text")}
    out["eval"] = expected_sequences(specs["bfd"], tokenizer, "eval")
    return out


# ----------------------------------------------------------------------------- sample: smoltalk2 + strategies


def test_sample_plan_shape(specs):
    spec = specs["bfd"]
    assert spec.source_names == ["gsm8k_think", "glaive_toolcall_en_demo_no_think"]
    assert spec.plan.num_train == 49 and spec.plan.num_eval == 3
    assert len(spec.unit_plan().units("train")) == 5 and spec.date == DATE
    st = specs["streaming"]  # the same rows in both orders
    assert Counter(zip(st.plan.train_source.tolist(), st.plan.train_row.tolist())) == \
        Counter(zip(spec.plan.train_source.tolist(), spec.plan.train_row.tolist()))


@pytest.mark.parametrize("strategy", ["bfd", "wrapped", "none"])
def test_packing_strategies(strategy, runs, specs, expected, pad_id):
    spec = specs[strategy]
    rows = runs[strategy].result()
    want = expected["wrapped" if strategy == "wrapped" else "bfd"]
    assert rows
    segs = check_packed(rows, want, spec, pad_id)
    if strategy != "wrapped":
        sources = Counter(s for row in segs for _, _, s in row)
        assert sources == Counter(e.source for e in want) and set(sources) == {0, 1}
        # the sample has over-long rows (tool conversations): truncated to max_length, still packed
        assert any(e.full_length > spec.data.max_length for e in want)
    else:  # nothing truncated: every rendered token is packed, rows cut at max_length
        assert all(len(e.ids) == e.full_length for e in want)
        assert sum(int((r["source_ids"] != -1).sum()) for r in rows) == sum(e.full_length for e in want)


def test_smoltalk2_trained_tokens_are_assistant_turns(runs, specs, expected, tokenizer, pad_id):
    spec = specs["bfd"]
    segs = segments(runs["bfd"].result(), spec.data.max_length, pad_id)
    got = all_trained_runs(segs, tokenizer)
    want = Counter()
    for e in expected["bfd"]:
        if e.full_length > spec.data.max_length:  # truncated: the ids are checked by check_packed
            runs_ = trained_runs(e.ids, e.labels, tokenizer)
            assert runs_ and all(r.startswith("<|im_start|>assistant\n") for r in runs_)
        else:
            think = "" if e.example["chat_template_kwargs"].get("enable_thinking", True) else "<think>\n\n</think>\n"
            runs_ = [f"<|im_start|>assistant\n{think}{m['content']}{EOS}\n"
                     for m in e.example["messages"] if m["role"] == "assistant"]
        want.update(runs_)
    assert got == want
    assert any(r.startswith("<|im_start|>assistant\n<think>\n") and "</think>" in r for r in got)  # gsm8k_think
    assert any("<tool_call>" in r for r in got)  # glaive tool calls are trained
    assert not any("<|im_start|>user" in r or "<|im_start|>system" in r for r in got)


def prepared_in_process(spec: DataSpec) -> list[dict]:
    """The reference order: every train unit prepared here, one after the other, no Ray."""
    prep = PrepareUnit(spec)
    out = []
    for unit in spec.unit_plan().units("train"):
        columns, _ = prep.prepare(unit)
        out += [{k: columns[k][i] for k in PACKED_COLUMNS} for i in range(len(columns["input_ids"]))]
    return out


def test_determinism_and_parallelism(runs, specs):
    one = runs["bfd"].result()
    two = runs["bfd@2"].result()  # another build of the same config, with an actor pool of up to 2
    assert row_digests(one) == row_digests(two)
    assert row_digests(one) == row_digests(prepared_in_process(specs["bfd"]))


def test_streaming_is_deterministic(runs, specs, expected, pad_id):
    spec = specs["streaming"]
    rows = runs["streaming@2"].result()
    # The same rows as the handbook order, in other windows, in the order fixed by the seed alone.
    check_packed(rows, expected["bfd"], spec, pad_id)
    assert row_digests(rows) == row_digests(prepared_in_process(spec))
    assert row_digests(rows) != row_digests(runs["bfd"].result())


def test_eval_split_is_the_plan_eval_rows(runs, specs, expected, pad_id):
    spec = specs["bfd"]
    want = expected["eval"]
    assert len(want) == spec.plan.num_eval == 3
    check_packed(runs["eval"].result(), want, spec, pad_id)
    train_keys = {e.key() for e in expected["bfd"]}
    assert not any(e.key() in train_keys for e in want)  # held out


def test_stats_equal_a_direct_computation(runs, specs, expected):
    spec = specs["bfd"]
    stats = runs["stats"].result()
    L = spec.data.max_length
    for split, per_source, plan_src in (("bfd", stats.sources, spec.plan.train_source),
                                        ("eval", stats.eval_sources, spec.plan.eval_source)):
        for s, name in enumerate(spec.source_names):
            mine = [e for e in expected[split] if e.source == s]
            st = per_source[name]
            assert st["selected"] == int((plan_src == s).sum()), (split, name)
            assert st["bad"] == {} and st["examples"] == []
            assert st["kept"] == len(mine) == st["selected"] - st["dropped_too_long"]
            assert st["tokens"] == sum(len(e.ids) for e in mine)
            assert st["trained_tokens"] == sum(int((e.labels != IGNORE_INDEX).sum()) for e in mine)
            assert st["truncated"] == sum(e.full_length > L for e in mine)
    assert stats.sources["glaive_toolcall_en_demo_no_think"]["truncated"] > 0
    rows = runs["bfd"].result()
    assert stats.train_packed_rows == len(rows)
    assert stats.train_packed_tokens == sum(int((r["source_ids"] != -1).sum()) for r in rows)
    assert stats.train_packed_tokens == sum(st["tokens"] for st in stats.sources.values())
    assert stats.eval_packed_rows == len(runs["eval"].result())
    assert stats.packing_efficiency == pytest.approx(stats.train_packed_tokens / (len(rows) * L))
    assert 0 < stats.packing_efficiency <= 1
    assert stats.to_json()["packing_efficiency"] == stats.packing_efficiency and stats.date == DATE


# ----------------------------------------------------------------------------- other formats


def test_sharegpt(runs, specs, expected, tokenizer, pad_id):
    want = expected["sharegpt"]
    assert len(want) == len(SHAREGPT_ROWS)
    segs = check_packed(runs["sharegpt"].result(), want, specs["sharegpt"], pad_id)
    assert all_trained_runs(segs, tokenizer) == Counter([
        f"<|im_start|>assistant\nHello! How can I help?{EOS}\n",
        f"<|im_start|>assistant\n<think>\n\n</think>\n4{EOS}\n",
        f"<|im_start|>assistant\n<think>\n\n</think>\n6{EOS}\n",
        f"<|im_start|>assistant\nMars.{EOS}\n",
    ])
    masked = "".join(tokenizer.decode(ids[labels == IGNORE_INDEX].tolist()) for row in segs for ids, labels, _ in row)
    assert "Answer with a number." in masked and "And 3+3?" in masked and "Name a planet." in masked


def test_prompt_completion(runs, specs, expected, tokenizer, pad_id):
    want = expected["pc"]
    assert len(want) == len(PC_STRINGS) + len(PC_CONVERSATIONAL)
    segs = check_packed(runs["pc"].result(), want, specs["pc"], pad_id)
    # Only the completions are trained (with the eos that ends them). For message lists that is what
    # follows the generation prompt, which with enable_thinking=False includes the empty think block.
    assert all_trained_runs(segs, tokenizer) == Counter([
        f" 4, because two plus two is four.{EOS}", f"chat{EOS}", f"Blue.{EOS}\n", f"Rome.{EOS}\n",
    ])
    text = {0: [], 1: []}
    for row in segs:
        for ids, _, s in row:
            text[s].append(tokenizer.decode(ids.tolist()))
    assert sorted(text[0]) == sorted(r["prompt"] + r["completion"] + EOS for r in PC_STRINGS)
    assert all(t.startswith("<|im_start|>system\n") for t in text[1])
    assert any("Capital of Italy?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\nRome." in t for t in text[1])


def test_plain_text(runs, specs, expected, tokenizer, pad_id):
    rows = runs["text"].result()
    segs = check_packed(rows, expected["text"], specs["text"], pad_id)
    assert len(rows) == 1  # three short documents share one bfd row
    assert all_trained_runs(segs, tokenizer) == Counter(t + EOS for t in TEXTS)  # every token trained


# ----------------------------------------------------------------------------- bad rows


def test_bad_rows_are_counted_per_reason(runs):
    cases = json.loads((TEST_ASSETS / "expected.json").read_text())
    by_line = {c["line"]: c["category"] for c in cases}
    stats = runs["bad"].result()
    st = stats.sources["bad_rows.jsonl"]
    rejected = Counter(c["category"] for c in cases if not c["keep"])
    # too_long is only known after rendering: with max_length=65536 and overlong=drop it is
    # dropped and counted apart (dropped_too_long), not as a malformed row.
    assert rejected.pop("too_long") == 1
    assert st["dropped_too_long"] == 1 and st["truncated"] == 0
    # Duplicates are skipped and reported as duplicates, not as malformed rows.
    assert st["duplicates"] == {r: n for r, n in rejected.items() if r.startswith("duplicate")} == {"duplicate_id": 2}
    assert st["bad"] == {r: n for r, n in rejected.items() if not r.startswith("duplicate")}
    assert st["selected"] == len(cases) == 28
    assert st["kept"] == sum(c["keep"] for c in cases) == 2
    assert stats.train_packed_rows == 1 and st["tokens"] == stats.train_packed_tokens
    # Examples name the file, the row (0-based physical line) and the field; at most 3 per reason.
    assert Counter(e["reason"] for e in st["examples"]) == Counter({r: min(n, 3) for r, n in rejected.items()})
    for e in st["examples"]:
        assert e["file"] == str(BAD_ROWS)
        assert by_line[e["row"] + 1] == e["reason"]
        assert e["field"] and e["message"]
    fields = {(e["row"] + 1, e["field"]) for e in st["examples"]}
    assert {(7, "messages[1].role"), (18, "line 18"), (20, "chat_template_kwargs.enable_thinking"), (25, "id")} <= fields


def test_bad_rows_abort_with_a_data_quality_error(runs, specs, ray_cluster):
    assert specs["bad_default"].data.max_bad_fraction == 0.01  # the default
    with pytest.raises(DataQualityError) as info:
        runs["bad_default"].result()
    err = info.value
    assert type(err) is DataQualityError and not isinstance(err, ray_cluster.exceptions.RayError)
    # Raised by our check on the driver after the pass, not re-raised out of a Ray worker.
    assert info.traceback[-1].name == "check_quality"
    assert Path(str(info.traceback[-1].path)).name == "stats.py"
    assert not any("/ray/" in str(entry.path) for entry in info.traceback)
    msg = str(err)
    # 25 rejected rows, minus the 2 duplicates (skipped and reported, but not malformed).
    assert "source 'bad_rows.jsonl': 23 of 28 selected rows are malformed" in msg
    assert "data.max_bad_fraction=0.01" in msg
    assert "bad_kwargs: 5" in msg and "invalid_json: 1" in msg and "duplicate_id: 2" in msg
    assert f"e.g. {BAD_ROWS} line 3, field messages:" in msg
    assert "Traceback" not in msg
