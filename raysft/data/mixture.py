"""Mixture math: which rows of which source are trained on, evaluated on, and in which order.

The semantics are the alignment-handbook's ``get_dataset``, exactly, computed on row *indices*
(only the sources' row counts are needed, never their content):

1. per source: ``shuffle(seed)`` then keep the first ``int(len * weight)`` rows;
2. concatenate the sources in config order, ``shuffle(seed)`` the whole;
3. ``train_test_split(test_size, seed)``: the first ``ceil(test_size * n)`` rows (a fraction) or
   ``test_size`` rows (a whole number >= 1, a row count, as ``datasets`` reads an int) of a seeded
   permutation are the eval set, the rest (in that permutation's order) the train set.

``datasets`` draws every permutation as ``np.random.default_rng(seed).permutation(n)``; so do we,
so the selected rows are the same rows ``datasets`` would select (``tests/test_mixture.py``).

Divergence, documented: the handbook has no ``weight > 1``. Here a source with weight ``w > 1`` is
repeated ``ceil(w)`` times before step 1, and ``int(len * w)`` rows are kept from the repeated,
shuffled copy (every row of the first ``floor(w)`` copies, then the first rows of the last copy in
shuffled order), so every row appears ``floor(w)`` or ``ceil(w)`` times.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixturePlan:
    """Rows as (source index, physical row index within the source), in training order."""

    train_source: np.ndarray  # int32
    train_row: np.ndarray  # int64
    eval_source: np.ndarray
    eval_row: np.ndarray
    kept_per_source: list[int]  # rows kept by the weights, before the eval split
    source_rows: list[int]  # physical rows per source

    @property
    def num_train(self) -> int:
        return int(len(self.train_row))

    @property
    def num_eval(self) -> int:
        return int(len(self.eval_row))

    def train_counts(self) -> list[int]:
        return np.bincount(self.train_source, minlength=len(self.source_rows)).astype(int).tolist()

    def eval_counts(self) -> list[int]:
        return np.bincount(self.eval_source, minlength=len(self.source_rows)).astype(int).tolist()


def select_source_rows(num_rows: int, weight: float, seed: int) -> np.ndarray:
    """Step 1 for one source: the physical row indices kept, in the source's shuffled order."""
    if weight <= 0:
        raise ValueError(f"weight must be > 0, got {weight}")
    repeats = max(1, math.ceil(weight))
    total = num_rows * repeats
    permutation = np.random.default_rng(seed).permutation(total)
    keep = int(num_rows * weight)
    # Row i of the repeated table is physical row i % num_rows (copies are concatenated).
    # Keep every entry of the first `whole` copies, plus the first `rest` entries (in shuffled
    # order) of the last copy: each row appears floor(w) or ceil(w) times. For w <= 1 or an
    # integer w this is exactly permutation[:keep].
    whole, rest = divmod(keep, max(num_rows, 1))
    in_whole = permutation < whole * num_rows
    in_rest = ~in_whole & (np.cumsum(~in_whole) <= rest)
    return (permutation[in_whole | in_rest] % max(num_rows, 1)).astype(np.int64)


def plan_mixture(
    source_rows: list[int], weights: list[float], seed: int, test_split_size: float
) -> MixturePlan:
    if len(source_rows) != len(weights):
        raise ValueError("one weight per source is required")
    per_source = [select_source_rows(n, w, seed) for n, w in zip(source_rows, weights)]
    for i, (n, w) in enumerate(zip(source_rows, weights)):
        if w > 1:
            log.info("source %d: weight %.3g > 1 -> repeated x%d, %d rows kept from %d", i, w, math.ceil(w), len(per_source[i]), n)
    sources = np.concatenate([np.full(len(r), i, dtype=np.int32) for i, r in enumerate(per_source)] or [np.zeros(0, np.int32)])
    rows = np.concatenate(per_source or [np.zeros(0, np.int64)])
    total = len(rows)
    if total == 0:
        raise ValueError("the mixture selects no rows: every source is empty or its weight keeps 0 rows")

    order = np.random.default_rng(seed).permutation(total)  # step 2
    sources, rows = sources[order], rows[order]

    if test_split_size > 0:  # step 3, as datasets.Dataset.train_test_split
        n_test = held_out_rows(test_split_size, total)
        if n_test >= total:
            raise ValueError(f"test_split_size={test_split_size} leaves no training rows out of {total}")
        split = np.random.default_rng(seed).permutation(total)
        test_idx, train_idx = split[:n_test], split[n_test:]
    else:
        test_idx, train_idx = np.zeros(0, np.int64), np.arange(total)

    return MixturePlan(
        train_source=sources[train_idx],
        train_row=rows[train_idx],
        eval_source=sources[test_idx],
        eval_row=rows[test_idx],
        kept_per_source=[len(r) for r in per_source],
        source_rows=list(source_rows),
    )


def held_out_rows(test_split_size: float, total: int) -> int:
    """Rows held out of ``total``, as ``datasets.Dataset.train_test_split(test_size=...)`` counts them:
    a fraction in (0, 1) -> ``ceil(fraction * total)``; a whole number >= 1 -> that many rows (the
    config's float field carries an int count as ``1000.0``)."""
    if test_split_size >= 1:
        if test_split_size != int(test_split_size):
            raise ValueError(f"test_split_size={test_split_size}: a row count must be a whole number (a fraction is < 1)")
        return int(test_split_size)
    return math.ceil(test_split_size * total)


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Order of the train rows in ``epoch``: the handbook order first, then a fresh seeded shuffle
    per epoch (as the HF Trainer's sampler reshuffles every epoch)."""
    if epoch == 0:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)
