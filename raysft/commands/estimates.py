"""The arithmetic behind ``raysft plan``: model shape, per-GPU memory, FLOPs, throughput, and the
published sizes of smoltalk2's splits. Pure (no Ray, no torch), so tests can check every formula.

Every figure here is an estimate with its source written beside it; ``raysft plan`` labels them so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raysft import assets

GB = 1e9  # decimal gigabytes, as GPU memory is sold ("80GB")

# ----------------------------------------------------------------------------- GPUs

# scaling.accelerator_type (Ray's labels, ray.util.accelerators) -> (memory GB, peak dense bf16
# TFLOP/s, rough on-demand USD per GPU-hour). Memory and TFLOP/s: NVIDIA datasheets (dense, without
# sparsity). Prices: rough 2025 cloud on-demand list prices, for orders of magnitude only: set
# plan.usd_per_gpu_hour to your own.
GPUS: dict[str, tuple[float, float, float]] = {
    "H100": (80.0, 989.0, 3.00),       # H100 SXM 80GB
    "H200": (141.0, 989.0, 3.50),      # H200 SXM 141GB: the H100's compute, more and faster memory
    "A100-80G": (80.0, 312.0, 1.80),
    "A100-40G": (40.0, 312.0, 1.30),
    "A100": (40.0, 312.0, 1.30),       # Ray's plain "A100" label covers both sizes: assume the smaller
    "L4": (24.0, 121.0, 0.80),
    "A10G": (24.0, 125.0, 1.00),       # A10 datasheet figure; AWS's A10G variant may run lower clocks
}



def accelerator_type_of(device_name: str, memory_gb: float) -> str | None:
    """Ray's ``accelerator_type`` label (a key of ``GPUS``) for a CUDA device name as
    ``torch.cuda.get_device_name`` gives it ("NVIDIA H100 80GB HBM3"); None when not in the table."""
    words = device_name.upper().replace("-", " ").split()
    for label in ("H200", "H100", "A10G", "L4"):
        if label in words:
            return label
    if "A100" in words:
        return "A100-80G" if memory_gb > 50 else "A100-40G"
    return None


# ----------------------------------------------------------------------------- throughput reference

# SmolLM3 blog (huggingface.co/blog/smollm3): pretraining on 11.2T tokens took 24 days on 384 H100s.
REFERENCE_TOKENS_PER_S_PER_GPU = 11.2e12 / (384 * 24 * 86400)  # = 14,066 tokens/s/GPU
REFERENCE_PARAMS = 3_075_098_624  # SmolLM3-3B, counted from its config.json by `ModelShape.num_params`
# Model FLOPs utilisation of that run, counting 6 FLOPs per parameter per token (forward + backward)
# and ignoring attention: 14,066 x 6 x 3.075e9 / 989e12 = 0.262. Holding the MFU constant is the
# assumption behind the derived throughput (attention and recompute are then added on top, so the
# derived figure for long-context SFT is lower than the pretraining one).
REFERENCE_MFU = REFERENCE_TOKENS_PER_S_PER_GPU * 6 * REFERENCE_PARAMS / (GPUS["H100"][1] * 1e12)

# ----------------------------------------------------------------------------- memory constants

OVERHEAD_BYTES = 2.0 * GB
"""CUDA context (~0.5-1 GB), NCCL buffers and allocator fragmentation: a rule-of-thumb reserve."""
NF4_BYTES_PER_PARAM = (4 + 0.127) / 8
"""QLoRA (Dettmers et al. 2023, sec. 3): 4-bit NF4 weights plus 0.127 bits/param of quantization
constants with double quantization."""
BFD_ASSUMED_EFFICIENCY = 0.97
"""Packing efficiency assumed when the data cannot be read (estimates only): best-fit decreasing
over windows of thousands of rows mostly shorter than ``max_length`` leaves a few percent padding.
With local data the plan measures it instead."""


# ----------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the estimates need, read from a causal LM's config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_position_embeddings: int | None
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "ModelShape":
        """From a config.json dict; keys it omits take the model type's transformers defaults
        (SmolLM3's config.json omits ``tie_word_embeddings``, which defaults to True)."""
        c = _with_defaults(c)
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        return cls(hidden=hidden, intermediate=int(c["intermediate_size"]), layers=int(c["num_hidden_layers"]),
                   heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or hidden // heads), vocab=int(c["vocab_size"]),
                   tied=bool(c.get("tie_word_embeddings", False)),
                   max_position_embeddings=c.get("max_position_embeddings"),
                   attention_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One decoder layer (Llama/SmolLM3 layout): q, k, v, o projections, SwiGLU MLP, two RMSNorms."""
        h, i = self.hidden, self.intermediate
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if self.attention_bias:
            attn += self.q_dim + 2 * self.kv_dim + h
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        return attn + mlp + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def num_params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embed_params + self.layers * self.layer_params + self.hidden + head

    def lora_params(self, r: int) -> int:
        """Trainable LoRA parameters with ``target_modules="all-linear"`` (every linear layer of the
        decoder, not the LM head): ``r * (in + out)`` per adapted matrix."""
        h, i = self.hidden, self.intermediate
        per_layer = (h + self.q_dim) + 2 * (h + self.kv_dim) + (self.q_dim + h) + 2 * (h + i) + (i + h)
        return self.layers * r * per_layer


def _with_defaults(c: dict[str, Any]) -> dict[str, Any]:
    try:
        from transformers import CONFIG_MAPPING

        config_class = CONFIG_MAPPING[c["model_type"]]
    except (ImportError, KeyError):  # unknown model type: the file's own keys only
        return c
    try:
        defaults = config_class().to_dict()  # the class defaults alone: no cross-field validation of our mix
    except Exception:  # noqa: BLE001 - a config class without usable defaults: the file's own keys only
        return c
    return {**defaults, **c}


def load_model_config(name_or_path: str, *, revision: str = "main", init: str = "pretrained",
                      config_overrides: dict | None = None) -> tuple[dict | None, str]:
    """(config.json as a dict, where it came from) without network; (None, why) when unavailable.

    Looked up in order: a local or ``bundled:`` directory; the SmolLM3-3B family, whose architecture
    is the bundled SmolLM3-3B config.json; the Hugging Face cache. ``config_overrides`` apply as in
    ``raysft.train.model.build_model`` (random init only)."""
    path = assets.resolve(name_or_path)
    config, source = None, ""
    if os.path.isdir(path):
        f = Path(path) / "config.json"
        if f.is_file():
            config, source = json.loads(f.read_text()), str(f)
    elif name_or_path.startswith("HuggingFaceTB/SmolLM3-3B"):
        f = Path(assets.resolve("bundled:smollm3")) / "config.json"
        config, source = json.loads(f.read_text()), f"{f} (SmolLM3-3B's config.json: same architecture as {name_or_path})"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - a malformed id or cache: treated as not cached
            cached = None
        if isinstance(cached, str) and os.path.isfile(cached):
            config, source = json.loads(Path(cached).read_text()), f"{cached} (Hugging Face cache)"
    if config is None:
        return None, (f"the config.json of {name_or_path!r} is not available offline (not a local directory, not in the "
                      f"Hugging Face cache): memory estimate and max_length check skipped")
    if init == "random" and config_overrides:
        config = {**config, **config_overrides}
        source += " + model.config_overrides"
    return config, source


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (per worker), by term; ``total`` is their sum."""

    params: float
    grads: float
    optimizer: float
    gathered_params: float
    activation_checkpoints: float
    layer_activations: float
    loss_head: float
    overhead: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def to_json(self) -> dict[str, float]:
        return {**{k: round(v / GB, 3) for k, v in asdict(self).items()}, "total": round(self.total / GB, 3)}


def memory_per_gpu(shape: ModelShape, *, world_size: int, micro_batch: int, seq_len: int, bf16: bool,
                   gradient_checkpointing: bool, zero_stage: int | None, offload_optimizer: bool = False,
                   offload_param: bool = False, peft: str | None = None, lora_r: int = 16,
                   fused_lm_head: bool = True, gpu: bool = True) -> MemoryEstimate:
    """Peak memory of one data-parallel worker during a training step.

    Model states (ZeRO paper, Rajbhandari et al. 2020, sec. 3.1): mixed-precision Adam holds
    ``2 + 2 + 12 = 16`` bytes per parameter: bf16 weights (2) and gradients (2), and fp32 master
    weights, momentum and variance (K = 12). fp32 training also totals 16 (4 + 4 + 8). ZeRO stage 1
    shards the 12 over the ``N`` workers, stage 2 also the gradients, stage 3 also the weights
    (``16 * P / N`` per GPU); offloading moves the optimizer (and with stage 3 the weights) to CPU.
    Stage 3 gathers each module's full weights while computing with it: two of the largest module
    (the one in use and the prefetched next) are counted, ``2 * 2 * max(layer, embedding)`` bytes.
    LoRA / QLoRA: frozen base weights (2 bytes/param bf16, 4 fp32, 0.516 NF4) and no base
    gradients or optimizer; the adapters (``ModelShape.lora_params``) train in fp32 with Adam, 16
    bytes each.

    Activations, with ``a`` bytes per element (2 in bf16, 4 in fp32), ``s = seq_len`` and
    ``b = micro_batch``, counted after Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models", sec. 4.1) for a Llama layer with flash attention (no ``s x s`` score
    matrix), GQA and a SwiGLU MLP. Per token, one layer saves for backward: attention-norm input and
    output, Q, RoPE'd Q, K, V, RoPE'd K and V kept by the kernel, attention output
    (``7h + 3 h_kv`` elements), MLP-norm input and output (inside the ``7h``), gate, up, SiLU(gate),
    SiLU(gate)*up (``4i``); its backward adds the gradients of two ``i``-wide tensors (``2i``):
    ``layer = s * b * a * (7h + 3 h_kv + 6i)``.
    With gradient checkpointing each layer keeps only its input (``s * b * h * a``, the checkpoint)
    and one layer at a time is recomputed in backward:
    ``activations = L * s * b * h * a + layer``; without it, ``L * layer``.
    Loss head: TRL's fused LM head (GPUs) scores tiles of the vocabulary, never the full logits:
    the final hidden states plus a few fp32 values per token, ``s * b * (a * h + 16)``; the plain
    head (raysft's CPU path) materialises fp32 logits, their log-softmax and its exponential,
    ``s * b * V * 12``.
    Plus ``OVERHEAD_BYTES`` on GPUs (CUDA context, NCCL buffers, fragmentation).
    """
    P, N = shape.num_params, max(1, world_size)
    a = 2 if bf16 else 4
    stage = zero_stage or 0
    if peft:
        base_bytes = NF4_BYTES_PER_PARAM if peft == "qlora" else a
        trainable = shape.lora_params(lora_r)
        params = P * base_bytes / (N if stage == 3 else 1) + trainable * 4
        grads, optimizer = trainable * 4.0, trainable * 8.0
    else:
        w, g, o = (2, 2, 12) if bf16 else (4, 4, 8)
        params = P * w / (N if stage >= 3 else 1)
        grads = P * g / (N if stage >= 2 else 1)
        optimizer = P * o / (N if stage >= 1 else 1)
        if offload_optimizer and stage >= 1:
            optimizer = 0.0
        if offload_param and stage >= 3:
            params = 0.0
    gathered = 2 * a * max(shape.layer_params, shape.embed_params) if stage >= 3 else 0.0

    s, b, h = seq_len, micro_batch, shape.hidden
    layer = s * b * a * (7 * h + 3 * shape.kv_dim + 6 * shape.intermediate)
    saved_without_bwd = s * b * a * (7 * h + 3 * shape.kv_dim + 4 * shape.intermediate)
    if gradient_checkpointing:
        checkpoints, layer_acts = shape.layers * s * b * h * a, layer
    else:
        checkpoints, layer_acts = 0.0, (shape.layers - 1) * saved_without_bwd + layer
    loss_head = s * b * (a * h + 16) if fused_lm_head else s * b * shape.vocab * 12
    return MemoryEstimate(params=float(params), grads=float(grads), optimizer=float(optimizer),
                          gathered_params=float(gathered), activation_checkpoints=float(checkpoints),
                          layer_activations=float(layer_acts), loss_head=float(loss_head),
                          overhead=OVERHEAD_BYTES if gpu else 0.0)


# ----------------------------------------------------------------------------- FLOPs and throughput


def flops_per_token(shape: ModelShape, *, mean_seq_len: float, gradient_checkpointing: bool, peft: bool = False) -> float:
    """Training FLOPs per token: matmuls ``2P`` forward, ``4P`` backward (``2P`` with frozen base
    weights: no weight gradients), plus causal attention within each packed sequence (document
    masking): ``2 * q_dim * d`` forward per layer for a sequence of ``d`` tokens (QK^T and AV over
    ``d / 2`` keys on average), three times that for forward + backward. Gradient checkpointing
    recomputes the forward once more. ``d`` = token-weighted mean sequence length."""
    P = shape.num_params
    fwd = 2 * P + 2 * shape.layers * shape.q_dim * mean_seq_len
    bwd = (1 if peft else 2) * 2 * P + 4 * shape.layers * shape.q_dim * mean_seq_len
    return fwd + bwd + (fwd if gradient_checkpointing else 0)


def derived_tokens_per_s(shape: ModelShape, peak_tflops: float, **kw) -> float:
    """Tokens/s per GPU at the reference run's MFU (``REFERENCE_MFU``) for this model and GPU."""
    return REFERENCE_MFU * peak_tflops * 1e12 / flops_per_token(shape, **kw)


# ----------------------------------------------------------------------------- smoltalk2 sizes

SMOLTALK2 = "HuggingFaceTB/smoltalk2"
SMOLTALK2_SOURCE = ("HuggingFaceTB/smoltalk2 dataset card, 'Dataset Stats' tables (rows, avg tokens per example, "
                    "avg tokens in response); the rows also in ../shared/recipes/smollm3/README.md 'smoltalk2 facts'")
# (config, split) -> (rows, mean tokens per row, mean tokens in the response). Estimates: the card's
# tokens are the conversation's, before the chat template (the SFT template adds a system block).
SMOLTALK2_SPLITS: dict[tuple[str, str], tuple[int, float, float]] = {
    ("Mid", "Llama_Nemotron_Post_Training_Dataset_reasoning_r1"): (3_644_790, 5132.79, 4987.79),
    ("Mid", "OpenThoughts3_1.2M"): (1_135_104, 14504.5, 14284.9),
    ("SFT", "smoltalk_smollm3_everyday_conversations_no_think"): (2_260, 277.24, 111.01),
    ("SFT", "smoltalk_smollm3_systemchats_30k_no_think"): (33_997, 648.91, 284.74),
    ("SFT", "tulu_3_sft_personas_instruction_following_no_think"): (29_970, 461.46, 397.74),
    ("SFT", "hermes_function_calling_v1_no_think"): (8_961, 1270.06, 468.37),
    ("SFT", "smoltalk_smollm3_smol_magpie_ultra_no_think"): (406_843, 1521.59, 522.07),
    ("SFT", "smoltalk_multilingual_8languages_lang_5_no_think"): (254_047, 656.54, 550.13),
    ("SFT", "table_gpt_no_think"): (13_203, 870.39, 155.58),
    ("SFT", "OpenHermes_2.5_no_think"): (384_900, 411.1, 214.71),
    ("SFT", "OpenThoughts3_1.2M_no_think_no_think"): (435_193, 872.76, 657.73),
    ("SFT", "Mixture_of_Thoughts_science_no_think"): (86_110, 435.61, 372.97),
    ("SFT", "smoltalk_smollm3_explore_instruct_rewriting_no_think"): (30_391, 152.29, 110.87),
    ("SFT", "smoltalk_smollm3_smol_rewrite_no_think"): (53_262, 381.86, 229.28),
    ("SFT", "smoltalk_smollm3_smol_summarize_no_think"): (96_061, 539.47, 182.86),
    ("SFT", "LongAlign_64k_context_lang_annotated_lang_6_no_think"): (6_249, 15327.7, 274.55),
    ("SFT", "multi_turn_reasoning_if_think"): (28_217, 3459.66, 1312.48),
    ("SFT", "smoltalk_everyday_convs_reasoning_Qwen3_32B_think"): (2_057, 1539.37, 1402.6),
    ("SFT", "smoltalk_systemchats_Qwen3_32B_think"): (27_436, 1087.79, 1059.73),
    ("SFT", "xlam_traces_no_think"): (59_962, 490.25, 455.84),
    ("SFT", "smolagents_toolcalling_traces_think"): (9_079, 7028.12, 681.89),
    ("SFT", "s1k_1.1_think"): (835, 9876.31, 9745.45),
    ("SFT", "LongAlign_64k_Qwen3_32B_yarn_131k_think"): (7_526, 18099.2, 2135.73),
    ("SFT", "aya_dataset_Qwen3_32B_think"): (15_222, 1242.73, 1198.4),
    ("SFT", "smoltalk_multilingual8_Qwen3_32B_think"): (244_736, 2255.38, 2148.74),
    ("SFT", "OpenThoughts3_1.2M_think"): (1_133_524, 14762.8, 14543.6),
    ("SFT", "table_gpt_Qwen3_32B_think"): (13_201, 1963.49, 1248.6),
}


def known_split(dataset_id: str | None, config: str | None, split: str) -> tuple[int, float, float] | None:
    if dataset_id != SMOLTALK2:
        return None
    return SMOLTALK2_SPLITS.get((config or "", split))


def packed_rows_estimate(tokens: float, rows: int, max_length: int, strategy: str) -> tuple[int, float]:
    """(packed rows, packing efficiency) when only token and row counts are known."""
    if strategy == "none":
        return rows, (tokens / max(1, rows * max_length))
    eff = 1.0 if strategy == "wrapped" else BFD_ASSUMED_EFFICIENCY
    return math.ceil(tokens / (max_length * eff)), eff
