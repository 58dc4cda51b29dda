"""The fused DoRA linear: a whole DoRA ``Linear`` (base GEMM, LoRA, DoRA scale, bias) as one GEMM with the DoRA
epilogue, forward and backward (issue 20; see :mod:`~dora_tune.kernels._dora_linear_triton` for the kernels).

With ``g = m / n`` (``n`` the detached row norm ``‖W + s·B·A‖_row``; ``g = 1`` where ``n = 0``) and ``u = x·Aᵀ``::

    y     = g ⊙ ([x, s·u] · [W, B]ᵀ) + bias = g ⊙ (x·Wᵀ + s·u·Bᵀ) + bias        (one GEMM, K = d_in + r)
    e     = g ⊙ d_y;   v = e·B;   d_x = [e, s·v] · [W; A]                       (one GEMM, K = d_out + r)
    d_B   = s·eᵀ·u;   d_A = s·vᵀ·x;   d_m = Σ_rows(d_y ⊙ y_pre) / n;   d_bias = Σ_rows d_y

where ``y_pre = [x, s·u]·[W, B]ᵀ`` is written by the forward only when ``m`` needs a gradient. There is no
``(g − 1)·base`` term, so no cancellation near ``g ≈ 1``. The same layer output as :func:`~dora_tune.kernels.
dora_layer.dora_layer` with ``output="full"``.

Implementations (``impl``):

- ``"composed"``: today's path — the base GEMM, the LoRA GEMMs and the fused compose (:func:`~dora_tune.kernels.
  dora_layer.dora_layer_unchecked`, ``"triton"`` on CUDA, its torch ops elsewhere).
- ``"fused"``: the two Triton GEMMs above with an explicit :class:`DoraLinearConfig` (x, W, A, B and bias of one
  dtype; the weight may require a gradient: ``d_W = eᵀ·x`` by cuBLAS).
- ``"folded"``: the large GEMMs on cuBLAS (``base = x·Wᵀ``, ``s·u = s·x·Aᵀ``; backward ``d_x = e·W`` with
  ``+= s·(e·B)·A`` accumulated in place, β = 1) and one Triton pass each way that folds the LoRA tail in
  (:mod:`~dora_tune.kernels._folded_triton`): forward ``y = g ⊙ (base + (s·u)·Bᵀ) + bias`` with the rank-r tail a
  ``tl.dot`` inside the pass (the LoRA output never goes to memory), backward ``e = g ⊙ d_y`` and ``d_m`` (the tail
  recomputed) in one pass; an explicit :class:`FoldedConfig`. A layer's forward + backward makes 13 passes over
  output-sized tensors where the composed path makes 19 and PEFT's plain LoRA layer 18 (docs/fused-linear.md), with
  two launches fewer than the composed path. One dtype, as ``"fused"``.

``impl="auto"`` (the default of the front door, ``dora_tune.kernels.dora_linear``): op ``dora_linear`` of the
dispatcher, shape ``(rows, d_out, d_in, r)``, profiled forward and backward (:data:`DORA_LINEAR_SPEC`), its
decision tables choosing the implementation and its config (docs/fused-linear.md). Measured on an H100: the fused
forward is 1.38–1.46× cuBLAS, forward + backward 1.6–2.9× the composed path; the folded one's forward + backward is
0.87–0.96× the composed path's and 0.97–0.98× PEFT's plain LoRA layer at 4096 tokens — so the H100's table picks
``"folded"`` at every shape, the layers' path race times it by default (:data:`FOLDED_LINEAR_ENV`), and the fused
linear only under :data:`FUSED_LINEAR_ENV`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

from dora_tune import ops
from dora_tune.kernels._common import (
    KernelConfig,
    Planner,
    as_rows,
    check_same_device,
    config_field,
    need_planner,
    require_triton,
    triton_available,
)
from dora_tune.kernels.spec import ANY_DEVICE, CUDA_ONLY, FUSED_TOL, ImplSpec, OpSpec

IMPLS: tuple[str, ...] = ops.DORA_LINEAR.impls
#: ``DORA_TUNE_FUSED_LINEAR=1``: a DoRA layer's training path race also times the fused linear, and a compiled layer
#: is its custom op, where :func:`fused_layer_route` says it applies. Opt-in until measured on a GPU.
FUSED_LINEAR_ENV = "DORA_TUNE_FUSED_LINEAR"
#: ``DORA_TUNE_FOLDED_LINEAR=0`` keeps the folded linear out of a DoRA layer's training path race, which otherwise
#: times it too where :func:`folded_layer_route` says it applies (measured on an H100: docs/fused-linear.md).
FOLDED_LINEAR_ENV = "DORA_TUNE_FOLDED_LINEAR"


@dataclasses.dataclass(frozen=True)
class DoraLinearConfig(KernelConfig):
    """Launch config of the fused DoRA linear's two GEMMs (forward over ``[rows, d_out]`` tiles, the ``d_x`` GEMM
    over ``[rows, d_in]`` tiles): ``block_m`` rows × ``block_n`` columns per program, ``block_k`` the main loop's
    K step, ``group_m`` row tiles per program group (L2 reuse), ``num_warps``, ``num_stages``. The r loop's step
    follows r (16–64)."""

    op = "dora_linear"
    block_m: int = config_field(lo=16, hi=256)
    block_n: int = config_field(lo=16, hi=256)
    block_k: int = config_field(lo=16, hi=256)
    group_m: int = config_field(lo=1, hi=64)
    num_warps: int = config_field(lo=1, hi=16)
    num_stages: int = config_field(lo=1, hi=8, pow2=False)


#: the default: 128 × 128 tiles, K step 64, groups of 8 row tiles, 8 warps, 3 stages (the usual Hopper GEMM start)
DEFAULT_DORA_LINEAR_CONFIG = DoraLinearConfig(128, 128, 64, 8, 8, 3)


@dataclasses.dataclass(frozen=True)
class FoldedConfig(KernelConfig):
    """Launch config of the folded DoRA linear's two Triton passes (its GEMMs are cuBLAS's): ``block_r`` rows ×
    ``block_c`` columns per tile (``block_r`` ≥ 16: the rank tail is a ``tl.dot``), ``num_warps``; the backward's
    programs walk ``row_iters`` tiles down the rows (fewer ``d_m`` partials to add)."""

    op = "dora_linear"
    block_r: int = config_field(lo=16, hi=256)
    block_c: int = config_field(lo=16, hi=1024)
    row_iters: int = config_field(lo=1, hi=64)
    num_warps: int = config_field(lo=1, hi=16)


#: the default: 64 × 128 tiles, 4 row tiles a backward program, 4 warps — the fastest of the space at 31 of the 45
#: shapes of the op's default set on an H100 (regret geomean 1.008, max 1.059 across them; docs/fused-linear.md)
DEFAULT_FOLDED_CONFIG = FoldedConfig(64, 128, 4, 4)
#: the folded passes' tiles, ``(block_r, block_c, num_warps)``: 2–8 K elements, 16–64 a thread, rows ≥ 16 (``tl.dot``)
_FOLDED_TILES: tuple[tuple[int, int, int], ...] = (
    (16, 128, 4),
    (32, 128, 4),
    (64, 128, 4),
    (64, 64, 4),
    (32, 256, 8),
    (128, 64, 8),
)


def folded_tuning_space(shape: dict[str, int]) -> list[dict[str, int]]:
    """The folded linear's configs to sweep (the same at every shape): the tiles of :data:`_FOLDED_TILES`, each
    backward program walking 4 of them down the rows."""
    return [FoldedConfig(br, bc, 4, warps).as_dict() for br, bc, warps in _FOLDED_TILES]


#: the implementations that take a config: name → (config class, default)
_CONFIGS: dict[str, tuple[type, Any]] = {
    "fused": (DoraLinearConfig, DEFAULT_DORA_LINEAR_CONFIG),
    "folded": (FoldedConfig, DEFAULT_FOLDED_CONFIG),
}


#: the tiles of the tuning space, ``(block_m, block_n, block_k, num_warps, num_stages)``: the usual tensor-core GEMM
#: tiles (wide ones with 8 warps, narrow ones with 4 and a deeper pipeline), each within 228 KB of shared memory
_TILES: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (64, 256, 64, 8, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
)


def dora_linear_tuning_space(shape: dict[str, int]) -> list[dict[str, int]]:
    """The configs to sweep at ``shape`` (``rows``, ``d_out``, ``d_in``, ``r``): the GEMM tiles of
    :data:`_TILES`, groups of 8 row tiles, less the tiles more than twice as tall as ``rows`` or wider than twice
    the widest output (the 64-wide ones always stay)."""
    rows, cols = shape["rows"], max(shape["d_out"], shape["d_in"])
    return [
        DoraLinearConfig(bm, bn, bk, 8, warps, stages).as_dict()
        for bm, bn, bk, warps, stages in _TILES
        if (bm == 64 or bm < 2 * rows) and (bn == 64 or bn < 2 * cols)
    ]


def dora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """:func:`dora_linear` evaluated in ``dtype`` (float64 for tests), differentiable (the norm detached)."""
    c = [t.to(dtype) for t in (x, weight, lora_A, lora_B, magnitude)]
    x_, W, A, B, m = c
    n = norm.detach().to(dtype)
    g = torch.where(n > 0, m / torch.where(n > 0, n, 1.0), 1.0)
    y = g * (x_ @ W.t() + scale * ((x_ @ A.t()) @ B.t()))
    return y if bias is None else y + bias.to(dtype)


def check_dora_linear_inputs(
    x: Any,
    weight: Any,
    bias: Any,
    lora_A: Any,
    lora_B: Any,
    magnitude: Any,
    norm: Any,
    scale: Any,
) -> float:
    """Validate :func:`dora_linear`'s arguments (``TypeError``/``ValueError`` naming the argument); return
    ``scale``."""
    from dora_tune.kernels.dora_layer import check_dora_layer_inputs

    return check_dora_layer_inputs(x, weight, lora_A, lora_B, magnitude, norm, scale, bias, None, "full")


class _LinearFn(torch.autograd.Function):
    """A whole-linear implementation's forward and backward on ``x2 [rows, d_in]``: ``impl`` its ``(forward,
    backward)`` pair (:func:`fused_forward` and :func:`fused_backward`, or the folded ones); inputs checked by the
    caller. The forward returns ``(y, u, saved or None)`` (``u``: what the backward's LoRA GEMMs read; ``saved``:
    what ``d_m`` needs — the fused linear's ``y_pre``, the folded one's base output — kept only when the magnitude
    needs a gradient)."""

    @staticmethod
    def forward(
        ctx: Any,
        impl: tuple[Callable[..., Any], Callable[..., Any]],
        x2: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        magnitude: torch.Tensor,
        n: torch.Tensor,
        scale: float,
        config: Any,
    ) -> torch.Tensor:
        y, u, pre = impl[0](x2, weight, bias, lora_A, lora_B, magnitude, n, scale, config, ctx.needs_input_grad[6])
        ctx.save_for_backward(x2, weight, u, lora_A, lora_B, magnitude, n, pre)
        ctx.impl, ctx.scale, ctx.config = impl, scale, config
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:
        x2, W, u, A, B, m, n, pre = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[1:7])  # x, weight, bias, lora_A, lora_B, magnitude
        grads = ctx.impl[1](dy, x2, W, u, A, B, m, n, pre, ctx.scale, ctx.config, needs, ctx.bias_dtype)
        return (None, *grads, None, None, None)


def fused_forward(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    n: torch.Tensor,
    scale: float,
    config: DoraLinearConfig,
    write_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(y, u, y_pre or None)`` of the fused forward on ``x2 [rows, d_in]`` (no autograd; checked by the caller):
    ``u = x·Aᵀ`` by cuBLAS, then the one GEMM with the DoRA epilogue."""
    from dora_tune.kernels._dora_linear_triton import dora_linear_fwd_triton

    with torch.no_grad():
        u = torch.mm(x2, lora_A.t())
        b = None if bias is None else bias.detach()
        y, pre = dora_linear_fwd_triton(x2, weight, u, lora_B, magnitude.detach(), n, b, scale, config, write_pre)
    return y, u, pre


