"""A run in S3 stopped by real signals, and two real drivers racing for it (raysft/run/stop.py,
raysft/storage/lease.py). SIGTERM under `ray job stop`, and two drivers on a local path: test_cluster.

1. A driver (this process, on the session's Ray) trains; a second driver (a real `raysft` process)
   started with the same storage.name refuses before Ray starts, in one line, exit 9.
2. SIGINT to the first: it checkpoints at the end of that step and stops, in one line, exit 130.
3. The same command again (a real process), SIGINT twice at once: it exits there, saying that no
   checkpoint was taken; its lease (its process gone) is taken over at once by the next driver.
4. 4 KB flipped in that checkpoint's weights in S3 (the object written again, same size); the same
   command again: it names the corrupted file and its checksums, resumes from the checkpoint before
   it and finishes, on exactly the rows and to the weights of the uninterrupted run (conftest's
   clean run, the same config on a local path); every attempt is recorded, not the refused driver's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load, load_file
from conftest import CLEAN_RUN, ROOT, compose
from faults import flip_bytes

from raysft.run import driver
from raysft.run.failures import RunStopped
from raysft.storage import checksums, files, lease

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, GA = 6, 2  # conftest.CLEAN_RUN: checkpoints every 2 steps
NAME = "signalled"


def _overrides(bucket: str) -> list[str]:
    return [f"storage.path=s3://{bucket}/stop-runs", f"storage.name={NAME}", *CLEAN_RUN, "trainer.save_total_limit=100"]


def _raysft(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.Popen([sys.executable, "-m", "raysft", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_signals_stop_with_a_checkpoint_and_a_second_driver_is_refused(clean_run, s3, capsys):
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
    assert err.strip().splitlines()[-1] == ("raysft: stopped at once (SIGINT twice), without a checkpoint — run the "
                                            "same command to resume from the newest one")
    assert run.latest_checkpoint().uri == last.uri and held.pid == again.pid

    # Bytes flipped in that checkpoint's weights in S3; once more: it is skipped, named with both
    # checksums, for the one before it, and the run ends as if never interrupted.
    key = f"stop-runs/{NAME}/{last.uri.rsplit('/', 1)[-1]}/model.safetensors"
    good = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    bad = flip_bytes(good)
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=bad)
    before = max(c.step for c in run.checkpoints() if c.step < last.step)
    capsys.readouterr()
    result = driver.run(compose(*args))
    out = capsys.readouterr().out
    skipped = next(x for x in out.splitlines() if "is corrupt" in x)
    assert skipped == (f"raysft: warning: checkpoint {last.uri} (step {last.step}) is corrupt: model.safetensors has "
                       f"crc32 {checksums.of_bytes(bad)}, its manifest says {checksums.of_bytes(good)} — skipped; "
                       f"using the previous complete checkpoint (step {before})"), skipped
    assert f"raysft: resuming from step {before} " in out
    assert result.max_steps == STEPS
    attempts = [json.loads(x) for x in files.read_bytes(run.file("attempts.jsonl")).decode().splitlines()]
    # (the driver stopped at once wrote no record: it exited there)
    assert [a["ended_by"] for a in attempts] == ["stopped by SIGINT", "finished"]
    assert [a["from_step"] for a in attempts] == [0, before] and attempts[-1]["to_step"] == STEPS
    summary = json.loads(files.read_bytes(run.file("train_summary.json")))
    assert summary["resumed_from_step"] == before and summary["global_step"] == STEPS

    # Every micro-batch on every rank is the uninterrupted run's (re-trained ones the same rows), and so are the weights.
    _, clean = clean_run
    for rank in (0, 1):
        want = _hashes((clean / "workers" / f"batches_rank{rank}.jsonl").read_text())
        assert _hashes(files.read_bytes(run.file(f"workers/batches_rank{rank}.jsonl")).decode()) == want
    a = load_file(clean / "model" / "model.safetensors")
    b = load(files.read_bytes(run.file("model/model.safetensors")))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def _hashes(text: str) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for e in map(json.loads, text.splitlines()):
        assert out.setdefault((e["step"], e["micro"]), e["rows"]) == e["rows"], f"step {e['step']} re-trained on other rows"
    assert sorted(out) == [(s, j) for s in range(1, STEPS + 1) for j in range(GA)]
    return out
