"""raysft.train.loss: the GPU path (TRL's fused LM head) and the CPU path (plain logits) give one loss,
and the fused one is what TRL's SFTTrainer.compute_loss computes (bench/gpu_check.py measures it)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compose

from raysft.train import loss as losses
from raysft.train import model as models


@pytest.fixture(scope="module")
def tiny():
    cfg = compose()
    return models.build_model(cfg.model, models.resolve_accel(cfg.model, bf16=False)), cfg


def _row():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128000, (1, 160), generator=g)
    labels = ids.clone()
    labels[:, :30] = -100  # a prompt
    labels[:, 100] = -100  # the second sequence's first token
    pos = torch.cat([torch.arange(100), torch.arange(60)])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def test_fused_and_plain_paths_agree(tiny):
    net, _ = tiny
    fused = copy.deepcopy(net)
    losses.add_fused_lm_head(fused)
    row = _row()
    a = losses.plain_token_loss(net, row, num_items_in_batch=200)
    b = losses.fused_token_loss(fused, row, num_items_in_batch=200)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    assert a.loss.item() == pytest.approx(a.nll.sum().item() / 200, rel=1e-6)  # divided by num_items_in_batch
    assert torch.equal(a.mask, b.mask) and int(a.mask.sum()) == 159 - 29 - 1
    torch.testing.assert_close(a.nll, b.nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.correct, b.correct)
    # the patched forward without fused_lm_head=True is the plain one: one model serves both paths
    c = losses.token_loss(fused, row, 200, fused=False)
    assert c.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)


def test_fused_loss_is_trls_compute_loss(tiny, tmp_path):
    """The GPU check measures ``fused_token_loss``; the GPU workers run TRL's SFTTrainer.compute_loss.
    They must stay one loss (TRL's default branch: loss_type nll)."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    net, cfg = tiny
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", packing=False, padding_free=False,
                     max_length=None, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=copy.deepcopy(net), args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": [[1]]}),
                         processing_class=models.load_tokenizer(cfg.model))
    row = _row()
    trl_loss = SFTTrainer.compute_loss(trainer, trainer.model, dict(row), num_items_in_batch=None)
    ours = losses.fused_token_loss(trainer.model, row)
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-6)


def _reference_loss(net, row, num_items_in_batch):
    """Every position scored, the masked ones zeroed: what the CPU path computed before it scored
    only trained positions."""
    logits = net(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[:, :-1].float()
    target = row["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    return nll.sum() / num_items_in_batch, nll


@pytest.mark.parametrize("batch", [1, 2])
def test_scoring_only_trained_positions_changes_neither_loss_nor_gradients(tiny, batch):
    """plain_token_loss gets logits for trained positions only (logits_to_keep); the loss, every
    parameter's gradient and the per-token NLL are those of scoring every position. Batch 2: the
    rows train different positions (the kept set is their union)."""
    net, _ = tiny
    row = _row()
    if batch == 2:
        other = row["labels"].clone()
        other[:, 60:140] = -100
        row = {"input_ids": row["input_ids"].repeat(2, 1), "labels": torch.cat([row["labels"], other]),
               "position_ids": row["position_ids"].repeat(2, 1)}
    net.zero_grad()
    ours = losses.plain_token_loss(net, row, num_items_in_batch=200)
    ours.loss.backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    want_loss, want_nll = _reference_loss(net, row, 200)
    want_loss.backward()
    assert ours.loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    torch.testing.assert_close(ours.nll.detach(), want_nll.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.mask, row["labels"][:, 1:] != -100)
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    net.zero_grad()


def test_a_micro_batch_without_trained_tokens_gives_a_zero_loss_with_a_graph(tiny):
    net, _ = tiny
    row = _row()
    row["labels"] = torch.full_like(row["labels"], -100)
    tl = losses.plain_token_loss(net, row)
    assert tl.loss.item() == 0.0 and tl.loss.requires_grad and not tl.mask.any()
    tl.loss.backward()
    net.zero_grad()