def fused_backward(
    dy: torch.Tensor,
    x2: torch.Tensor,
    W: torch.Tensor,
    u: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    pre: torch.Tensor | None,
    s: float,
    config: DoraLinearConfig,
    needs: tuple[bool, bool, bool, bool, bool, bool],
    bias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, ...]:
    """``(d_x, d_W, d_bias, d_A, d_B, d_m)`` of the fused linear, None where ``needs`` (the same order) is False:
    ``v = d_y·(diag(g)·B)`` then the ``d_x`` GEMM with ``d_m`` (:func:`~dora_tune.kernels._dora_linear_triton.
    dora_linear_dx_triton`; ``pre`` required for ``d_m``), ``d_W``, ``d_B``, ``d_A`` by cuBLAS, ``d_bias`` a column
    sum."""
    from dora_tune.kernels._dora_linear_triton import dora_linear_dx_triton
    from dora_tune.kernels.dora_layer import _scale_terms

    nx, nW, nbias, nA, nB, nm = needs
    with torch.no_grad():
        inv, c = _scale_terms(n)
        g = torch.addcmul(c, m.detach().float(), inv)  # dora_scale's g, for the small cuBLAS operands
        v = torch.mm(dy, (B.float() * g[:, None]).to(B.dtype)) if nx or nA else None  # v = e·B = d_y·(diag(g)·B)
        dx, dm = dora_linear_dx_triton(
            dy, W, v if v is not None else u, A, m.detach(), n, pre if nm else None, s, config, nx, m.dtype
        )
        dW = (torch.mm(dy.t(), x2).float() * g[:, None]).to(W.dtype) if nW else None  # eᵀ·x
        dB = (torch.mm(dy.t(), u).float() * (s * g)[:, None]).to(B.dtype) if nB else None  # s·eᵀ·u
        dA = (torch.mm(v.t(), x2).float() * s).to(A.dtype) if nA else None  # s·vᵀ·x
        dbias = dy.sum(0, dtype=torch.float32).to(bias_dtype) if nbias else None
    return dx, dW, dbias, dA, dB, dm


