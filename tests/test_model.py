"""Model construction, CPU fallbacks, and the packed-sequence loss invariant (no Ray)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from raysft.train import model as models


def test_offline_hub_model_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose("model=smollm3_3b")
    with pytest.raises(models.ModelNotAvailableError) as e:
        models.check_available(cfg.model)
    msg = str(e.value)
    assert "HuggingFaceTB/SmolLM3-3B-Base" in msg and "not available" in msg and "model.name_or_path=" in msg


def test_recipe_gpu_options_fall_back_on_cpu():
    cfg = compose("model=smollm3_3b")
    cpu = models.resolve_accel(cfg.model, bf16=True, cuda=False)
    assert cpu.attn_implementation == "sdpa" and not cpu.use_liger and not cpu.bf16
    assert len(cpu.notes) == 3 and any("flash_attention_2" in n for n in cpu.notes)
    gpu = models.resolve_accel(cfg.model, bf16=True, cuda=True)
    assert gpu.bf16
    # flash-attn / liger are applied on a GPU machine only when installed (the `gpu` extra).
    import importlib.util

    assert gpu.attn_implementation == ("flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa")
    assert gpu.use_liger == bool(importlib.util.find_spec("liger_kernel"))


@pytest.fixture(scope="module")
def tiny():
    cfg = compose()
    net = models.build_model(cfg.model, models.resolve_accel(cfg.model, bf16=False))
    return net.eval()


def test_tiny_model_is_smollm3_scaled_down(tiny):
    assert type(tiny).__name__ == "SmolLM3ForCausalLM"
    assert tiny.config.vocab_size == 128256 and tiny.config.num_hidden_layers == 4
    assert len(tiny.config.layer_types) == 4 and len(tiny.config.no_rope_layers) == 4
    assert 2e6 < sum(p.numel() for p in tiny.parameters()) < 2e7
    assert tiny.config.use_cache is False


def _seqs():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128000, (n,), generator=g) for n in (37, 120, 5, 64)]


def _nll_sum(logits, ids):
    lp = torch.log_softmax(logits[:-1].double(), -1)
    return -lp.gather(-1, ids[1:, None]).sum()


def test_packed_row_loss_equals_separate_sequences(tiny):
    """The invariant packing relies on: position_ids restarting per sequence and no attention mask
    give exactly the per-sequence forward (sdpa on CPU; flash-attn varlen uses the same position_ids)."""
    seqs = _seqs()
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        packed = tiny(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        start, packed_nll, sep_nll = 0, 0.0, 0.0
        for s in seqs:
            alone = tiny(input_ids=s[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(s)], alone, atol=1e-5, rtol=1e-5)
            packed_nll += _nll_sum(packed[start:start + len(s)], s)
            sep_nll += _nll_sum(alone, s)
            start += len(s)
    n_tokens = sum(len(s) - 1 for s in seqs)
    assert abs(packed_nll / n_tokens - sep_nll / n_tokens) < 1e-5


def test_a_kv_cache_breaks_packing_and_the_check_catches_it(tiny):
    """With a cache, transformers skips packed-sequence detection and sequences attend across the
    boundary: the same comparison as above must then fail. This is why we force use_cache=False."""
    seqs = _seqs()
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        cached = tiny(input_ids=ids, position_ids=pos, use_cache=True).logits[0]
        alone = tiny(input_ids=seqs[1][None], use_cache=False).logits[0]
    diff = (cached[37:157] - alone).abs().max().item()
    assert diff > 1e-3


def test_qlora_loads_4bit_and_steps_on_cpu_as_a_smoke_test(tmp_path, tiny):
    """QLoRA on CPU only as a smoke test: the base loads as 4-bit nf4 through bitsandbytes and a LoRA
    step runs. (bitsandbytes' CPU backward is not trustworthy; QLoRA is for GPUs, see README.)"""
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model

    tiny.save_pretrained(tmp_path / "base")
    cfg = compose("peft=qlora", f"model.name_or_path={tmp_path / 'base'}", "model.init=pretrained",
                  "model.tokenizer=bundled:smollm3")
    net = models.build_model(cfg.model, models.resolve_accel(cfg.model, bf16=False), peft=cfg.peft)
    assert any(type(m).__name__ == "Linear4bit" for m in net.modules())
    net = get_peft_model(net, models.lora_config(cfg.peft))
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    net.train()
    ids = torch.randint(0, 128000, (1, 64))
    loss = net(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_a_scheduler_takes_only_its_own_keyword_arguments():
    """The recipe default min_lr_rate stays in trainer.lr_scheduler_kwargs when only the schedule
    changes (dicts merge); a cosine schedule must not receive it."""
    from conftest import compose

    from raysft.train.worker import scheduler_kwargs

    cfg = compose("trainer.lr_scheduler_type=cosine")
    assert cfg.trainer.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert scheduler_kwargs("cosine", dict(cfg.trainer.lr_scheduler_kwargs)) == {}
    assert scheduler_kwargs("cosine_with_min_lr", {"min_lr_rate": 0.1}) == {"min_lr_rate": 0.1}
