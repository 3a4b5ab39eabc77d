"""Pack tokenized sequences into fixed-length rows (pure numpy; no Ray, no torch).

`pack` runs inside a Ray Data map operator over a bounded window of sequences, so
everything here works on one in-memory list and never looks beyond it.

Output convention (the padding-free / position_ids style the HF stack uses):
  * every packed row is exactly `max_length` (L) tokens, right-padded;
  * `position_ids` restart at 0 at every sequence start. transformers builds a
    block-diagonal mask from position_ids when `attention_mask is None` (and
    `use_cache=False`), so sequences in one row never attend to each other;
  * padding gets its *own* run of positions 0,1,2,... so it can never look like
    a continuation of the last real sequence in the row;
  * labels travel unchanged with their tokens. Masking the label of each
    segment's first token (so the last token of one sequence is not trained to
    predict the first token of the next) is the collator's job, as in TRL's
    padding-free collator; `position_ids == 0` marks exactly those tokens.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from raysft.config.data import normalize_strategy

logger = logging.getLogger(__name__)

PackingStrategy = Literal["bfd", "bfd_split", "wrapped", "none"]

IGNORE_INDEX = -100
_INT16_MAX = np.iinfo(np.int16).max


@dataclass
class Sequence:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, -100 = not trained
    source: int  # index of the data source it came from


def truncate_or_drop(
    seq: Sequence, max_length: int, policy: Literal["truncate", "drop"]
) -> Sequence | None:
    """Caller-side handling of sequences longer than max_length (before bfd/none).

    "truncate" keeps the first max_length tokens (like TRL's bfd); "drop" returns
    None. Sequences that already fit are returned unchanged (same object).
    """
    if policy not in ("truncate", "drop"):
        raise ValueError(f"policy must be 'truncate' or 'drop', got {policy!r}")
    if len(seq.input_ids) <= max_length:
        return seq
    if policy == "drop":
        return None
    return Sequence(seq.input_ids[:max_length], seq.labels[:max_length], seq.source)


def packing_efficiency(num_tokens_total: int, rows: int, max_length: int) -> float:
    """Fraction of the rows * max_length slots holding real tokens (0.0 for no rows)."""
    if rows <= 0:
        return 0.0
    return float(num_tokens_total) / (float(rows) * float(max_length))


# --------------------------------------------------------------------------- bfd


class _SpaceTree:
    """Max segment tree over the integers 1..maxval: which remaining-space values exist.

    search(x) returns the smallest present value >= x in O(log maxval), the same
    structure TRL uses (after "Fewer Truncations Improve Language Modeling").
    Leaf i holds the value i+1 when present, else 0, so a node's max is the
    largest present value below it and descending "left if left max >= x"
    finds the smallest fitting value.
    """

    __slots__ = ("size", "tree")

    def __init__(self, maxval: int):
        self.size = 1 << max(maxval - 1, 0).bit_length()
        self.tree = [0] * (2 * self.size)

    def add(self, val: int) -> None:
        t = self.tree
        i = self.size + val - 1
        t[i] = val
        i >>= 1
        # Maxima only grow: stop at the first ancestor that already covers val.
        while i and t[i] < val:
            t[i] = val
            i >>= 1

    def remove(self, val: int) -> None:
        t = self.tree
        i = self.size + val - 1
        t[i] = 0
        i >>= 1
        while i:
            left, right = t[2 * i], t[2 * i + 1]
            new = left if left >= right else right
            if t[i] == new:  # ancestors unchanged from here up
                break
            t[i] = new
            i >>= 1

    def search(self, val: int) -> int:
        t = self.tree
        i = 1
        size = self.size
        while i < size:
            i <<= 1
            if t[i] < val:
                i += 1
        return t[i]


def _bfd_bins(lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Best-fit decreasing, bin-for-bin identical to TRL's `_pack_bfd`.

    Sort by length descending (stable, so ties keep input order); put each
    sequence into the bin with the least remaining space that still fits it;
    among bins with equal remaining space take the one that reached it first
    (FIFO, TRL's deque.popleft); otherwise open a new bin. Bins are returned in
    opening order, each listing input indices in placement order.
    O(n log n) for the sort + O(n log max_length) for the tree.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() <= 0 or lengths.max() > max_length):
        raise ValueError("bfd lengths must be in 1..max_length")
    order = np.argsort(-lengths, kind="stable")
    tree = _SpaceTree(max_length)
    tree.add(max_length)  # "open a new bin" is always an option
    space_to_bins: defaultdict[int, deque[int]] = defaultdict(deque)
    bins: list[list[int]] = []
    for idx, length in zip(order.tolist(), lengths[order].tolist()):
        space = tree.search(length)
        if space < max_length:
            queue = space_to_bins[space]
            b = queue.popleft()
            if not queue:
                tree.remove(space)
        else:
            b = len(bins)
            bins.append([])
        bins[b].append(idx)
        space -= length
        if space > 0:  # full bins leave the structure for good
            queue = space_to_bins[space]
            if not queue:
                tree.add(space)
            queue.append(b)
    return bins


def bfd_num_bins(lengths, max_length: int) -> int:
    """Rows a whole-dataset BFD would need (reference for windowed-vs-whole efficiency).

    Lengths must already be truncated/dropped to 1..max_length (zeros are ignored).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    return len(_bfd_bins(lengths[lengths > 0], max_length))


# ---------------------------------------------------------------------- assembly


def _assemble(
    ids: np.ndarray,
    labels: np.ndarray,
    src: np.ndarray,
    seg_lengths: np.ndarray,
    segs_per_row: np.ndarray,
    max_length: int,
    pad_token_id: int,
) -> dict[str, np.ndarray | list]:
    """Lay a flat token stream out as rows.

    ids/labels/src are 1-D, already in output order; the stream is split into
    segments (seg_lengths, each becomes one positions-from-0 run) and the
    segments into rows (segs_per_row). Fully vectorized: one boolean-mask
    assignment per column, because a row-major mask of "col < row_len" visits the
    slots in exactly the stream's order.
    """
    n_rows = len(segs_per_row)
    seg_lengths = seg_lengths.astype(np.int64, copy=False)
    seg_row = np.repeat(np.arange(n_rows), segs_per_row)
    row_len = np.bincount(seg_row, weights=seg_lengths, minlength=n_rows).astype(np.int64)
    assert row_len.size == 0 or row_len.max() <= max_length
    cols = np.arange(max_length)
    filled = cols[None, :] < row_len[:, None]

    out_ids = np.full((n_rows, max_length), pad_token_id, dtype=np.int32)
    out_labels = np.full((n_rows, max_length), IGNORE_INDEX, dtype=np.int32)
    out_src = np.full((n_rows, max_length), -1, dtype=np.int16)
    # Padding positions: 0,1,2,... from the first pad slot of the row.
    out_pos = (cols[None, :] - row_len[:, None]).astype(np.int32)
    seg_start = np.cumsum(seg_lengths) - seg_lengths
    tok_pos = np.arange(ids.size, dtype=np.int64) - np.repeat(seg_start, seg_lengths)

    out_ids[filled] = ids
    out_labels[filled] = labels
    out_src[filled] = src
    out_pos[filled] = tok_pos
    seq_lengths = np.split(seg_lengths.astype(np.int32), np.cumsum(segs_per_row)[:-1])
    return {
        "input_ids": out_ids,
        "labels": out_labels,
        "position_ids": out_pos,
        "source_ids": out_src,
        "seq_lengths": seq_lengths if n_rows else [],
        "num_tokens": row_len.astype(np.int32),
    }


def _split_long(seqs: list[Sequence], max_length: int) -> list[Sequence]:
    """bfd_split: cut each over-long sequence into max_length chunks, in place (TRL order)."""
    out: list[Sequence] = []
    for s in seqs:
        n = len(s.input_ids)
        if n <= max_length:
            out.append(s)
        else:
            for a in range(0, n, max_length):
                out.append(Sequence(s.input_ids[a : a + max_length], s.labels[a : a + max_length], s.source))
    return out


def pack(seqs: list[Sequence], max_length: int, strategy: str, pad_token_id: int) -> dict[str, np.ndarray | list]:
    """Returns columns for N packed rows:
    input_ids [N, L] int32, labels [N, L] int32 (-100 on padding), position_ids [N, L] int32 restarting at 0
    for every sequence (padding gets its own run of positions starting at 0 so it never extends a real sequence),
    source_ids [N, L] int16 (source of each token, -1 for padding), seq_lengths: list of int32 arrays (lengths of
    the sequences in each row, padding excluded), num_tokens [N] int32 (non-pad tokens).

    bfd / bfd_split: TRL's best-fit decreasing (rows in bin-opening order, sequences within a row in
      placement order). bfd and none raise ValueError on sequences longer than L: use truncate_or_drop first.
    wrapped: concatenate in order and cut every L tokens; a sequence cut at a row boundary continues at the
      start of the next row with positions from 0. Only the last row can be partial (num_tokens[-1] < L).
    none: one sequence per row.
    Empty sequences carry no tokens and are skipped (TRL's bfd filters them too).
    """
    strategy = normalize_strategy(strategy)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for s in seqs:
        if len(s.input_ids) != len(s.labels):
            raise ValueError(f"input_ids and labels differ in length: {len(s.input_ids)} != {len(s.labels)}")
        if not 0 <= s.source <= _INT16_MAX:
            raise ValueError(f"source {s.source} does not fit the int16 source_ids column")
    if strategy == "bfd_split":
        seqs = _split_long(seqs, max_length)
    seqs = [s for s in seqs if len(s.input_ids) > 0]
    lengths = np.fromiter((len(s.input_ids) for s in seqs), dtype=np.int64, count=len(seqs))

    if strategy in ("bfd", "bfd_split", "none") and lengths.size and lengths.max() > max_length:
        n_long = int((lengths > max_length).sum())
        raise ValueError(
            f"{n_long} sequence(s) longer than max_length={max_length} (longest {int(lengths.max())}) reached "
            f"strategy {strategy!r}; truncate or drop them first (truncate_or_drop)"
        )

    if strategy == "wrapped":
        order = np.arange(len(seqs))
        total = int(lengths.sum())
        # Segment boundaries = sequence boundaries ∪ row boundaries.
        bounds = np.union1d(np.concatenate(([0], np.cumsum(lengths))), np.arange(0, total, max_length))
        seg_lengths = np.diff(bounds)
        segs_per_row = np.bincount(bounds[:-1] // max_length, minlength=-(-total // max_length))
        if total % max_length:
            logger.debug("wrapped: last row is partial (%d/%d tokens, padded)", total % max_length, max_length)
    elif strategy == "none":
        order = np.arange(len(seqs))
        seg_lengths = lengths
        segs_per_row = np.ones(len(seqs), dtype=np.int64)
    else:
        bins = _bfd_bins(lengths, max_length)
        order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(seqs))
        seg_lengths = lengths[order]
        segs_per_row = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))

    if len(seqs):
        ids = np.concatenate([seqs[i].input_ids for i in order.tolist()], dtype=np.int32, casting="same_kind")
        labels = np.concatenate([seqs[i].labels for i in order.tolist()], dtype=np.int32, casting="same_kind")
        sources = np.fromiter((seqs[i].source for i in order.tolist()), dtype=np.int16, count=len(seqs))
        src = np.repeat(sources, lengths[order])
    else:
        ids = labels = np.zeros(0, dtype=np.int32)
        src = np.zeros(0, dtype=np.int16)
    return _assemble(ids, labels, src, seg_lengths, segs_per_row, max_length, pad_token_id)
