"""Fault tolerance with exact data resume, on a local Ray cluster with 2 CPU workers.

A run is trained uninterrupted; the same run is trained again while a worker process is killed
with SIGKILL from outside after step 3 and, after the restart, Ray Train's controller after step 5
(checkpoints every 2 steps), and every actor that is not Ray Train's own is SIGKILLed after step 1.
Ray Train restarts the worker group, the driver the whole run, raysft resumes from the step-2, then
the step-4 checkpoint, and
the workers train on exactly the micro-batches the uninterrupted run trained on (hashes of every
micro-batch), to the same weights, with the same step, learning rate and token count in the
metrics. Resuming a run whose newest checkpoint is its last step trains nothing more; a run resumed
on more workers at an epoch boundary trains the next epoch in the global order."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import CLEAN_RUN, GROWN_ROWS, GROWN_STEPS, compose
from faults import flip_bytes, kill_other_actors_after

from raysft.run import driver

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, GA = 6, 2  # conftest.CLEAN_RUN: checkpoints every 2 steps, eval and samples every 3


def _hashes(run_dir: Path, rank: int) -> tuple[dict[tuple[int, int], list[str]], int]:
    """(step, micro-batch) -> its rows' hashes (a re-trained micro-batch must hold the same rows),
    and the line count."""
    lines = [json.loads(x) for x in (run_dir / "workers" / f"batches_rank{rank}.jsonl").read_text().splitlines()]
    out: dict[tuple[int, int], list[str]] = {}
    for e in lines:
        key = (e["step"], e["micro"])
        assert out.get(key, e["rows"]) == e["rows"], f"step {key} trained on other rows when re-trained"
        out[key] = e["rows"]
    return out, len(lines)


def _by_step(run_dir: Path) -> dict[int, dict]:
    """The last train log line of every step (a resumed run logs the redone steps again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["global_step"]] = m
    return out


