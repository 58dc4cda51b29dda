"""A whole DoRA layer's adapter — LoRA GEMMs, DoRA scale and compose, forward and backward — on one of two paths.

With ``g = m / n`` (``n`` the detached row norm, ``g = 1`` where ``n = 0``), ``u = x·Aᵀ``, ``lora = u·Bᵀ``::

    base  = base_result − bias     (PEFT hands the base layer's output, bias included)   or   x·Wᵀ  (computed here)
    delta = (g−1)·base + g·(s·lora)                          output="delta"  (what PEFT adds to the base output)
    y     = base + delta + bias = g ⊙ (base + s·lora) + bias   output="full"   (the layer output, DoRALinear)

Backward (``d`` the output gradient): ``d_lora = g·s·d``, ``d_base = (g − 1 + [full])·d``,
``d_m = Σ_rows((s·lora + base) ⊙ d) / n``, then the LoRA GEMMs ``d_B = d_loraᵀ·u``, ``d_u = d_lora·B``,
``d_A = d_uᵀ·x``, ``d_x = d_u·A (+ d_base·W when base was computed here)``; ``base_result`` gets ``d_base``.

Paths (``impl``):

- ``"triton"``: ONE autograd node around the fused kernels of :mod:`~dora_tune.kernels._dora_triton` (``g``
  formed in the kernel, PEFT's bias subtraction inside): forward 2 GEMMs + 1 launch, backward 4 GEMMs + 1 or 2
  launches, the launches through :func:`~dora_tune.kernels._launch.lean`. Least GPU memory traffic.
- ``"eager"``: 7–9 torch ops under torch's own (C++) autograd, ``g = c + m·(1/n)`` from terms memoised on the norm
  tensor. No Python in the backward: cheapest where the host, not the GPU, bounds the step.
- ``"auto"``: on CUDA with autograd recording, whichever of the two the dispatcher's first-use race of whole paths
  (:meth:`~dora_tune.dispatch.runtime.Dispatcher.pick_path`: wall time of back-to-back forward+backward) kept for
  this layer shape and token bucket, with the ``compose_train`` plan's config for the node; without autograd, the
  ``compose`` plan's implementation; on the CPU, ``"eager"``. The race also times the folded DoRA linear
  (:mod:`~dora_tune.kernels.dora_linear`: cuBLAS GEMMs and one Triton pass each way; ``DORA_TUNE_FOLDED_LINEAR=0``
  keeps it out) and, with ``DORA_TUNE_FUSED_LINEAR=1``, the fused one, where they apply
  (:func:`~dora_tune.kernels.dora_linear.folded_layer_route`, :func:`~dora_tune.kernels.dora_linear.fused_layer_route`).
  While FSDP2 shards a module of the process, the race leaves the one-node path out and its no-race default is
  ``"eager"``: on a GPU, sharded and unsharded models trained through the node differ (loss gap 8.8e-3 in float32 on
  an H100, cause not found) where the torch and folded paths match bit for bit (``benchmarks/fsdp_parity.py``).

The weight W must be frozen: a W that requires grad, or autocast, take the composed multi-node path
(:func:`dora_layer_composed`, same values); under ``torch.compile`` the layer is plain torch ops for Inductor to fuse.
``impl="auto"`` asks the planner handed in (``planner=``; :func:`dora_tune.kernels.dora_layer`, the front door
:mod:`dora_tune.auto`, hands in the dispatcher's).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.compiler import is_compiling

from dora_tune.kernels._common import (
    Planner,
    as_rows,
    check_same_device,
    check_scale,
    check_tensor,
    need_planner,
    require_triton,
    triton_available,
)
from dora_tune.kernels._sharded import fsdp_in_use
from dora_tune.kernels.compose import check_scale_inputs, resolve_impl
from dora_tune.kernels.compose_train import DEFAULT_COMPOSE_TRAIN_CONFIG, ComposeTrainConfig
from dora_tune.kernels.dora_linear import (
    FOLDED_LINEAR_ENV,
    FUSED_LINEAR_ENV,
    DoraLinearConfig,
    FoldedConfig,
    dora_linear_folded,
    dora_linear_fused,
    folded_from_base,
    folded_layer_route,
    fused_layer_route,
    linear_config,
    linear_runner,
)

IMPLS: tuple[str, ...] = ("eager", "triton")
OUTPUTS: tuple[str, ...] = ("delta", "full")


def dora_layer_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    *,
    bias: torch.Tensor | None = None,
    base_result: torch.Tensor | None = None,
    output: str = "delta",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """:func:`dora_layer` evaluated in ``dtype`` (float64 for tests), differentiable; result in ``dtype``."""
    x_, W = x.to(dtype), weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    if base_result is not None:
        base = base_result.to(dtype) - (b if b is not None else 0)
    else:
        base = x_ @ W.t()
    lora = (x_ @ lora_A.to(dtype).t()) @ lora_B.to(dtype).t()
    n = norm.detach().to(dtype)
    g = torch.where(n > 0, magnitude.to(dtype) / torch.where(n > 0, n, 1.0), 1.0)
    delta = (g - 1) * base + g * (scale * lora)
    if output == "delta":
        return delta
    return base + delta + (b if b is not None else 0)


def _fwd(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    base_result2: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    scale: float,
    sub_bias: bool,
    full: bool,
    config: Any,
    write_inner: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The Triton forward on ``[rows, ·]`` views, autograd off: ``(out, u, inner or None, W in x's dtype)``."""
    u = torch.mm(x2 if x2.dtype == lora_A.dtype else x2.to(lora_A.dtype), lora_A.t())
    lora = torch.mm(u, lora_B.t())
    Wx = weight if weight.dtype == x2.dtype else weight.to(x2.dtype)
    sub_bias = sub_bias and base_result2 is not None and bias is not None
    base = base_result2 if base_result2 is not None else torch.mm(x2, Wx.t())
    # compose in the promoted dtype of the branches, as the composed path does; the full output in base's dtype
    dt = torch.promote_types(lora.dtype, base.dtype)
    out_dtype = base.dtype if full else dt
    from dora_tune.kernels._dora_triton import dora_fwd_triton

    require_triton(base.device)
    if isinstance(config, ComposeTrainConfig):
        fwd_cfg = config.fwd
    else:
        fwd_cfg = config or DEFAULT_COMPOSE_TRAIN_CONFIG.fwd
    b = None if bias is None else bias.detach().contiguous()
    out, inner = dora_fwd_triton(
        lora,
        base,
        m.detach().contiguous(),
        n,
        b,
        scale,
        fwd_cfg,
        sub_bias=sub_bias,
        full=full,
        write_inner=write_inner,
        out_dtype=out_dtype,
        inner_dtype=dt,
    )
    return out, u, inner, Wx


