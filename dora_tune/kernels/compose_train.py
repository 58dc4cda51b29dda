"""DoRA compose for training: ``(g−1)·base + g·(s·lora)`` with gradients to ``lora``, ``base`` and ``g``.

Backward (DESIGN.md §1), with ``inner = s·lora + base``::

    d_lora = g·s·d_out,   d_base = (g−1)·d_out,   d_g = Σ_rows inner ⊙ d_out.

``"eager"`` is :func:`~dora_tune.kernels.compose.compose_formula` under autograd. ``"triton"`` is an
``autograd.Function``: the fused forward also writes ``inner`` (in the input dtype) only when ``g`` requires grad;
the fused backward reads ``d_out`` (and ``inner``) once, writes ``d_lora`` and ``d_base``, and reduces ``d_g`` in
two deterministic stages (per-program column partials, then a fixed-order sum). Shapes and dtypes as in
:func:`~dora_tune.kernels.compose.compose`; gradients come back in each input's dtype and shape.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import torch

from dora_tune import ops
from dora_tune.kernels._common import KernelConfig, Planner, as_rows, config_field, require_triton
from dora_tune.kernels.compose import (
    DEFAULT_COMPOSE_CONFIG,
    FORMULA_SOURCE,
    ComposeConfig,
    _dora_scale,
    check_compose_inputs,
    check_scale_inputs,
    compose_config_space,
    compose_formula,
    compose_inputs,
    g_vector,
    resolve_impl,
)
from dora_tune.kernels.spec import ANY_DEVICE, CUDA_ONLY, EAGER_TOL, FUSED_TOL, ImplSpec, OpSpec

IMPLS: tuple[str, ...] = ops.COMPOSE_TRAIN.impls


@dataclasses.dataclass(frozen=True)
class ComposeBwdConfig(KernelConfig):
    """Launch config of the compose backward: ``block_r × block_c`` tiles, ``row_iters`` of them down the rows per
    program (more iterations → fewer ``d_g`` partials to reduce)."""

    op = "compose_bwd"
    block_r: int = config_field(lo=1, hi=256)
    block_c: int = config_field(lo=16, hi=8192)
    row_iters: int = config_field(lo=1, hi=64)
    num_warps: int = config_field(lo=1, hi=16)


@dataclasses.dataclass(frozen=True)
class ComposeTrainConfig:
    """Config of the Triton training path: the forward's and the backward's launch configs."""

    fwd: ComposeConfig
    bwd: ComposeBwdConfig
    op = "compose_train"

    def __post_init__(self) -> None:
        if not isinstance(self.fwd, ComposeConfig) or not isinstance(self.bwd, ComposeBwdConfig):
            raise TypeError("ComposeTrainConfig needs fwd: ComposeConfig and bwd: ComposeBwdConfig")

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{"fwd": {...}, "bwd": {...}}`` of plain ints."""
        return {"fwd": self.fwd.as_dict(), "bwd": self.bwd.as_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> ComposeTrainConfig:
        """Build and validate from ``{"fwd": {...}, "bwd": {...}}``."""
        if not isinstance(data, dict) or sorted(data) != ["bwd", "fwd"]:
            raise ValueError(f"ComposeTrainConfig needs exactly the keys 'fwd' and 'bwd', got {data!r}")
        return cls(ComposeConfig.from_dict(data["fwd"]), ComposeBwdConfig.from_dict(data["bwd"]))


DEFAULT_COMPOSE_BWD_CONFIG = ComposeBwdConfig(block_r=8, block_c=512, row_iters=8, num_warps=4)
DEFAULT_COMPOSE_TRAIN_CONFIG = ComposeTrainConfig(DEFAULT_COMPOSE_CONFIG, DEFAULT_COMPOSE_BWD_CONFIG)


def compose_bwd_config_space() -> list[ComposeBwdConfig]:
    """Every backward config worth trying: tiles of 1–16 K elements, 8–64 elements a thread, 1–16 row steps."""
    out = []
    for br, bc, it, w in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096), (1, 4, 16), (4, 8)):
        elems = br * bc
        if 1024 <= elems <= 16384 and 8 <= elems // (32 * w) <= 64:
            out.append(ComposeBwdConfig(block_r=br, block_c=bc, row_iters=it, num_warps=w))
    return out