def folded_forward(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    n: torch.Tensor,
    scale: float,
    config: FoldedConfig,
    keep_base: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(y, s·u, base or None)`` of the folded forward on ``x2 [rows, d_in]`` (no autograd; checked by the
    caller): ``s·u = s·x·Aᵀ`` (cuBLAS's α: rounded once, as ``u`` would be), ``base = x·Wᵀ``, then one pass
    ``y = g ⊙ (base + (s·u)·Bᵀ) + bias`` with the tail on the tensor cores — over ``base`` itself unless it is kept
    (for ``d_m``: when ``m`` needs a gradient)."""
    from dora_tune.kernels._folded_triton import folded_fwd_triton

    with torch.no_grad():
        us = torch.addmm(x2.new_empty(()), x2, lora_A.t(), beta=0, alpha=scale)
        base = torch.mm(x2, weight.t())
        b = None if bias is None else bias.detach()
        y = folded_fwd_triton(base, us, lora_B, magnitude.detach(), n, b, config, in_place=not keep_base)
    return y, us, base if keep_base else None


def folded_backward(
    dy: torch.Tensor,
    x2: torch.Tensor,
    W: torch.Tensor,
    us: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    base: torch.Tensor | None,
    s: float,
    config: FoldedConfig,
    needs: tuple[bool, ...],
    bias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, ...]:
    """``(d_x, d_W, d_bias, d_A, d_B, d_m)`` of the folded linear, None where ``needs`` (the same order) is False:
    the pass and the LoRA tail's gradients of :func:`_folded_tail_backward`, then ``d_x = e·W`` with
    ``+= s·d(s·u)·A`` accumulated in place (β = 1) and ``d_W = eᵀ·x`` by cuBLAS."""
    nx, nW, nbias, nA, nB, nm = needs
    with torch.no_grad():
        e, dus, dA, dB, dm, dbias = _folded_tail_backward(
            dy, x2, us, A, B, m, n, base, s, config, nx or nW, nx, nA, nB, nm, bias_dtype if nbias else None
        )
        dx = dW = None
        if nx:
            dx = torch.mm(e, W)
            dx.addmm_(dus, A, alpha=s)
        if nW:
            dW = torch.mm(e.t(), x2)
    return dx, dW, dbias, dA, dB, dm


def _folded_tail_backward(
    dy: torch.Tensor,
    x2: torch.Tensor,
    us: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    base: torch.Tensor | None,
    s: float,
    config: FoldedConfig,
    need_e: bool,
    need_dus: bool,
    nA: bool,
    nB: bool,
    nm: bool,
    bias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, ...]:
    """``(e, d(s·u), d_A, d_B, d_m, d_bias)`` of the folded pass (autograd off), None where not needed: ``e = g ⊙ d_y``
    and ``d_m = Σ_rows(d_y ⊙ (base + (s·u)·Bᵀ)) / n`` in one pass (``base`` required for ``d_m``), then cuBLAS:
    ``d(s·u) = e·B``, ``d_B = eᵀ·(s·u)``, ``d_A = s·d(s·u)ᵀ·x``; ``d_bias`` (when ``bias_dtype``) a column sum."""
    from dora_tune.kernels._folded_triton import folded_bwd_triton

    d = dy if dy.stride(-1) == 1 else dy.contiguous()
    need_dus = need_dus or nA
    need_e = need_e or need_dus or nB
    e, dm = folded_bwd_triton(d, base if nm else None, us, B, m.detach(), n, config, need_e=need_e, m_dtype=m.dtype)
    dus = torch.mm(e, B) if need_dus else None
    dB = torch.mm(e.t(), us) if nB else None
    dA = torch.addmm(dus.new_empty(()), dus.t(), x2, beta=0, alpha=s) if nA else None
    dbias = d.sum(0, dtype=torch.float32).to(bias_dtype) if bias_dtype is not None else None
    return e, dus, dA, dB, dm, dbias


class _FoldedTailFn(torch.autograd.Function):
    """The folded pass on a base output computed elsewhere (``DoRALinear``'s ``dropout_mode="lora_only"``: ``x·Wᵀ`` of
    the input as it came, the LoRA branch on the dropped-out one): ``y = g ⊙ (base + (s·u)·Bᵀ) + bias`` with
    ``s·u = s·x·Aᵀ`` of the LoRA input ``x2 [rows, d_in]`` and ``base2 [rows, d_out]`` without the bias; ``d_base =
    e``, ``d_x = s·d(s·u)·A``. Inputs checked by the caller; ``config`` a :class:`FoldedConfig`."""

    @staticmethod
    def forward(
        ctx: Any,
        x2: torch.Tensor,
        base2: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        magnitude: torch.Tensor,
        n: torch.Tensor,
        scale: float,
        config: FoldedConfig,
    ) -> torch.Tensor:
        from dora_tune.kernels._folded_triton import folded_fwd_triton

        with torch.no_grad():
            us = torch.addmm(x2.new_empty(()), x2, lora_A.t(), beta=0, alpha=scale)
            b = None if bias is None else bias.detach()
            y = folded_fwd_triton(base2, us, lora_B, magnitude.detach(), n, b, config, in_place=False)
        keep = ctx.needs_input_grad[5]
        ctx.save_for_backward(x2, us, lora_A, lora_B, magnitude, n, base2 if keep else None)
        ctx.scale, ctx.config = scale, config
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:
        x2, us, A, B, m, n, base = ctx.saved_tensors
        nx, nbase, nbias, nA, nB, nm = ctx.needs_input_grad[:6]
        s = ctx.scale
        with torch.no_grad():
            e, dus, dA, dB, dm, dbias = _folded_tail_backward(
                dy, x2, us, A, B, m, n, base, s, ctx.config, nbase, nx, nA, nB, nm, ctx.bias_dtype if nbias else None
            )
            dx = torch.addmm(dus.new_empty(()), dus, A, beta=0, alpha=s) if nx else None
        return dx, e if nbase else None, dbias, dA, dB, dm, None, None, None


def folded_from_base(
    x: torch.Tensor,
    base: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    config: FoldedConfig | None = None,
) -> torch.Tensor:
    """``g ⊙ (base + s·(x·Aᵀ)·Bᵀ) + bias`` by the folded pass, for ``x [..., d_in]`` (the LoRA branch's input) and
    ``base [..., d_out]`` (``x·Wᵀ`` of the base input, computed elsewhere, without the bias; x's dtype); checked by
    the caller as for :func:`dora_linear_folded`. Differentiable with respect to x, base, bias, lora_A, lora_B and
    magnitude."""
    lead = x.shape[:-1]
    m = magnitude if magnitude.is_contiguous() else magnitude.contiguous()
    x2, b2 = as_rows("x", x), as_rows("base", base)
    out = _FoldedTailFn.apply(x2, b2, bias, lora_A, lora_B, m, norm, scale, config or DEFAULT_FOLDED_CONFIG)
    return out if len(lead) == 1 else out.view(*lead, out.shape[-1])


def dora_linear_folded(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    config: FoldedConfig | None = None,
) -> torch.Tensor:
    """The folded implementation on inputs :func:`dora_linear` would accept (checked by the caller; ``norm``
    float32 and contiguous, :func:`fused_eligible`): for layers that validated their tensors once. ``config`` None:
    :data:`DEFAULT_FOLDED_CONFIG`."""
    cfg = config or DEFAULT_FOLDED_CONFIG
    return _whole_linear(
        (folded_forward, folded_backward), x, weight, bias, lora_A, lora_B, magnitude, norm, scale, cfg
    )


def folded_layer_route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_result: torch.Tensor | None,
    full: bool,
    sub_bias: bool = True,
) -> bool:
    """Whether a DoRA layer call may run as the folded linear: :data:`FOLDED_LINEAR_ENV` is not ``"0"``, and the
    call is one :func:`fused_layer_route` would take apart from its opt-in (the full output, no ``base_result``, a
    frozen weight, one dtype) — or the full output from a ``base_result`` that excludes the bias (``not sub_bias``:
    ``DoRALinear``'s ``dropout_mode="lora_only"``) in x's dtype (:func:`folded_from_base`)."""
    if os.environ.get(FOLDED_LINEAR_ENV) == "0":
        return False
    if base_result is None or sub_bias or base_result.dtype != x.dtype:
        return _linear_route(x, weight, bias, lora_A, lora_B, base_result, full)
    return _linear_route(x, weight, bias, lora_A, lora_B, None, full)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
    config: DoraLinearConfig | FoldedConfig | None = None,
    planner: Planner | None = None,
) -> torch.Tensor:
    """A DoRA ``Linear``'s output ``g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias`` (see the module docstring), differentiable.

    Args:
        x: ``[..., d_in]`` (leading dims flatten); weight: ``[d_out, d_in]``; bias: ``[d_out]`` or None;
            lora_A: ``[r, d_in]``; lora_B: ``[d_out, r]``; magnitude: ``[d_out]`` m; norm: ``[d_out]`` the detached
            ``‖W + s·B·A‖_row`` (e.g. :func:`~dora_tune.kernels.factored_norm`); scale: the LoRA scale s.
            bfloat16, float16 or float32, all on one device.
        impl: ``"auto"`` (the ``planner``'s choice of implementation and config for op ``dora_linear`` at
            ``(rows, d_out, d_in, r)``, a shortlist raced on these inputs at first use; ``"composed"`` wherever the
            others do not apply: a CPU without the interpreter, mixed dtypes), ``"composed"``, ``"fused"`` or
            ``"folded"`` (these two need Triton: CUDA, or the CPU under ``TRITON_INTERPRET=1``; and x, weight,
            lora_A, lora_B and bias of one dtype).
        config: a :class:`DoraLinearConfig` for the fused implementation, a :class:`FoldedConfig` for the folded
            one (None: the plan's, else the default); with ``impl="auto"``, used where the plan picks its
            implementation; ``"composed"`` takes none.
        planner: what answers ``impl="auto"`` and plans the composed path's compose where it asks (a weight that
            requires grad, autocast: :func:`~dora_tune.kernels.dora_layer.dora_layer_composed`); the run-time
            dispatcher's hooks (:mod:`dora_tune.dispatch.runtime`), which ``dora_tune.kernels.dora_linear`` (the
            front door) passes.

    Returns:
        ``[..., d_out]`` in x's dtype, differentiable with respect to x, weight, bias, lora_A, lora_B and magnitude.
    """
    s = check_dora_linear_inputs(x, weight, bias, lora_A, lora_B, magnitude, norm, scale)
    if impl not in (*IMPLS, "auto"):
        raise ValueError(f"impl must be one of {IMPLS} or 'auto', got {impl!r}")
    if config is not None:
        want = tuple(cls for name, (cls, _) in _CONFIGS.items() if impl in (name, "auto"))
        if not want or not isinstance(config, want):
            names = " or ".join(c.__name__ for c in want)
            raise TypeError(
                f"impl={impl!r} takes no config, got {type(config).__name__}"
                if not want
                else f"config for impl={impl!r} must be a {names}, got {type(config).__name__}"
            )
    n = norm.detach().float().contiguous()
    if impl == "auto":
        planner = need_planner("dora_linear", planner)
        impl, config = _plan(x, weight, bias, lora_A, lora_B, magnitude, n, s, config, planner)
    if impl == "composed":
        from dora_tune.kernels.dora_layer import dora_layer_unchecked

        path = "triton" if x.is_cuda else "eager"
        return dora_layer_unchecked(
            x, weight, lora_A, lora_B, magnitude, n, s, bias, None, False, True, path, None, planner
        )
    require_triton(x.device)
    if not fused_eligible(x, weight, bias, lora_A, lora_B):
        dtypes = {t.dtype for t in (x, weight, lora_A, lora_B, *(() if bias is None else (bias,)))}
        raise TypeError(
            f"impl={impl!r} needs x, weight, lora_A, lora_B and bias of one dtype, got "
            + ", ".join(str(d) for d in sorted(dtypes, key=str))
            + " (impl='composed' takes mixed dtypes)"
        )
    check_same_device(x=x, norm=n)
    if impl == "folded":
        return dora_linear_folded(x, weight, bias, lora_A, lora_B, magnitude, n, s, config)
    return dora_linear_fused(x, weight, bias, lora_A, lora_B, magnitude, n, s, config)


def _plan(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    n: torch.Tensor,
    s: float,
    config: DoraLinearConfig | FoldedConfig | None,
    planner: Planner,
) -> tuple[str, Any]:
    """``(impl, config)`` of an ``impl="auto"`` call: the planner's, with ``"composed"`` where the fused and folded
    implementations do not apply here (no Triton, mixed dtypes, no rows; the dispatcher plans ``"composed"`` off
    CUDA)."""
    if x.numel() == 0 or not fused_eligible(x, weight, bias, lora_A, lora_B) or not triton_available():
        return "composed", None

    def race() -> Callable[[Any], Any]:
        return linear_runner(x, weight, bias, lora_A, lora_B, magnitude, n, s)

    chosen = _ask(x, weight, lora_A, planner, race if config is None else None)
    if chosen.impl not in _CONFIGS:
        return "composed", None
    return chosen.impl, config if isinstance(config, _CONFIGS[chosen.impl][0]) else chosen.config


def _ask(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, planner: Planner, race: Any) -> Any:
    """The ``planner``'s plan of op ``dora_linear`` for a call on ``x [..., d_in]``: dims (rows, d_out, d_in, r)."""
    dims = (x.numel() // max(x.shape[-1], 1), weight.shape[0], weight.shape[1], lora_A.shape[0])
    return planner.auto("dora_linear", dims, x.dtype, x.device, race)


def linear_config(
    impl: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    planner: Planner,
    race: Callable[[], Callable[[Any], Any]] | None = None,
) -> Any:
    """The config implementation ``impl`` (``"fused"`` or ``"folded"``) runs with for a call on ``x [..., d_in]``:
    the ``planner``'s plan of op ``dora_linear`` at ``(rows, d_out, d_in, r)`` when that is ``impl``, else its
    default (:data:`DEFAULT_DORA_LINEAR_CONFIG`, :data:`DEFAULT_FOLDED_CONFIG`: a caller that runs it where the plan
    would not — a path race's pick, a compiled layer). ``race`` as :meth:`Planner.auto`'s."""
    cls, default = _CONFIGS[impl]
    plan = _ask(x, weight, lora_A, planner, race)
    if plan.impl == impl and isinstance(plan.config, cls):
        return plan.config
    return default


def linear_runner(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    n: torch.Tensor,
    s: float,
) -> Callable[[Any], Any]:
    """``run(config)``: the fused linear's (a :class:`DoraLinearConfig`) or the folded one's (a
    :class:`FoldedConfig`) forward and backward (x, A, B and m needing gradients, as in training) on detached
    copies of these tensors and a constant output gradient — nothing the caller sees changes, no RNG drawn: what a
    race of configs times."""
    xs, As, Bs, ms = (t.detach().requires_grad_() for t in (x, lora_A, lora_B, magnitude))
    b = None if bias is None else bias.detach()
    dy = torch.full((*x.shape[:-1], weight.shape[0]), 1e-3, device=x.device, dtype=x.dtype)

    def run(config: Any) -> Any:
        fn = dora_linear_folded if isinstance(config, FoldedConfig) else dora_linear_fused
        fn(xs, weight.detach(), b, As, Bs, ms, n, s, config).backward(dy)

    return run


def fused_eligible(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> bool:
    """Whether ``impl="fused"`` takes these tensors: x, weight, lora_A, lora_B and bias of one dtype."""
    dt = x.dtype
    return weight.dtype == dt and lora_A.dtype == dt and lora_B.dtype == dt and (bias is None or bias.dtype == dt)


def fused_layer_route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_result: torch.Tensor | None,
    full: bool,
) -> bool:
    """Whether a DoRA layer call may run as the fused linear: :data:`FUSED_LINEAR_ENV` opts in, the call wants the
    full output and computes its base output itself (no PEFT ``base_result``: no dropout acting), the weight is
    frozen and :func:`fused_eligible` holds."""
    return os.environ.get(FUSED_LINEAR_ENV) == "1" and _linear_route(x, weight, bias, lora_A, lora_B, base_result, full)


def _linear_route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_result: torch.Tensor | None,
    full: bool,
) -> bool:
    """A DoRA layer call a whole-linear implementation can run: the full output, computed from x here (no PEFT
    ``base_result``: no dropout acting), a frozen weight, :func:`fused_eligible`."""
    return full and base_result is None and not weight.requires_grad and fused_eligible(x, weight, bias, lora_A, lora_B)


def dora_linear_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    config: DoraLinearConfig | None = None,
) -> torch.Tensor:
    """The fused implementation on inputs :func:`dora_linear` would accept (checked by the caller; ``norm`` float32
    and contiguous, :func:`fused_eligible`): for layers that validated their tensors once."""
    cfg = config or DEFAULT_DORA_LINEAR_CONFIG
    return _whole_linear((fused_forward, fused_backward), x, weight, bias, lora_A, lora_B, magnitude, norm, scale, cfg)


def _whole_linear(
    impl: tuple[Callable[..., Any], Callable[..., Any]],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    config: Any,
) -> torch.Tensor:
    """:class:`_LinearFn` of ``impl`` on ``x [..., d_in]``: leading dims flattened and restored."""
    lead = x.shape[:-1]
    x2 = as_rows("x", x)
    m = magnitude if magnitude.is_contiguous() else magnitude.contiguous()
    out = _LinearFn.apply(impl, x2, weight, bias, lora_A, lora_B, m, norm, scale, config)
    return out if len(lead) == 1 else out.view(*lead, out.shape[-1])


# ----------------------------------------------------------------------------------------------- the op's spec


def _linear_runner(name: str, t: dict[str, Any], cfg: Any) -> Callable[[], Any]:
    leaves, dy = t["leaves"], t["dy"]
    x, A, B, m = leaves

    def step() -> Any:
        out = dora_linear(x, t["W"], None, A, B, m, t["n"], t["s"], impl=name, config=cfg)
        return torch.autograd.grad(out, leaves, dy)

    return step


def _linear_inputs(shape: dict[str, int], rnd: Any) -> dict[str, Any]:
    rows, o, i, r = shape["rows"], shape["d_out"], shape["d_in"], shape["r"]
    W, A, B = rnd(o, i, scale=0.02), rnd(r, i, scale=i**-0.5), rnd(o, r, scale=0.02)
    n = torch.linalg.vector_norm(W.float() + 2.0 * (B.float() @ A.float()), dim=1)  # as the norm op gives it
    leaves = [rnd(rows, i), A, B, (n * (1 + rnd(o, scale=0.01).float())).to(W.dtype)]
    return {
        "W": W,
        "n": n,
        "s": 2.0,
        "dy": rnd(rows, o),
        "leaves": [t.clone().requires_grad_() for t in leaves],
    }


_K = "dora_tune.kernels."
#: dora_linear's facts, configs, implementations, runner (forward and backward, as in training) and inputs
#: (:data:`dora_tune.kernels.OP_SPECS`)
DORA_LINEAR_SPEC = OpSpec(
    ops.DORA_LINEAR,
    DoraLinearConfig,
    DEFAULT_DORA_LINEAR_CONFIG,
    impls=(
        ImplSpec(
            "composed",
            ANY_DEVICE,
            (
                _K + "_dora_triton",
                _K + "dora_layer:_DoraLayerFn",
                _K + "dora_layer:_fwd",
                _K + "dora_layer:_torch_path",
            ),
            selfcheck_tol=FUSED_TOL,
        ),
        ImplSpec(
            "fused",
            CUDA_ONLY,
            (
                _K + "_dora_linear_triton",
                _K + "_dora_triton",
                _K + "dora_linear:_LinearFn",
                _K + "dora_linear:fused_forward",
                _K + "dora_linear:fused_backward",
            ),
            dora_linear_tuning_space,
            DoraLinearConfig.from_dict,
            ("rows", "d_out", "d_in"),
            FUSED_TOL,
        ),
        ImplSpec(
            "folded",
            CUDA_ONLY,
            (
                _K + "_folded_triton",
                _K + "_dora_triton",
                _K + "dora_linear:_LinearFn",
                _K + "dora_linear:folded_forward",
                _K + "dora_linear:folded_backward",
            ),
            folded_tuning_space,
            FoldedConfig.from_dict,
            (),
            FUSED_TOL,
        ),
    ),
    runner=_linear_runner,
    inputs=_linear_inputs,
)


__all__ = [
    "DEFAULT_DORA_LINEAR_CONFIG",
    "DEFAULT_FOLDED_CONFIG",
    "DORA_LINEAR_SPEC",
    "FOLDED_LINEAR_ENV",
    "FUSED_LINEAR_ENV",
    "IMPLS",
    "DoraLinearConfig",
    "FoldedConfig",
    "check_dora_linear_inputs",
    "dora_linear",
    "dora_linear_folded",
    "dora_linear_fused",
    "dora_linear_reference",
    "dora_linear_tuning_space",
    "folded_from_base",
    "folded_layer_route",
    "folded_tuning_space",
    "fused_eligible",
    "fused_layer_route",
    "linear_config",
    "linear_runner",
]
