"""Work units: the mixture plan cut into bounded windows of rows, in a deterministic order.

A unit is the granule of the data pipeline: one Ray Data task reads its rows, renders, tokenizes and
packs them (BFD within the window), so memory per task is bounded by ``window_rows`` whatever the
dataset size, and the packed output depends only on the config and seed, never on how many CPUs
ran it or in which order tasks finished.

Two orders, the same rows (``data.order``):
- ``handbook``: units are consecutive slices of the handbook's shuffled order (epoch 0) or of a
  seeded reshuffle (later epochs). Reads are random access: for data that is cheap to read.
- ``streaming``: each source's kept rows sorted by position and cut into windows (near-sequential
  reads of big parquet files); the windows of all sources interleaved by a seeded shuffle per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raysft.data.mixture import MixturePlan, epoch_order


@dataclass(frozen=True)
class Unit:
    index: int  # position in the stream (also its packed rows' order key)
    split: str  # "train" | "eval"
    epoch: int
    start: int  # slice of the split's ordering for this epoch
    stop: int


class UnitPlan:
    """Maps a unit to its (source, row) pairs. Holds only index arrays (~12 bytes a row)."""

    def __init__(self, plan: MixturePlan, *, order: str, window_rows: int, seed: int, epochs: int):
        self.plan, self.order, self.window_rows, self.seed = plan, order, window_rows, seed
        self.epochs = max(1, epochs)
        self._cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        if order == "streaming":
            # Stable sort by (source, row): each source's rows in file order.
            key = np.lexsort((plan.train_row, plan.train_source))
            self._stream_src, self._stream_row = plan.train_source[key], plan.train_row[key]
            self._chunks = _chunk_bounds(self._stream_src, window_rows)

    # ------------------------------------------------------------------ units

    def units(self, split: str = "train") -> list[Unit]:
        if split == "eval":
            n = self.plan.num_eval
            return [Unit(i, "eval", 0, s, min(s + self.window_rows, n)) for i, s in enumerate(range(0, n, self.window_rows))]
        out: list[Unit] = []
        for epoch in range(self.epochs):
            if self.order == "streaming":
                for c in np.random.default_rng([self.seed, epoch, 7]).permutation(len(self._chunks)):
                    start, stop = self._chunks[c]
                    out.append(Unit(len(out), "train", epoch, int(start), int(stop)))
            else:
                n = self.plan.num_train
                for s in range(0, n, self.window_rows):
                    out.append(Unit(len(out), "train", epoch, s, min(s + self.window_rows, n)))
        return out

    def rows(self, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        """(source indices, physical rows) of a unit, in the order they are packed."""
        if unit.split == "eval":
            return self.plan.eval_source[unit.start:unit.stop], self.plan.eval_row[unit.start:unit.stop]
        if self.order == "streaming":
            src = self._stream_src[unit.start:unit.stop]
            row = self._stream_row[unit.start:unit.stop]
            # A seeded shuffle inside the window, so later epochs see other neighbours.
            perm = np.random.default_rng([self.seed, unit.epoch, unit.start]).permutation(len(row))
            return src[perm], row[perm]
        src, row = self._epoch_arrays(unit.epoch)
        return src[unit.start:unit.stop], row[unit.start:unit.stop]

    def _epoch_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        key = ("train", epoch)
        if key not in self._cache:
            self._cache.clear()  # keep one epoch's ordering in memory at a time
            order = epoch_order(self.plan.num_train, self.seed, epoch)
            self._cache[key] = (self.plan.train_source[order], self.plan.train_row[order])
        return self._cache[key]


def _chunk_bounds(sorted_sources: np.ndarray, window_rows: int) -> list[tuple[int, int]]:
    """Cut a source-sorted array into windows of at most ``window_rows`` that never span two sources."""
    bounds: list[tuple[int, int]] = []
    if len(sorted_sources) == 0:
        return bounds
    change = np.flatnonzero(np.diff(sorted_sources)) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [len(sorted_sources)]])
    for a, b in zip(starts, stops):
        pieces = max(1, math.ceil((b - a) / window_rows))
        # Equal-sized pieces rather than a runt last window: packing efficiency stays even.
        edges = np.linspace(a, b, pieces + 1).round().astype(int)
        bounds.extend((int(x), int(y)) for x, y in zip(edges[:-1], edges[1:]))
    return bounds
