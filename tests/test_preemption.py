"""Preemption and elastic growth on a real multi-raylet Ray cluster on one machine.

The cluster is this module's own: a head (``ray start --head``, 1 CPU: one training worker fits)
and second raylets (``ray start --address``, 1 CPU each) started and stopped by the tests, on free
ports with their own temp dirs (see ``test_cluster.ray_head``). The runs are ``python -m raysft``
subprocesses connected with ``scaling.address``, so nothing here touches another Ray on the machine.

- Elastic growth: a run with ``scaling.min_workers=1 scaling.num_workers=2`` starts on the head
  alone (1 worker, accumulation 2 x GA); a second raylet joins mid-run; Ray Train restarts the group
  with 2 workers (accumulation GA) from the latest checkpoint, and every step trains on the same rows of
  the global order whichever group ran it.
- Preemption: ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds``
  on the raylet that hosts one of the 2 workers, while a periodic checkpoint crawls to S3 (moto,
  through the test's proxy narrowed to 2 MB/s): raysft stops that upload, checkpoints at the step it
  sees the notice (not a periodic step) and uploads that first, the link recovers, Ray Train tears the group down at the deadline (the drained
  raylet then exits by itself: a draining node shuts down once idle), a replacement raylet joins
  (the autoscaler's job on a cloud), the group restarts from that checkpoint, and every rank trains
  on exactly the rows a clean run trains.

The clean reference is the global row order read from the prepared set (rank ``r`` of ``W`` takes
position ``((s - 1) x GA + j) x W + r`` for micro-batch ``j`` of step ``s``): what an uninterrupted
run of the same config trains (test_resume checks runs against it and against a real clean run).
A clean run of its own here would cost another minute of the ~4 this module may take on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import compose
from test_cluster import Head, _free_ports, _ray_env, _stop_ray_under, ray_head

from raysft.storage import checkpoints as ckpts
from raysft.storage import files

# Accumulation of the 2-worker runs: 12 rows per optimizer step. The faults here need steps that take a
# while (a raylet joining, a drain's deadline before the run ends): ~2.5 s a step on 2 CPU workers.
GA = 6
COMMON = [f"trainer.gradient_accumulation_steps={GA}", "trainer.eval_steps=null", "monitor.sample_prompts=[]",
          "monitor.log_batch_hashes=true", "trainer.save_strategy=steps"]
# Preemption: periodic checkpoints at 6 and 12 (the last step); the drain comes after the one at 6, its
# notice is checked every step, and its deadline (sized from the step time) falls ~5 steps before step 12
# (with 4 it was once reached first: steps ran faster once the thin link recovered).
PRE_STEPS, PRE_SAVE = 12, 6
PREEMPTIBLE = [*COMMON, f"trainer.max_steps={PRE_STEPS}", f"trainer.save_steps={PRE_SAVE}",
               "scaling.preemption_check_steps=1", "scaling.max_preemption_failures=1"]
ELASTIC_STEPS = 12  # a raylet joining and the group's restart take ~30 s on a loaded 2-core box
ELASTIC = [*COMMON, f"trainer.max_steps={ELASTIC_STEPS}", "trainer.save_steps=2", "scaling.num_workers=2",
           "scaling.min_workers=1", "scaling.elastic_resize_interval_s=2"]


# ----------------------------------------------------------------------------- the callback alone (no Ray)


def _info(deadline_ms=None, nodes=("n1",), ranks=(1,)):
    return SimpleNamespace(deadline_ms=deadline_ms, preempted_node_ids=list(nodes), preempted_ranks=list(ranks))


def _step(cb, step):
    control = SimpleNamespace(should_save=False)
    cb.on_step_end(None, SimpleNamespace(global_step=step), control)
    return control.should_save


def test_a_notice_saves_once_at_the_next_check(tmp_path):
    from raysft.train.preemption import PreemptionCallback

    answers = iter([None, _info(123), _info(123), _info(456)])
    calls = []
    cb = PreemptionCallback(2, rank=0, metrics_path=None, get_info=lambda: calls.append(1) or next(answers))
    saved = [s for s in range(1, 9) if _step(cb, s)]
    assert len(calls) == 4  # steps 2, 4, 6, 8: every rank the same number of times (a barrier)
    assert saved == [4, 8]  # once per notice: 123 seen at 4 (and again at 6), 456 at 8
    assert cb.notice.step == 8 and cb.notice.deadline_ms == 456

    off = PreemptionCallback(0, rank=0, metrics_path=None, get_info=lambda: pytest.fail("checked with checks off"))
    assert not any(_step(off, s) for s in range(1, 6))


def test_rank0_records_the_notice_to_complete_checkpoint_time(tmp_path):
    from raysft.train.preemption import EVENT, PreemptionCallback

    metrics = tmp_path / "metrics.jsonl"
    deadline_ms = int((time.time() + 30) * 1000)
    cb = PreemptionCallback(1, rank=0, metrics_path=metrics, get_info=lambda: _info(deadline_ms, ranks=[1]),
                            wait_complete_s=5)
    assert _step(cb, 3)
    cb.on_save(None, SimpleNamespace(global_step=3), None)
    ckpt = tmp_path / "checkpoint_x"
    ckpt.mkdir()
    (ckpt / "model.bin").write_bytes(b"x" * 10)
    ckpts.write_manifest(ckpt, 0, 2, {"global_step": 3})
    cb.checkpoint_uploaded(2, str(ckpt))  # another checkpoint's upload: not the notice's
    cb.checkpoint_uploaded(3, str(ckpt))  # rank 0's part is in; rank 1's manifest lands 0.5 s later
    time.sleep(0.5)
    ckpts.write_manifest(ckpt, 1, 2, {})
    cb.on_train_end(None, None, None)  # waits for the timer
    (rec,) = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert rec["event"] == EVENT and rec["global_step"] == 3 and rec["complete"] and rec["preempted_ranks"] == [1]
    assert 0.5 <= rec["notice_to_checkpoint_s"] < 5 and rec["notice_to_saved_s"] <= rec["notice_to_checkpoint_s"]
    assert 20 < rec["deadline_left_s"] < 30


def test_restart_budgets_come_from_the_scaling_group():
    from raysft.run.restarts import failure_config, survives

    local = compose()
    fc = failure_config(local)
    assert (fc.max_failures, fc.max_preemption_failures, fc.preemption_grace_s) == (0, 0, 0.0)  # fails fast
    assert survives(local) == ("worker failures: no (scaling.max_failures=0); preemptions: no "
                               "(scaling.max_preemption_failures=0), a checkpoint on notice (checked every 5 steps); "
                               "workers: fixed 2")
    for preset in ("recipe=smollm3_mid", "recipe=smollm3_sft", "scaling=gpu_1x8"):
        fc = failure_config(compose(preset))
        assert (fc.max_failures, fc.max_preemption_failures, fc.preemption_grace_s) == (3, -1, 60.0), preset
    assert failure_config(compose("scaling=gpu_1")).max_preemption_failures == -1
    line = survives(compose("recipe=smollm3_sft", "deepspeed=none", "scaling.min_workers=32", "scaling.preemption_check_steps=0"))
    assert line == ("worker failures: 3 restarts; preemptions: unlimited restarts, no checkpoint on notice "
                    "(scaling.preemption_check_steps=0), 60 s grace past the deadline; workers: elastic 32-64, "
                    "grows when more fit (checked every 60 s)")
    with pytest.raises(ValueError, match="max_preemption_failures"):
        compose("scaling.max_preemption_failures=-2")


# ----------------------------------------------------------------------------- a cluster of raylets


@dataclass
class Cluster:
    head: Head
    root: Path  # storage.path of every run (the prepared data set is shared)
    raylets: dict[str, str] = field(default_factory=dict)  # node id -> temp dir, of the raylets started here

    def add_raylet(self) -> str:
        before = {n.node_id for n in self.workers()}
        temp_dir = tempfile.mkdtemp(prefix="rsftw", dir="/tmp")
        nm, om, agent, agent_grpc, metrics, rt_env = _free_ports(6)
        p = subprocess.run(["ray", "start", f"--address={self.head.gcs_address}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                            f"--node-manager-port={nm}", f"--object-manager-port={om}",
                            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
                            "--object-store-memory=200000000", "--disable-usage-stats"],
                           env=self.head.env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, f"ray start (worker node) failed:\n{p.stdout}\n{p.stderr}"
        (node_id,) = _wait(lambda: {n.node_id for n in self.workers()} - before, 60, "the new raylet")
        self.raylets[node_id] = temp_dir
        return node_id

    def nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.head.dashboard_url) if n.state == "ALIVE"]

    def workers(self) -> list:
        """The alive non-head nodes."""
        return [n for n in self.nodes() if not n.is_head_node]

    def only_head(self) -> None:
        for node_id in list(self.raylets):
            self.kill(node_id)
        _wait(lambda: not self.workers(), 60, "the worker raylets to leave")

    def kill(self, node_id: str) -> None:
        """Stop a raylet started here and every process of its node."""
        _stop_ray_under(self.raylets.pop(node_id), timeout_s=5)

    def drain(self, node_id: str, deadline_s: int) -> None:
        p = subprocess.run(["ray", "drain-node", f"--address={self.head.gcs_address}", f"--node-id={node_id}",
                            "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=test spot reclaim",
                            f"--deadline-remaining-seconds={deadline_s}"],
                           env=self.head.env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr

    def start(self, name: str, *overrides: str, storage: str | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "raysft", f"scaling.address={self.head.gcs_address}",
                                 f"storage.path={storage or self.root}", f"storage.name={name}", *overrides],
                                env=self.head.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)

    def finish(self, p: subprocess.Popen, name: str, timeout_s: float = 300) -> str:
        try:
            p.wait(timeout=timeout_s)
        finally:
            if p.poll() is None:
                p.kill()
        out = (self.root / f"{name}.log").read_text()
        assert p.returncode == 0, out[-8000:]
        return out


def _wait(cond, timeout_s: float, what: str, every_s: float = 0.3):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if value := cond():
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if '"loss"' in x] if path.exists() else []


def _complete_at(run_dir: Path, step: int) -> bool:
    return run_dir.exists() and any(c.complete and c.step == step for c in ckpts.scan(str(run_dir)))


def _audit(run_dir: Path) -> list[dict]:
    return [json.loads(x) | {"rank": int(f.stem.rsplit("rank", 1)[1])}
            for f in sorted((run_dir / "workers").glob("batches_rank*.jsonl")) for x in f.read_text().splitlines()]


def _global_order(root: Path | str, count: int) -> list[str]:
    """Row hashes of the first ``count`` positions of the global training order (the prepared set
    under storage ``root`` in its per-epoch permutation), as one worker taking every position reads them."""
    from raysft.data.prepared import open_prepared
    from raysft.data.shards import RowStream
    from raysft.storage import files
    from raysft.train.batches import row_digests

    (prepared,) = {i.path.rstrip("/").split("/")[-1] for i in files.list_dir(files.join(str(root), "prepared"))}
    stream = RowStream(open_prepared(files.join(str(root), "prepared", prepared)).rows(), rank=0, world=1, batch=1, start=0,
                       seed=compose().trainer.seed, timeout_s=60)
    return [row_digests(stream.batch_at(g))[0] for g in range(count)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    # The preemption watcher polls drains every second (Ray's default: 5 s), in the controller's process.
    # Every node reaches S3 (moto, through the test's proxy) with the credentials in this environment.
    env = _ray_env(RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="1")
    with ray_head(num_cpus=1, env=env) as head:
        c = Cluster(head, tmp_path_factory.mktemp("preempt"))
        try:
            yield c
        finally:
            for d in [*c.raylets.values(), head.temp_dir]:  # a short grace: SIGTERMed Ray processes may linger 20 s
                _stop_ray_under(d, timeout_s=5)


# ----------------------------------------------------------------------------- elastic growth


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_elastic_run_grows_when_a_raylet_joins_and_keeps_the_global_order(cluster):
    cluster.only_head()
    run_dir = cluster.root / "elastic"
    started = time.time()
    p = cluster.start("elastic", *ELASTIC)
    # One worker (the head's CPU) trains; once its step-2 checkpoint is in storage, a node joins.
    _wait(lambda: _complete_at(run_dir, 2) or p.poll() is not None, 240, "the step-2 checkpoint")
    assert p.poll() is None, (cluster.root / "elastic.log").read_text()[-6000:]
    cluster.add_raylet()
    out = cluster.finish(p, "elastic")
    print(f"elastic run: {time.time() - started:.0f} s")
    assert "workers: elastic 1-2" in out

    audit = _audit(run_dir)
    first = min(e["session"] for e in audit)
    assert {(e["rank"], e["micro"]) for e in audit if e["session"] == first} == {(0, j) for j in range(2 * GA)}
    grown = [e for e in audit if e["session"] > first]
    assert {(e["rank"], e["micro"]) for e in grown} == {(r, j) for r in (0, 1) for j in range(GA)}
    assert min(e["step"] for e in grown) > 2  # resumed from a checkpoint, not from scratch
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["global_step"] == ELASTIC_STEPS and summary["resumed_from_step"] >= 2
    assert json.loads((run_dir / "workers" / "rank_1.json").read_text())["gradient_accumulation_steps"] == GA

    # Step s trained on global positions 2GA(s-1) .. 2GA s - 1, whichever group ran it (a step re-trained
    # after the resize on the same rows): none lost, none repeated.
    order = _global_order(cluster.root, 2 * GA * ELASTIC_STEPS)
    for s in range(1, ELASTIC_STEPS + 1):
        sessions = {e["session"] for e in audit if e["step"] == s}
        assert sessions, s
        for session in sessions:
            got = sorted(d for e in audit if e["step"] == s and e["session"] == session for d in e["rows"])
            assert got == sorted(order[2 * GA * (s - 1):2 * GA * s]), (s, session)


# ----------------------------------------------------------------------------- preemption


def _hashes(run_dir: Path) -> tuple[dict[tuple[int, int, int], list[str]], int]:
    """(rank, step, micro) -> its rows (the same whenever re-trained), and the line count."""
    out: dict[tuple[int, int, int], list[str]] = {}
    audit = _audit(run_dir)
    for e in audit:
        key = (e["rank"], e["step"], e["micro"])
        assert out.setdefault(key, e["rows"]) == e["rows"], f"{key} trained on other rows when re-trained"
    return out, len(audit)


class StepClock:
    """When each ``step N/M | loss`` line reached the run's log (a run in S3 has no local metrics)."""

    def __init__(self, log: Path):
        self.log, self.seen = log, {}

    def poll(self) -> dict[int, float]:
        for m in re.finditer(r"(?m)^step (\d+)/\d+ \| loss ", self.log.read_text() if self.log.exists() else ""):
            self.seen.setdefault(int(m[1]), time.time())
        return self.seen

    def wait_step(self, step: int, p: subprocess.Popen, timeout_s: float = 240) -> None:
        _wait(lambda: step in self.poll() or p.poll() is not None, timeout_s, f"step {step}", every_s=0.1)
        assert p.poll() is None, self.log.read_text()[-6000:]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_preemption_during_a_checkpoint_upload_checkpoints_on_notice_and_resumes_exactly(cluster, s3):
    """A run in S3 whose link thins to 2 MB/s as its periodic checkpoint (step 6) uploads; the node of
    one worker is drained (PREEMPTION, with a deadline) during that upload. The notice stops the
    older upload (Ray uploads one checkpoint at a time) and puts the checkpoint on notice first; the
    link recovers; Ray restarts the group at the deadline and it resumes from the notice's step, with
    the earlier attempt's metrics and batch log continued in S3 and every row as a clean run trains it."""
    if not cluster.raylets:
        cluster.add_raylet()
    (raylet,) = cluster.raylets  # with the head's 1 CPU, one of the 2 workers runs here
    s3.client.create_bucket(Bucket="preempt")  # its own: moto lists a prefix by scanning the whole bucket
    storage, name = "s3://preempt/runs", "preempted"
    started = time.time()
    s3.proxy.up()
    p = cluster.start(name, *PREEMPTIBLE, storage=storage)
    clock = StepClock(cluster.root / f"{name}.log")
    try:
        clock.wait_step(PRE_SAVE - 1, p)
        s3.proxy.slow(2 << 20)  # before the step-6 save: its upload crawls
        clock.wait_step(PRE_SAVE, p)
        time.sleep(1.0)  # the local save (~0.3 s), then Ray's upload thread sends it over the thin link
        seen = clock.poll()
        step_s = (seen[PRE_SAVE] - seen[2]) / (PRE_SAVE - 2)
        # The notice must be seen (drain call ~2 s, watcher poll 1 s, then the next step's end), the
        # checkpoint saved and uploaded before the deadline (measured: ~3 s to the notice, ~1.5 s to
        # the checkpoint), and the deadline come well before the last step.
        deadline_s = math.ceil(5 + 2 * step_s)
        drained_at = time.time()
        cluster.drain(raylet, deadline_s)
        drain_call_s = time.time() - drained_at
        _wait(lambda: "preemption notice at step" in (cluster.root / f"{name}.log").read_text() or p.poll() is not None,
              deadline_s + 30, "the notice", every_s=0.1)
    finally:
        s3.proxy.slow(None)  # the link recovers

    def gone():
        return raylet not in {n.node_id for n in cluster.workers()}

    with contextlib.suppress(AssertionError):
        _wait(gone, deadline_s + 60, "the drained raylet to exit")
    gone_s = time.time() - drained_at
    cluster.kill(raylet)  # (its processes, if any are left, and its temp dir)
    cluster.add_raylet()  # the replacement node (what the autoscaler does on a cloud)
    out = cluster.finish(p, name)
    assert "preemptions: 1 restart, a checkpoint on notice (checked every 1 steps)" in out

    run_dir = cluster.root / "preempted-from-s3"
    files.download_dir(f"{storage}/{name}", run_dir)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
               if '"preemption_checkpoint"' in x]
    (rec,) = records  # once per notice, written by the first attempt's rank 0 and continued in S3
    step = rec["global_step"]
    print(f"preempted run {time.time() - started:.0f} s: {step_s:.1f} s/step, step-{PRE_SAVE} upload in flight, "
          f"{deadline_s} s deadline (drain call {drain_call_s:.1f} s); notice at step {step}, "
          f"{rec['notice_unix_s'] - drained_at:.1f} s after the drain; notice -> checkpoint complete "
          f"{rec['notice_to_checkpoint_s']} s (local save {rec['notice_to_saved_s']} s), {rec['deadline_left_s']} s "
          f"before the deadline; raylet gone {gone_s:.1f} s after the drain")
    assert rec["complete"] and rec["deadline_left_s"] > 0
    assert PRE_SAVE < step < PRE_STEPS, step  # the step of the notice, not a periodic one
    assert rec["preempted_nodes"] == [raylet] and len(rec["preempted_ranks"]) == 1
    assert f"raysft: preemption checkpoint at step {step} complete" in out
    assert re.search(rf"upload of checkpoint \S+ \(step {PRE_SAVE}\) stopped: the preemption checkpoint at step "
                     rf"{step} goes first", out), out[-6000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == step and summary["global_step"] == PRE_STEPS
    # No checkpoint is left half-written: the stopped one was deleted at the resume.
    assert all(c.complete for c in ckpts.scan(f"{storage}/{name}"))
    logged = {r["global_step"] for r in _steps(run_dir)}
    assert logged == set(range(1, PRE_STEPS + 1))  # both attempts' steps, in one metrics.jsonl

    # Every rank trained every micro-batch on the rows a clean run trains; the steps between the
    # checkpoint and the deadline ran twice, on the same rows (the first attempt's lines kept).
    got, lines = _hashes(run_dir)
    order = _global_order(storage, 2 * GA * PRE_STEPS)
    want = {(r, s, j): [order[((s - 1) * GA + j) * 2 + r]] for r in (0, 1) for s in range(1, PRE_STEPS + 1)
            for j in range(GA)}
    assert got == want and lines >= len(want)
