"""Model and tokenizer construction from the ``model`` config, with clean CPU fallbacks.

GPU-only parts of the recipes (flash-attention, liger-kernel's Triton kernels, bf16 under DeepSpeed)
are applied when a CUDA device is present; on a CPU machine each falls back with one log line:
sdpa (which honours per-sequence ``position_ids``), no liger, fp32.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

from raysft import assets
from raysft.config import ModelConfig, PeftConfig

log = logging.getLogger(__name__)


class ModelNotAvailableError(RuntimeError):
    """The model cannot be loaded here (e.g. offline); the message says how to point at a local copy."""


@dataclass(frozen=True)
class Accel:
    """What the recipes' GPU options resolve to on this machine."""

    attn_implementation: str
    use_liger: bool
    bf16: bool
    notes: tuple[str, ...]


def resolve_accel(model: ModelConfig, *, bf16: bool, cuda: bool | None = None) -> Accel:
    """Pure decision (testable without a GPU): which attention, liger and precision will be used."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    notes = []
    attn = model.attn_implementation
    if attn.startswith("flash_attention") and not (cuda and importlib.util.find_spec("flash_attn")):
        why = "no CUDA device" if not cuda else "flash-attn is not installed (pip install 'raysft[gpu]')"
        notes.append(f"attn_implementation={attn} requested but {why}: using sdpa (honours packed position_ids)")
        attn = "sdpa"
    liger = model.use_liger_kernel
    if liger and not (cuda and importlib.util.find_spec("liger_kernel")):
        why = "no CUDA device (its Triton kernels fail on CPU)" if not cuda else "liger-kernel is not installed"
        notes.append(f"use_liger_kernel requested but {why}: running without liger")
        liger = False
    if bf16 and not cuda:
        notes.append("bf16 requested but no CUDA device: training in fp32 (DeepSpeed and the HF Trainer refuse bf16 on CPU)")
        bf16 = False
    return Accel(attn, liger, bf16, tuple(notes))


def tokenizer_path(model: ModelConfig) -> str:
    return assets.resolve(model.tokenizer or model.name_or_path)


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    path = tokenizer_path(model)
    try:
        return AutoTokenizer.from_pretrained(path, revision=model.revision if path == model.name_or_path else None,
                                             trust_remote_code=model.trust_remote_code)
    except OSError as e:
        raise ModelNotAvailableError(_offline_message(path, "tokenizer", e)) from e


def check_available(model: ModelConfig) -> None:
    """Fail fast on the driver, before Ray starts, when the model cannot be found."""
    path = assets.resolve(model.name_or_path)
    if os.path.isdir(path):
        return
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(path, revision=model.revision, allow_patterns=["config.json"],
                          local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1", etag_timeout=10)
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise ModelNotAvailableError(_offline_message(path, "model", e)) from e


def _offline_message(path: str, what: str, err: BaseException) -> str:
    return (f"The {what} {path!r} is not available here ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            f"It is not a local directory and could not be fetched from the Hugging Face hub (offline, or no "
            f"access). Download it where there is network (`huggingface-cli download {path} --local-dir DIR`) and "
            f"point raysft at the copy: model.name_or_path=DIR (and model.tokenizer=DIR).")


def build_model(model: ModelConfig, accel: Accel, *, peft: PeftConfig | None = None, seed: int = 0):
    """A causal LM from the config: random-initialised (``init=random``) or pretrained weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    for note in accel.notes:
        log.info(note)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[model.dtype]
    if not torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32
    path = assets.resolve(model.name_or_path)
    kwargs = dict(attn_implementation=accel.attn_implementation, trust_remote_code=model.trust_remote_code)
    set_seed(seed)  # the same random init on every worker
    try:
        if model.init == "random":
            config = AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
            for k, v in model.config_overrides.items():
                setattr(config, k, v)
            if "num_hidden_layers" in model.config_overrides:  # per-layer lists must match the new depth
                _fit_layer_lists(config)
            net = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        else:
            quant = _quantization(peft)
            net = AutoModelForCausalLM.from_pretrained(path, revision=model.revision, dtype=dtype,
                                                       quantization_config=quant, **kwargs)
    except OSError as e:
        raise ModelNotAvailableError(_offline_message(path, "model", e)) from e
    net.config.use_cache = False  # a cache makes transformers ignore packed position_ids (cross-sequence attention)
    if accel.use_liger:
        _apply_liger(net)
    return net


def _fit_layer_lists(config) -> None:
    n = config.num_hidden_layers
    for name in ("layer_types", "no_rope_layers"):
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) != n:
            setattr(config, name, (values * (n // max(1, len(values)) + 1))[:n])


def _quantization(peft: PeftConfig | None):
    if peft is None or not peft.enabled or not (peft.load_in_4bit or peft.load_in_8bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=peft.load_in_4bit, load_in_8bit=peft.load_in_8bit,
                              bnb_4bit_quant_type=peft.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=peft.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=compute)


def _apply_liger(net) -> None:
    # NOTE: through liger's own API: TRL 1.x deprecates use_liger_kernel in favour of hub kernels,
    # which need network access. fused_linear_cross_entropy stays off: TRL fuses the LM head itself.
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=net, fused_linear_cross_entropy=False, cross_entropy=False)
    log.info("liger-kernel applied to %s", type(net).__name__)


def lora_config(peft: PeftConfig):
    from peft import LoraConfig

    return LoraConfig(r=peft.r, lora_alpha=peft.lora_alpha, lora_dropout=peft.lora_dropout,
                      target_modules=peft.target_modules, task_type="CAUSAL_LM")
