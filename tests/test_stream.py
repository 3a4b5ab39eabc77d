"""The training stream (raysft/data/stream.py): a real RowDealer actor on local Ray deals the packed
rows of the bundled sample round-robin, in the order an in-process pass produces them, and a stream
restarted from a cursor continues exactly where the first one stopped, with any number of workers."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from raysft import assets
from raysft.config import ScalingConfig, derived
from raysft.data.pipeline import PrepareUnit, build_spec
from raysft.data.stream import Cursor, RowDealer

pytestmark = pytest.mark.ray


def digest(row) -> str:
    return hashlib.sha1(b"".join(np.asarray(row[c], dtype=np.int64).tobytes()
                                 for c in ("input_ids", "labels", "position_ids"))).hexdigest()


@pytest.fixture(scope="module")
def spec():
    from raysft.config import compose

    # 10 rows per unit: the sample's 49 train rows make 5 units, so a pass crosses unit boundaries.
    cfg = compose(["data.date=2025-03-04", "data.window_rows=10"])
    return build_spec(cfg.data, assets.resolve("bundled:smollm3"))


@pytest.fixture(scope="module")
def one_pass(spec):
    """(digest, unit) of every packed train row, one pass, prepared in this process without Ray."""
    prep = PrepareUnit(spec)
    out = []
    for unit in spec.unit_plan().units("train"):
        cols, _ = prep.prepare(unit)
        out += [(digest({c: cols[c][i] for c in cols}), unit.index) for i in range(len(cols["input_ids"]))]
    return out


@pytest.fixture(scope="module")
def dealer(ray_cluster, spec):
    import ray

    actor = ray.remote(RowDealer).options(num_cpus=0, max_concurrency=8).remote(spec, **derived.data_resources(ScalingConfig()))
    yield actor
    ray.kill(actor)


def take(dealer, session: int, world: int, steps: int, first: int = 0) -> list[list[list[str]]]:
    """Every rank's micro-batches 0..steps-1: the ranks ask concurrently, each in order, as workers do."""
    import ray

    out: list[list[list[str]]] = [[] for _ in range(world)]
    for k in range(first, first + steps):
        for r, b in enumerate(ray.get([dealer.next_batch.remote(session, r, k) for r in range(world)])):
            out[r].append([digest({c: b[c][i] for c in b}) for i in range(len(b["input_ids"]))])
    return out


def expected(one_pass, start: int, world: int, batch: int, steps: int, first: int = 0) -> list[list[list[str]]]:
    rows = [d for d, _ in one_pass]
    at = lambda g: rows[g % len(rows)]  # noqa: E731  (passes repeat)
    return [[[at(start + (k * batch + i) * world + r) for i in range(batch)] for k in range(first, first + steps)]
            for r in range(world)]


def test_rows_are_dealt_round_robin_and_a_cursor_resumes_exactly(ray_cluster, dealer, one_pass):
    import ray

    n = len(one_pass)
    assert len({u for _, u in one_pass}) >= 4 and n > 30

    # 2 workers x 3 rows per micro-batch. After 4 micro-batches each, 24 rows are consumed: the
    # cursor names the unit of global row 24 and the offset into it (what a checkpoint stores).
    s = ray.get(dealer.start.remote(Cursor().to_dict(), 2, 3))
    assert take(dealer, s, 2, 4) == expected(one_pass, 0, 2, 3, 4)
    c = Cursor.from_dict(ray.get(dealer.cursor_at.remote(s, 24)))
    first_of_unit = next(i for i, (_, u) in enumerate(one_pass) if u == one_pass[24][1])
    assert (c.pass_, c.unit, c.offset, c.global_row) == (0, one_pass[24][1], 24 - first_of_unit, 24)
    # 60 rows: more than one pass, the stream wraps into the second.
    assert take(dealer, s, 2, 6, first=4) == expected(one_pass, 0, 2, 3, 6, first=4)
    wrapped = Cursor.from_dict(ray.get(dealer.cursor_at.remote(s, 60)))
    assert (wrapped.pass_, wrapped.global_row) == (1, 60)

    # Restarted at the cursor with 3 workers x 2 rows: exactly the rows after global row 24.
    s2 = ray.get(dealer.start.remote(c.to_dict(), 3, 2))
    assert take(dealer, s2, 3, 4) == expected(one_pass, 24, 3, 2, 4)

    # Restarted in the second pass with one worker.
    s3 = ray.get(dealer.start.remote(wrapped.to_dict(), 1, 4))
    assert take(dealer, s3, 1, 3) == expected(one_pass, 60, 1, 4, 3)


def test_out_of_order_and_stale_requests_fail_loudly(ray_cluster, dealer):
    import ray

    s = ray.get(dealer.start.remote(Cursor().to_dict(), 2, 1))
    with pytest.raises(ray.exceptions.RayTaskError, match="expected 0"):
        ray.get(dealer.next_batch.remote(s, 0, 1))
    ray.get(dealer.start.remote(Cursor().to_dict(), 2, 1))
    with pytest.raises(ray.exceptions.RayTaskError, match="stale data session"):
        ray.get(dealer.next_batch.remote(s, 0, 0))