def compose_train_config_space() -> list[ComposeTrainConfig]:
    """The product of the forward and backward spaces (tune the two halves separately: they are independent)."""
    return [ComposeTrainConfig(f, b) for f, b in itertools.product(compose_config_space(), compose_bwd_config_space())]


def race_step(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float) -> Callable[[Any], Any]:
    """The runner the dispatcher's race times for a ``compose_train`` call (:meth:`Dispatcher.settle`): with a
    :class:`ComposeTrainConfig`, the fused forward on the call's own ``lora``, ``base`` and ``g`` (writing ``inner``),
    then the fused backward producing all three gradients, with ``base`` standing in for ``d_out`` (the kernels' time
    does not depend on the values; nothing is allocated for it) — the GPU work of a profiled ``compose_train`` trial.
    Its outputs are the race's own; the caller's tensors are only read."""
    from dora_tune.kernels._compose_triton import compose_bwd_triton, compose_fwd_triton

    lora2, base2, gvec = as_rows("lora", lora), as_rows("base", base), g_vector(g)

    def run(config: ComposeTrainConfig) -> Any:
        _, inner = compose_fwd_triton(lora2, base2, gvec, scale, config.fwd, write_inner=True)
        return compose_bwd_triton(
            base2,
            inner,
            gvec,
            scale,
            config.bwd,
            lora_dtype=lora2.dtype,
            need_dlora=True,
            need_dbase=True,
            need_dg=True,
        )

    return run


class _ComposeTrainFn(torch.autograd.Function):
    """Fused forward/backward. Inputs are validated by :func:`compose_train`; views are made here, where autograd
    is off and they cost nothing."""

    @staticmethod
    def forward(ctx: Any, lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float, config: Any) -> Any:
        from dora_tune.kernels._compose_triton import compose_fwd_triton

        need_dg = ctx.needs_input_grad[2]
        gvec = g_vector(g)
        out, inner = compose_fwd_triton(
            as_rows("lora", lora), as_rows("base", base), gvec, scale, config.fwd, write_inner=need_dg
        )
        ctx.save_for_backward(inner, gvec)
        ctx.scale, ctx.config, ctx.lora_dtype, ctx.g_meta = scale, config, lora.dtype, (g.shape, g.dtype)
        return out if base.dim() == 2 else out.view(base.shape)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> Any:
        from dora_tune.kernels._compose_triton import compose_bwd_triton

        inner, gvec = ctx.saved_tensors
        need_dlora, need_dbase, need_dg = ctx.needs_input_grad[:3]
        dlora, dbase, dg = compose_bwd_triton(
            as_rows("dout", dout), inner, gvec, ctx.scale, ctx.config.bwd,
            lora_dtype=ctx.lora_dtype, need_dlora=need_dlora, need_dbase=need_dbase, need_dg=need_dg,
        )  # fmt: skip
        if dout.dim() != 2:
            dlora = None if dlora is None else dlora.view(dout.shape)
            dbase = None if dbase is None else dbase.view(dout.shape)
        if dg is not None:
            g_shape, g_dtype = ctx.g_meta
            dg = dg.to(g_dtype) if dg.dtype != g_dtype else dg
            dg = dg if len(g_shape) == 1 else dg.view(g_shape)
        return dlora, dbase, dg, None, None


