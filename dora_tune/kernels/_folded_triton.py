"""Triton kernels of the folded DoRA linear (:func:`~dora_tune.kernels.dora_linear.folded_forward`; imported
lazily).

The folded linear runs its large GEMMs on cuBLAS (``base = x·Wᵀ``, ``s·u = s·x·Aᵀ``, and the backward's) and leaves
one elementwise pass each way, with the LoRA branch's rank-r tail ``(s·u)·Bᵀ`` computed inside the pass on the
tensor cores (a ``tl.dot`` of K = r per tile: the LoRA output is never written to memory):

    g     = m / n                  where n > 0, else 1 (float32, as dora_scale; IEEE division)
    y     = g ⊙ (base + (s·u)·Bᵀ) + bias                     forward, rounded once to y's dtype
    e     = g ⊙ d_y                                           backward (the GEMMs' operand)
    d_m   = Σ_rows(d_y ⊙ (base + (s·u)·Bᵀ)) / n   (0 where n > 0 fails)   backward, the tail recomputed

``d_m`` is reduced into per-program column partials and summed in a fixed order (deterministic; one row program:
written directly). Tensors are ``[rows, cols]`` with unit column stride and any row stride; ``s·u`` ``[rows, r]`` and
``B`` ``[cols, r]`` any strides; ``m``, ``n`` and ``bias`` contiguous ``[cols]`` vectors (``n`` float32). ``y`` may
be ``base`` itself (in place: each program reads its tile before it writes it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from dora_tune.kernels._common import cdiv
from dora_tune.kernels._dora_linear_triton import _block_r, _dot_setup, _rank_tail, _rounded, _stored
from dora_tune.kernels._dora_triton import _dm_finish_kernel, _scale, _store_dm
from dora_tune.kernels._launch import lean

if TYPE_CHECKING:
    from dora_tune.kernels.dora_linear import FoldedConfig

_FINISH_BLOCK = 1024


@triton.jit
def _folded_fwd_kernel(
    base_ptr, us_ptr, b_ptr, m_ptr, n_ptr, bias_ptr, y_ptr,
    rows, cols, R,
    stride_base, stride_um, stride_ur, stride_bn, stride_br, stride_y,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = offs_r < rows
    c_ok = offs_c < cols
    mask = r_ok[:, None] & c_ok[None, :]
    tail = _rank_tail(
        us_ptr, stride_um, stride_ur, b_ptr, stride_br, stride_bn, offs_r, r_ok, offs_c, c_ok, R,
        BLOCK_R, BLOCK_C, BLOCK_K, DOT_DTYPE, PREC,
    )  # fmt: skip
    base = tl.load(base_ptr + offs_r[:, None] * stride_base + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    g, _ = _scale(m_ptr, n_ptr, offs_c, c_ok)
    y = g[None, :] * (base + tail)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_r[:, None] * stride_y + offs_c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _folded_bwd_kernel(
    dy_ptr, base_ptr, us_ptr, b_ptr, m_ptr, n_ptr, e_ptr, dm_ptr,
    rows, cols, R,
    stride_dy, stride_base, stride_um, stride_ur, stride_bn, stride_br, stride_e,
    NEED_E: tl.constexpr, NEED_DM: tl.constexpr, DM_DIRECT: tl.constexpr, ROW_ITERS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < cols
    g, n = _scale(m_ptr, n_ptr, offs_c, c_ok)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(ROW_ITERS):
        offs_r = ((pid_r * ROW_ITERS + i) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = offs_r < rows
        mask = r_ok[:, None] & c_ok[None, :]
        d = tl.load(dy_ptr + offs_r[:, None] * stride_dy + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_E:
            p = e_ptr + offs_r[:, None] * stride_e + offs_c[None, :]
            tl.store(p, (g[None, :] * d).to(e_ptr.dtype.element_ty), mask=mask)
        if NEED_DM:
            tail = _rank_tail(
                us_ptr, stride_um, stride_ur, b_ptr, stride_br, stride_bn, offs_r, r_ok, offs_c, c_ok, R,
                BLOCK_R, BLOCK_C, BLOCK_K, DOT_DTYPE, PREC,
            )  # fmt: skip
            p = base_ptr + offs_r[:, None] * stride_base + offs_c[None, :]
            inner = tl.load(p, mask=mask, other=0.0).to(tl.float32) + tail
            acc += tl.sum(inner * d, axis=0)
    if NEED_DM:
        _store_dm(dm_ptr, acc, n, offs_c, c_ok, pid_r, cols, DM_DIRECT)


def folded_fwd_triton(
    base: torch.Tensor,
    us: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    bias: torch.Tensor | None,
    config: FoldedConfig,
    *,
    in_place: bool,
) -> torch.Tensor:
    """``y = g ⊙ (base + us·Bᵀ) + bias`` for ``base [rows, cols]`` and ``us = s·u [rows, r]``, in ``base``'s dtype;
    written over ``base`` when ``in_place`` (checked by the caller)."""
    rows, cols = base.shape
    store = _stored(base.dtype, base.device)
    y = base if in_place and store == base.dtype else torch.empty((rows, cols), device=base.device, dtype=store)
    if rows == 0 or cols == 0:
        return _rounded(y, base.dtype)
    R = lora_B.shape[1]
    dot, prec = _dot_setup(base.dtype, base.device)
    c = config
    lean(_folded_fwd_kernel)[(cdiv(rows, c.block_r), cdiv(cols, c.block_c))](
        base, us, lora_B, magnitude, norm, bias if bias is not None else norm, y,
        rows, cols, R,
        base.stride(0), us.stride(0), us.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_R=c.block_r, BLOCK_C=c.block_c, BLOCK_K=_block_r(R), DOT_DTYPE=dot, PREC=prec, num_warps=c.num_warps,
    )  # fmt: skip
    return _rounded(y, base.dtype)


def folded_bwd_triton(
    dy: torch.Tensor,
    base: torch.Tensor | None,
    us: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    config: FoldedConfig,
    *,
    need_e: bool,
    m_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(e = g ⊙ dy or None, d_m or None)`` for ``dy [rows, cols]`` (``d_m`` in ``m_dtype`` when ``base`` is given:
    it needs the base output the forward read); checked by the caller."""
    rows, cols = dy.shape
    dev = dy.device
    need_dm = base is not None
    e = torch.empty((rows, cols), device=dev, dtype=_stored(dy.dtype, dev)) if need_e else None
    dm = torch.zeros(cols, device=dev, dtype=m_dtype) if need_dm and rows == 0 else None
    if rows == 0 or cols == 0 or not (need_e or need_dm):
        return _rounded(e, dy.dtype), dm
    c = config
    parts = cdiv(rows, c.block_r * c.row_iters)
    direct = parts == 1
    if need_dm:
        dm = torch.empty(cols, device=dev, dtype=_stored(m_dtype, dev))
    part = dm if direct or not need_dm else torch.empty((parts, cols), device=dev, dtype=torch.float32)
    R = lora_B.shape[1]
    dot, prec = _dot_setup(dy.dtype, dev)
    lean(_folded_bwd_kernel)[(parts, cdiv(cols, c.block_c))](
        dy, base if base is not None else dy, us, lora_B, magnitude, norm, e if e is not None else dy,
        part if part is not None else norm,
        rows, cols, R,
        dy.stride(0), base.stride(0) if base is not None else 0, us.stride(0), us.stride(1),
        lora_B.stride(0), lora_B.stride(1), e.stride(0) if e is not None else 0,
        NEED_E=need_e, NEED_DM=need_dm, DM_DIRECT=direct, ROW_ITERS=c.row_iters,
        BLOCK_R=c.block_r, BLOCK_C=c.block_c, BLOCK_K=_block_r(R), DOT_DTYPE=dot, PREC=prec, num_warps=c.num_warps,
    )  # fmt: skip
    if need_dm and not direct:
        lean(_dm_finish_kernel)[(cdiv(cols, _FINISH_BLOCK),)](part, norm, dm, parts, cols, BLOCK=_FINISH_BLOCK)
    return _rounded(e, dy.dtype), _rounded(dm, m_dtype)
