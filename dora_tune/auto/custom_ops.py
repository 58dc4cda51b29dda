"""The kernels as ``torch.library`` custom ops (namespace ``dora_tune``): the front door under ``torch.compile``.

Eager calls of :func:`~dora_tune.kernels.factored_norm`, :func:`~dora_tune.kernels.compose` and
:func:`~dora_tune.kernels.compose_train` do not come here: they keep their lower-overhead paths. While
``torch.compile`` traces them (``torch.compiler.is_compiling()``), the front door (:mod:`dora_tune.auto`) calls the
wrappers of this module instead, so a compiled model holds each op as one opaque node with a fake (meta)
implementation and no graph break:

- ``dora_tune::factored_norm(weight, lora_A, lora_B, scale, impl, config) -> norm``  (float32 ``[d_out]``, no grad)
- ``dora_tune::cached_norm(weight, lora_A, lora_B, scale) -> norm``: the same norm (``"auto"``), computed only when
  W, A or B changed since the last call (version counters, storages; the dispatcher's ``SharedNormCache``), so a
  compiled training step runs the norm once per optimizer step as eager ``DoRALinear`` and ``enable()`` do. Tagged
  ``cudagraph_unsafe``: under ``mode="reduce-overhead"`` Inductor runs it between the CUDA-graph partitions (with
  ``graph_partition`` off, the graph holding it is not captured); captured by hand, it records the computation
- ``dora_tune::compose(lora, base, g, scale, impl, config) -> out``                   (no grad)
- ``dora_tune::compose_train_fwd(lora, base, g, scale, write_inner, impl, config) -> (out, inner)``
- ``dora_tune::compose_train_bwd(dout, inner, g, scale, need_dlora, need_dbase, need_dg, impl, config)
  -> (d_lora, d_base, d_g)``; ``compose_train_fwd``'s autograd formula calls it.
- ``dora_tune::dora_linear_fwd(x, weight, bias, lora_A, lora_B, magnitude, norm, scale, write_pre, config)
  -> (y, u, y_pre)`` and ``dora_tune::dora_linear_bwd(...) -> (d_x, d_bias, d_A, d_B, d_m)``: the fused DoRA linear
  (:mod:`~dora_tune.kernels.dora_linear`, Triton) on ``[rows, d_in]`` inputs with a frozen weight; the compiled
  layers use it where ``DORA_TUNE_FUSED_LINEAR=1`` opts in (:func:`dora_linear_op`).

``impl`` is ``"auto"``, a torch implementation or ``"triton"``; ``config`` is ``""`` (the default / the dispatcher's
choice) or a kernel config as canonical JSON. With ``"auto"`` the implementation is chosen **when the op runs**, by
the same memoised dispatcher as eager calls (so dynamic shapes are planned per actual shape and nothing about the
dispatcher is traced). The implementations call the same launchers as the eager paths (``compose_fwd_triton``,
``compose_bwd_triton``, ``factored_norm_triton``) or the torch formulas. Outputs that are not needed (``inner``
without ``write_inner``, unneeded gradients) come back as empty tensors.

Registration is lazy (on first use, never at ``import dora_tune``) and idempotent; :func:`ensure_registered` may be
called at any time, also while ``torch.compile`` traces.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

import torch

from dora_tune import ops
from dora_tune.dispatch import runtime
from dora_tune.kernels._common import as_rows, require_triton

NAMESPACE = "dora_tune"
_LOCK = threading.Lock()
_REGISTERED = False

_TRAIN_IMPLS = ops.COMPOSE_TRAIN.impls
_NORM_IMPLS = ops.NORM.impls


# ----------------------------------------------------------------------------------------------- configs and plans


def config_json(config: Any) -> str:
    """A kernel config as the canonical JSON string the ops take (``""`` for None)."""
    if config is None:
        return ""
    return json.dumps(config.as_dict(), sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def _parse(op: str, text: str) -> Any:
    from dora_tune.kernels.compose import ComposeConfig
    from dora_tune.kernels.compose_train import ComposeTrainConfig
    from dora_tune.kernels.dora_linear import DoraLinearConfig
    from dora_tune.kernels.norm import NormConfig

    classes = (NormConfig, ComposeConfig, ComposeTrainConfig, DoraLinearConfig)
    cls = {c.op: c for c in classes}[op]
    return cls.from_dict(json.loads(text))


def _resolve(op: str, impl: str, config: str, t: torch.Tensor, race: Any = None) -> tuple[str, Any]:
    """``(impl, config object or None)`` for a run of ``op`` at ``t``'s rows × cols: ``"auto"`` asks the dispatcher
    (at run time; ``race`` as :func:`~dora_tune.kernels.compose.resolve_impl`'s)."""
    from dora_tune.kernels.compose import resolve_impl

    return resolve_impl(op, t, impl, _parse(op, config) if config else None, race, runtime)


def _default(op: str) -> Any:
    from dora_tune.kernels.catalog import OP_SPECS

    return OP_SPECS[op].default_config


# ----------------------------------------------------------------------------------------------- implementations


def _norm_impl(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, impl: str, config: str
) -> torch.Tensor:
    # the eager function itself (not traced when the op runs): the same planning on the compute dtype and the same
    # fallback when a planned config cannot launch
    from dora_tune.kernels.norm import factored_norm

    if impl not in ("auto", *_NORM_IMPLS):
        raise ValueError(f"dora_tune::factored_norm: unknown impl {impl!r}")
    cfg = _parse("norm", config) if config else None
    return factored_norm(weight, lora_A, lora_B, scale, impl=impl, config=cfg, planner=runtime)


def _cached_norm_impl(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    from dora_tune.kernels.norm import factored_norm

    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        # captured all the same (a graph captured by hand): a replay does not call back into Python, so record the
        # computation itself (a replay after an optimizer step must see the new weights), never a remembered norm
        return factored_norm(weight, lora_A, lora_B, scale, planner=runtime)
    # a copy: compiled code owns an op's output and may reuse its buffer for later results
    return runtime.default_dispatcher().norms(weight, lora_A, lora_B, scale).clone()


def _compose_impl(
    lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float, impl: str, config: str
) -> torch.Tensor:
    from dora_tune.kernels.compose import compose_formula, g_vector

    name, cfg = _resolve("compose", impl, config, base)
    with torch.no_grad():
        if name == "eager":
            return compose_formula(lora, base, g.reshape(-1).to(base.dtype), scale).contiguous()
        if name == "triton":
            require_triton(base.device)
            from dora_tune.kernels._compose_triton import compose_fwd_triton

            out, _ = compose_fwd_triton(
                as_rows("lora", lora), as_rows("base", base), g_vector(g), scale, cfg or _default("compose")
            )
            return out.view(base.shape)
    raise ValueError(f"dora_tune::compose: unknown impl {name!r}")


def _train_fwd_impl(
    lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float, write_inner: bool, impl: str, config: str
) -> tuple[torch.Tensor, torch.Tensor]:
    from dora_tune.kernels.compose import compose_formula, g_vector
    from dora_tune.kernels.compose_train import race_step

    name, cfg = _resolve("compose_train", impl, config, base, lambda: race_step(lora, base, g, scale))
    with torch.no_grad():
        if name == "eager":
            out = compose_formula(lora, base, g.reshape(-1).to(base.dtype), scale).contiguous()
            inner = torch.add(base, lora, alpha=scale).contiguous() if write_inner else base.new_empty(0)
            return out, inner
        if name == "triton":
            require_triton(base.device)
            from dora_tune.kernels._compose_triton import compose_fwd_triton

            cfg = cfg or _default("compose_train")
            out, inner = compose_fwd_triton(
                as_rows("lora", lora), as_rows("base", base), g_vector(g), scale, cfg.fwd, write_inner=write_inner
            )
            return out.view(base.shape), (inner.view(base.shape) if write_inner else base.new_empty(0))
    raise ValueError(f"dora_tune::compose_train_fwd: unknown impl {name!r}")


def _train_bwd_impl(
    dout: torch.Tensor,
    inner: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    need_dlora: bool,
    need_dbase: bool,
    need_dg: bool,
    impl: str,
    config: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dora_tune.kernels.compose import g_vector

    if need_dg and inner.shape != dout.shape:
        raise ValueError("dora_tune::compose_train_bwd: d_g needs `inner` (compose_train_fwd with write_inner=True)")
    name, cfg = _resolve("compose_train", impl, config, dout)
    empty = dout.new_empty(0)
    with torch.no_grad():
        if name == "eager":
            gd = g.reshape(-1).to(dout.dtype)
            dlora = (dout * (gd * scale)).contiguous() if need_dlora else empty
            dbase = (dout * (gd - 1)).contiguous() if need_dbase else empty
            if need_dg:
                d2 = dout.reshape(-1, dout.shape[-1])
                dg = (inner.reshape(d2.shape).float() * d2.float()).sum(dim=0)
            else:
                dg = dout.new_empty(0, dtype=torch.float32)
            return dlora, dbase, dg
        if name == "triton":
            require_triton(dout.device)
            from dora_tune.kernels._compose_triton import compose_bwd_triton

            cfg = cfg or _default("compose_train")
            dlora, dbase, dg = compose_bwd_triton(
                as_rows("dout", dout),
                as_rows("inner", inner) if need_dg else None,
                g_vector(g),
                scale,
                cfg.bwd,
                lora_dtype=dout.dtype,
                need_dlora=need_dlora,
                need_dbase=need_dbase,
                need_dg=need_dg,
            )
            return (
                empty if dlora is None else dlora.view(dout.shape),
                empty if dbase is None else dbase.view(dout.shape),
                dout.new_empty(0, dtype=torch.float32) if dg is None else dg,
            )
    raise ValueError(f"dora_tune::compose_train_bwd: unknown impl {name!r}")


def _linear_config(config: str, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> Any:
    """The op's config: the given one, else the dispatcher's for op ``dora_linear`` at this call's shape (at run
    time; the backward finds the forward's memoised plan)."""
    from dora_tune.kernels.dora_linear import linear_config

    return _parse("dora_linear", config) if config else linear_config("fused", x, weight, lora_A, runtime)


def _linear_fwd_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    write_pre: bool,
    config: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dora_tune.kernels.dora_linear import fused_forward

    require_triton(x.device)
    n = norm.detach().float().contiguous()
    y, u, pre = fused_forward(
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        magnitude.contiguous(),
        n,
        scale,
        _linear_config(config, x, weight, lora_A),
        write_pre,
    )
    return y, u, pre if pre is not None else x.new_empty(0)


def _linear_bwd_impl(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    u: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    pre: torch.Tensor,
    scale: float,
    need_dx: bool,
    need_dbias: bool,
    need_dA: bool,
    need_dB: bool,
    need_dm: bool,
    config: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from dora_tune.kernels.dora_linear import fused_backward

    n = norm.detach().float().contiguous()
    needs = (need_dx, False, need_dbias, need_dA, need_dB, need_dm)
    dx, _, dbias, dA, dB, dm = fused_backward(
        dy.contiguous(), x, weight, u, lora_A, lora_B, magnitude, n, pre if need_dm else None, scale,
        _linear_config(config, x, weight, lora_A), needs, dy.dtype,
    )  # fmt: skip
    empty = dy.new_empty(0)
    return tuple(empty if t is None else t for t in (dx, dbias, dA, dB, dm))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- registration


def _setup_train(ctx: Any, inputs: tuple, output: tuple) -> None:
    _lora, _base, g, scale, write_inner, impl, config = inputs
    ctx.save_for_backward(output[1], g)
    ctx.scale, ctx.impl, ctx.config, ctx.write_inner = scale, impl, config, write_inner


def _backward_train(ctx: Any, dout: torch.Tensor, _dinner: Any) -> tuple:
    inner, g = ctx.saved_tensors
    need_dlora, need_dbase, need_dg = ctx.needs_input_grad[:3]
    if need_dg and not ctx.write_inner:
        raise RuntimeError(
            "dora_tune::compose_train_fwd: g needs a gradient but the forward ran with "
            "write_inner=False (pass write_inner=True when g requires grad)"
        )
    dlora, dbase, dg = torch.ops.dora_tune.compose_train_bwd(
        dout, inner, g, ctx.scale, need_dlora, need_dbase, need_dg, ctx.impl, ctx.config
    )
    return (
        dlora if need_dlora else None,
        dbase if need_dbase else None,
        dg.to(g.dtype).view(g.shape) if need_dg else None,
        None,
        None,
        None,
        None,
    )


def _setup_linear(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, lora_A, lora_B, magnitude, norm, scale, write_pre, config = inputs
    ctx.save_for_backward(x, weight, output[1], lora_A, lora_B, magnitude, norm, output[2])
    ctx.scale, ctx.config, ctx.write_pre = scale, config, write_pre
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_linear(ctx: Any, dy: torch.Tensor, _du: Any, _dpre: Any) -> tuple:
    x, weight, u, lora_A, lora_B, magnitude, norm, pre = ctx.saved_tensors
    nx, _nw, nbias, nA, nB, nm = ctx.needs_input_grad[:6]
    if nm and not ctx.write_pre:
        raise RuntimeError(
            "dora_tune::dora_linear_fwd: magnitude needs a gradient but the forward ran with write_pre=False"
        )
    dx, dbias, dA, dB, dm = torch.ops.dora_tune.dora_linear_bwd(
        dy, x, weight, u, lora_A, lora_B, magnitude, norm, pre, ctx.scale, nx, nbias, nA, nB, nm, ctx.config
    )
    return (
        dx if nx else None,
        None,
        dbias.to(ctx.bias_dtype) if nbias else None,
        dA if nA else None,
        dB if nB else None,
        dm if nm else None,
        None,
        None,
        None,
        None,
    )


def _op_exists(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _register() -> None:
    lib = torch.library
    if not _op_exists("factored_norm"):
        op = lib.custom_op(f"{NAMESPACE}::factored_norm", _norm_impl, mutates_args=())

        @op.register_fake
        def _(weight, lora_A, lora_B, scale, impl, config):
            return weight.new_empty((weight.shape[0],), dtype=torch.float32)

    if not _op_exists("cached_norm"):
        # stateful: kept out of CUDA graphs (Inductor runs it between the captured partitions), so that a replay never
        # misses a weight change and no remembered norm lives in a CUDA-graph memory pool. Defined at the dispatcher
        # level rather than as a custom_op: compiled training calls it once per layer and forward, and custom_op's
        # Python layers cost ~4x the call itself (11.7 against 4.6 µs a call of a trivial op on the dev CPU); its
        # inputs arrive detached (cached_norm_op), so it needs no autograd kernel.
        unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)
        tags = () if unsafe is None else (unsafe,)
        qualname = f"{NAMESPACE}::cached_norm"
        lib.define(qualname, "(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor", tags=tags)
        lib.impl(qualname, "default", _cached_norm_impl)

        @lib.register_fake(qualname)
        def _(weight, lora_A, lora_B, scale):
            return weight.new_empty((weight.shape[0],), dtype=torch.float32)

    if not _op_exists("compose"):
        op = lib.custom_op(f"{NAMESPACE}::compose", _compose_impl, mutates_args=())

        @op.register_fake
        def _(lora, base, g, scale, impl, config):
            return base.new_empty(base.shape)

    if not _op_exists("compose_train_bwd"):
        op = lib.custom_op(f"{NAMESPACE}::compose_train_bwd", _train_bwd_impl, mutates_args=())

        @op.register_fake
        def _(dout, inner, g, scale, need_dlora, need_dbase, need_dg, impl, config):
            return (
                dout.new_empty(dout.shape if need_dlora else (0,)),
                dout.new_empty(dout.shape if need_dbase else (0,)),
                dout.new_empty((dout.shape[-1],) if need_dg else (0,), dtype=torch.float32),
            )

    if not _op_exists("compose_train_fwd"):
        op = lib.custom_op(f"{NAMESPACE}::compose_train_fwd", _train_fwd_impl, mutates_args=())

        @op.register_fake
        def _(lora, base, g, scale, write_inner, impl, config):
            return base.new_empty(base.shape), base.new_empty(base.shape if write_inner else (0,))

        op.register_autograd(_backward_train, setup_context=_setup_train)


def _register_linear() -> None:
    lib = torch.library
    if not _op_exists("dora_linear_bwd"):
        op = lib.custom_op(f"{NAMESPACE}::dora_linear_bwd", _linear_bwd_impl, mutates_args=())

        @op.register_fake
        def _(dy, x, weight, u, lora_A, lora_B, magnitude, norm, pre, scale, nx, nbias, nA, nB, nm, config):
            def like(t, need):
                return t.new_empty(t.shape if need else (0,))

            return (
                like(x, nx),
                dy.new_empty((dy.shape[1],) if nbias else (0,)),
                like(lora_A, nA),
                like(lora_B, nB),
                like(magnitude, nm),
            )

    if not _op_exists("dora_linear_fwd"):
        op = lib.custom_op(f"{NAMESPACE}::dora_linear_fwd", _linear_fwd_impl, mutates_args=())

        @op.register_fake
        def _(x, weight, bias, lora_A, lora_B, magnitude, norm, scale, write_pre, config):
            rows, d_out = x.shape[0], weight.shape[0]
            pre = x.new_empty((rows, d_out) if write_pre else (0,))
            return x.new_empty((rows, d_out)), x.new_empty((rows, lora_A.shape[0])), pre

        op.register_autograd(_backward_linear, setup_context=_setup_linear)


@torch.compiler.assume_constant_result
def ensure_registered() -> bool:
    """Register the ``dora_tune::*`` custom ops once per process (thread-safe; a no-op afterwards). Returns True.

    Marked ``assume_constant_result``: when the first use happens while ``torch.compile`` traces, Dynamo runs it
    eagerly instead of tracing the registration."""
    global _REGISTERED
    if not _REGISTERED:
        with _LOCK:
            if not _REGISTERED:
                _register()
                _register_linear()
                _REGISTERED = True
    return True


# ----------------------------------------------------------------------------------------------- wrappers


def _prepare(impl: str, allowed: tuple[str, ...], config: Any) -> str:
    """Check ``impl``, register the ops (once) and return ``config`` as the ops' JSON string argument."""
    if impl != "auto" and impl not in allowed:
        raise ValueError(f"impl must be one of {allowed} or 'auto', got {impl!r}")
    ensure_registered()
    return config_json(config)


def factored_norm_op(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    impl: str = "auto",
    config: Any = None,
) -> torch.Tensor:
    """``dora_tune::factored_norm`` on detached inputs: float32 ``[d_out]`` row norms of ``W + s·B·A``.

    Inputs as in :func:`~dora_tune.kernels.factored_norm` (validated there); ``config`` a ``NormConfig`` or None.
    """
    cfg = _prepare(impl, _NORM_IMPLS, config)
    return torch.ops.dora_tune.factored_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scale, impl, cfg)


def cached_norm_op(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``dora_tune::cached_norm``: the float32 ``[d_out]`` norm of :func:`~dora_tune.kernels.factored_norm`
    (``impl="auto"``), reused across calls while W, A and B are unchanged — the norm once per optimizer step inside a
    compiled graph (:class:`~dora_tune.kernels.norm.SharedNormCache` of the process-wide dispatcher). Inputs as in
    ``factored_norm`` (checked here, at trace time)."""
    from dora_tune.kernels.norm import _check_norm_inputs

    s = _check_norm_inputs(weight, lora_A, lora_B, scale)
    ensure_registered()
    return torch.ops.dora_tune.cached_norm(weight.detach(), lora_A.detach(), lora_B.detach(), s)


def compose_op(
    lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float, impl: str = "auto", config: Any = None
) -> torch.Tensor:
    """``dora_tune::compose`` on detached inputs: ``(g−1)·base + g·(s·lora)``, ``base``'s shape and dtype."""
    cfg = _prepare(impl, _TRAIN_IMPLS, config)
    return torch.ops.dora_tune.compose(lora.detach(), base.detach(), g.detach(), scale, impl, cfg)


def compose_train_op(
    lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float, impl: str = "auto", config: Any = None
) -> torch.Tensor:
    """``dora_tune::compose_train_fwd`` with its autograd formula: ``(g−1)·base + g·(s·lora)`` with gradients to
    ``lora``, ``base`` and ``g`` (``inner = s·lora + base`` is written only when ``g`` needs a gradient)."""
    cfg = _prepare(impl, _TRAIN_IMPLS, config)
    write_inner = torch.is_grad_enabled() and g.requires_grad
    out, _ = torch.ops.dora_tune.compose_train_fwd(lora, base, g, scale, write_inner, impl, cfg)
    return out


def dora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    config: Any = None,
) -> torch.Tensor:
    """``dora_tune::dora_linear_fwd`` on ``x [..., d_in]`` (leading dims flattened and restored): the fused DoRA
    linear's output ``[..., d_out]``, differentiable (not in the weight). Inputs as
    :func:`~dora_tune.kernels.dora_linear.dora_linear` takes them for ``impl="fused"``; ``config`` a
    ``DoraLinearConfig`` or None (the default)."""
    ensure_registered()
    x2 = x.reshape(-1, x.shape[-1])
    y, _, _ = torch.ops.dora_tune.dora_linear_fwd(
        x2, weight.detach(), bias, lora_A, lora_B, magnitude, norm, scale, magnitude.requires_grad, config_json(config)
    )
    return y.view(*x.shape[:-1], weight.shape[0])
