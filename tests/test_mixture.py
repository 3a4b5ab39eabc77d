"""raysft.data.mixture and raysft.data.units: pure index math, no Ray.

The reference for the mixture is the alignment-handbook's ``get_dataset`` run with ``datasets``
itself on tables that hold their own (source, row) ids: per source ``shuffle(seed)`` then
``select(range(int(n * w)))``, ``concatenate_datasets``, ``shuffle(seed)``,
``train_test_split(test_size, seed)``.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from raysft.data.mixture import MixturePlan, epoch_order, plan_mixture, select_source_rows
from raysft.data.units import UnitPlan

datasets = pytest.importorskip("datasets")

SEEDS = [0, 42, 1234]
WEIGHTS = [1.0, 0.5, 0.02, 0.3]
TEST_SIZES = [0.0, 0.01, 0.005, 0.1]


def handbook_reference(counts: list[int], weights: list[float], seed: int, test_size: float):
    """(train pairs, test pairs) exactly as the handbook's get_dataset selects them."""
    parts = []
    for i, (n, w) in enumerate(zip(counts, weights)):
        ds = datasets.Dataset.from_dict({"src": [i] * n, "row": list(range(n))})
        parts.append(ds.shuffle(seed=seed).select(range(int(len(ds) * w))))
    mixed = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    if test_size > 0:  # the handbook only splits when test_split_size is set (datasets rejects 0)
        split = mixed.train_test_split(test_size=test_size, seed=seed)
        train, test = split["train"], split["test"]
    else:
        train, test = mixed, None
    pairs = lambda d: [] if d is None else list(zip(d["src"], d["row"]))  # noqa: E731
    return pairs(train), pairs(test)


def plan_pairs(plan: MixturePlan) -> tuple[list, list]:
    return (list(zip(plan.train_source.tolist(), plan.train_row.tolist())),
            list(zip(plan.eval_source.tolist(), plan.eval_row.tolist())))


def assert_matches_handbook(counts, weights, seed, test_size):
    plan = plan_mixture(counts, weights, seed, test_size)
    ref_train, ref_test = handbook_reference(counts, weights, seed, test_size)
    train, test = plan_pairs(plan)
    assert train == ref_train
    assert test == ref_test
    assert plan.kept_per_source == [int(n * w) for n, w in zip(counts, weights)]
    assert plan.source_rows == list(counts)
    assert plan.num_train + plan.num_eval == sum(plan.kept_per_source)
    assert plan.train_counts() == np.bincount([s for s, _ in ref_train], minlength=len(counts)).tolist()
    assert plan.train_source.dtype == np.int32 and plan.train_row.dtype == np.int64


# ----------------------------------------------------------------------------- handbook equivalence


