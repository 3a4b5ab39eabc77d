"""Tests for raysft.data.pack (pure numpy packing). Fast: no Ray, no torch, no transformers import."""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

try:
    import raysft  # noqa: F401
except ImportError:  # plain `pytest` puts tests/ (not the repo root) on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysft.data import pack as P
from raysft.data.pack import (
    Sequence,
    bfd_num_bins,
    normalize_strategy,
    pack,
    packing_efficiency,
    truncate_or_drop,
)

PAD = 0
STRATEGIES = ["bfd", "bfd_split", "wrapped", "none"]


# ----------------------------------------------------------------- helpers


def make_seqs(lengths, rng, n_sources=3, int64=False):
    """Sequences whose token ids are globally unique (1..T, so never PAD) and
    whose labels/sources are random, so every token can be traced back."""
    seqs, nxt = [], 1
    for n in lengths:
        ids = np.arange(nxt, nxt + n, dtype=np.int64 if int64 else np.int32)
        nxt += n
        labels = np.where(rng.random(n) < 0.3, -100, rng.integers(0, 50_000, n)).astype(ids.dtype)
        seqs.append(Sequence(ids, labels, int(rng.integers(0, n_sources))))
    return seqs


def token_tables(seqs):
    """Per token id: label, source, sequence index, offset in sequence, offset in the whole stream."""
    T = sum(len(s.input_ids) for s in seqs) + 1
    label, source = np.full(T, 12345, np.int64), np.full(T, -7, np.int64)
    seq_of, off_in_seq = np.full(T, -1, np.int64), np.full(T, -1, np.int64)
    for k, s in enumerate(seqs):
        ids = np.asarray(s.input_ids)
        label[ids], source[ids], seq_of[ids] = s.labels, s.source, k
        off_in_seq[ids] = np.arange(len(ids))
    stream_off = np.arange(T) - 1  # ids are assigned in stream order starting at 1
    return label, source, seq_of, off_in_seq, stream_off


def check_invariants(seqs, out, L, strategy):
    ids, labels, pos, src = out["input_ids"], out["labels"], out["position_ids"], out["source_ids"]
    ntok, seq_lengths = out["num_tokens"], out["seq_lengths"]
    N = ids.shape[0]
    assert ids.shape == labels.shape == pos.shape == src.shape == (N, L)
    assert (ids.dtype, labels.dtype, pos.dtype, src.dtype, ntok.dtype) == (
        np.int32, np.int32, np.int32, np.int16, np.int32)
    assert len(seq_lengths) == N == ntok.shape[0]
    assert all(sl.dtype == np.int32 and (sl > 0).all() for sl in seq_lengths)
    np.testing.assert_array_equal([int(sl.sum()) for sl in seq_lengths], ntok)  # seq_lengths sum to num_tokens
    assert (ntok <= L).all() and (ntok > 0).all()

    label_of, source_of, seq_of, off_in_seq, stream_off = token_tables(seqs)
    real_rows = []
    for r in range(N):
        n = int(ntok[r])
        # padding is on the right only, with pad id / -100 / -1 / positions 0,1,2,...
        assert (ids[r, n:] == PAD).all() and (labels[r, n:] == -100).all() and (src[r, n:] == -1).all()
        np.testing.assert_array_equal(pos[r, n:], np.arange(L - n))
        real = ids[r, :n].astype(np.int64)
        assert (real != PAD).all()
        # labels and sources travel with their tokens
        np.testing.assert_array_equal(labels[r, :n], label_of[real])
        np.testing.assert_array_equal(src[r, :n], source_of[real])
        # position_ids restart at 0 at every seq_lengths boundary and count up by 1
        np.testing.assert_array_equal(pos[r, :n], np.concatenate([np.arange(k) for k in seq_lengths[r]]))
        # ... and those boundaries are where the original data says (independent of seq_lengths):
        if strategy in ("bfd", "none"):
            expected = off_in_seq[real]
        elif strategy == "bfd_split":
            expected = off_in_seq[real] % L
        else:  # wrapped: a segment starts at a sequence start or at the row start
            seq_start_stream = stream_off[real] - off_in_seq[real]
            expected = stream_off[real] - np.maximum(seq_start_stream, stream_off[real[0]])
        np.testing.assert_array_equal(pos[r, :n], expected)
        # a segment never mixes sequences
        owner = seq_of[real]
        assert (owner[1:] == owner[:-1])[pos[r, 1:n] != 0].all()
        real_rows.append(real)

    # multiset of non-pad tokens in == out (ids are unique, so: a permutation)
    all_out = np.concatenate(real_rows) if real_rows else np.zeros(0, np.int64)
    all_in = np.concatenate([s.input_ids for s in seqs]).astype(np.int64) if seqs else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.sort(all_out), np.sort(all_in))
    if strategy == "wrapped":  # order preserved, every row full except the last
        np.testing.assert_array_equal(all_out, all_in)
        assert (ntok[:-1] == L).all()
    if strategy == "none":
        np.testing.assert_array_equal(ntok, [len(s.input_ids) for s in seqs if len(s.input_ids)])


