"""TRL's SFTTrainer fed directly from the raysft data stream, with per-source losses.

Why a subclass: handing SFTTrainer a ``datasets.IterableDataset`` built from a Ray shard trains,
but accelerate re-shards the already-sharded stream and each worker silently drops about half its
rows. Here the trainer gets a plain DataLoader over the worker's own micro-batches (``TrainStream``):
every worker consumes exactly the rows dealt to it. The rows arrive packed and masked, so nothing is re-tokenised,
re-packed or collated (``position_ids`` reach the model untouched).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from trl import SFTTrainer

MODEL_COLUMNS = ("input_ids", "labels", "position_ids")
ROW_COLUMNS = (*MODEL_COLUMNS, "source_ids")
STALL_HELP = ("the data pipeline is not making progress. On a small machine Ray may have no CPU left for data "
              "tasks (raise scaling.local_num_cpus, or lower scaling.data_cpus_per_task); on a cluster check that "
              "CPU nodes can be added. Timeout: scaling.data_timeout_s.")


class DataStallError(RuntimeError):
    """No batch arrived from the data pipeline within the timeout: fail loudly instead of hanging."""


def as_model_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    # TRL's padding-free layout: the B packed rows become one row of B*L tokens. The per-sequence
    # position_ids keep sequences apart (flash-attn varlen / sdpa block mask), and TRL's token
    # counter (position_ids.size(1)) then counts every token.
    # np.array copies: arrays from the object store are read-only (zero-copy).
    return {k: torch.from_numpy(np.array(batch[k], dtype=np.int64)).reshape(1, -1) for k in ROW_COLUMNS if k in batch}


def row_digests(batch: dict[str, np.ndarray]) -> list[str]:
    """A short hash of each packed row's tokens, labels and positions (the data audit log)."""
    out = []
    for i in range(len(batch["input_ids"])):
        h = hashlib.sha1()
        for c in MODEL_COLUMNS:
            h.update(np.ascontiguousarray(batch[c][i], dtype=np.int64).tobytes())
        out.append(h.hexdigest()[:16])
    return out


class TrainStream(IterableDataset):
    """A worker's endless sequence of training micro-batches from the ``RowDealer``
    (``raysft/data/stream.py``), which deals the global row order round-robin to the ranks.

    Endless, because the step count is fixed up front: the dealer starts another pass when the
    data end, so every rank takes exactly ``max_steps x GA`` micro-batches and no rank's epoch ends
    early. The next micro-batch is requested while the current one trains. ``rows_consumed`` counts
    rows handed to the trainer; ``on_batch(step, micro, batch)`` sees every micro-batch with the
    optimizer step it belongs to (``first_step`` = steps done before a resume) and its place in it."""

    def __init__(self, dealer, session: int, rank: int, *, grad_accum: int, timeout_s: float = 1800.0,
                 first_step: int = 0, on_batch=None):
        self.dealer, self.session, self.rank, self.timeout_s = dealer, session, rank, timeout_s
        self.grad_accum, self.first_step, self.on_batch = grad_accum, first_step, on_batch
        self.rows_consumed = 0
        self._k = 0
        self._next = None

    def _request(self):
        ref = self.dealer.next_batch.remote(self.session, self.rank, self._k)
        self._k += 1
        return ref

    def __iter__(self):
        import ray
        from ray.exceptions import GetTimeoutError

        if self._next is None:
            self._next = self._request()
        while True:
            try:
                batch = ray.get(self._next, timeout=self.timeout_s)
            except GetTimeoutError:
                raise DataStallError(f"no training batch for {self.timeout_s:.0f} s: {STALL_HELP}") from None
            k = self._k - 1
            self._next = self._request()
            self.rows_consumed += len(batch["input_ids"])
            if self.on_batch is not None:
                self.on_batch(self.first_step + k // self.grad_accum + 1, k % self.grad_accum, batch)
            yield as_model_batch(batch)


class EvalBatches(IterableDataset):
    """Packed eval rows from a Ray Data shard (order does not matter for a mean loss), fetched on a
    thread so that a pipeline that makes no progress raises after ``timeout_s`` instead of hanging."""

    def __init__(self, shard, batch_size: int, *, timeout_s: float = 1800.0):
        self.shard, self.batch_size, self.timeout_s = shard, batch_size, timeout_s

    def __iter__(self):
        it = self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=False,
                                     prefetch_batches=2)
        q: queue.Queue = queue.Queue(maxsize=2)
        done = object()

        def pump():
            try:
                for b in it:
                    q.put(b)
                q.put(done)
            except BaseException as e:  # surfaced in the training thread
                q.put(e)

        threading.Thread(target=pump, daemon=True, name="raysft-eval").start()
        while True:
            try:
                item = q.get(timeout=self.timeout_s)
            except queue.Empty:
                raise DataStallError(f"no eval batch for {self.timeout_s:.0f} s: {STALL_HELP}") from None
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield as_model_batch(item)


