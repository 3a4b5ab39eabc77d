"""The training loss, as one function per path: TRL's fused LM head (GPUs) and plain logits (CPU).

``RaySFTTrainer.compute_loss`` (``raysft/train/trainer.py``) computes its loss with these, and so does
``bench/gpu_check.py``, which measures the GPU path without Ray, datasets or the Trainer: this module
imports only torch at import time (TRL's fused head is imported when it is added to a model).

Both return a ``TokenLoss``: the reduced loss plus the per-token NLL and label mask it came from,
aligned with ``labels[:, 1:]`` (position ``t`` scores the label at ``t + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")
"""The per-token fields TRL's ``SFTTrainer`` asks its fused LM head for (loss, entropy, accuracy)."""


@dataclass
class TokenLoss:
    loss: torch.Tensor
    """Sum of the per-token NLL over the trained tokens / ``num_items_in_batch`` (their count when None)."""
    nll: torch.Tensor
    """(batch, seq - 1) NLL of each next-token label, 0 where the label is -100."""
    mask: torch.Tensor
    """(batch, seq - 1) True where the label is trained."""
    entropy: torch.Tensor
    """(batch, seq - 1) entropy of the next-token distribution, without gradient (0 where masked)."""
    correct: torch.Tensor
    """(batch, seq - 1) True where the label is the most likely token (and trained)."""
    outputs: Any
    """The model's own output object."""


def _reduce(nll_sum: torch.Tensor, mask: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    # Clamped as TRL does, so a micro-batch without trained tokens reduces to a finite zero.
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return nll_sum / torch.as_tensor(denom).clamp(min=1)


def add_fused_lm_head(net) -> None:
    """TRL's fused LM head, added exactly as ``SFTTrainer.__init__`` adds it (the workers get it from
    there): ``net(..., labels=..., fused_lm_head=True)`` then scores the labels in vocabulary tiles
    without materialising the logits."""
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    trl_add_fused_lm_head(net, outputs=FUSED_OUTPUTS)


def fused_token_loss(model, inputs: dict[str, torch.Tensor], num_items_in_batch=None) -> TokenLoss:
    """The loss of TRL's ``SFTTrainer.compute_loss`` on GPUs (its default branch: ``loss_type=nll``,
    no label smoother, no ``compute_loss_func``), on a model with ``add_fused_lm_head``."""
    outputs = model(input_ids=inputs["input_ids"], labels=inputs["labels"], position_ids=inputs.get("position_ids"),
                    use_cache=False, fused_lm_head=True)
    nll = -outputs.log_probs  # zero on ignored positions
    loss = _reduce(nll.sum(), outputs.label_mask, num_items_in_batch)
    return TokenLoss(loss, nll, outputs.label_mask, outputs.entropy.detach(), outputs.is_top1.bool(), outputs)


def plain_token_loss(model, inputs: dict[str, torch.Tensor], num_items_in_batch=None) -> TokenLoss:
    """The same loss from plain fp32 logits (raysft's CPU path: TRL's fused head without Triton is ~4x
    slower than a plain forward; see ``RaySFTTrainer._compute_loss_unfused``), scored only where a
    label is trained.

    The LM head and the softmax over a 128k vocabulary are most of a CPU step, and a position whose
    next token is not trained (prompt, padding: ~3/4 of the default job's) adds nothing to the loss,
    its gradient or the token metrics. So only the trained positions (of any row of the batch) get
    logits, through ``logits_to_keep`` (a transformers causal LM takes a tensor of positions); a model
    that does not take it is scored on every position and the same ones picked out after."""
    labels = inputs["labels"]
    target = labels[:, 1:]
    keep = (target != -100).any(0).nonzero().squeeze(-1)
    if keep.numel() == 0:  # nothing trained in this micro-batch: one (masked) position keeps the graph whole
        keep = keep.new_zeros(1)
    kw = {"logits_to_keep": keep} if _takes_logits_to_keep(model) else {}
    outputs = model(input_ids=inputs["input_ids"], position_ids=inputs.get("position_ids"), use_cache=False, **kw)
    logits = outputs.logits.float() if kw else outputs.logits[:, :-1][:, keep].float()
    kept = target[:, keep]
    kept_mask = kept != -100
    log_probs = torch.log_softmax(logits, dim=-1)
    kept_nll = -log_probs.gather(-1, kept.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~kept_mask, 0.0)
    loss = _reduce(kept_nll.sum(), kept_mask, num_items_in_batch)
    with torch.no_grad():
        kept_entropy = -(log_probs.exp() * log_probs).sum(-1) * kept_mask
        kept_correct = (logits.argmax(-1) == kept) & kept_mask

    def spread(values: torch.Tensor) -> torch.Tensor:  # back to (batch, seq - 1), 0 / False elsewhere
        out = values.new_zeros(target.shape)
        out[:, keep] = values
        return out

    return TokenLoss(loss, spread(kept_nll), target != -100, spread(kept_entropy), spread(kept_correct), outputs)


def _takes_logits_to_keep(model) -> bool:
    # DDP wraps the model in .module; a PeftModel and DeepSpeed's engine pass attributes through.
    inner = getattr(model, "module", model)
    supports = getattr(inner, "_supports_logits_to_keep", None)
    return bool(supports and supports())


def token_loss(model, inputs: dict[str, torch.Tensor], num_items_in_batch=None, *, fused: bool) -> TokenLoss:
    """The path the workers take: fused on CUDA, plain logits elsewhere."""
    return (fused_token_loss if fused else plain_token_loss)(model, inputs, num_items_in_batch)
