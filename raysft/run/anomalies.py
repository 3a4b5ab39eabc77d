"""What the driver does when its workers stopped on an anomaly (``raysft/train/anomaly.py``): record
it in ``anomalies.jsonl``, then stop the run with one line (``trainer.anomaly.policy=stop``, exit 8)
or roll it back (``rollback``): the next Ray Train run resumes from the last checkpoint before the
anomaly and never trains the rows of the steps that caused it (their global-order positions are
recorded, and every later attempt of the run skips them)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from raysft.config import RaySFTConfig
from raysft.run import records
from raysft.run.failures import EXIT_ANOMALY, Failure, RunFailedError
from raysft.storage import checkpoints as ckpts
from raysft.storage import files
from raysft.storage.rundir import RunDir
from raysft.train.anomaly import Anomaly
from raysft.train.loop import LoopConfig

log = logging.getLogger("raysft")


def handle(end: dict[str, Any], rundir: RunDir, cfg: RaySFTConfig, loop: LoopConfig, attempt: records.Attempt) -> LoopConfig:
    """The loop config of the rolled-back run; raises ``RunFailedError`` when the run stops here."""
    a = Anomaly(**end["anomaly"])
    guard = cfg.trainer.anomaly
    what = a.describe(guard.loss_factor)
    found = rundir.checkpoints()
    good = ckpts.latest_verified(rundir.uri, found, skip=loop.corrupt_checkpoints, before_step=a.first_step).chosen
    back_to = f"step {good.step} ({good.uri})" if good else "the start (no checkpoint before it)"
    record = {"time": records.now_iso(), **dataclasses.asdict(a), "last_good_step": good.step if good else 0}
    skip = end.get("skip_rows")
    if a.policy == "rollback" and loop.rollbacks_left > 0 and skip:
        # Checkpoints from the anomaly's logging window on hold weights trained on what caused it.
        for c in found:
            if c.complete and c.step >= a.first_step:
                log.warning("raysft: deleting checkpoint %s (step %d): trained on the batches before the anomaly", c.uri, c.step)
                files.delete_dir(c.uri)
        records.append(rundir, RunDir.ANOMALIES, {**record, "action": "rollback", "skipped_rows": skip})
        steps = f"step {a.step}" if a.first_step == a.step else f"steps {a.first_step}-{a.step}"
        print(f"raysft: {what}: rolling back to {back_to}, skipping the rows of {steps} (global order [{skip[0]:,}, "
              f"{skip[1]:,}), recorded in {RunDir.ANOMALIES}); {loop.rollbacks_left - 1} rollbacks left", flush=True)
        return dataclasses.replace(loop, data_skips=(*loop.data_skips, tuple(skip)), rollbacks_left=loop.rollbacks_left - 1,
                                   verified_checkpoint=None)
    records.append(rundir, RunDir.ANOMALIES, {**record, "action": "stop"})
    attempt.end("stopped by the anomaly guard", a.step, anomaly=what)
    hint = ("trainer.anomaly.max_rollbacks were all used" if a.policy == "rollback" else
            "rerun with trainer.anomaly.policy=rollback to skip the batch that caused it")
    raise RunFailedError(Failure(EXIT_ANOMALY, f"{what} (trainer.anomaly.policy={guard.policy}): stopped, nothing saved "
                                               f"after it; the last good checkpoint is {back_to} — {hint}"))
