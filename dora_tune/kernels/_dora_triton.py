"""Triton kernels of the one-node DoRA layer (:mod:`dora_tune.kernels.dora_layer`; imported lazily).

The compose of :mod:`~dora_tune.kernels._compose_triton` with the DoRA scale formed inside (no separate ``g``
launch), PEFT's bias subtracted inside, and optionally the base output added back (the layer's whole output), so a
layer's forward is one launch besides its GEMMs and its backward one or two:

    g     = m / n        where n > 0, else 1                      (float32, as dora_scale)
    base' = base − bias  (SUB_BIAS: PEFT passes the base layer's output, bias included)
    out   = (g−1)·base' + g·(s·lora)             (the DoRA delta), or
    out   = base' + [(g−1)·base' + g·(s·lora)] + bias            (FULL: the layer output g·(base' + s·lora) + bias)
    inner = s·lora + base'                       (WRITE_INNER: what d_m needs)

Backward, one pass over ``d_out`` (and ``inner``): ``d_lora = g·s·d``, ``d_base = (g − 1 + FULL)·d`` and
``d_m = Σ_rows(inner ⊙ d) / n`` (0 where n = 0) — per-program column partials, then a fixed-order finish
(deterministic, no atomics); with one row program the backward kernel writes ``d_m`` itself.

Tensors are ``[rows, cols]`` with unit column stride and any row stride; ``m``, ``n`` and ``bias`` are contiguous
``[cols]`` vectors (``n`` float32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from dora_tune.kernels._common import cdiv
from dora_tune.kernels._launch import lean

if TYPE_CHECKING:
    from dora_tune.kernels.compose import ComposeConfig
    from dora_tune.kernels.compose_train import ComposeBwdConfig

_FINISH_BLOCK = 1024


@triton.jit
def _scale(m_ptr, n_ptr, offs_c, c_ok):
    """g = m / n (IEEE division; 1 where n > 0 fails), and n, for the columns ``offs_c``."""
    m = tl.load(m_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    n = tl.load(n_ptr + offs_c, mask=c_ok, other=1.0)
    ok = n > 0
    return tl.where(ok, tl.math.div_rn(m, tl.where(ok, n, 1.0)), 1.0), n


@triton.jit
def _dora_fwd_kernel(
    lora_ptr,
    base_ptr,
    m_ptr,
    n_ptr,
    bias_ptr,
    out_ptr,
    inner_ptr,
    rows,
    cols,
    stride_lora,
    stride_base,
    stride_out,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SUB_BIAS: tl.constexpr,
    FULL: tl.constexpr,
    WRITE_INNER: tl.constexpr,
):
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < cols
    mask = (offs_r[:, None] < rows) & c_ok[None, :]
    lora = tl.load(lora_ptr + offs_r[:, None] * stride_lora + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    base = tl.load(base_ptr + offs_r[:, None] * stride_base + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    g, _ = _scale(m_ptr, n_ptr, offs_c, c_ok)
    g = g[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if SUB_BIAS:
            base = base - bias
    out = (g - 1.0) * base + g * (scale * lora)
    if FULL:
        out = base + out
        if HAS_BIAS:
            out = out + bias
    o_off = offs_r[:, None] * stride_out + offs_c[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_INNER:
        tl.store(inner_ptr + o_off, (scale * lora + base).to(inner_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dora_bwd_kernel(
    dout_ptr,
    inner_ptr,
    m_ptr,
    n_ptr,
    dlora_ptr,
    dbase_ptr,
    dm_ptr,
    rows,
    cols,
    stride_dout,
    stride_inner,
    stride_dlora,
    stride_dbase,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROW_ITERS: tl.constexpr,
    FULL: tl.constexpr,
    NEED_DLORA: tl.constexpr,
    NEED_DBASE: tl.constexpr,
    NEED_DM: tl.constexpr,
    DM_DIRECT: tl.constexpr,
):
    pid_r = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < cols
    g, n = _scale(m_ptr, n_ptr, offs_c, c_ok)
    g = g[None, :]
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(ROW_ITERS):
        offs_r = ((pid_r * ROW_ITERS + i) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (offs_r[:, None] < rows) & c_ok[None, :]
        d = tl.load(dout_ptr + offs_r[:, None] * stride_dout + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_DLORA:
            p = dlora_ptr + offs_r[:, None] * stride_dlora + offs_c[None, :]
            tl.store(p, (g * scale * d).to(dlora_ptr.dtype.element_ty), mask=mask)
        if NEED_DBASE:
            p = dbase_ptr + offs_r[:, None] * stride_dbase + offs_c[None, :]
            if FULL:
                tl.store(p, (g * d).to(dbase_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(p, ((g - 1.0) * d).to(dbase_ptr.dtype.element_ty), mask=mask)
        if NEED_DM:
            p = inner_ptr + offs_r[:, None] * stride_inner + offs_c[None, :]
            inner = tl.load(p, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(inner * d, axis=0)
    if NEED_DM:
        _store_dm(dm_ptr, acc, n, offs_c, c_ok, pid_r, cols, DM_DIRECT)


@triton.jit
def _store_dm(dm_ptr, acc, n, offs_c, c_ok, pid_r, cols, DM_DIRECT: tl.constexpr):
    """A backward program's column sums ``acc`` of ``d_g`` over its rows: with one row program ``d_m = d_g / n``
    stored directly (the finish kernel's formula; 0 where n > 0 fails), else the partial for the finish kernel."""
    if DM_DIRECT:
        ok = n > 0
        dm = tl.where(ok, tl.math.div_rn(acc, tl.where(ok, n, 1.0)), 0.0)
        tl.store(dm_ptr + offs_c, dm.to(dm_ptr.dtype.element_ty), mask=c_ok)
    else:
        tl.store(dm_ptr + pid_r * cols + offs_c, acc, mask=c_ok)


@triton.jit
def _dm_finish_kernel(part_ptr, n_ptr, dm_ptr, parts, cols, BLOCK: tl.constexpr):
    """d_m = (Σ_p partials[p]) / n in a fixed order (0 where n > 0 fails), stored in m's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok_c = offs < cols
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(parts):
        acc += tl.load(part_ptr + p * cols + offs, mask=ok_c, other=0.0)
    n = tl.load(n_ptr + offs, mask=ok_c, other=1.0)
    ok = n > 0
    dm = tl.where(ok, tl.math.div_rn(acc, tl.where(ok, n, 1.0)), 0.0)
    tl.store(dm_ptr + offs, dm.to(dm_ptr.dtype.element_ty), mask=ok_c)


def dora_fwd_triton(
    lora: torch.Tensor,
    base: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    config: ComposeConfig,
    *,
    sub_bias: bool,
    full: bool,
    write_inner: bool,
    out_dtype: torch.dtype,
    inner_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward on ``[rows, cols]`` views (``magnitude``, ``norm`` float32 and ``bias`` contiguous
    ``[cols]``; ``lora`` and ``base`` may differ in dtype). Returns ``(out, inner or None)``, ``[rows, cols]``."""
    rows, cols = base.shape
    out = torch.empty((rows, cols), device=base.device, dtype=out_dtype)
    inner = torch.empty((rows, cols), device=base.device, dtype=inner_dtype) if write_inner else None
    if out.numel() == 0:
        return out, inner
    grid = (cdiv(rows, config.block_r), cdiv(cols, config.block_c))
    lean(_dora_fwd_kernel)[grid](
        lora,
        base,
        magnitude,
        norm,
        bias if bias is not None else norm,
        out,
        inner if write_inner else out,
        rows,
        cols,
        lora.stride(0),
        base.stride(0),
        out.stride(0),
        scale,
        BLOCK_R=config.block_r,
        BLOCK_C=config.block_c,
        HAS_BIAS=bias is not None,
        SUB_BIAS=sub_bias,
        FULL=full,
        WRITE_INNER=write_inner,
        num_warps=config.num_warps,
    )
    return out, inner


def dora_bwd_triton(
    dout: torch.Tensor,
    inner: torch.Tensor | None,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    config: ComposeBwdConfig,
    *,
    full: bool,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
    m_dtype: torch.dtype,
    need_dlora: bool,
    need_dbase: bool,
    need_dm: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward on ``[rows, cols]`` views. Returns ``(d_lora, d_base, d_m [cols] in m_dtype)``, None
    where not needed. ``inner`` is required when ``need_dm``."""
    rows, cols = dout.shape
    dev = dout.device
    dlora = torch.empty((rows, cols), device=dev, dtype=lora_dtype) if need_dlora else None
    dbase = torch.empty((rows, cols), device=dev, dtype=base_dtype) if need_dbase else None
    parts = cdiv(rows, config.block_r * config.row_iters)
    direct = parts == 1
    # The CPU interpreter (triton 3.9) truncates float32 → bfloat16 stores instead of rounding to nearest even:
    # there, and only there, d_m is stored as float32 and torch rounds.
    interp = dev.type != "cuda"
    dm_store_dtype = torch.float32 if interp else m_dtype
    dm = None
    if need_dm:
        if rows == 0:
            return dlora, dbase, torch.zeros(cols, device=dev, dtype=m_dtype)
        dm = torch.empty(cols, device=dev, dtype=dm_store_dtype)
        part = dm if direct else torch.empty((parts, cols), device=dev, dtype=torch.float32)
    if rows * cols > 0 and (need_dlora or need_dbase or need_dm):
        any_out = dlora if dlora is not None else (dbase if dbase is not None else dout)
        grid = (parts, cdiv(cols, config.block_c))
        lean(_dora_bwd_kernel)[grid](
            dout,
            inner if need_dm else dout,
            magnitude,
            norm,
            dlora if need_dlora else any_out,
            dbase if need_dbase else any_out,
            part if need_dm else norm,
            rows,
            cols,
            dout.stride(0),
            inner.stride(0) if need_dm else 0,
            dlora.stride(0) if need_dlora else 0,
            dbase.stride(0) if need_dbase else 0,
            scale,
            BLOCK_R=config.block_r,
            BLOCK_C=config.block_c,
            ROW_ITERS=config.row_iters,
            FULL=full,
            NEED_DLORA=need_dlora,
            NEED_DBASE=need_dbase,
            NEED_DM=need_dm,
            DM_DIRECT=direct,
            num_warps=config.num_warps,
        )
        if need_dm and not direct:
            grid = (cdiv(cols, _FINISH_BLOCK),)
            lean(_dm_finish_kernel)[grid](part, norm, dm, parts, cols, BLOCK=_FINISH_BLOCK, num_warps=4)
    if dm is not None and dm.dtype != m_dtype:
        dm = dm.to(m_dtype)
    return dlora, dbase, dm
