"""Triton kernels of the fused DoRA linear (:mod:`dora_tune.kernels.dora_linear`; imported lazily).

With ``g = m / n`` (``n`` the detached row norm; ``g = 1`` where ``n = 0``: :func:`~dora_tune.kernels._dora_triton.
_scale`, the formula of every fused DoRA kernel) and ``u = x·Aᵀ`` (one cuBLAS GEMM before the launch):

* forward, ``_fwd_kernel``: ``y_pre = [x, s·u]·[W, B]ᵀ`` as ONE GEMM of ``K = d_in + r`` — a main loop over ``d_in``
  (``x`` tiles against ``W``), then a short one over ``r`` (``u`` against ``B``) into a second fp32 accumulator,
  scaled by ``s`` once — and the epilogue ``y = g ⊙ y_pre + bias``, writing ``y_pre`` too when ``m`` needs a
  gradient. No ``(g − 1)·base`` term, hence no cancellation near ``g ≈ 1``.
* backward, ``_dx_kernel``: ``d_x = [e, s·v]·[W; A]`` with ``e = g ⊙ d_y`` formed in the prologue of the main loop
  (over ``d_out``) and ``v = e·B`` (one cuBLAS GEMM before the launch), then the loop over ``r``; the programs of the
  first ``d_in`` tile also reduce ``Σ_rows(d_y ⊙ y_pre)`` per row block into partials that
  :func:`~dora_tune.kernels._dora_triton._dm_finish_kernel` adds in a fixed order and divides by ``n`` (``d_m``;
  deterministic, no atomics).

Programs are ordered in groups of ``GROUP_M`` row tiles (the L2 reuse of the usual grouped GEMM order). Tensors are
``[rows, cols]`` with any strides; ``m`` and ``n`` contiguous ``[d_out]`` vectors (``n`` float32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from dora_tune.kernels._common import cdiv
from dora_tune.kernels._dora_triton import _dm_finish_kernel, _scale
from dora_tune.kernels._launch import lean

if TYPE_CHECKING:
    from dora_tune.kernels.dora_linear import DoraLinearConfig

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_FINISH_BLOCK = 1024


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (row tile, column tile) of program ``pid`` in the grouped order."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.jit
def _rank_tail(
    l_ptr, stride_la, stride_lr, r_ptr, stride_rr, stride_rb, offs_a, a_ok, offs_b, b_ok, R,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """``Σ_j left[a, j]·right[j, b]`` over the rank — the GEMM's short K tail (``u·Bᵀ`` forward, ``v·A``
    backward) — into a fresh fp32 accumulator."""
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for j in range(0, R, BLOCK_R):
        rr = j + offs_r
        r_ok = rr < R
        left = tl.load(
            l_ptr + offs_a[:, None] * stride_la + rr[None, :] * stride_lr, mask=a_ok[:, None] & r_ok[None, :], other=0.0
        )
        right = tl.load(
            r_ptr + rr[:, None] * stride_rr + offs_b[None, :] * stride_rb, mask=r_ok[:, None] & b_ok[None, :], other=0.0
        )
        acc = tl.dot(left.to(DOT_DTYPE), right.to(DOT_DTYPE), acc, input_precision=PREC)
    return acc


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, u_ptr, b_ptr, m_ptr, n_ptr, bias_ptr, y_ptr, pre_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur, stride_bn, stride_br,
    stride_ym, stride_pm,
    scale,
    HAS_BIAS: tl.constexpr, WRITE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + offs_k
        k_ok = kk < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk, mask=n_ok[None, :] & k_ok[:, None], other=0.0
        )
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PREC)
    acc_l = _rank_tail(
        u_ptr, stride_um, stride_ur, b_ptr, stride_br, stride_bn, offs_m, m_ok, offs_n, n_ok, R,
        BLOCK_M, BLOCK_N, BLOCK_R, DOT_DTYPE, PREC,
    )  # fmt: skip
    pre = acc + scale * acc_l
    g, _ = _scale(m_ptr, n_ptr, offs_n, n_ok)
    y = pre * g[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_PRE:
        tl.store(pre_ptr + offs_m[:, None] * stride_pm + offs_n[None, :], pre.to(pre_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx_kernel(
    dy_ptr, w_ptr, v_ptr, a_ptr, m_ptr, n_ptr, pre_ptr, dx_ptr, part_ptr,
    M, N, K, R, K_GRID,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_vm, stride_vr, stride_ar, stride_ak,
    stride_pm, stride_dxm,
    scale,
    NEED_DX: tl.constexpr, NEED_DM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # output tile: BLOCK_M rows × BLOCK_N columns of d_x [M, K = d_in]; the main loop runs over N = d_out
    pid_m, pid_k = _tile(tl.program_id(0), M, K_GRID, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m < M
    k_ok = offs_k < K
    offs_c = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, N, BLOCK_K):
        cc = c + offs_c
        c_ok = cc < N
        tile = m_ok[:, None] & c_ok[None, :]
        d = tl.load(dy_ptr + offs_m[:, None] * stride_dym + cc[None, :] * stride_dyn, mask=tile, other=0.0)
        d = d.to(tl.float32)
        if NEED_DX:
            g, _ = _scale(m_ptr, n_ptr, cc, c_ok)
            w = tl.load(
                w_ptr + cc[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=c_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            acc = tl.dot((d * g[None, :]).to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PREC)
        if NEED_DM:
            if pid_k == 0:  # the first d_in tile's programs: this row block's partial of Σ_rows(d_y ⊙ y_pre)
                pre = tl.load(pre_ptr + offs_m[:, None] * stride_pm + cc[None, :], mask=tile, other=0.0)
                tl.store(part_ptr + pid_m * N + cc, tl.sum(pre.to(tl.float32) * d, axis=0), mask=c_ok)
    if NEED_DX:
        acc_l = _rank_tail(
            v_ptr, stride_vm, stride_vr, a_ptr, stride_ar, stride_ak, offs_m, m_ok, offs_k, k_ok, R,
            BLOCK_M, BLOCK_N, BLOCK_R, DOT_DTYPE, PREC,
        )  # fmt: skip
        dx = acc + scale * acc_l
        p = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
        tl.store(p, dx.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


def _dot_setup(dtype: torch.dtype, device: torch.device) -> tuple[tl.dtype, str]:
    """The dots' operand dtype and fp32 precision: bf16 dots upcast under the CPU interpreter (wrong there in triton
    3.9, as for the norm); fp32 operands as 3-pass tf32 on the GPU, exact in the interpreter."""
    interp = device.type != "cuda"
    dot = torch.float32 if (interp and dtype == torch.bfloat16) else dtype
    prec = ("ieee" if interp else "tf32x3") if dot == torch.float32 else "tf32"
    return _TL_DTYPES[dot], prec


def _stored(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a kernel stores ``dtype`` outputs in: the CPU interpreter (triton 3.9) truncates float32 → bfloat16
    stores instead of rounding to nearest even, so there, and only there, bf16 outputs are stored as float32 and torch
    rounds (the other fused kernels do the same)."""
    return torch.float32 if device.type != "cuda" and dtype == torch.bfloat16 else dtype


