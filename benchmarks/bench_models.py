"""The decoder stacks the end-to-end benchmarks train: a transformers Llama or Qwen2 built from a config with random
weights (no downloads), on the device in the working dtype.

Imported by the benchmark scripts as ``bench_models`` (running ``python3 benchmarks/x.py`` puts ``benchmarks/`` on
``sys.path``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The projections the benchmarks adapt: every attention and MLP projection of a decoder layer."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """Projection dims of one model family: hidden and MLP sizes, attention and KV heads."""

    family: str  # "llama" | "qwen2" (q/k/v with bias)
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int


def decoder_config(spec: Spec, *, layers: int, vocab: int, max_tokens: int) -> Any:
    """The transformers config of ``layers`` decoder layers of ``spec``: SDPA attention, no KV cache, untied head."""
    from transformers import LlamaConfig, Qwen2Config

    cfg_cls = LlamaConfig if spec.family == "llama" else Qwen2Config
    return cfg_cls(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=max(max_tokens, 4096),
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )


def build_decoder(
    spec: Spec, *, layers: int, vocab: int, max_tokens: int, dtype: torch.dtype, device: torch.device, seed: int
) -> torch.nn.Module:
    """The random decoder stack (weights from ``seed``), built directly on ``device`` in ``dtype``; its config is
    ``model.config``."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    model_cls = LlamaForCausalLM if spec.family == "llama" else Qwen2ForCausalLM
    cfg = decoder_config(spec, layers=layers, vocab=vocab, max_tokens=max_tokens)
    prev = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_cls(cfg)
    finally:
        torch.set_default_dtype(prev)
