"""TRL's SFTTrainer fed directly from the prepared data set, with per-source losses.

Why a subclass: handing SFTTrainer a ``datasets.IterableDataset`` trains, but accelerate re-shards
the already-sharded stream and each worker silently drops about half its rows. Here the trainer gets
a plain DataLoader over the worker's own micro-batches (``TrainBatches``): every worker consumes
exactly its share of the global row order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader
from trl import SFTTrainer

from raysft.train.batches import EvalBatches, TrainBatches
from raysft.train.loss import plain_token_loss


class RaySFTTrainer(SFTTrainer):
    def __init__(self, *args: Any, train_batches: TrainBatches, eval_batches: EvalBatches | None,
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
        """The same loss and metrics as TRL's ``compute_loss``, from plain logits
        (``raysft.train.loss.plain_token_loss``, which bench/gpu_check.py shares).

        NOTE: divergence from TRL, CPU only. TRL's fused LM head scores every position in tiles and
        recomputes them in backward; without Triton that is ~4x slower than a plain forward here
        (measured: 512 tokens, 128k vocab, 1 thread: 8-10 s vs 1.7-2.7 s per forward+backward).
        On CUDA the TRL path above is used unchanged."""
        mode = "train" if self.model.training else "eval"
        tl = plain_token_loss(model, inputs, num_items_in_batch)
        loss, mask = tl.loss, tl.mask
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as TRL: DDP averages gradients across ranks
        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            num_valid = gather(mask.sum()).sum()
            entropy_sum = gather(tl.entropy.sum()).sum()
            num_correct = gather(tl.correct.sum()).sum()
            self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
            if mode == "train":
                self._total_train_tokens += gather(torch.tensor(inputs["input_ids"].numel())).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            if self._pending_sources is not None:
                self._accumulate_sources(mode, self._pending_sources[:, 1:], tl.nll, mask)
        outputs = tl.outputs
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
