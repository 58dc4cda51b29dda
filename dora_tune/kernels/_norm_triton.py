"""Triton kernels of the factored DoRA row norm (imported lazily: only when impl="triton" runs).

Math (DESIGN.md §1): ``n² = ‖W‖²_row + Σ_j B_ij·(2s·U_ij + s²·(B·G)_ij)`` with ``U = W·Aᵀ`` and ``G = A·Aᵀ``.

Launches:
1. ``G = A·Aᵀ`` in fp32: for 16-bit A on CUDA one cuBLAS call with an fp32 output (``torch.mm(out_dtype=...)``);
   otherwise ``_gram_kernel`` (split-K Triton, tf32x3 for fp32 operands) and a fixed-order sum of its partials.
2. ``_norm_main_kernel``: one pass over W. A program owns ``BLOCK_M`` rows of W, ``BLOCK_N`` columns of U and one of
   ``SPLIT_K`` ranges of d_in. Its K loop accumulates ``U`` on the tensor cores (fp32 accumulator) and, in the
   first r-tile only, ``‖W_i‖²``; its epilogue forms ``2s·Σ_j B_ij U_ij`` (linear in U, so K-split partials add up)
   and ``s²·Σ_j B_ij (B·G)_ij`` by a short K loop over r, whose range the K-splits share (each takes a slice of r:
   the sum is linear in it too, and no split carries the whole epilogue). For bf16, G is split in
   registers into ``G_hi = bf16(G)`` and ``G_lo = bf16(G − G_hi)`` (≈16 significant bits, relative error ≤ 2⁻¹⁸)
   so that ``B·G`` runs on the tensor cores; otherwise it is an fp32 (tf32x3) dot.
3. With one tile along r and K the program writes the norm itself; otherwise ``_norm_finish_kernel`` adds the
   ``T·S`` partials of each row in a fixed order (deterministic; no atomics) and takes the square root.

Neither ``B·A`` nor ``U`` is materialised: extra memory is ``4·T·S·d_out + 4·r²`` bytes (plus the split-K partials
of G, ≤ 16 MB, on the Triton G path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from dora_tune.kernels._common import cdiv
from dora_tune.kernels._launch import lean

if TYPE_CHECKING:
    from dora_tune.kernels.norm import NormConfig

#: K step of the short B·G loop over r (two pipeline stages).
_BLOCK_KR = 32
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _gram_kernel(
    a_ptr,
    part_ptr,
    r,
    d_in,
    k_per_split,
    stride_ar,
    stride_ak,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_in)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        kk = k + offs_k
        km = kk < k_hi
        ai = tl.load(
            a_ptr + offs_i[:, None] * stride_ar + kk[None, :] * stride_ak,
            mask=(offs_i[:, None] < r) & km[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        aj = tl.load(
            a_ptr + offs_j[None, :] * stride_ar + kk[:, None] * stride_ak,
            mask=(offs_j[None, :] < r) & km[:, None],
            other=0.0,
        ).to(DOT_DTYPE)
        acc = tl.dot(ai, aj, acc, input_precision=PREC)
    out = part_ptr + pid_s * r * r + offs_i[:, None] * r + offs_j[None, :]
    tl.store(out, acc, mask=(offs_i[:, None] < r) & (offs_j[None, :] < r))


@triton.jit
def _norm_mainloop(
    w_ptr,
    a_ptr,
    offs_m,
    offs_n,
    k_lo,
    k_hi,
    d_out,
    d_in,
    r,
    stride_wm,
    stride_wk,
    stride_ar,
    stride_ak,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    WITH_WSQ: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_m[:, None].to(tl.int64) * stride_wm + offs_k[None, :] * stride_wk
    a_ptrs = a_ptr + offs_n[None, :].to(tl.int64) * stride_ar + offs_k[:, None] * stride_ak
    m_mask = offs_m[:, None] < d_out
    n_mask = offs_n[None, :] < r
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    wsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=m_mask, other=0.0)
            a = tl.load(a_ptrs, mask=n_mask, other=0.0)
        else:
            w = tl.load(w_ptrs, mask=m_mask & (offs_k[None, :] + (k - k_lo) < k_hi), other=0.0)
            a = tl.load(a_ptrs, mask=n_mask & (offs_k[:, None] + (k - k_lo) < k_hi), other=0.0)
        if WITH_WSQ:
            wf = w.to(tl.float32)
            wsq += tl.sum(wf * wf, axis=1)
        acc = tl.dot(w.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PREC)
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    return acc, wsq


@triton.jit
def _norm_main_kernel(
    w_ptr,
    a_ptr,
    b_ptr,
    g_ptr,
    part_ptr,
    out_ptr,
    d_out,
    d_in,
    r,
    k_per_split,
    r_per_split,
    stride_wm,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bm,
    stride_br,
    scale,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KR: tl.constexpr,
    EVEN_K: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    SPLIT_G: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PREC: tl.constexpr,
    G_PREC: tl.constexpr,
):
    # Program order: r-tile fastest, then K-split, then row block: the programs that read the same block of W
    # rows (and K range) run together, so W comes from HBM once and the re-reads hit L2.
    pid = tl.program_id(0)
    n_rtiles = tl.cdiv(r, BLOCK_N)
    pid_m = pid // (n_rtiles * SPLIT_K)
    rem = pid % (n_rtiles * SPLIT_K)
    pid_n = rem % n_rtiles
    pid_s = rem // n_rtiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < d_out
    n_ok = offs_n < r
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_in)

    # Main loop: U tile (tensor cores, fp32 accumulator); ‖W_i‖² over this K range in the first r-tile only.
    if pid_n == 0:
        acc, wsq = _norm_mainloop(
            w_ptr, a_ptr, offs_m, offs_n, k_lo, k_hi, d_out, d_in, r, stride_wm, stride_wk, stride_ar, stride_ak,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, True, DOT_DTYPE, PREC,
        )  # fmt: skip
    else:
        acc, wsq = _norm_mainloop(
            w_ptr, a_ptr, offs_m, offs_n, k_lo, k_hi, d_out, d_in, r, stride_wm, stride_wk, stride_ar, stride_ak,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, False, DOT_DTYPE, PREC,
        )  # fmt: skip

    # Epilogue 1: 2s·Σ_j B_ij U_ij over this r-tile (linear in U, so K-split partials simply add up).
    b_off = offs_m[:, None].to(tl.int64) * stride_bm
    b = tl.load(b_ptr + b_off + offs_n[None, :] * stride_br, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    bf = b.to(tl.float32)
    partial = wsq + 2.0 * scale * tl.sum(bf * acc, axis=1)

    # Epilogue 2: s²·Σ_j B_ij (B·G)_ij, with B·G by a short K loop over r. The K-splits share that loop (split s
    # takes the r range [s·r_per_split, (s+1)·r_per_split), linear again), so no program carries all of it.
    kr_lo = pid_s * r_per_split
    kr_hi = tl.minimum(kr_lo + r_per_split, r)
    if kr_lo < kr_hi:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_kr = tl.arange(0, BLOCK_KR)
        for k in tl.range(kr_lo, kr_hi, BLOCK_KR, num_stages=2):
            kr = k + offs_kr
            kr_ok = kr < kr_hi
            bk = tl.load(b_ptr + b_off + kr[None, :] * stride_br, mask=m_ok[:, None] & kr_ok[None, :], other=0.0)
            g = tl.load(g_ptr + kr[:, None] * r + offs_n[None, :], mask=kr_ok[:, None] & n_ok[None, :], other=0.0)
            if SPLIT_G:
                # fp32 G as two bf16 terms: G_hi = bf16(G), G_lo = bf16(G − G_hi) (relative error ≤ 2⁻¹⁸).
                g_hi = g.to(tl.bfloat16)
                g_lo = (g - g_hi.to(tl.float32)).to(tl.bfloat16)
                acc = tl.dot(bk.to(DOT_DTYPE), g_hi.to(DOT_DTYPE), acc, input_precision=PREC)
                acc = tl.dot(bk.to(DOT_DTYPE), g_lo.to(DOT_DTYPE), acc, input_precision=PREC)
            else:
                acc = tl.dot(bk.to(tl.float32), g, acc, input_precision=G_PREC)
        partial += scale * scale * tl.sum(bf * acc, axis=1)

    if SINGLE_TILE:
        tl.store(out_ptr + offs_m, tl.sqrt(tl.maximum(partial, 0.0)), mask=m_ok)
    else:
        tl.store(part_ptr + (pid_s * n_rtiles + pid_n) * d_out + offs_m, partial, mask=m_ok)


@triton.jit
def _norm_finish_kernel(part_ptr, out_ptr, d_out, T, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d_out
    n2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, T):
        n2 += tl.load(part_ptr + t * d_out + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, tl.sqrt(tl.maximum(n2, 0.0)), mask=mask)


def _gram_split(r: int, d_in: int, block: int, block_k: int, n_sm: int) -> int:
    """Split-K factor for G: about two programs per SM, ≥4 K-blocks per split, ≤16 MB of partials."""
    tiles = cdiv(r, block) ** 2
    s = max(1, (2 * n_sm) // tiles)
    s = min(s, max(1, cdiv(d_in, 4 * block_k)))
    s = min(s, max(1, (16 << 20) // (4 * r * r)))
    return s


def _gram_triton(lora_A: torch.Tensor, dot_dtype: torch.dtype, prec: str, n_sm: int) -> torch.Tensor:
    """``A·Aᵀ`` in fp32 by the split-K Triton kernel and a fixed-order sum of the partials."""
    r, d_in = lora_A.shape
    block = 64 if r > 32 else (32 if r > 16 else 16)
    block_k = 64
    S = _gram_split(r, d_in, block, block_k, n_sm)
    k_per_split = cdiv(cdiv(d_in, S), block_k) * block_k
    S = cdiv(d_in, k_per_split)
    part = torch.empty((S, r, r), device=lora_A.device, dtype=torch.float32)
    grid = (cdiv(r, block), cdiv(r, block), S)
    lean(_gram_kernel)[grid](
        lora_A, part, r, d_in, k_per_split, lora_A.stride(0), lora_A.stride(1),
        BLOCK=block, BLOCK_K=block_k, DOT_DTYPE=_TL_DTYPES[dot_dtype], PREC=prec, num_warps=4, num_stages=3,
    )  # fmt: skip
    return part[0] if S == 1 else part.sum(dim=0)


def factored_norm_triton(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, config: NormConfig
) -> torch.Tensor:
    """Launch the fused norm with an explicit config. Inputs are validated by the caller (``factored_norm``)."""
    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    dev = weight.device
    out = torch.empty(d_out, device=dev, dtype=torch.float32)
    if d_out == 0:
        return out
    compute = torch.promote_types(torch.promote_types(weight.dtype, lora_A.dtype), lora_B.dtype)
    interp = dev.type != "cuda"
    # Under the CPU interpreter tl.dot on bf16 operands is wrong (triton 3.9): upcast there, and only there.
    dot_dtype = torch.float32 if (interp and compute == torch.bfloat16) else compute
    # fp32 dots: 3-pass tf32 on the GPU (≈fp32 accuracy on tensor cores), exact fp32 in the interpreter. For 16-bit
    # operands the precision argument is ignored by Triton; pass its default.
    f32_prec = "ieee" if interp else "tf32x3"
    prec = f32_prec if dot_dtype == torch.float32 else "tf32"
    split_g = compute == torch.bfloat16
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count if not interp else 4

    # 1. G = A·Aᵀ in fp32: cuBLAS with an fp32 output for 16-bit A on CUDA, else the split-K Triton kernel.
    G = None
    if not interp and lora_A.dtype == compute and compute in (torch.bfloat16, torch.float16):
        try:
            G = torch.mm(lora_A, lora_A.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch build without mm(out_dtype=...)
            G = None
    if G is None:
        G = _gram_triton(lora_A, dot_dtype, prec, n_sm)

    # 3. one pass over W (split over r-tiles and K ranges), then the fixed-order sum of the partials.
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    T = cdiv(r, bn)
    k_per_split = cdiv(cdiv(d_in, config.split_k), bk) * bk
    S = cdiv(d_in, k_per_split)
    r_per_split = cdiv(cdiv(r, S), _BLOCK_KR) * _BLOCK_KR
    single = T * S == 1
    partials = out if single else torch.empty((T * S, d_out), device=dev, dtype=torch.float32)
    grid = (cdiv(d_out, bm) * T * S,)
    lean(_norm_main_kernel)[grid](
        weight, lora_A, lora_B, G, partials, out,
        d_out, d_in, r, k_per_split, r_per_split,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        scale,
        SPLIT_K=S, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KR=_BLOCK_KR, EVEN_K=(d_in % bk == 0),
        SINGLE_TILE=single, SPLIT_G=split_g, DOT_DTYPE=_TL_DTYPES[dot_dtype], PREC=prec, G_PREC=f32_prec,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not single:
        lean(_norm_finish_kernel)[(cdiv(d_out, 1024),)](partials, out, d_out, T * S, BLOCK=1024)
    return out
