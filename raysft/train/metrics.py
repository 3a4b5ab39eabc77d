"""One metrics path: every logging step goes to ``ray.train.report``, the trackers (through the HF
Trainer's ``report_to``), a JSONL file in the run directory, and one console line on rank 0."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import ray.train
import torch
from transformers import TrainerCallback

from raysft.train.loop import PROGRESS_MARK
from raysft.train.trackers import log_samples

log = logging.getLogger("raysft")

# Keys the HF Trainer / TRL log that we rename to stable names in metrics.jsonl.
_RENAMES = {"train_loss": "train_loss_mean"}


class MetricsCallback(TrainerCallback):
    def __init__(self, metrics_path: str | None, *, world_size: int, report_to_ray: bool = True,
                 flops_per_token: float | None = None, peak_flops_per_device: float | None = None,
                 live_progress: bool = False):
        self.live_progress = live_progress
        self.path = Path(metrics_path) if metrics_path else None
        self.world_size = world_size
        self.report_to_ray = report_to_ray
        # MFU = achieved model FLOP/s (6 x params per trained token) / peak; only meaningful on GPUs.
        self.flops_per_token, self.peak = flops_per_token, peak_flops_per_device
        # Set again when training begins; a run resumed at its last step only evaluates (no train begin).
        self._t0 = self._last_t = time.perf_counter()
        self._last_tokens = 0.0
        self.resume_tokens = 0.0  # num_tokens already trained before a resume

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._last_t = time.perf_counter()
        self._last_tokens = float(self.resume_tokens)
        if self.path and state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.live_progress and state.is_world_process_zero:
            print(f"{PROGRESS_MARK}{state.global_step}/{state.max_steps}", file=sys.stderr, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        now = time.perf_counter()
        record: dict[str, Any] = {"global_step": state.global_step, "epoch": state.epoch, "time_s": round(now - self._t0, 3)}
        record.update({_RENAMES.get(k, k): v for k, v in logs.items()})
        tokens = logs.get("num_tokens")
        if tokens is not None and now > self._last_t:
            rate = (tokens - self._last_tokens) / (now - self._last_t)
            record["tokens_per_s"] = rate
            record["tokens_per_s_per_device"] = rate / self.world_size
            if self.flops_per_token and self.peak:
                record["mfu"] = rate / self.world_size * self.flops_per_token / self.peak
            self._last_tokens, self._last_t = tokens, now
        if self.report_to_ray:
            ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
        if not state.is_world_process_zero:
            return
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if "loss" in record or "eval_loss" in record:  # the end-of-training totals stay in the JSONL
            log.info(progress_line(record, state.max_steps, now - self._t0))

    def log_text(self, state, kind: str, payload: dict[str, Any]) -> None:
        """Non-numeric events (generated samples) into the same JSONL."""
        if self.path and state.is_world_process_zero:
            with self.path.open("a") as f:
                f.write(json.dumps({"global_step": state.global_step, "event": kind, **payload}) + "\n")


def progress_line(record: dict[str, Any], max_steps: int, elapsed: float) -> str:
    step = record["global_step"]
    parts = [f"step {step}/{max_steps}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"), ("learning_rate", "lr {:.2e}"),
                     ("grad_norm", "grad_norm {:.3f}"), ("mean_token_accuracy", "acc {:.3f}"),
                     ("tokens_per_s", "tok/s {:,.0f}")):
        if isinstance(record.get(key), (int, float)) and math.isfinite(record[key]):
            parts.append(fmt.format(record[key]))
    if 0 < step < max_steps:
        eta = elapsed / step * (max_steps - step)
        parts.append(f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
    return " | ".join(parts)


class SampleCallback(TrainerCallback):
    """Greedy generations on fixed prompts every N steps (and at the end), logged as text to the
    console, metrics.jsonl and every tracker: TRL's LogCompletionsCallback publishes only to
    wandb/comet. Runs on every rank: under ZeRO-3 generation needs all ranks' parameter shards."""

    def __init__(self, tokenizer, prompts: list[str], *, every_steps: int, max_new_tokens: int, metrics: MetricsCallback):
        self.tokenizer, self.prompts = tokenizer, prompts
        self.every, self.max_new_tokens, self.metrics = every_steps, max_new_tokens, metrics
        self.samples: list[dict[str, Any]] = []
        self.trackers: list = []  # the tracker callbacks (trackers.attach)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._generate(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._generate(args, state, model)

    def _generate(self, args, state, model) -> None:
        if not self.prompts or model is None:
            return
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for prompt in self.prompts:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                         return_tensors="pt", return_dict=True)
                ids = {k: v.to(model.device) for k, v in ids.items()}
                gen = model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=self.tokenizer.pad_token_id)
                text = self.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)
                out.append({"prompt": prompt, "completion": text})
        if was_training:
            model.train()
        self.samples.append({"global_step": state.global_step, "samples": out})
        if state.is_world_process_zero:
            for s in out:
                log.info("sample at step %d: %r -> %r", state.global_step, s["prompt"], s["completion"])
            self.metrics.log_text(state, "samples", {"samples": out})
            log_samples(self.trackers, state.global_step, out)

