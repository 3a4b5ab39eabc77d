"""The loss-spike guard (raysft/train/anomaly.py, raysft/run/anomalies.py) on a poisoned batch made for
real: a saved model whose input embedding of one token is NaN, and that token in exactly one packed
row of the default job's data, which the global order puts in step 3. Its forward gives a NaN loss
and grad norm at step 3 and nowhere else.

- ``policy=stop``: the run ends at step 3 in one line (exit 8) naming the step, the loss and the last
  good checkpoint (step 2); nothing after it is saved.
- then ``policy=rollback``, the same run: it resumes from step 2, skips the rows of step 3 (recorded),
  trains step 3 on the next rows of the global order and finishes.
- ``policy=warn`` and the spike rule: the guard itself, on the values it is handed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLEAN_RUN, compose

from raysft.run import driver
from raysft.run.failures import RunFailedError

ROWS_PER_STEP = 2  # conftest.CLEAN_RUN on 1 worker (a lighter group to restart): 1 row x accumulation 2
POISONED_STEP = 3


@pytest.fixture(scope="module")
def poisoned(clean_run, tmp_path_factory):
    """(storage root with the clean run's prepared set, the model folder, the poisoned packed row)."""
    import torch

    from raysft.data.prepared import open_prepared
    from raysft.data.shards import train_order
    from raysft.train import model as models

    _, clean = clean_run
    root = tmp_path_factory.mktemp("poison")
    shutil.copytree(clean.parent / "prepared", root / "prepared")  # the same data, reused by fingerprint
    (prepared,) = (root / "prepared").iterdir()
    rows = open_prepared(str(prepared)).rows()
    n = rows.num_rows("train")
    train = rows.read("train", np.arange(n))["input_ids"]
    evals = rows.read("eval", np.arange(rows.num_rows("eval")))["input_ids"]
    order = train_order(n, compose().trainer.seed, 0)
    in_rows: dict[int, set[int]] = {}
    for r in range(n):
        for tok in np.unique(train[r]):
            in_rows.setdefault(int(tok), set()).add(r)
    step_rows = order[(POISONED_STEP - 1) * ROWS_PER_STEP:POISONED_STEP * ROWS_PER_STEP]
    token, row = next((t, next(iter(rs))) for t, rs in sorted(in_rows.items())
                      if len(rs) == 1 and next(iter(rs)) in step_rows and t not in evals)

    cfg = compose("model.config_overrides.tie_word_embeddings=false")
    net = models.build_model(cfg.model, models.resolve_accel(cfg.model, bf16=False), seed=0)
    with torch.no_grad():
        net.get_input_embeddings().weight[token] = float("nan")
    model_dir = root / "poisoned-model"
    net.save_pretrained(model_dir)
    return root, model_dir, row


def _run(root: Path, model_dir: Path, name: str, *overrides: str):
    return driver.run(compose(f"storage.path={root}", f"storage.name={name}", *CLEAN_RUN, "trainer.save_total_limit=10",
                              "monitor.sample_prompts=[]", "trainer.eval_steps=null", "scaling.num_workers=1",
                              f"model.name_or_path={model_dir}", "model.init=pretrained", "model.tokenizer=bundled:smollm3",
                              *overrides))


@pytest.mark.ray
@pytest.mark.slow
def test_a_poisoned_batch_stops_the_run_then_a_rollback_skips_it_with_the_data_position_exact(poisoned, capsys):
    """One run, as a user meets it: ``policy=stop`` ends it at step 3 in one line; the same command
    with ``policy=rollback`` (what that line suggests) resumes from step 2, hits the batch again, rolls
    back past it and finishes."""
    from raysft.data.prepared import open_prepared
    from raysft.data.shards import RowStream
    from raysft.train.batches import row_digests

    root, model_dir, row = poisoned
    run = root / "poisoned"
    with pytest.raises(RunFailedError) as failed:
        _run(root, model_dir, "poisoned", "trainer.anomaly.policy=stop")
    f = failed.value.failure
    assert f.code == 8
    # (the NaN reaches the gradient for sure; the loss too when a trained position attends to it)
    assert re.match(rf"non-finite (loss|grad norm) at step {POISONED_STEP} \(nan\) \(trainer.anomaly.policy=stop\): "
                    r"stopped, nothing saved after it; the last good checkpoint is step 2 \(.*\) — rerun with "
                    r"trainer.anomaly.policy=rollback", f.line), f.line
    steps = sorted(json.loads((c / "raysft_state.json").read_text())["global_step"] for c in run.glob("checkpoint_*")
                   if c.is_dir())
    assert steps == [2] and not (run / "model").exists() and not (run / "train_summary.json").exists()
    (record,) = [json.loads(x) for x in (run / "anomalies.jsonl").read_text().splitlines()]
    assert record["step"] == POISONED_STEP and record["action"] == "stop" and record["last_good_step"] == 2
    assert json.loads((run / "attempts.jsonl").read_text().splitlines()[-1])["ended_by"] == "stopped by the anomaly guard"

    capsys.readouterr()
    result = _run(root, model_dir, "poisoned", "trainer.anomaly.policy=rollback")
    out = capsys.readouterr().out
    skipped = [(POISONED_STEP - 1) * ROWS_PER_STEP, POISONED_STEP * ROWS_PER_STEP]
    assert (re.search(rf"raysft: non-finite (loss|grad norm) at step {POISONED_STEP} \(nan\): rolling back to step 2 \(",
                      out) and f"skipping the rows of step {POISONED_STEP} (global order [{skipped[0]}, {skipped[1]})" in out), \
        out[-3000:]
    stopped, rolled = [json.loads(x) for x in (run / "anomalies.jsonl").read_text().splitlines()]
    assert stopped == record and rolled["action"] == "rollback" and rolled["skipped_rows"] == skipped
    assert result.max_steps == 6 and json.loads((run / "train_summary.json").read_text())["global_step"] == 6
    assert [json.loads(x)["ended_by"] for x in (run / "attempts.jsonl").read_text().splitlines()] == \
        ["stopped by the anomaly guard", "finished"]

    # The batch audit: after the rollback (the last session) step 3 trained the next rows of the global
    # order, and the poisoned row was never trained again.
    (prepared,) = (root / "prepared").iterdir()
    stream = RowStream(open_prepared(str(prepared)).rows(), rank=0, world=1, batch=1, start=0,
                       seed=compose().trainer.seed, timeout_s=60)
    by_position = [row_digests(stream.batch_at(g))[0] for g in range(40)]
    poisoned_digest = row_digests(open_prepared(str(prepared)).rows().read("train", np.array([row])))[0]
    assert poisoned_digest in by_position[skipped[0]:skipped[1]]
    audit = [json.loads(x) for x in (run / "workers" / "batches_rank0.jsonl").read_text().splitlines()]
    last = max(e["session"] for e in audit)
    after = {(e["step"] - 1) * 2 + e["micro"]: e["rows"][0] for e in audit if e["session"] == last}
    assert min(after) == 2 * ROWS_PER_STEP  # resumed from step 2
    assert [after[g] for g in sorted(after)] == by_position[skipped[0] + ROWS_PER_STEP:6 * ROWS_PER_STEP + ROWS_PER_STEP]
    losses = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = {m["global_step"]: m["loss"] for m in losses if "loss" in m}
    assert all(np.isfinite(v) for v in final.values()) and sorted(final) == list(range(1, 7))


def test_the_guard_decides_on_what_every_rank_logs():
    from transformers import TrainerControl, TrainerState

    from raysft.train.anomaly import AnomalyGuard, detect

    assert detect(1.0, 0.5, [1.0] * 20, factor=2.0, min_history=10) is None
    assert detect(2.5, 0.5, [1.0] * 20, factor=2.0, min_history=10) == ("loss spike", 1.0)
    assert detect(2.5, 0.5, [1.0] * 5, factor=2.0, min_history=10) is None  # not enough history yet
    assert detect(1.0, float("inf"), [], factor=2.0, min_history=10)[0] == "non-finite grad norm"

    warn = AnomalyGuard(policy="warn", factor=2.0, window=50, min_history=3, rank=1, metrics_path=None)
    stop = AnomalyGuard(policy="stop", factor=2.0, window=50, min_history=3, rank=1, metrics_path=None)
    state = TrainerState()
    for step, loss in enumerate([2.0, 1.9, 1.8, 1.7, 9.0], start=1):
        state.global_step = step
        for guard in (warn, stop):
            c = guard.on_log(None, state, TrainerControl(should_save=True), logs={"loss": loss, "grad_norm": 1.0})
            if guard is warn or step < 5:
                assert c.should_save and not c.should_training_stop, (guard.policy, step)
    assert warn.tripped is None  # warn: training goes on
    assert stop.tripped.reason == "loss spike" and stop.tripped.step == 5 and stop.tripped.median == 1.85
