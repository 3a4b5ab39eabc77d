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