def _weights(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


def _kill_a_worker_after(run_dir: Path, steps: tuple[int, ...], killed: list, stop: threading.Event,
                         actor: str = "RayTrainWorker") -> None:
    """SIGKILL one ``actor`` process (a Ray Train worker, or its controller) once each of ``steps`` is
    logged and the checkpoint of the step before it is in storage (each kill after the group restarted
    from the previous one)."""
    from ray.util.state import list_actors

    from raysft.storage import checkpoints as ckpts

    metrics = run_dir / "metrics.jsonl"
    for step in steps:
        while not stop.is_set():
            lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
            logged = any(m.get("global_step", 0) >= step and "loss" in m for m in lines)
            if logged and any(c.complete and c.step == step - 1 for c in ckpts.scan(str(run_dir))):
                workers = list_actors(filters=[("class_name", "=", actor), ("state", "=", "ALIVE")])
                pids = sorted(w.pid for w in workers if w.pid not in killed)
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    break
            time.sleep(0.2)


def test_sigkill_of_a_worker_and_of_the_controller_resumes_with_exactly_the_same_data(clean_run, tmp_path, capsys):
    import torch

    _, clean = clean_run

    killed: list[int] = []
    others: list[str] = []  # every actor not Ray Train's own, SIGKILLed once step 1 is logged
    stop = threading.Event()
    controller: list[int] = []
    killers = [threading.Thread(target=_kill_a_worker_after, args=(tmp_path / "faulty", (3,), killed, stop), daemon=True),
               threading.Thread(target=_kill_a_worker_after, args=(tmp_path / "faulty", (5,), controller, stop,
                                                                   "TrainController"), daemon=True),
               threading.Thread(target=kill_other_actors_after, args=(tmp_path / "faulty", 1, others, stop), daemon=True)]
    for t in killers:
        t.start()
    capsys.readouterr()
    try:
        driver.run(compose(f"storage.path={tmp_path}", "storage.name=faulty", "scaling.max_failures=2", *CLEAN_RUN))
    finally:
        stop.set()
    out = capsys.readouterr().out
    faulty = tmp_path / "faulty"
    assert len(killed) == 1 and len(controller) == 1, f"workers killed: {killed}, controller: {controller}"
    # Ray Train restarted the group after the worker's death; the driver restarted the run after its
    # controller's (the driver is alive: it knows the newest checkpoint), and said so in one line.
    assert re.search(r"raysft: Ray Train's controller process died \(\w+\); the newest complete checkpoint is step 4 "
                     r"\(.*\): restarting the run from it \(1 of scaling.max_failures=2\)", out), out[-3000:]
    assert "<checked>" in others, others  # training needs no actor but Ray Train's (the workers read storage)
    summary = json.loads((faulty / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 4 and summary["global_step"] == STEPS  # restarted twice, last from step 4

    # Every micro-batch of the run, on every rank, is the one the uninterrupted run trained on:
    # none lost, none repeated (re-training the steps after the checkpoint replays the same rows).
    for rank in (0, 1):
        want, _ = _hashes(clean, rank)
        got, lines = _hashes(faulty, rank)
        assert sorted(want) == [(s, j) for s in range(1, STEPS + 1) for j in range(GA)]
        assert got == want
        assert lines > STEPS * GA  # the steps after each checkpoint really ran again

    # Same weights, and the metrics continue as if nothing happened.
    a, b = _weights(clean), _weights(faulty)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
    m_clean, m_faulty = _by_step(clean), _by_step(faulty)
    assert sorted(m_faulty) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert m_faulty[step]["learning_rate"] == pytest.approx(m_clean[step]["learning_rate"]), step
        assert m_faulty[step]["num_tokens"] == m_clean[step]["num_tokens"], step
        assert m_faulty[step]["loss"] == pytest.approx(m_clean[step]["loss"], abs=1e-4), step


def test_running_a_finished_run_again_trains_nothing_and_starts_no_worker(clean_run, tmp_path, capsys):
    """The same command run again once the run has finished (a retried job, a resubmit): it says so
    and starts no worker group; the run's files, model and summary stay the ones the run produced.
    A run whose newest checkpoint is its last step but that never saved its final model resumes
    there and trains nothing more."""
    import shutil

    _, clean = clean_run
    done = tmp_path / "clean"
    shutil.copytree(clean, done)
    shutil.copytree(clean.parent / "prepared", tmp_path / "prepared")  # the same data, reused by fingerprint
    keep = ("metrics.jsonl", "train_summary.json", "model/model.safetensors", "workers/batches_rank0.jsonl")
    before = {f: (done / f).read_bytes() for f in keep}
    capsys.readouterr()
    result = driver.run(compose(f"storage.path={tmp_path}", "storage.name=clean", *CLEAN_RUN))
    out = capsys.readouterr().out
    assert result.max_steps == STEPS and f"raysft: run clean already finished at step {STEPS}" in out, out
    assert "resuming from step" not in out
    assert {f: (done / f).read_bytes() for f in keep} == before
    assert json.loads((done / "train_summary.json").read_text())["resumed_from_step"] == 0

    # Without its train_summary.json (a run stopped after its last checkpoint, before its final save)
    # it is not finished: it resumes from step 6, trains nothing more and saves the model.
    (done / "train_summary.json").unlink()
    driver.run(compose(f"storage.path={tmp_path}", "storage.name=clean", *CLEAN_RUN))
    after = _by_step(done)
    assert sorted(after) == list(range(1, STEPS + 1))  # no step past the last
    summary = json.loads((done / "train_summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["resumed_from_step"] == STEPS
    _, lines = _hashes(done, 0)
    assert lines == STEPS * GA  # no micro-batch trained again

    # Bytes flipped in its only checkpoint (retention kept the newest): nothing trustworthy is left to
    # resume from; one line naming the file and both checksums, exit 7, before Ray starts.
    from raysft.run.failures import one_line
    from raysft.storage import checkpoints as ckpts

    (done / "train_summary.json").unlink()
    (only,) = [c for c in ckpts.scan(str(done)) if c.complete]
    weights = Path(only.uri) / "model.safetensors"
    weights.write_bytes(flip_bytes(weights.read_bytes()))
    with pytest.raises(ckpts.CorruptCheckpointError) as corrupt:
        driver.run(compose(f"storage.path={tmp_path}", "storage.name=clean", *CLEAN_RUN))
    code, line = one_line(corrupt.value)
    assert code == 7 and "every complete checkpoint" in line and "model.safetensors has crc32" in line, line
    assert "is corrupt: model.safetensors" in capsys.readouterr().out


def _global_rows(storage: Path, seed: int, count: int) -> list[str]:
    """Row hashes of the first ``count`` positions of the global training order: the run's prepared
    set read in its per-epoch permutation, as one worker taking every position would read it."""
    from raysft.data.prepared import open_prepared
    from raysft.data.shards import RowStream
    from raysft.train.batches import row_digests

    (prepared,) = (storage / "prepared").iterdir()
    stream = RowStream(open_prepared(str(prepared)).rows(), rank=0, world=1, batch=1, start=0, seed=seed, timeout_s=60)
    return [row_digests(stream.batch_at(g))[0] for g in range(count)]


def test_a_resume_on_more_workers_continues_the_global_data_order(grown_run):
    """What an elastic resize does (Ray Train restarts the group, bigger, from the latest checkpoint),
    at an epoch boundary: a run on 1 worker (accumulation 4) trains epoch 1 (steps 1-2); the same run
    resumed on 2 workers (accumulation 2, the same 4 rows per step) from the epoch-1 checkpoint trains
    epoch 2, not skipped (verl #7401): every step on the next rows of the same global order, none
    lost, none repeated, and each epoch every packed row once, in a new order (conftest.grown_run)."""
    from collections import Counter

    import numpy as np

    from raysft.data.prepared import open_prepared
    from raysft.train.batches import row_digests

    run_dir, steps = grown_run.run_dir, GROWN_STEPS[1]
    audit = [json.loads(x) | {"rank": r} for r in (0, 1)
             for x in (run_dir / "workers" / f"batches_rank{r}.jsonl").read_text().splitlines()]
    first = min(e["session"] for e in audit)
    assert {(e["rank"], e["micro"]) for e in audit if e["session"] == first} == {(0, j) for j in range(4)}
    assert {e["step"] for e in audit if e["session"] == first} == {1, 2}
    assert {e["step"] for e in audit if e["session"] > first} == {3, 4}
    assert json.loads((run_dir / "train_summary.json").read_text())["resumed_from_step"] == GROWN_STEPS[0]
    final = json.loads((run_dir / "workers" / "rank_1.json").read_text())
    assert final["world_size"] == 2 and final["gradient_accumulation_steps"] == 2
    assert final["wrapped_model"] == "DistributedDataParallel"
    # One worker trains as one plain process: no DDP around the model (worker._alone).
    assert grown_run.first_worker["world_size"] == 1 and grown_run.first_worker["wrapped_model"] != "DistributedDataParallel"

    # Global position of micro-batch j of step s on rank r of W workers (accumulation 4 / W, 1 row each):
    # ((s - 1) x GA + j) x W + r. The run trained position g on global row g of the prepared set's order.
    trained: dict[int, str] = {}
    for e in audit:
        world, ga = (1, 4) if e["session"] == first else (2, 2)
        (row,) = e["rows"]
        assert trained.setdefault(((e["step"] - 1) * ga + e["micro"]) * world + e["rank"], row) == row
    assert sorted(trained) == list(range(4 * steps))
    sequence = [trained[g] for g in range(4 * steps)]
    assert sequence == _global_rows(grown_run.root, compose(*grown_run.common).trainer.seed, 4 * steps)
    # Each epoch trains every packed row once (read from the set directly), epoch 2 in a new order.
    (prepared,) = (grown_run.root / "prepared").iterdir()
    every_row = row_digests(open_prepared(str(prepared)).rows().read("train", np.arange(GROWN_ROWS)))
    epoch1, epoch2 = sequence[:GROWN_ROWS], sequence[GROWN_ROWS:]
    assert Counter(epoch1) == Counter(epoch2) == Counter(every_row) and len(set(every_row)) == GROWN_ROWS
    assert epoch1 != epoch2


def test_elastic_accumulation_keeps_the_global_batch():
    from raysft.config.derived import grad_accum_for

    cfg = compose("scaling.num_workers=8", "scaling.min_workers=2", "trainer.gradient_accumulation_steps=2")
    assert [grad_accum_for(cfg, w) for w in (8, 4, 2, 5)] == [2, 4, 8, 3]  # 16 rows per step; 5 x 3 = 15 is nearest
    assert grad_accum_for(compose("trainer.gradient_accumulation_steps=2"), 1) == 2  # not elastic: as configured
