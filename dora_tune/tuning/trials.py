"""What a trial needs besides the registry (:mod:`dora_tune.dispatch.registry`): random inputs of an op at a shape
(:func:`make_inputs`, the op spec's recipe), the second stage of the compose_train sweep (:func:`train_bwd_stage`)
and an op's floors (:func:`op_bytes`, :func:`op_flops`: the cost model's traffic and work features)."""

from __future__ import annotations

from typing import Any

import torch

from dora_tune.kernels._common import DTYPES as _DTYPES
from dora_tune.ops import OP_SHAPE_KEYS, OPS

DTYPES: dict[str, torch.dtype] = _DTYPES  # the kernels' one table


def op_bytes(op: str, shape: dict[str, int], dtype: str) -> int:
    """Fewest bytes the op must move through memory (each input read once, each output written once; its facts)."""
    return OPS[op].bytes(shape, DTYPES[dtype].itemsize)


def op_flops(op: str, shape: dict[str, int]) -> int:
    """Floating-point operations of the op (the factored norm: the U GEMM plus G and B·G; its facts)."""
    return OPS[op].flops(shape)


def make_inputs(op: str, shape: dict[str, int], dtype: str, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Random inputs (never zeros) for ``op`` at ``shape``, scaled like real DoRA tensors (the op spec's recipe)."""
    from dora_tune.kernels.catalog import OP_SPECS

    if set(shape) != set(OP_SHAPE_KEYS[op]):
        raise ValueError(f"{op} shape needs keys {OP_SHAPE_KEYS[op]}, got {sorted(shape)}")
    dt = DTYPES[dtype]
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, device=device, generator=g) * scale).to(dt)

    return OP_SPECS[op].inputs(shape, rnd)


def train_bwd_stage(best_fwd: dict) -> list[dict]:
    """Stage 2 of the compose_train sweep: every backward config with the best forward of stage 1."""
    from dora_tune.kernels.compose_train import compose_bwd_config_space

    return [{"fwd": best_fwd, "bwd": b.as_dict()} for b in compose_bwd_config_space()]