def compose_train(
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
    config: ComposeTrainConfig | None = None,
    planner: Planner | None = None,
) -> torch.Tensor:
    """``(g−1)·base + g·(scale·lora)`` with autograd (see the module docstring for the backward).

    Args:
        lora: ``[..., cols]`` LoRA branch output (unscaled).
        base: ``[..., cols]`` base layer output, same dtype as ``lora``.
        g: ``[cols]`` or ``[1, cols]`` DoRA scale; ``d_g`` is produced only if it requires grad.
        scale: the LoRA scale s, a Python number.
        impl: ``"eager"``, ``"triton"`` or ``"auto"`` (chosen by ``planner``).
        config: launch configs for ``impl="triton"`` (default :data:`DEFAULT_COMPOSE_TRAIN_CONFIG`).
        planner: what answers ``impl="auto"`` (:class:`~dora_tune.kernels._common.Planner`); the public
            :func:`dora_tune.kernels.compose_train` (the front door, :mod:`dora_tune.auto`) passes the dispatcher's.

    Returns:
        Tensor of ``base``'s shape and dtype, differentiable with respect to ``lora``, ``base`` and ``g``.
    """
    s = check_compose_inputs(lora, base, g, scale)
    race = lambda: race_step(lora, base, g.detach(), s)  # noqa: E731
    impl, config = resolve_impl("compose_train", base, impl, config, race, planner)
    if impl == "eager":
        return compose_formula(lora, base, (g if g.dim() == 1 else g.reshape(-1)).to(base.dtype), s)
    if impl == "triton":
        require_triton(base.device)
        if config is not None and not isinstance(config, ComposeTrainConfig):
            raise TypeError(f"config must be a ComposeTrainConfig, got {type(config).__name__}")
        return _ComposeTrainFn.apply(lora, base, g, s, config or DEFAULT_COMPOSE_TRAIN_CONFIG)
    raise ValueError(f"impl must be one of {IMPLS} or 'auto', got {impl!r}")


class _DoraComposeTrainFn(torch.autograd.Function):
    """:class:`_ComposeTrainFn` with ``g = dora_scale(m, n)`` formed inside: one autograd node for the whole DoRA
    delta (no graph of small ops for ``g``). ``magnitude`` sits where ``g`` sits in :class:`_ComposeTrainFn`, so its
    forward and backward run unchanged on this node's context. ``g`` and ``d_m`` (from ``d_g``) come from one Triton
    launch each (:mod:`~dora_tune.kernels._scale_triton`: the formulas of :func:`_dora_scale` and
    :func:`dora_scale_backward`, bitwise). ``norm`` (a detached ``[d_out]`` vector) is kept on the context."""

    @staticmethod
    def forward(
        ctx: Any,
        lora: torch.Tensor,
        base: torch.Tensor,
        magnitude: torch.Tensor,
        norm: torch.Tensor,
        scale: float,
        config: Any,
    ) -> Any:
        from dora_tune.kernels._scale_triton import dora_scale_fwd_triton

        ctx.norm, ctx.m_dtype = norm, magnitude.dtype
        return _ComposeTrainFn.forward(ctx, lora, base, dora_scale_fwd_triton(magnitude, norm), scale, config)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> Any:
        from dora_tune.kernels._scale_triton import dora_scale_bwd_triton

        dlora, dbase, dg, _, _ = _ComposeTrainFn.backward(ctx, dout)
        dm = None if dg is None else dora_scale_bwd_triton(dg, ctx.norm, ctx.m_dtype)
        return dlora, dbase, dm, None, None, None


