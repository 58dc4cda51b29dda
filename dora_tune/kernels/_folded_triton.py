"""Triton kernel of the folded DoRA linear's forward (:func:`~dora_tune.kernels.dora_linear.folded_forward`;
imported lazily).

The folded forward leaves one elementwise pass after its cuBLAS GEMMs: the column scale and the bias,

    g   = m / n      where n > 0, else 1      (float32, as dora_scale; IEEE division)
    out = g ⊙ pre + bias                      (float32 arithmetic, rounded once to out's dtype)

over ``pre = x·Wᵀ + s·u·Bᵀ`` ``[rows, cols]`` (unit column stride, any row stride). ``out`` may be ``pre`` itself
(in place: each program reads its tile before it writes it). The backward reuses the one-node layer's backward
kernel (:func:`~dora_tune.kernels._dora_triton.dora_bwd_triton`: ``e = g ⊙ d_y`` and ``d_m`` in one pass).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from dora_tune.kernels._common import cdiv
from dora_tune.kernels._dora_triton import _scale
from dora_tune.kernels._launch import lean

if TYPE_CHECKING:
    from dora_tune.kernels.compose import ComposeConfig


@triton.jit
def _folded_scale_kernel(
    pre_ptr,
    m_ptr,
    n_ptr,
    bias_ptr,
    out_ptr,
    rows,
    cols,
    stride_pre,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < cols
    mask = (offs_r[:, None] < rows) & c_ok[None, :]
    pre = tl.load(pre_ptr + offs_r[:, None] * stride_pre + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    g, _ = _scale(m_ptr, n_ptr, offs_c, c_ok)
    out = g[None, :] * pre
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_r[:, None] * stride_out + offs_c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def folded_scale_triton(
    pre: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    bias: torch.Tensor | None,
    config: ComposeConfig,
    *,
    in_place: bool,
) -> torch.Tensor:
    """``g ⊙ pre + bias`` of ``pre [rows, cols]`` (``magnitude`` contiguous ``[cols]``, ``norm`` float32 contiguous
    ``[cols]``, ``bias`` contiguous ``[cols]`` or None), in ``pre``'s dtype; written over ``pre`` when
    ``in_place``."""
    rows, cols = pre.shape
    out = pre if in_place else torch.empty((rows, cols), device=pre.device, dtype=pre.dtype)
    if out.numel() == 0:
        return out
    grid = (cdiv(rows, config.block_r), cdiv(cols, config.block_c))
    lean(_folded_scale_kernel)[grid](
        pre,
        magnitude,
        norm,
        bias if bias is not None else norm,
        out,
        rows,
        cols,
        pre.stride(0),
        out.stride(0),
        BLOCK_R=config.block_r,
        BLOCK_C=config.block_c,
        HAS_BIAS=bias is not None,
        num_warps=config.num_warps,
    )
    return out
