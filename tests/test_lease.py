"""One writer per run (raysft/storage/lease.py), on a local path and on S3 (moto's server enforces
If-None-Match and If-Match): a live lease refuses a second driver, a stale one is taken over, and the
driver it was taken from learns it lost it. Two real drivers racing: tests/test_stop.py."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest

from raysft.storage import lease
from raysft.storage.lease import Lease, LeaseHeldError, LeaseLostError

_RUNS = itertools.count()


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    s3 = request.getfixturevalue("s3")
    s3.proxy.up()
    return f"s3://{s3.bucket}/leases/run-{next(_RUNS)}"


def test_a_live_lease_refuses_a_second_driver_and_a_stale_one_is_taken_over(run_uri):
    a, note = Lease.acquire(run_uri, "r", timeout_s=1.5)
    assert note is None and lease.read(run_uri).token == a.token
    with pytest.raises(LeaseHeldError, match=r"run r is being written by .* pid \d+ since .* \(lease renewed \d+ s ago\) "
                                             r"— wait for it, stop it, or use another storage.name"):
        Lease.acquire(run_uri, "r", timeout_s=1.5)
    a.renew()  # renewing keeps it live
    time.sleep(2.0)  # ... and then the holder freezes: nothing renews it for longer than the timeout
    b, note = Lease.acquire(run_uri, "r", timeout_s=1.5)
    assert note.startswith("took over the lease of run r from ") and "not renewed for" in note, note
    assert lease.read(run_uri).token == b.token
    with pytest.raises(LeaseLostError):
        a.renew()  # the frozen driver wakes up: its conditional write loses
    assert a.lost_to.token == b.token
    a.release()  # never touches the new holder's lease
    assert lease.read(run_uri).token == b.token and not lease.read(run_uri).released
    b.request_stop("SIGTERM")
    b.renew()
    assert lease.read(run_uri).stop == "SIGTERM"  # what the workers watch
    b.release()
    assert lease.read(run_uri).released
    c, note = Lease.acquire(run_uri, "r", timeout_s=60)  # a released lease is free at once, no line
    assert note is None
    c.release()


def test_a_lease_whose_process_on_this_host_is_gone_is_taken_over_at_once(run_uri, tmp_path):
    """A driver killed with SIGKILL (it never released): the next one on the same host need not wait
    out storage.lease_timeout_s."""
    script = (f"from raysft.storage.lease import Lease; l, _ = Lease.acquire({run_uri!r}, 'r', 600); "
              "print(l.token, flush=True)")
    token = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    held = lease.read(run_uri)
    assert held.token == token and not held.released
    b, note = Lease.acquire(run_uri, "r", timeout_s=600)
    assert f"its process {held.pid} on this host is gone" in note
    b.release()


def test_workers_stop_without_writing_when_their_drivers_lease_is_taken_over(run_uri):
    """The workers' side (raysft/train/control.py): rank 0 watches the lease; once another driver has
    taken it over, the next step end stops training with no save, log or evaluation; a stop request
    instead checkpoints that step."""
    from transformers import TrainerControl, TrainerState

    from raysft.train import control as ctl

    held, _ = Lease.acquire(run_uri, "r", timeout_s=0.5)
    watch = ctl.RunControl(run_uri, held.token, rank=0, world=1)
    state = TrainerState(global_step=4)
    c = watch.on_step_end(None, state, TrainerControl(should_save=True, should_log=True))
    assert c.should_save and c.should_log and not c.should_training_stop  # live: nothing changes
    held.request_stop("SIGTERM")
    held.renew()
    deadline = time.time() + 10
    while watch.verdict != ctl.STOP and time.time() < deadline:
        time.sleep(0.1)
    c = watch.on_step_end(None, state, TrainerControl())
    assert c.should_save and c.should_training_stop and watch.stopped_at == 4 and watch.signal == "SIGTERM"

    time.sleep(0.6)  # the driver froze past storage.lease_timeout_s: another one takes the run over
    other, note = Lease.acquire(run_uri, "r", timeout_s=0.5)
    assert note and "took over" in note
    while watch.verdict != ctl.LOST and time.time() < deadline + 10:
        time.sleep(0.1)
    c = watch.on_step_end(None, TrainerState(global_step=5), TrainerControl(should_save=True, should_log=True,
                                                                            should_evaluate=True))
    assert watch.lost and c.should_training_stop and not (c.should_save or c.should_log or c.should_evaluate)
    assert other.token in lease.read(run_uri).token and watch.holder == other.info.holder
    watch.on_train_end(None, state, c)
    other.release()