class RaySFTTrainer(SFTTrainer):
    def __init__(self, *args: Any, train_batches: TrainStream, eval_batches: EvalBatches | None,
                 source_names: list[str], **kwargs: Any):
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.source_names = source_names
        self._pending_sources: torch.Tensor | None = None
        n = len(source_names)
        # Per-source [sum of token NLL, token count], train and eval; summed across ranks when logged.
        self._source_sums = {"train": torch.zeros(2, n, dtype=torch.float64), "eval": torch.zeros(2, n, dtype=torch.float64)}
        super().__init__(*args, **kwargs)
        self._hook = self.model.register_forward_hook(self._capture_source_losses)

    # ------------------------------------------------------------------ data

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_batches, batch_size=None, num_workers=0)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if self.eval_batches is None:
            raise ValueError("no eval split: set data.dataset_mixture.test_split_size > 0 to evaluate")
        return DataLoader(self.eval_batches, batch_size=None, num_workers=0)

    # ------------------------------------------------------------------ per-source loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._pending_sources = inputs.pop("source_ids", None)
        try:
            if self.args.device.type == "cuda":
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            return self._compute_loss_unfused(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._pending_sources = None

    def _compute_loss_unfused(self, model, inputs, return_outputs, num_items_in_batch):
        """The same loss and metrics as TRL's ``compute_loss``, from plain logits.

        NOTE: divergence from TRL, CPU only. TRL's fused LM head scores every position in tiles and
        recomputes them in backward; without Triton that is ~4x slower than a plain forward here
        (measured: 512 tokens, 128k vocab, 1 thread: 8-10 s vs 1.7-2.7 s per forward+backward).
        On CUDA the TRL path above is used unchanged."""
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], position_ids=inputs.get("position_ids"), use_cache=False)
        logits = outputs.logits[:, :-1].float()
        target = labels[:, 1:]
        mask = target != -100
        log_probs = torch.log_softmax(logits, dim=-1)
        token_logp = log_probs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -token_logp.sum() / torch.as_tensor(denom).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as TRL: DDP averages gradients across ranks
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            gather = self.accelerator.gather_for_metrics
            num_valid = gather(mask.sum()).sum()
            entropy_sum = gather((entropy * mask).sum()).sum()
            num_correct = gather(((logits.argmax(-1) == target) & mask).sum()).sum()
            self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
            if mode == "train":
                self._total_train_tokens += gather(torch.tensor(inputs["input_ids"].numel())).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            if self._pending_sources is not None:
                self._accumulate_sources(mode, self._pending_sources[:, 1:], -token_logp, mask)
        return (loss, outputs) if return_outputs else loss

    def _capture_source_losses(self, module, args, output) -> None:
        sources = self._pending_sources
        log_probs = getattr(output, "log_probs", None)
        if sources is None or log_probs is None:
            return
        with torch.no_grad():
            # TRL's fused LM head scores position t+1 from t: align sources with labels[:, 1:].
            mode = "train" if module.training else "eval"
            self._accumulate_sources(mode, sources[:, 1:].to(log_probs.device), -log_probs.detach(), output.label_mask)

    def _accumulate_sources(self, mode: str, sources: torch.Tensor, nll: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask & (sources >= 0)
        idx = sources[mask].long().cpu()
        values = nll[mask].double().cpu()
        sums = self._source_sums[mode]
        sums[0].index_add_(0, idx, values)
        sums[1].index_add_(0, idx, torch.ones_like(values))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        sums = self._source_sums[mode]
        if self.accelerator.num_processes > 1:  # every rank calls log(), so a collective is safe here
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), reduction="sum").cpu()
        prefix = "eval_loss" if mode == "eval" else "loss"
        for i, name in enumerate(self.source_names):
            if sums[1, i] > 0:
                logs[f"{prefix}/{name}"] = float(sums[0, i] / sums[1, i])
        self._source_sums[mode].zero_()
        super().log(logs, start_time)