def _rounded(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _block_r(r: int) -> int:
    """The r-loop's K step: the next power of two of r, 16 to 64 (``tl.dot`` needs ≥ 16)."""
    return min(64, max(16, triton.next_power_of_2(r)))


def dora_linear_fwd_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    u: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    config: DoraLinearConfig,
    write_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, y_pre or None)`` for ``x [M, d_in]``, ``u = x·Aᵀ [M, r]``; checked by the caller."""
    M, K = x.shape
    N, R = lora_B.shape
    store = _stored(x.dtype, x.device)
    y = torch.empty((M, N), device=x.device, dtype=store)
    pre = torch.empty((M, N), device=x.device, dtype=store) if write_pre else None
    if M == 0 or N == 0:
        return _rounded(y, x.dtype), _rounded(pre, x.dtype)
    dot, prec = _dot_setup(x.dtype, x.device)
    c = config
    grid = (cdiv(M, c.block_m) * cdiv(N, c.block_n),)
    lean(_fwd_kernel)[grid](
        x, weight, u, lora_B, magnitude, norm, bias if bias is not None else y, y, pre if pre is not None else y,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), u.stride(0), u.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(0),
        scale,
        HAS_BIAS=bias is not None, WRITE_PRE=write_pre,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_R=_block_r(R), GROUP_M=c.group_m,
        DOT_DTYPE=dot, PREC=prec, num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip
    return _rounded(y, x.dtype), _rounded(pre, x.dtype)


def dora_linear_dx_triton(
    dy: torch.Tensor,
    weight: torch.Tensor,
    v: torch.Tensor,
    lora_A: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    y_pre: torch.Tensor | None,
    scale: float,
    config: DoraLinearConfig,
    need_dx: bool,
    dm_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(d_x or None, d_m or None)`` for ``dy [M, d_out]`` and ``v = (g ⊙ dy)·B [M, r]`` (``d_m`` when ``y_pre``
    is given); checked by the caller."""
    M, N = dy.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    need_dm = y_pre is not None
    dx = torch.empty((M, K), device=dy.device, dtype=_stored(dy.dtype, dy.device)) if need_dx else None
    dm = torch.empty((N,), device=dy.device, dtype=_stored(dm_dtype, dy.device)) if need_dm else None
    if not (need_dx or need_dm) or N == 0:
        return _rounded(dx, dy.dtype), _rounded(dm, dm_dtype)
    c = config
    num_m = cdiv(M, c.block_m) if M else 0
    part = torch.zeros((max(num_m, 1), N), device=dy.device, dtype=torch.float32) if need_dm else None
    if M:
        dot, prec = _dot_setup(dy.dtype, dy.device)
        k_grid = K if need_dx else 1  # d_m alone: one program per row block
        grid = (num_m * cdiv(k_grid, c.block_n),)
        any_out = dx if dx is not None else dy
        lean(_dx_kernel)[grid](
            dy, weight, v, lora_A, magnitude, norm, y_pre if y_pre is not None else dy, any_out,
            part if part is not None else dy,
            M, N, K, R, k_grid,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), v.stride(0), v.stride(1),
            lora_A.stride(0), lora_A.stride(1), y_pre.stride(0) if y_pre is not None else 0, any_out.stride(0),
            scale,
            NEED_DX=need_dx, NEED_DM=need_dm,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_R=_block_r(R), GROUP_M=c.group_m,
            DOT_DTYPE=dot, PREC=prec, num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip
    if need_dm:
        parts = part.shape[0]
        lean(_dm_finish_kernel)[(cdiv(N, _FINISH_BLOCK),)](part, norm, dm, parts, N, BLOCK=_FINISH_BLOCK)
    return _rounded(dx, dy.dtype), _rounded(dm, dm_dtype)