@pytest.mark.parametrize("test_size", TEST_SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_plan_equals_handbook(seed, test_size):
    assert_matches_handbook([1000, 257, 3000, 50], WEIGHTS, seed, test_size)


@pytest.mark.parametrize("seed", SEEDS)
def test_plan_equals_handbook_other_shapes(seed):
    # Weights in another order, a source whose weight keeps 0 rows, one source alone.
    assert_matches_handbook([40, 999, 10, 333], [0.3, 0.02, 0.02, 1.0], seed, 0.1)
    assert_matches_handbook([40, 999, 10, 333], [0.5, 1.0, 0.3, 0.5], seed, 0.005)
    assert_matches_handbook([777], [1.0], seed, 0.01)
    assert_matches_handbook([777], [0.5], seed, 0.0)


def _sample_counts(config: str, splits: list[str]) -> list[int]:
    from raysft.data.sources import resolve_files

    return [sum(f.num_rows for f in resolve_files(id="HuggingFaceTB/smoltalk2", config=config, split=s,
                                                  data_root="bundled:data/smoltalk2-sample")) for s in splits]


@pytest.mark.parametrize(
    "config, splits, weights, test_size",
    [
        # conf/data/sample_sft.yaml, smoltalk2_sft_local.yaml, smoltalk2_mid_local.yaml
        ("SFT", ["gsm8k_think", "glaive_toolcall_en_demo_no_think"], [0.02, 0.04], 0.05),
        ("SFT", ["gsm8k_think", "glaive_toolcall_en_demo_no_think"], [1.0, 1.0], 0.005),
        ("Mid", ["gsm8k_socratic", "gsm8k_chained_multiturn_long"], [1.0, 1.0], 0.01),
        ("SFT", ["gsm8k_think", "glaive_toolcall_en_demo_no_think"], [0.5, 0.3], 0.1),
    ],
)
@pytest.mark.parametrize("seed", [0, 42])
def test_plan_equals_handbook_on_bundled_sample(config, splits, weights, test_size, seed):
    counts = _sample_counts(config, splits)
    assert all(n > 0 for n in counts)
    assert_matches_handbook(counts, weights, seed, test_size)


@pytest.mark.parametrize("test_size", [1000, 7, 1])
@pytest.mark.parametrize("seed", [0, 42])
def test_int_test_split_size_is_a_row_count_as_datasets_reads_it(seed, test_size):
    """The handbook's ``test_split_size: 1000``: datasets reads an int as a row count. The config's float
    field carries it as 1000.0; the rows held out are exactly those datasets holds out."""
    counts = _sample_counts("SFT", ["gsm8k_think", "glaive_toolcall_en_demo_no_think"])
    plan = plan_mixture(counts, [1.0, 1.0], seed, float(test_size))
    ref_train, ref_test = handbook_reference(counts, [1.0, 1.0], seed, test_size)
    assert plan_pairs(plan) == (ref_train, ref_test)
    assert plan.num_eval == test_size
    assert plan_pairs(plan_mixture([3000, 257], [0.5, 1.0], seed, float(test_size))) == \
        handbook_reference([3000, 257], [0.5, 1.0], seed, test_size)


def test_int_test_split_size_too_large_or_not_whole():
    with pytest.raises(ValueError, match="leaves no training rows"):
        plan_mixture([10, 10], [1.0, 1.0], 0, 20.0)
    with pytest.raises(ValueError):  # datasets refuses the same split
        datasets.Dataset.from_dict({"x": list(range(20))}).train_test_split(test_size=20, seed=0)
    with pytest.raises(ValueError, match="whole number"):
        plan_mixture([10, 10], [1.0, 1.0], 0, 2.5)


def test_per_source_selection_is_datasets_shuffle():
    for n, w, seed in [(1000, 0.5, 0), (37, 1.0, 3), (5, 0.02, 9)]:
        ds = datasets.Dataset.from_dict({"row": list(range(n))}).shuffle(seed=seed).select(range(int(n * w)))
        assert select_source_rows(n, w, seed).tolist() == ds["row"]


# ----------------------------------------------------------------------------- weight > 1


@pytest.mark.parametrize("weight", [1.5, 2.0, 2.3, 3.0, 2.99, 1.01])
@pytest.mark.parametrize("n", [1, 7, 100, 1319])
def test_weight_above_one(n, weight):
    rows = select_source_rows(n, weight, seed=42)
    assert len(rows) == int(n * weight)
    counts = np.bincount(rows, minlength=n)
    assert len(counts) == n and rows.min() >= 0
    assert set(counts.tolist()) <= {math.floor(weight), math.ceil(weight)}
    np.testing.assert_array_equal(rows, select_source_rows(n, weight, seed=42))  # deterministic


def test_weight_above_one_in_a_mixture():
    counts, weights = [100, 40, 300], [2.5, 1.0, 0.3]
    plan = plan_mixture(counts, weights, 7, 0.1)
    assert plan.kept_per_source == [250, 40, 90]
    per_source = [Counter() for _ in counts]
    for s, r in zip(np.concatenate([plan.train_source, plan.eval_source]), np.concatenate([plan.train_row, plan.eval_row])):
        per_source[s][int(r)] += 1
    assert set(per_source[0].values()) == {2, 3} and len(per_source[0]) == 100
    assert set(per_source[1].values()) == {1} and len(per_source[1]) == 40
    assert set(per_source[2].values()) == {1} and len(per_source[2]) == 90
    again = plan_mixture(counts, weights, 7, 0.1)
    assert plan_pairs(again) == plan_pairs(plan)
    assert plan_pairs(plan_mixture(counts, weights, 8, 0.1)) != plan_pairs(plan)
    # Rows repeated by the weight may land in both splits (as they would in a repeated table).
    assert plan.num_eval == math.ceil(0.1 * 380)


def test_integer_weight_matches_a_repeated_table():
    """weight=k is the handbook run on the source concatenated k times (weight 1 on that table)."""
    n, k, seed = 60, 3, 5
    ds = datasets.Dataset.from_dict({"row": list(range(n)) * k}).shuffle(seed=seed)
    assert select_source_rows(n, float(k), seed).tolist() == ds["row"]


# ----------------------------------------------------------------------------- errors


def test_test_split_leaving_no_train_rows():
    with pytest.raises(ValueError, match="leaves no training rows"):
        plan_mixture([1], [1.0], 0, 0.5)
    with pytest.raises(ValueError, match="leaves no training rows"):
        plan_mixture([10, 10], [0.1, 0.1], 0, 0.6)  # 2 rows, ceil(1.2) = 2 test rows
    # datasets refuses the same split
    with pytest.raises(ValueError):
        datasets.Dataset.from_dict({"x": [0, 1]}).train_test_split(test_size=0.6, seed=0)


@pytest.mark.parametrize("weight", [0.0, -0.5])
def test_non_positive_weight(weight):
    with pytest.raises(ValueError, match="weight must be > 0"):
        plan_mixture([10, 10], [1.0, weight], 0, 0.0)


def test_other_errors():
    with pytest.raises(ValueError, match="selects no rows"):
        plan_mixture([10], [0.05], 0, 0.0)  # int(0.5) == 0 rows
    with pytest.raises(ValueError, match="one weight per source"):
        plan_mixture([10, 10], [1.0], 0, 0.0)


def test_epoch_order():
    np.testing.assert_array_equal(epoch_order(10, 3, 0), np.arange(10))
    e1, e2 = epoch_order(100, 3, 1), epoch_order(100, 3, 2)
    assert sorted(e1.tolist()) == list(range(100)) and not np.array_equal(e1, e2)
    np.testing.assert_array_equal(e1, epoch_order(100, 3, 1))


# ----------------------------------------------------------------------------- units

UNIT_COUNTS, UNIT_WEIGHTS = [500, 123, 64, 900], [1.0, 2.5, 0.5, 0.3]


def unit_pairs(up: UnitPlan, unit) -> list[tuple[int, int]]:
    src, row = up.rows(unit)
    assert len(src) == len(row) == unit.stop - unit.start
    return list(zip(src.tolist(), row.tolist()))


def epoch_units(up: UnitPlan, epoch: int):
    return [u for u in up.units("train") if u.epoch == epoch]


@pytest.fixture(scope="module")
def unit_mixture() -> MixturePlan:
    return plan_mixture(UNIT_COUNTS, UNIT_WEIGHTS, 11, 0.05)


@pytest.mark.parametrize("window", [1, 37, 256, 100_000])
@pytest.mark.parametrize("order", ["handbook", "streaming"])
def test_units_cover_the_plan(unit_mixture, order, window):
    plan = unit_mixture
    up = UnitPlan(plan, order=order, window_rows=window, seed=11, epochs=3)
    expected = Counter(zip(plan.train_source.tolist(), plan.train_row.tolist()))
    units = up.units("train")
    assert [u.index for u in units] == list(range(len(units)))
    assert [u.epoch for u in units] == sorted(u.epoch for u in units)
    per_epoch = []
    for epoch in range(3):
        pairs = [p for u in epoch_units(up, epoch) for p in unit_pairs(up, u)]
        assert Counter(pairs) == expected, f"epoch {epoch}"
        per_epoch.append(pairs)
        for u in epoch_units(up, epoch):
            assert 0 < u.stop - u.start <= window and u.split == "train"
            if order == "streaming":
                assert len({s for s, _ in unit_pairs(up, u)}) == 1, "a streaming unit mixes sources"
    if order == "handbook":  # epoch 0 is the handbook order itself
        assert per_epoch[0] == list(zip(plan.train_source.tolist(), plan.train_row.tolist()))
    # Every epoch sees the rows in another order...
    if plan.num_train > 1:
        assert per_epoch[0] != per_epoch[1] != per_epoch[2] != per_epoch[0]
    # ... deterministically for the seed, whoever builds the plan.
    again = UnitPlan(plan, order=order, window_rows=window, seed=11, epochs=3)
    assert again.units("train") == units
    assert [unit_pairs(again, u) for u in units] == [unit_pairs(up, u) for u in units]
    other = UnitPlan(plan, order=order, window_rows=window, seed=12, epochs=3)
    assert [p for u in other.units("train") for p in unit_pairs(other, u)] != [p for per in per_epoch for p in per]


@pytest.mark.parametrize("order", ["handbook", "streaming"])
def test_streaming_unit_order_differs_between_epochs(unit_mixture, order):
    up = UnitPlan(unit_mixture, order=order, window_rows=50, seed=11, epochs=2)
    first = [unit_pairs(up, u)[0] for u in epoch_units(up, 0)]
    second = [unit_pairs(up, u)[0] for u in epoch_units(up, 1)]
    assert first != second


def test_streaming_units_read_sources_in_file_order(unit_mixture):
    up = UnitPlan(unit_mixture, order="streaming", window_rows=37, seed=11, epochs=1)
    for u in up.units("train"):
        src, row = up._stream_src[u.start:u.stop], up._stream_row[u.start:u.stop]
        assert len(set(src.tolist())) == 1 and np.all(np.diff(row) >= 0)


@pytest.mark.parametrize("window", [1, 7, 4096])
@pytest.mark.parametrize("order", ["handbook", "streaming"])
def test_eval_units_are_the_eval_rows(unit_mixture, order, window):
    plan = unit_mixture
    up = UnitPlan(plan, order=order, window_rows=window, seed=11, epochs=2)
    units = up.units("eval")
    assert units and all(u.split == "eval" and u.epoch == 0 and 0 < u.stop - u.start <= window for u in units)
    pairs = [p for u in units for p in unit_pairs(up, u)]
    assert pairs == list(zip(plan.eval_source.tolist(), plan.eval_row.tolist()))


def test_no_eval_units_without_a_test_split():
    plan = plan_mixture([100], [1.0], 0, 0.0)
    assert UnitPlan(plan, order="handbook", window_rows=10, seed=0, epochs=1).units("eval") == []
