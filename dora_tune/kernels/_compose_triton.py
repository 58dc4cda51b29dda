"""Triton kernels of the DoRA compose (imported lazily: only when impl="triton" runs).

Forward: ``out = (g−1)·base + g·(s·lora)`` in fp32, stored in the input dtype; with ``WRITE_INNER`` it also stores
``inner = s·lora + base`` (what the backward needs for ``d_g``). Backward, one pass over ``d_out`` (and ``inner``):
``d_lora = g·s·d_out``, ``d_base = (g−1)·d_out`` and per-program column partials of ``inner ⊙ d_out``; a second,
fixed-order reduction over those partials gives ``d_g`` (deterministic: no atomics).

Tensors are ``[rows, cols]`` with unit column stride and any row stride; ``g`` is a contiguous ``[cols]`` vector.
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


@triton.jit
def _compose_fwd_kernel(
    lora_ptr,
    base_ptr,
    g_ptr,
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
    WRITE_INNER: tl.constexpr,
):
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < cols
    mask = (offs_r[:, None] < rows) & c_ok[None, :]
    lora = tl.load(lora_ptr + offs_r[:, None] * stride_lora + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    base = tl.load(base_ptr + offs_r[:, None] * stride_base + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    out = (g - 1.0) * base + g * (scale * lora)
    o_off = offs_r[:, None] * stride_out + offs_c[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_INNER:
        tl.store(inner_ptr + o_off, (scale * lora + base).to(inner_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _compose_bwd_kernel(
    dout_ptr,
    inner_ptr,
    g_ptr,
    dlora_ptr,
    dbase_ptr,
    dg_part_ptr,
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
    NEED_DLORA: tl.constexpr,
    NEED_DBASE: tl.constexpr,
    NEED_DG: tl.constexpr,
):
    pid_r = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < cols
    g = tl.load(g_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
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
            tl.store(p, ((g - 1.0) * d).to(dbase_ptr.dtype.element_ty), mask=mask)
        if NEED_DG:
            p = inner_ptr + offs_r[:, None] * stride_inner + offs_c[None, :]
            inner = tl.load(p, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(inner * d, axis=0)
    if NEED_DG:
        tl.store(dg_part_ptr + pid_r * cols + offs_c, acc, mask=c_ok)


def compose_fwd_triton(
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    config: ComposeConfig,
    *,
    write_inner: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward on ``[rows, cols]`` views. Returns ``(out, inner or None)``, both ``[rows, cols]``."""
    rows, cols = base.shape
    out = torch.empty((rows, cols), device=base.device, dtype=base.dtype)
    inner = torch.empty_like(out) if write_inner else None
    if out.numel() == 0:
        return out, inner
    grid = (cdiv(rows, config.block_r), cdiv(cols, config.block_c))
    lean(_compose_fwd_kernel)[grid](
        lora, base, g, out, inner if write_inner else out,
        rows, cols, lora.stride(0), base.stride(0), out.stride(0), scale,
        BLOCK_R=config.block_r, BLOCK_C=config.block_c, WRITE_INNER=write_inner, num_warps=config.num_warps,
    )  # fmt: skip
    return out, inner


def compose_bwd_triton(
    dout: torch.Tensor,
    inner: torch.Tensor | None,
    g: torch.Tensor,
    scale: float,
    config: ComposeBwdConfig,
    *,
    lora_dtype: torch.dtype,
    need_dlora: bool,
    need_dbase: bool,
    need_dg: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward on ``[rows, cols]`` views. Returns ``(d_lora, d_base, d_g fp32 [cols])``, None where
    not needed. ``inner`` is required when ``need_dg``."""
    rows, cols = dout.shape
    dev = dout.device
    dlora = torch.empty((rows, cols), device=dev, dtype=lora_dtype) if need_dlora else None
    dbase = torch.empty((rows, cols), device=dev, dtype=dout.dtype) if need_dbase else None
    n_row_progs = cdiv(rows, config.block_r * config.row_iters)
    dg_part = torch.empty((n_row_progs, cols), device=dev, dtype=torch.float32) if need_dg else None
    if rows * cols > 0 and (need_dlora or need_dbase or need_dg):
        any_out = dlora if dlora is not None else (dbase if dbase is not None else dout)
        grid = (n_row_progs, cdiv(cols, config.block_c))
        lean(_compose_bwd_kernel)[grid](
            dout, inner if need_dg else dout, g,
            dlora if need_dlora else any_out, dbase if need_dbase else any_out, dg_part if need_dg else g,
            rows, cols, dout.stride(0), inner.stride(0) if need_dg else 0,
            dlora.stride(0) if need_dlora else 0, dbase.stride(0) if need_dbase else 0, scale,
            BLOCK_R=config.block_r, BLOCK_C=config.block_c, ROW_ITERS=config.row_iters,
            NEED_DLORA=need_dlora, NEED_DBASE=need_dbase, NEED_DG=need_dg, num_warps=config.num_warps,
        )  # fmt: skip
    dg = None
    if need_dg:
        if rows == 0:
            dg = torch.zeros(cols, device=dev, dtype=torch.float32)
        else:
            dg = dg_part[0] if n_row_progs == 1 else dg_part.sum(dim=0)
    return dlora, dbase, dg
