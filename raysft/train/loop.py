"""What the driver hands Ray Train: the per-worker entry point and its plain config.

Light on purpose: the driver imports this, not ``worker.py``, so it never loads torch's training
stack, transformers' Trainer, TRL or PEFT (~6 s a process); only the workers do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from raysft.config import RaySFTConfig

log = logging.getLogger("raysft")

# Rank 0's per-step mark for the driver's live progress bar (raysft/run/console.py); only sent when the
# driver's console is a terminal, and never shown: the driver turns it into the bar.
PROGRESS_MARK = "@@raysft-progress "


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands each worker (plain values only, as Ray's train_loop_config should be)."""

    cfg: dict[str, Any]
    run_root: str
    run_name: str
    max_steps: int
    source_names: list[str]
    has_eval: bool
    prepared_uri: str = ""  # the prepared data set the workers read (raysft/data/prepared.py)
    save_steps: float = 0  # 0 = no checkpoints; < 1 = a fraction of max_steps (as the recipes)
    init_checkpoint: str | None = None  # `resume=<uri>`: start from another run's checkpoint
    verified_checkpoint: str | None = None  # the checkpoint the driver chose and verified just before
    corrupt_checkpoints: tuple[str, ...] = ()  # checkpoints the driver found corrupt (not checked again)
    data_skips: tuple[tuple[int, int], ...] = ()  # global-order ranges never trained (rollbacks: anomalies.jsonl)
    rollbacks_left: int = 0  # trainer.anomaly.max_rollbacks less those the run has made
    lease_token: str | None = None  # the driver's lease (storage/lease.py): the workers stop when it is not
    # Every logging step to ray.train.report: only a sweep reads them (Ray Tune); otherwise each report
    # is a cross-rank barrier per step for nothing (bench/train_overhead.py: ~0.7 s of a 2 s CPU step).
    report_metrics: bool = False
    live_progress: bool = False  # rank 0 marks each step for the driver's live bar (its console is a terminal)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function (``LoopConfig.to_dict()``)."""
    from raysft.train.worker import run_worker

    run_worker(loop_config)


def check_world_size(saved: int | None, world: int, cfg: RaySFTConfig, where: str) -> None:
    """A checkpoint can continue on another number of workers only without DeepSpeed: ZeRO shards
    optimizer state (and with stage 3 the weights) per rank. The data cursor is global either way."""
    if saved is None or saved == world:
        return
    if cfg.deepspeed.enabled:
        raise RuntimeError(
            f"checkpoint {where} was written by {saved} workers and this run has {world}: DeepSpeed ZeRO-"
            f"{cfg.deepspeed.stage} keeps optimizer state (and at stage 3 the weights) in per-rank shards, which "
            f"cannot be re-split. Resume with scaling.num_workers={saved}, or export the checkpoint "
            "(raysft export) and start a new run from the exported model.")
    log.warning("resuming a %d-worker checkpoint on %d workers: weights, optimizer and data position carry over "
                "(the data cursor is global); per-rank RNG states of new ranks start fresh", saved, world)