def dora_compose_train(
    lora: torch.Tensor,
    base: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
    config: ComposeTrainConfig | None = None,
    planner: Planner | None = None,
) -> torch.Tensor:
    """The DoRA delta for training: ``compose_train(lora, base, dora_scale(magnitude, norm), scale)``.

    Same values and gradients as that composition (``norm`` is treated as a constant), but with ``impl="triton"``
    the scale ``g`` is formed inside one autograd node instead of a graph of small ops: per adapted layer that saves
    the host the bookkeeping of about five autograd nodes in the forward and as many in the backward, which is what
    limits a training step when the GPU work per layer is small (docs/end-to-end.md, "Host cost").

    Args:
        lora: ``[..., cols]`` LoRA branch output (unscaled).
        base: ``[..., cols]`` base layer output, same dtype as ``lora``.
        magnitude: ``[cols]`` DoRA magnitude vector m (any supported float dtype); gets ``d_m`` if it requires grad.
        norm: ``[cols]`` row norms ``‖W + s·B·A‖`` (e.g. from :func:`factored_norm`), detached.
        scale: the LoRA scale s, a Python number.
        impl: ``"eager"``, ``"triton"`` or ``"auto"`` (the plan of op ``compose_train``, from ``planner``).
        config: launch configs for ``impl="triton"`` (default :data:`DEFAULT_COMPOSE_TRAIN_CONFIG`).
        planner: what answers ``impl="auto"`` (:class:`~dora_tune.kernels._common.Planner`); the public
            :func:`dora_tune.kernels.dora_compose_train` (the front door, :mod:`dora_tune.auto`) passes the
            dispatcher's.

    Returns:
        Tensor of ``base``'s shape and dtype, differentiable with respect to ``lora``, ``base`` and ``magnitude``.
    """
    check_scale_inputs(magnitude, norm)
    s = check_compose_inputs(lora, base, magnitude, scale)  # magnitude in g's place: [cols] on base's device

    def race() -> Callable[[Any], Any]:  # g's values do not change the kernels' time: the torch formula
        return race_step(lora, base, _dora_scale(magnitude.detach(), norm), s)

    impl, config = resolve_impl("compose_train", base, impl, config, race, planner)
    if impl != "triton":  # eager: the composition as written
        return compose_train(lora, base, _dora_scale(magnitude, norm), s, impl=impl, config=config)
    require_triton(base.device)
    if config is not None and not isinstance(config, ComposeTrainConfig):
        raise TypeError(f"config must be a ComposeTrainConfig, got {type(config).__name__}")
    return _DoraComposeTrainFn.apply(lora, base, magnitude, norm.detach(), s, config or DEFAULT_COMPOSE_TRAIN_CONFIG)


# ----------------------------------------------------------------------------------------------- the op's spec


def _train_space(shape: dict[str, int]) -> list[dict]:
    # Stage 1 of the coordinate sweep: every forward config with the default backward (the profiler adds stage 2,
    # the backward configs with the best forward, once stage 1 is measured).
    default_bwd = DEFAULT_COMPOSE_TRAIN_CONFIG.bwd.as_dict()
    return [{"fwd": f.as_dict(), "bwd": default_bwd} for f in compose_config_space()]


def _train_runner(name: str, x: dict[str, Any], cfg: ComposeTrainConfig | None) -> Callable[[], Any]:
    leaves, dout = x["leaves"], x["dout"]

    def step() -> Any:
        out = compose_train(*leaves, x["s"], impl=name, config=cfg)
        return torch.autograd.grad(out, leaves, dout)

    return step


def _train_inputs(shape: dict[str, int], rnd: Any) -> dict[str, Any]:
    out = compose_inputs(shape, rnd)
    out["dout"] = rnd(shape["rows"], shape["cols"])
    out["leaves"] = [out[k].clone().requires_grad_() for k in ("lora", "base", "g")]
    return out


#: compose_train's facts, configs, implementations, runner and inputs (:data:`dora_tune.kernels.OP_SPECS`)
COMPOSE_TRAIN_SPEC = OpSpec(
    ops.COMPOSE_TRAIN,
    ComposeTrainConfig,
    DEFAULT_COMPOSE_TRAIN_CONFIG,
    impls=(
        ImplSpec("eager", ANY_DEVICE, (FORMULA_SOURCE,), selfcheck_tol=EAGER_TOL),
        ImplSpec(
            "triton",
            CUDA_ONLY,
            ("dora_tune.kernels._compose_triton", "dora_tune.kernels.compose_train:_ComposeTrainFn"),
            _train_space,
            ComposeTrainConfig.from_dict,
            selfcheck_tol=FUSED_TOL,
        ),
    ),
    runner=_train_runner,
    inputs=_train_inputs,
)
