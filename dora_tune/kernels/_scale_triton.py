"""Triton kernels of the DoRA scale ``g = m / n`` for the fused training node (imported lazily).

:class:`~dora_tune.kernels.compose_train._DoraComposeTrainFn` forms ``g`` in its forward and ``d_m`` in its
backward. In torch each is about five elementwise launches on a ``[d_out]`` vector (compare, two ``where``, a cast,
a divide: the formulas of :func:`~dora_tune.kernels.compose._dora_scale` and
:func:`~dora_tune.kernels.compose.dora_scale_backward`); the GPU work is nothing, the host's is 60–100 µs a layer
(docs/end-to-end.md, "Host cost"). Here each is one launch computing the same formula with IEEE round-to-nearest
division, so the results are bitwise those of the torch formulas:

    g   = m / n      where n > 0, else 1      (float32)
    d_m = d_g / n    where n > 0, else 0      (rounded once to m's dtype)

Vectors are ``[d_out]``; ``n`` and ``d_g`` are read as float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dora_tune.kernels._common import cdiv
from dora_tune.kernels._launch import lean

_BLOCK = 1024


@triton.jit
def _scale_fwd_kernel(m_ptr, n_ptr, g_ptr, cols, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(n_ptr + offs, mask=mask, other=1.0)
    ok = n > 0
    g = tl.where(ok, tl.math.div_rn(m, tl.where(ok, n, 1.0)), 1.0)
    tl.store(g_ptr + offs, g, mask=mask)


@triton.jit
def _scale_bwd_kernel(dg_ptr, n_ptr, dm_ptr, cols, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    dg = tl.load(dg_ptr + offs, mask=mask, other=0.0)
    n = tl.load(n_ptr + offs, mask=mask, other=1.0)
    ok = n > 0
    dm = tl.where(ok, tl.math.div_rn(dg, tl.where(ok, n, 1.0)), 0.0)
    tl.store(dm_ptr + offs, dm.to(dm_ptr.dtype.element_ty), mask=mask)


def dora_scale_fwd_triton(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``g = m / n`` (1 where ``n > 0`` fails): float32 ``[d_out]`` from ``magnitude [d_out]`` and ``norm [d_out]``
    (any float dtypes; validated by the caller)."""
    m, n = magnitude.detach().contiguous(), norm.detach().float().contiguous()
    g = torch.empty(n.shape, device=n.device, dtype=torch.float32)
    if n.numel():
        lean(_scale_fwd_kernel)[(cdiv(n.numel(), _BLOCK),)](m, n, g, n.numel(), BLOCK=_BLOCK, num_warps=4)
    return g


def dora_scale_bwd_triton(grad_g: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``d_m = d_g / n`` (0 where ``n > 0`` fails) in ``dtype``, ``[d_out]``, from ``grad_g`` and ``norm``."""
    dg, n = grad_g.float().contiguous(), norm.detach().float().contiguous()
    # The CPU interpreter (triton 3.9) truncates float32 → bfloat16 stores instead of rounding to nearest even:
    # there, and only there, the kernel stores float32 and torch rounds.
    interp = n.device.type != "cuda"
    dm = torch.empty(n.shape, device=n.device, dtype=torch.float32 if interp else dtype)
    if n.numel():
        lean(_scale_bwd_kernel)[(cdiv(n.numel(), _BLOCK),)](dg, n, dm, n.numel(), BLOCK=_BLOCK, num_warps=4)
    return dm.to(dtype) if interp else dm