def _terms(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_scale_terms` computed, in four ops (a norm is ≥ 0; 0, -0.0 and NaN get inv = 0, c = 1)."""
    nf = n.detach().float()
    ok = nf > 0
    return torch.where(ok, nf.reciprocal(), 0.0), torch.where(ok, 0.0, 1.0)


def _scale_terms(n: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inv, c)`` with ``g = c + m·inv`` = :func:`~dora_tune.kernels.compose.dora_scale` (``inv = 1/n``, ``c = 0``
    where ``n > 0``; ``inv = 0``, ``c = 1`` elsewhere), computed in float32 and held in ``dtype``. Kept on the norm
    tensor (a norm cached per optimizer step pays for them once), keyed on its version counter and ``dtype``."""
    if is_compiling():  # traced: plain ops for Inductor to fuse, no memo on the tensor
        inv, c = _terms(n)
        return (inv, c) if dtype == torch.float32 else (inv.to(dtype), c.to(dtype))
    version = None if n.is_inference() else n._version  # inference tensors have no version counter: no memo
    memo = getattr(n, "_dora_tune_terms", None)
    if memo is None or version is None or memo[0] != version:
        memo = (version, {})
        if version is not None:
            n._dora_tune_terms = memo
    terms = memo[1].get(dtype)
    if terms is None:
        with torch.no_grad():
            inv, c = _terms(n)
            terms = memo[1][dtype] = (inv, c) if dtype == torch.float32 else (inv.to(dtype), c.to(dtype))
    return terms


def _torch_path(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    base_result: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    scale: float,
    sub_bias: bool,
    full: bool,
) -> torch.Tensor:
    """The layer in a few torch ops under torch's own (C++) autograd: the lean path where the host, not the GPU,
    bounds the step (each op costs the host one dispatch, its backward none in Python)."""
    lora = F.linear(F.linear(x if x.dtype == lora_A.dtype else x.to(lora_A.dtype), lora_A), lora_B)
    base = (
        F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype)) if base_result is None else base_result
    )
    out_dtype = base.dtype
    dt = torch.promote_types(lora.dtype, base.dtype)
    lora, base = (lora if lora.dtype == dt else lora.to(dt)), (base if base.dtype == dt else base.to(dt))
    if base_result is not None and sub_bias and bias is not None:
        base = base - bias
    # g = m / n (1 where n = 0; d_m = d_g / n, 0 there) in float32 — but directly in bf16 for the full output of a
    # bf16 layer: no (g − 1) to cancel there, bf16 has float32's range, and it saves a cast each way (host cost)
    bf16 = full and dt == torch.bfloat16 and m.dtype == dt
    inv, c = _scale_terms(n, dt if bf16 else torch.float32)
    g = torch.addcmul(c, m, inv)
    g = g if g.dtype == dt else g.to(dt)
    if full:  # g ⊙ (base + s·lora) + bias: no subtraction, no cancellation
        y = g * torch.add(base, lora, alpha=scale)
        if bias is not None:
            y = y + bias
        return y if y.dtype == out_dtype else y.to(out_dtype)
    return torch.addcmul((g - 1) * base, g, lora, value=scale)


class _DoraLayerFn(torch.autograd.Function):
    """The one node (Triton kernels). Inputs: ``x2 [rows, d_in]``, weight, bias, ``base_result2 [rows, d_out]`` or
    None, A, B, m, n (float32, contiguous), scale, sub_bias, full, config (a ComposeTrainConfig); checked by the
    caller."""

    @staticmethod
    def forward(
        ctx: Any,
        x2: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        base_result2: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        magnitude: torch.Tensor,
        norm: torch.Tensor,
        scale: float,
        sub_bias: bool,
        full: bool,
        config: ComposeTrainConfig,
    ) -> torch.Tensor:
        need_dm = ctx.needs_input_grad[6]
        out, u, inner, Wx = _fwd(
            x2, weight, bias, base_result2, lora_A, lora_B, magnitude, norm, scale, sub_bias, full, config, need_dm
        )
        ctx.save_for_backward(x2, u, inner, Wx, lora_A, lora_B, magnitude, norm)
        ctx.scale, ctx.full, ctx.config = scale, full, config
        ctx.base_inside = base_result2 is None
        ctx.sub_bias = sub_bias and base_result2 is not None and bias is not None
        ctx.base_dtype = x2.dtype if base_result2 is None else base_result2.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> Any:
        x2, u, inner, Wx, A, B, m, n = ctx.saved_tensors
        nx, _, nbias, nbase, nA, nB, nm = ctx.needs_input_grad[:7]
        s, full = ctx.scale, ctx.full
        d = dout if dout.stride(-1) == 1 else dout.contiguous()
        need_dlora = nx or nA or nB
        need_dbase = nbase or nbias or (nx and ctx.base_inside)
        from dora_tune.kernels._dora_triton import dora_bwd_triton

        dlora, dbase, dm = dora_bwd_triton(
            d,
            inner,
            m.detach(),
            n,
            s,
            ctx.config.bwd,
            full=full,
            lora_dtype=u.dtype,
            base_dtype=ctx.base_dtype,
            m_dtype=m.dtype,
            need_dlora=need_dlora,
            need_dbase=need_dbase,
            need_dm=nm,
        )
        dx = dA = dB = dbias = None
        if need_dlora:
            if nB:
                dB = torch.mm(dlora.t(), u)
            if nx or nA:
                du = torch.mm(dlora, B)
                if nA:
                    dA = torch.mm(du.t(), x2 if x2.dtype == du.dtype else x2.to(du.dtype))
                if nx:
                    dx = torch.mm(du, A).to(x2.dtype)
        if nx and ctx.base_inside:
            dxb = torch.mm(dbase if dbase.dtype == Wx.dtype else dbase.to(Wx.dtype), Wx)
            dx = dxb if dx is None else dx + dxb
        if nbias:  # rare: a trainable bias of the base layer
            dbias = torch.zeros(d.shape[-1], device=d.device, dtype=torch.float32)
            if full:
                dbias += d.float().sum(dim=0)
            if ctx.sub_bias:
                dbias -= dbase.float().sum(dim=0)
        dbase_result = dbase if nbase else None
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, None, dbias, dbase_result, dA, dB, dm, None, None, None, None, None


def check_dora_layer_inputs(
    x: Any,
    weight: Any,
    lora_A: Any,
    lora_B: Any,
    magnitude: Any,
    norm: Any,
    scale: Any,
    bias: Any = None,
    base_result: Any = None,
    output: str = "delta",
) -> float:
    """Validate :func:`dora_layer`'s arguments (``TypeError``/``ValueError`` naming the argument); return ``scale``."""
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    check_scale_inputs(magnitude, norm)
    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != d_in:
        raise ValueError(f"x must be [..., d_in] with d_in={d_in} (weight {tuple(weight.shape)}), got {tuple(x.shape)}")
    if tuple(lora_A.shape) != (r, d_in) or tuple(lora_B.shape) != (d_out, r):
        raise ValueError(
            f"lora_A must be [r, {d_in}] and lora_B [{d_out}, r], got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    if tuple(magnitude.shape) != (d_out,):
        raise ValueError(f"magnitude and norm must be [d_out] = [{d_out}], got {tuple(magnitude.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias must be [d_out] = [{d_out}], got {tuple(bias.shape)}")
    if base_result is not None:
        check_tensor("base_result", base_result)
        if tuple(base_result.shape) != (*x.shape[:-1], d_out):
            raise ValueError(
                f"base_result must be [..., d_out] = {(*x.shape[:-1], d_out)}, got {tuple(base_result.shape)}"
            )
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude, "norm": norm}
    if bias is not None:
        tensors["bias"] = bias
    if base_result is not None:
        tensors["base_result"] = base_result
    check_same_device(**tensors)
    return check_scale(scale)


def dora_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    *,
    bias: torch.Tensor | None = None,
    base_result: torch.Tensor | None = None,
    base_includes_bias: bool = True,
    output: str = "delta",
    impl: str = "auto",
    config: ComposeTrainConfig | None = None,
    planner: Planner | None = None,
) -> torch.Tensor:
    """A DoRA layer's adapter in one autograd node (see the module docstring for the math).

    Args:
        x: ``[..., d_in]`` input of the LoRA branch (PEFT: the dropped-out input when dropout is active).
        weight: ``[d_out, d_in]`` base weight W, frozen.
        lora_A: ``[r, d_in]``; lora_B: ``[d_out, r]``; magnitude: ``[d_out]`` m; norm: ``[d_out]`` detached
            ``‖W + s·B·A‖_row`` (e.g. :func:`~dora_tune.kernels.factored_norm`).
        scale: the LoRA scale s, a Python number.
        bias: ``[d_out]`` base-layer bias or None.
        base_result: ``[..., d_out]`` the base layer's output (PEFT's ``base_result``); None: the base output
            ``x·Wᵀ`` is computed here (and ``d_x`` gets its gradient).
        base_includes_bias: ``base_result`` includes ``bias`` (PEFT's does), which is then subtracted here.
        output: ``"delta"`` — ``(g−1)·base + g·s·lora`` in the promoted dtype of the branches — or ``"full"`` —
            ``g ⊙ (base + s·lora) + bias`` in ``base``'s dtype.
        impl: ``"eager"``, ``"triton"`` or ``"auto"`` (the plan of op ``compose_train`` at rows × d_out).
        config: a :class:`ComposeTrainConfig` for ``impl="triton"``.
        planner: what answers ``impl="auto"`` (:class:`~dora_tune.kernels._common.Planner`); the public
            :func:`dora_tune.kernels.dora_layer` (the front door, :mod:`dora_tune.auto`) passes the dispatcher's.

    Returns:
        ``[..., d_out]``, differentiable with respect to ``x``, ``base_result``, ``lora_A``, ``lora_B``,
        ``magnitude`` and ``bias``.
    """
    s = check_dora_layer_inputs(x, weight, lora_A, lora_B, magnitude, norm, scale, bias, base_result, output)
    if impl not in (*IMPLS, "auto"):
        raise ValueError(f"impl must be one of {IMPLS} or 'auto', got {impl!r}")
    if config is not None and not isinstance(config, ComposeTrainConfig):
        raise TypeError(f"config must be a ComposeTrainConfig, got {type(config).__name__}")
    sub = base_includes_bias and base_result is not None
    return dora_layer_unchecked(
        x, weight, lora_A, lora_B, magnitude, norm, s, bias, base_result, sub, output == "full", impl, config, planner
    )


def dora_layer_unchecked(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    base_result: torch.Tensor | None = None,
    sub_bias: bool = True,
    full: bool = False,
    impl: str = "auto",
    config: ComposeTrainConfig | None = None,
    planner: Planner | None = None,
) -> torch.Tensor:
    """:func:`dora_layer` without the argument checks: for layers that validated their tensors once (their shapes,
    dtypes and devices are fixed while they stay the same tensors). ``sub_bias``: ``base_result`` includes ``bias``;
    ``full``: the layer output instead of the delta."""
    if is_compiling():  # torch ops that Inductor fuses into its own kernels (an opaque custom op runs Python a call)
        n = norm.detach().float()
        return _torch_path(x, weight, bias, base_result, lora_A, lora_B, magnitude, n, scale, sub_bias, full)
    if weight.requires_grad or torch.is_autocast_enabled(x.device.type):
        return dora_layer_composed(
            x, weight, lora_A, lora_B, magnitude, norm, scale, bias, base_result, sub_bias, full, planner
        )
    grad = torch.is_grad_enabled() and (
        x.requires_grad
        or lora_A.requires_grad
        or lora_B.requires_grad
        or magnitude.requires_grad
        or (base_result is not None and base_result.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    # the caller's tensor itself when it can be used as is: the scale terms are memoised on it (a norm cached per
    # optimizer step pays for them once)
    plain = norm.dtype == torch.float32 and not norm.requires_grad and norm.is_contiguous()
    n = norm if plain else norm.detach().float().contiguous()
    if impl == "auto":
        planner = need_planner("dora_layer", planner)
        impl, config = _choose(
            x, weight, bias, base_result, lora_A, lora_B, magnitude, n, scale, sub_bias, full, grad, planner
        )
    if impl == "eager":
        return _torch_path(x, weight, bias, base_result, lora_A, lora_B, magnitude, n, scale, sub_bias, full)
    if impl in ("fused", "folded"):  # only as the path race's pick (full output, one dtype: see _choose)
        return _run_whole_linear(impl, x, weight, bias, base_result, lora_A, lora_B, magnitude, n, scale, config)
    if impl != "triton":
        raise ValueError(f"impl must be one of {IMPLS} or 'auto', got {impl!r}")
    lead = x.shape[:-1]
    x2 = as_rows("x", x)
    br2 = None if base_result is None else as_rows("base_result", base_result)
    cfg = config if isinstance(config, ComposeTrainConfig) else DEFAULT_COMPOSE_TRAIN_CONFIG
    if grad:
        out = _DoraLayerFn.apply(x2, weight, bias, br2, lora_A, lora_B, magnitude, n, scale, sub_bias, full, cfg)
    else:
        with torch.no_grad():
            out = _fwd(x2, weight, bias, br2, lora_A, lora_B, magnitude, n, scale, sub_bias, full, cfg, False)[0]
    return out if len(lead) == 1 else out.view(*lead, out.shape[-1])


def _choose(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    base_result: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    scale: float,
    sub_bias: bool,
    full: bool,
    grad: bool,
    planner: Planner,
) -> tuple[str, Any]:
    """``("eager" | "triton" | "fused" | "folded", config)`` for a call: the compose plan's config for the Triton
    node, and — with autograd recording on CUDA — the path the dispatcher's host-aware race found cheaper for this
    layer's shape (wall time of back-to-back forward+backward calls, what the step pays), once per rows bucket;
    the whole-linear paths where their rules let them (:func:`_path_runners`)."""
    rows, d_out = x.numel() // max(x.shape[-1], 1), weight.shape[0]
    if x.device.type != "cuda" or rows == 0 or not triton_available():
        return "eager", None
    op = "compose_train" if grad else "compose"
    plan_impl, config = resolve_impl(op, _Rows(rows, d_out, x), "auto", None, planner=planner)
    cfg = config if isinstance(config, ComposeTrainConfig) else DEFAULT_COMPOSE_TRAIN_CONFIG
    if not grad:
        return plan_impl, cfg
    A_dt = lora_A.dtype

    def planned(impl: str) -> Any:  # a whole-linear path's planned config (its shortlist raced on these inputs once)
        race = functools.partial(linear_runner, x, weight, bias, lora_A, lora_B, m, n, scale)
        return linear_config(impl, x, weight, lora_A, planner, race)

    def runners() -> dict[str, Callable[[], Any]]:  # only when a race is due: nothing of it on the hot path
        linear = {}
        if fused_layer_route(x, weight, bias, lora_A, lora_B, base_result, full):
            linear["fused"] = planned("fused")
        if folded_layer_route(x, weight, bias, lora_A, lora_B, base_result, full, sub_bias):
            linear["folded"] = planned("folded")
        paths = _path_runners(x, weight, bias, base_result, lora_A, lora_B, m, n, scale, sub_bias, full, cfg, linear)
        if sharded:  # the node's FSDP2 parity gap (module doc)
            del paths["triton"]
        return paths

    bucket = 1 << (rows - 1).bit_length()  # token counts change per batch: one race per power-of-2 bucket
    # with the whole-linear opt-ins: a race is of the paths offered when it ran; under FSDP2, without the node
    fused, folded = os.environ.get(FUSED_LINEAR_ENV), os.environ.get(FOLDED_LINEAR_ENV)
    sharded = fsdp_in_use()
    key = ("dora_layer", bucket, d_out, weight.shape[1], lora_A.shape[0], full, base_result is None, x.dtype, A_dt)
    key = (*key, fused, folded, sharded)
    path = planner.auto_path(key, x.device, runners, "eager" if sharded else "triton")
    return (path, planned(path)) if path in ("fused", "folded") else (path, cfg)


def _path_runners(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    base_result: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    scale: float,
    sub_bias: bool,
    full: bool,
    cfg: ComposeTrainConfig,
    linear: dict[str, Any] | None = None,
) -> dict[str, Callable[[], Any]]:
    """The whole paths the training race times for a call (name → forward+backward on the call's shapes, with
    detached copies of its leaves: nothing the caller sees changes): ``"eager"``, ``"triton"``, and each
    whole-linear implementation of ``linear`` (``"fused"``, ``"folded"`` → its config; where
    :func:`~dora_tune.kernels.dora_linear.fused_layer_route` or ``folded_layer_route`` says it applies)."""

    def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().requires_grad_(t.requires_grad)

    xs, brs, As, Bs, ms = (leaf(t) for t in (x, base_result, lora_A, lora_B, m))
    b = None if bias is None else bias.detach()
    out_dtype = (base_result.dtype if base_result is not None else x.dtype) if full else None
    dt = out_dtype or torch.promote_types(lora_A.dtype, x.dtype if base_result is None else base_result.dtype)
    # a constant gradient: the kernels' time does not depend on the values, and the race must not draw from
    # the global RNG (the step's dropout masks would change)
    dout = torch.full((*x.shape[:-1], weight.shape[0]), 1e-3, device=x.device, dtype=dt)

    def eager() -> None:
        _torch_path(xs, weight, b, brs, As, Bs, ms, n, scale, sub_bias, full).backward(dout)

    def node() -> None:
        dora_layer_unchecked(xs, weight, As, Bs, ms, n, scale, b, brs, sub_bias, full, "triton", cfg).backward(dout)

    paths = {"eager": eager, "triton": node}
    for name, config in (linear or {}).items():

        def whole(name: str = name, config: Any = config) -> None:
            _run_whole_linear(name, xs, weight, b, brs, As, Bs, ms, n, scale, config).backward(dout)

        paths[name] = whole
    return paths


def _run_whole_linear(
    impl: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    base_result: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    scale: float,
    config: Any,
) -> torch.Tensor:
    """A layer call run by a whole-linear implementation of :mod:`~dora_tune.kernels.dora_linear` (``"fused"``,
    ``"folded"``; ``config`` its config, else its default): the folded one from ``base_result`` where one is given
    (:func:`~dora_tune.kernels.dora_linear.folded_from_base`)."""
    if impl == "fused":
        cfg = config if isinstance(config, DoraLinearConfig) else None
        return dora_linear_fused(x, weight, bias, lora_A, lora_B, m, n, scale, cfg)
    cfg = config if isinstance(config, FoldedConfig) else None
    if base_result is not None:
        return folded_from_base(x, base_result, bias, lora_A, lora_B, m, n, scale, cfg)
    return dora_linear_folded(x, weight, bias, lora_A, lora_B, m, n, scale, cfg)


class _Rows:
    """The shape ``resolve_impl`` reads (``shape[-1]``, ``numel()``, ``dtype``, ``device``) of a ``[rows, d_out]``
    output, without allocating one."""

    def __init__(self, rows: int, d_out: int, like: torch.Tensor) -> None:
        self.shape = (rows, d_out)
        self.dtype, self.device = like.dtype, like.device
        self._numel = rows * d_out

    def numel(self) -> int:
        return self._numel


def dora_layer_composed(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    base_result: torch.Tensor | None,
    sub_bias: bool,
    full: bool,
    planner: Planner | None = None,
) -> torch.Tensor:
    """The same values through torch autograd and the compose ops (several nodes), each planned by ``planner``:
    under autocast, or with a trainable W."""
    from dora_tune.kernels.compose import compose, dora_scale
    from dora_tune.kernels.compose_train import dora_compose_train

    lora = F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B)
    if base_result is not None:
        base = base_result - bias if (sub_bias and bias is not None) else base_result
    else:
        base = F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))
    dt = torch.promote_types(lora.dtype, base.dtype)
    lora_c, base_c = lora.to(dt), base.to(dt)
    if torch.is_grad_enabled():
        delta = dora_compose_train(lora_c, base_c, magnitude, norm, scale, planner=planner)
    else:
        delta = compose(lora_c, base_c, dora_scale(magnitude, norm), scale, planner=planner)
    if not full:
        return delta
    out = base_c + delta
    if bias is not None:
        out = out + bias
    return out.to(base.dtype)