def ref_bfd(lengths, L):
    """Naive O(n * bins) best-fit decreasing with TRL's tie rules: stable sort by length
    descending; tightest fitting bin; among equal remaining space, the bin that got there first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins = []  # [remaining, step at which it reached `remaining`, items]
    for t, i in enumerate(order):
        x = lengths[i]
        fits = [b for b in bins if b[0] >= x]
        if fits:
            b = min(fits, key=lambda b: (b[0], b[1]))
        else:
            b = [L, -1, []]
            bins.append(b)
        b[0] -= x
        b[1] = t
        b[2].append(i)
    return [b[2] for b in bins]


def ffd_num_bins(lengths, L):
    rem = []
    for x in sorted(lengths, reverse=True):
        for b in range(len(rem)):
            if rem[b] >= x:
                rem[b] -= x
                break
        else:
            rem.append(L - x)
    return len(rem)


@pytest.fixture(scope="module")
def trl_pack_bfd():
    """TRL's own `_pack_bfd`, taken from the installed trl/data_utils.py.

    `import trl.data_utils` pulls in transformers + torch (~10 s here), too slow for this
    suite, so the three definitions we need are lifted out of the installed source with
    `ast` and exec'd against pyarrow/numpy. test_trl_pack_dataset_public_api (opt-in)
    checks the public `pack_dataset` path gives the same thing.
    """
    pa = pytest.importorskip("pyarrow")
    import pyarrow.compute as pc

    spec = importlib.util.find_spec("trl")  # locates the package without importing it
    if spec is None:
        pytest.skip("trl not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data_utils.py"
    tree = ast.parse(path.read_text())
    wanted = {"_SegmentTree", "_pack_bfd", "_check_if_columns_can_be_packed"}
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in wanted]
    assert {n.name for n in nodes} == wanted, "TRL's packing code moved; update this fixture"
    ns = {"np": np, "pa": pa, "pc": pc, "pyarrow": pa, "defaultdict": defaultdict, "deque": deque,
          "Literal": Literal}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), ns)

    def run(input_ids: list[list[int]], L: int, overflow: str = "truncate"):
        table = pa.table({"input_ids": pa.array(input_ids, type=pa.list_(pa.int64()))})
        out = ns["_pack_bfd"](table, L, on_seq_length_overflow=overflow)
        return out.column("input_ids").to_pylist(), out.column("seq_lengths").to_pylist()

    return run


def our_rows(out):
    return [out["input_ids"][r, : out["num_tokens"][r]].tolist() for r in range(len(out["num_tokens"]))]


# ------------------------------------------------------------------- tests


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed", range(6))
def test_invariants(strategy, seed):
    rng = np.random.default_rng(seed)
    L = int(rng.choice([1, 7, 64, 512]))
    n = int(rng.integers(0, 300))
    hi = 3 * L if strategy in ("wrapped", "bfd_split") else L  # over-long only where allowed
    lengths = rng.integers(1, hi + 1, n)
    lengths[rng.random(n) < 0.05] = 0  # empty sequences are skipped
    seqs = make_seqs(lengths, rng, int64=bool(seed % 2))
    out = pack(seqs, L, strategy, PAD)
    check_invariants(seqs, out, L, strategy)


@pytest.mark.parametrize("seed", range(24))
def test_bfd_matches_trl_exactly(seed, trl_pack_bfd):
    rng = np.random.default_rng(100 + seed)
    L = int(rng.choice([8, 33, 256, 4096]))
    n = int(rng.integers(1, 400))
    # Small length alphabets produce many ties, which exercise the tie-breaking rules.
    lengths = rng.choice(rng.integers(1, L + 1, 4), n) if seed % 2 else rng.integers(1, L + 1, n)
    seqs = make_seqs(lengths, rng)
    out = pack(seqs, L, "bfd", PAD)
    trl_ids, trl_lens = trl_pack_bfd([s.input_ids.tolist() for s in seqs], L)
    # Same grouping into rows (multiset of per-row seq_lengths) ...
    assert sorted(map(tuple, trl_lens)) == sorted(tuple(x.tolist()) for x in out["seq_lengths"])
    # ... and in fact identical rows in identical order.
    assert our_rows(out) == trl_ids
    assert [x.tolist() for x in out["seq_lengths"]] == trl_lens


@pytest.mark.parametrize("seed", range(10))
def test_bfd_split_matches_trl(seed, trl_pack_bfd):
    rng = np.random.default_rng(200 + seed)
    L = int(rng.choice([8, 64]))
    seqs = make_seqs(rng.integers(1, 4 * L, int(rng.integers(1, 200))), rng)
    out = pack(seqs, L, "bfd_split", PAD)
    trl_ids, trl_lens = trl_pack_bfd([s.input_ids.tolist() for s in seqs], L, overflow="split")
    assert our_rows(out) == trl_ids
    assert [x.tolist() for x in out["seq_lengths"]] == trl_lens


@pytest.mark.skipif(not os.environ.get("RAYSFT_TRL_FULL"), reason="imports transformers (~10 s); set RAYSFT_TRL_FULL=1")
def test_trl_pack_dataset_public_api():
    datasets = pytest.importorskip("datasets")
    from trl.data_utils import pack_dataset

    rng = np.random.default_rng(7)
    seqs = make_seqs(rng.integers(1, 300, 2500), rng)
    ds = datasets.Dataset.from_dict({"input_ids": [s.input_ids.tolist() for s in seqs]})
    # batch_size=None: one window. TRL's default (1000) packs in windows of 1000 rows.
    trl = pack_dataset(ds, 300, strategy="bfd", map_kwargs={"batch_size": None})
    out = pack(seqs, 300, "bfd", PAD)
    assert our_rows(out) == trl["input_ids"]
    assert [x.tolist() for x in out["seq_lengths"]] == trl["seq_lengths"]


def test_bfd_property_random():
    """A few hundred random cases: bins identical to a naive best-fit reference, every
    bin-opening sequence really did not fit anywhere, never below the volume bound, and
    in aggregate never worse than first-fit decreasing."""
    rng = np.random.default_rng(0)
    total_bfd = total_ffd = 0
    for _ in range(300):
        L = int(rng.integers(1, 80))
        lengths = rng.integers(1, L + 1, int(rng.integers(1, 60))).tolist()
        bins = P._bfd_bins(np.array(lengths), L)
        assert bins == ref_bfd(lengths, L)
        fill = [sum(lengths[i] for i in b) for b in bins]
        assert max(fill) <= L
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert len(bins) >= -(-sum(lengths) // L)
        # any-fit: bin j was opened by its largest item, which fits in no earlier bin
        # (remaining space only shrinks, so checking final remaining space suffices)
        for j in range(1, len(bins)):
            assert all(L - fill[i] < lengths[bins[j][0]] for i in range(j))
        total_bfd += len(bins)
        total_ffd += ffd_num_bins(lengths, L)
    assert total_bfd <= total_ffd


def test_bfd_not_always_better_than_ffd(trl_pack_bfd):
    """Per instance, BFD can need more bins than FFD; TRL's BFD does the same. Pin the
    smallest case found so nobody "fixes" bfd into something that isn't TRL's."""
    lengths, L = [19, 12, 9, 5, 4, 3, 2], 27  # sum 54 = exactly 2 bins; FFD finds them
    assert ffd_num_bins(lengths, L) == 2
    assert bfd_num_bins(lengths, L) == 3
    _, trl_lens = trl_pack_bfd([[1] * n for n in lengths], L)
    assert trl_lens == [[19, 4, 3], [12, 9, 5], [2]]
    ours = pack(make_seqs(lengths, np.random.default_rng(0)), L, "bfd", PAD)
    assert [x.tolist() for x in ours["seq_lengths"]] == trl_lens


def test_ffd_alias_warns_and_equals_bfd(caplog):
    import raysft.config.data as C

    C._warned_aliases.clear()
    rng = np.random.default_rng(3)
    seqs = make_seqs(rng.integers(1, 100, 200), rng)
    with caplog.at_level(logging.WARNING, logger=C.__name__):
        assert normalize_strategy("ffd") == "bfd"
    assert any("ffd" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    a, b = pack(seqs, 128, "ffd", PAD), pack(seqs, 128, "bfd", PAD)
    for k in ("input_ids", "labels", "position_ids", "source_ids", "num_tokens"):
        np.testing.assert_array_equal(a[k], b[k])
    assert [x.tolist() for x in a["seq_lengths"]] == [x.tolist() for x in b["seq_lengths"]]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=C.__name__):
        normalize_strategy("FFD")  # once per process: Ray would otherwise log it for every batch
    assert not caplog.records


def test_normalize_strategy_values():
    for s in ("bfd", "bfd_split", "wrapped", "none"):
        assert normalize_strategy(s) == s
    assert normalize_strategy("bfd-requeue") == "bfd_split"
    with pytest.raises(ValueError, match="bfd.*wrapped.*none"):
        normalize_strategy("first_fit")
    with pytest.raises(ValueError):
        pack([], 8, "greedy", PAD)


def test_wrapped_cut_and_continue():
    seqs = [
        Sequence(np.array([1, 2, 3]), np.array([11, 12, -100]), 0),
        Sequence(np.array([4, 5, 6, 7, 8]), np.array([14, 15, 16, 17, 18]), 1),
        Sequence(np.array([9, 10, 11, 12, 13, 14, 15, 16, 17]), np.arange(19, 28), 2),  # longer than L
    ]
    out = pack(seqs, 6, "wrapped", PAD)
    np.testing.assert_array_equal(
        out["input_ids"], [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 0]])
    np.testing.assert_array_equal(out["position_ids"], [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0]])
    np.testing.assert_array_equal(
        out["labels"], [[11, 12, -100, 14, 15, 16], [17, 18, 19, 20, 21, 22], [23, 24, 25, 26, 27, -100]])
    np.testing.assert_array_equal(out["source_ids"], [[0, 0, 0, 1, 1, 1], [1, 1, 2, 2, 2, 2], [2, 2, 2, 2, 2, -1]])
    assert [x.tolist() for x in out["seq_lengths"]] == [[3, 3], [2, 4], [5]]
    np.testing.assert_array_equal(out["num_tokens"], [6, 6, 5])  # final partial row is padded
    exact = pack(seqs[:2] + [Sequence(np.arange(20, 24), np.arange(4), 0)], 6, "wrapped", PAD)
    np.testing.assert_array_equal(exact["num_tokens"], [6, 6])  # 12 tokens: no padded row


def test_overlong_rejected_by_bfd_and_none():
    rng = np.random.default_rng(0)
    seqs = make_seqs([5, 9, 3], rng)
    for strategy in ("bfd", "none", "ffd"):
        with pytest.raises(ValueError, match="longer than max_length=8"):
            pack(seqs, 8, strategy, PAD)
    with pytest.raises(ValueError):
        bfd_num_bins([5, 9], 8)
    assert pack(seqs, 8, "bfd_split", PAD)["num_tokens"].sum() == 17
    assert pack(seqs, 8, "wrapped", PAD)["num_tokens"].tolist() == [8, 8, 1]


def test_truncate_or_drop_and_efficiency():
    s = Sequence(np.arange(10, dtype=np.int32), np.arange(10, dtype=np.int32) + 100, 4)
    t = truncate_or_drop(s, 6, "truncate")
    assert t.input_ids.tolist() == list(range(6)) and t.labels.tolist() == list(range(100, 106)) and t.source == 4
    assert truncate_or_drop(s, 6, "drop") is None
    assert truncate_or_drop(s, 10, "drop") is s
    with pytest.raises(ValueError):
        truncate_or_drop(s, 6, "split")
    assert packing_efficiency(3000, 1, 4096) == pytest.approx(3000 / 4096)
    assert packing_efficiency(0, 0, 4096) == 0.0


def test_bfd_num_bins_matches_pack_and_bad_inputs():
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 513, 1000)
    out = pack(make_seqs(lengths, rng), 512, "bfd", PAD)
    assert bfd_num_bins(lengths, 512) == len(out["num_tokens"])
    assert bfd_num_bins(np.append(lengths, 0), 512) == len(out["num_tokens"])  # zeros ignored
    with pytest.raises(ValueError, match="same|differ"):
        pack([Sequence(np.arange(3), np.arange(2), 0)], 8, "bfd", PAD)
    with pytest.raises(ValueError, match="int16"):
        pack([Sequence(np.arange(3), np.arange(3), 40_000)], 8, "bfd", PAD)


def test_bfd_scales_n_log_n():
    """A quadratic bin search would take minutes here; the segment tree takes well under a second."""
    lengths = np.clip(np.random.default_rng(1).lognormal(np.log(400), 1.0, 50_000), 1, 4096).astype(np.int64)
    t0 = time.perf_counter()
    bins = bfd_num_bins(lengths, 4096)
    assert time.perf_counter() - t0 < 5.0
    assert bins >= lengths.sum() / 4096
