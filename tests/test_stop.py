"""A run in S3 stopped by real signals, and two real drivers racing for it (raysft/run/stop.py,
raysft/storage/lease.py). SIGTERM under `ray job stop`, and two drivers on a local path: test_cluster.

1. A driver (this process, on the session's Ray) trains; a second driver (a real `raysft` process)
   started with the same storage.name refuses before Ray starts, in one line, exit 9.
2. SIGINT to the first: it checkpoints at the end of that step and stops, in one line, exit 130.
3. The same command again (a real process), SIGINT twice at once: it stops at once and says that no
   checkpoint was taken.
4. The same command again: it resumes from the step-N checkpoint and finishes; every step was trained
   once, on exactly the rows of the global order (the batch audit), and the run's attempts are all
   recorded (not the refused driver's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, compose

from raysft.run import driver
from raysft.run.failures import RunStopped
from raysft.storage import files, lease

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, GA = 8, 2
NAME = "signalled"


def _overrides(bucket: str) -> list[str]:
    return [f"storage.path=s3://{bucket}/stop-runs", f"storage.name={NAME}", f"trainer.max_steps={STEPS}",
            f"trainer.gradient_accumulation_steps={GA}", "trainer.save_strategy=steps", "trainer.save_steps=2",
            "trainer.save_total_limit=100", "trainer.eval_steps=null",
            "monitor.sample_prompts=[]", "monitor.log_batch_hashes=true"]


def _raysft(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.Popen([sys.executable, "-m", "raysft", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_signals_stop_with_a_checkpoint_and_a_second_driver_is_refused(ray_cluster, s3):
    from raysft.storage.rundir import Storage

    s3.proxy.up()
    args = _overrides(s3.bucket)
    run = Storage.at(f"s3://{s3.bucket}/stop-runs").run(NAME)
    seen: dict = {}

    def race_then_interrupt() -> None:
        while not files.exists(run.file("lease.json")):
            time.sleep(0.05)
        second = _raysft(args)  # a double-submitted job, while the first one starts up and trains
        out, err = second.communicate(timeout=300)
        seen["second"] = (second.returncode, err.strip().splitlines()[-1] if err.strip() else out)
        while not any(c.complete and c.step == 2 for c in run.checkpoints()):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C on the first driver

    t = threading.Thread(target=race_then_interrupt, daemon=True)
    t.start()
    with pytest.raises(RunStopped) as stopped:
        driver.run(compose(*args))
    t.join(timeout=10)
    code, line = seen["second"]
    assert code == 9 and line.startswith(f"raysft: error: run {NAME} is being written by ") and \
        "wait for it, stop it, or use another storage.name" in line, line
    assert stopped.value.code == 130, stopped.value.line
    last = run.latest_checkpoint()
    assert last is not None and 2 < last.step < STEPS
    assert stopped.value.line == (f"stopped at step {last.step} (checkpoint at step {last.step} in {last.uri}) "
                                  "— run the same command to resume")
    assert lease.read(run.uri).released

    # The same command again, interrupted twice as soon as it holds the run: it stops at once.
    again = _raysft(args)
    first_token = lease.read(run.uri).token
    deadline = time.time() + 120
    while (held := lease.read(run.uri)).token == first_token and time.time() < deadline:
        time.sleep(0.05)
    again.send_signal(signal.SIGINT)
    time.sleep(0.3)
    again.send_signal(signal.SIGINT)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 130, (out + err)[-3000:]
    assert err.strip().splitlines()[-1] == (f"raysft: stopped at once (SIGINT twice), without a checkpoint: the newest "
                                            f"is step {last.step} in {last.uri} — run the same command to resume from it")
    assert run.latest_checkpoint().uri == last.uri and held.pid == again.pid

    # ... and once more: it resumes from the signal's checkpoint and trains every step once.
    result = driver.run(compose(*args))
    assert result.max_steps == STEPS
    attempts = [json.loads(x) for x in files.read_bytes(run.file("attempts.jsonl")).decode().splitlines()]
    assert [a["ended_by"] for a in attempts] == ["stopped by SIGINT", "stopped at once (SIGINT twice)", "finished"]
    assert [a["from_step"] for a in attempts] == [0, last.step, last.step] and attempts[-1]["to_step"] == STEPS
    summary = json.loads(files.read_bytes(run.file("train_summary.json")))
    assert summary["resumed_from_step"] == last.step and summary["global_step"] == STEPS
    audit = [json.loads(x) | {"rank": r} for r in (0, 1)
             for x in files.read_bytes(run.file(f"workers/batches_rank{r}.jsonl")).decode().splitlines()]
    trained = {}
    n = 2 * GA * STEPS  # 2 workers x 1 row x GA: micro-batch j of step s on rank r is position ((s-1) GA + j) 2 + r
    for e in audit:
        assert trained.setdefault(((e["step"] - 1) * GA + e["micro"]) * 2 + e["rank"], e["rows"][0]) == e["rows"][0]
    assert sorted(trained) == list(range(n)) and len(audit) == n  # none lost, none trained twice
    assert [trained[g] for g in range(n)] == _global_rows(run, compose(*args).trainer.seed, n)


def _global_rows(run, seed: int, count: int) -> list[str]:
    """The first ``count`` rows of the run's global training order, read from its prepared set."""
    from raysft.data.prepared import open_prepared
    from raysft.data.shards import RowStream
    from raysft.train.batches import row_digests

    (prepared,) = files.list_dir(files.join(run.root, "prepared"))
    stream = RowStream(open_prepared(f"s3://{prepared.path}").rows(), rank=0, world=1, batch=1, start=0, seed=seed,
                       timeout_s=60)
    return [row_digests(stream.batch_at(g))[0] for g in range(count)]
