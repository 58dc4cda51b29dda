"""DoRA compose: ``delta = (g−1)·base + g·(s·lora)`` (forward only, no autograd).

``base = x·Wᵀ`` comes from the (frozen) base layer and ``lora = (x·Aᵀ)·Bᵀ`` from the adapter; adding ``delta`` to
``base`` gives the DoRA output ``g ⊙ (base + s·lora)``. The stable form above avoids the cancellation of
``g·(s·lora + base) − base`` near ``g ≈ 1`` (DESIGN.md §1).

Shapes: ``lora`` and ``base`` are ``[..., cols]`` (leading dims flatten into rows) with one dtype; ``g`` is
``[cols]`` or ``[1, cols]`` in any supported float dtype. The result has ``base``'s shape and dtype.

Zero-norm policy: ``g`` comes from :func:`dora_scale`, which maps rows of ``W + s·B·A`` whose norm is 0 to
``g = 1`` (the layer's output for that row is 0 whatever ``g`` is; ``g = 1`` keeps every term finite), so a zero
row never turns into NaN here or in the gradients.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import torch

from dora_tune import ops
from dora_tune.kernels._common import (
    KernelConfig,
    Planner,
    as_rows,
    check_same_device,
    check_scale,
    check_tensor,
    config_field,
    need_planner,
    require_triton,
)
from dora_tune.kernels.spec import ANY_DEVICE, CUDA_ONLY, EAGER_TOL, FUSED_TOL, ImplSpec, OpSpec

IMPLS: tuple[str, ...] = ops.COMPOSE.impls


@dataclasses.dataclass(frozen=True)
class ComposeConfig(KernelConfig):
    """Launch config of the compose forward kernel: a ``block_r × block_c`` tile per program."""

    op = "compose"
    block_r: int = config_field(lo=1, hi=256)
    block_c: int = config_field(lo=16, hi=8192)
    num_warps: int = config_field(lo=1, hi=16)


DEFAULT_COMPOSE_CONFIG = ComposeConfig(block_r=8, block_c=512, num_warps=4)


def compose_config_space() -> list[ComposeConfig]:
    """Every forward config worth trying: tiles of 1–16 K elements, 8–64 elements a thread."""
    out = []
    for br, bc, w in itertools.product((1, 2, 4, 8, 16, 32), (128, 256, 512, 1024, 2048, 4096), (2, 4, 8, 16)):
        elems = br * bc
        if 1024 <= elems <= 16384 and 8 <= elems // (32 * w) <= 64:
            out.append(ComposeConfig(block_r=br, block_c=bc, num_warps=w))
    return out


def compose_formula(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """The one torch expression of the compose, broadcasting ``g`` over rows (used by eager and the reference)."""
    return (g - 1) * base + g * (scale * lora)


def compose_reference(
    lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """:func:`compose_formula` evaluated in ``dtype`` (float64 for tests); result in ``dtype``."""
    return compose_formula(lora.to(dtype), base.to(dtype), g.reshape(-1).to(dtype), scale)


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``g = m / n`` in float32 with the zero-norm policy: where ``n == 0``, ``g = 1``.

    Args:
        magnitude: ``[d_out]`` DoRA magnitude vector m (any float dtype).
        norm: ``[d_out]`` row norms n of ``W + s·B·A`` (e.g. from :func:`factored_norm`); treated as a constant.

    Returns:
        ``[d_out]`` float32 ``g``; differentiable with respect to ``magnitude`` only.
    """
    check_scale_inputs(magnitude, norm)
    return _dora_scale(magnitude, norm)


def check_scale_inputs(magnitude: object, norm: object) -> None:
    """Validate :func:`dora_scale`'s arguments: 1-D float tensors of one shape on one device."""
    check_tensor("magnitude", magnitude, ndim=1)
    check_tensor("norm", norm, ndim=1)
    check_same_device(magnitude=magnitude, norm=norm)
    if magnitude.shape != norm.shape:
        raise ValueError(f"magnitude {tuple(magnitude.shape)} and norm {tuple(norm.shape)} must have one shape")


def _dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """:func:`dora_scale`'s formula on inputs already checked (the fused training node's hot path)."""
    n = norm.detach().float()
    ok = n > 0
    return torch.where(ok, magnitude.float() / torch.where(ok, n, 1.0), 1.0)


def dora_scale_backward(grad_g: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``∂L/∂m`` from ``∂L/∂g`` for ``g = dora_scale(m, n)``: ``grad_g / n`` where ``n > 0``, else 0 (there
    ``g = 1`` does not depend on ``m``). What autograd computes through :func:`dora_scale`, as float32 ``[d_out]``."""
    n = norm.detach().float()
    ok = n > 0
    return torch.where(ok, grad_g.float() / torch.where(ok, n, 1.0), 0.0)


def check_compose_inputs(lora: object, base: object, g: object, scale: object) -> float:
    """Validate compose arguments (``TypeError``/``ValueError`` naming the argument); return ``scale`` as float.

    Checks only: no views are made here (views of tensors that require grad cost an autograd node each).
    """
    check_tensor("lora", lora)
    check_tensor("base", base)
    check_tensor("g", g)
    check_same_device(base=base, lora=lora, g=g)
    if lora.shape != base.shape:
        raise ValueError(f"lora {tuple(lora.shape)} and base {tuple(base.shape)} must have one shape")
    if lora.dtype != base.dtype:
        raise TypeError(f"lora and base must share a dtype, got {lora.dtype} and {base.dtype}")
    cols = base.shape[-1]
    if not (g.dim() == 1 or (g.dim() == 2 and g.shape[0] == 1)) or g.shape[-1] != cols:
        raise ValueError(f"g must be [cols] or [1, cols] with cols={cols}, got {tuple(g.shape)}")
    return check_scale(scale)


def resolve_impl(
    op: str,
    base: torch.Tensor,
    impl: str,
    config: Any,
    race: Callable[[], Callable[[Any], Any]] | None = None,
    planner: Planner | None = None,
) -> tuple[str, Any]:
    """``(impl, config)`` of a compose-family call: ``impl="auto"`` asks ``planner`` (the dispatcher's hooks, from
    the front door) for ``op`` at ``base``'s rows × cols, dtype and device (the caller's own ``config`` wins over the
    plan's); anything else passes through.

    ``race``: for ops that race a model plan's shortlist at first use, a factory of the runner the dispatcher times
    (:meth:`~dora_tune.dispatch.runtime.Dispatcher.settle`; called only when a race is due)."""
    if impl != "auto":
        return impl, config
    auto = need_planner(op, planner).auto
    cols = base.shape[-1]
    race = race if config is None and base.numel() else None
    chosen = auto(op, (base.numel() // max(cols, 1), cols), base.dtype, base.device, race)
    return chosen.impl, config or chosen.config


def g_vector(g: torch.Tensor) -> torch.Tensor:
    """``g`` as a contiguous ``[cols]`` vector (a view when it already is one)."""
    return g if (g.dim() == 1 and g.is_contiguous()) else g.reshape(-1).contiguous()


def compose(
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
    config: ComposeConfig | None = None,
    planner: Planner | None = None,
) -> torch.Tensor:
    """``(g−1)·base + g·(scale·lora)`` without autograd.

    Args:
        lora: ``[..., cols]`` LoRA branch output ``(x·Aᵀ)·Bᵀ`` (unscaled).
        base: ``[..., cols]`` base layer output ``x·Wᵀ``, same dtype as ``lora``.
        g: ``[cols]`` or ``[1, cols]`` DoRA scale ``m / ‖W + s·B·A‖`` (see :func:`dora_scale`).
        scale: the LoRA scale s, a Python number.
        impl: ``"eager"``, ``"triton"`` or ``"auto"`` (chosen by ``planner``).
        config: launch config for ``impl="triton"`` (default :data:`DEFAULT_COMPOSE_CONFIG`).
        planner: what answers ``impl="auto"`` (:class:`~dora_tune.kernels._common.Planner`); the public
            :func:`dora_tune.kernels.compose` (the front door, :mod:`dora_tune.auto`) passes the dispatcher's.

    Returns:
        Tensor of ``base``'s shape and dtype. Eager computes in that dtype; Triton in float32, rounded once.
    """
    s = check_compose_inputs(lora, base, g, scale)
    impl, config = resolve_impl("compose", base, impl, config, planner=planner)
    with torch.no_grad():
        if impl == "eager":
            return compose_formula(lora, base, g_vector(g).to(base.dtype), s)
        if impl == "triton":
            require_triton(base.device)
            if config is not None and not isinstance(config, ComposeConfig):
                raise TypeError(f"config must be a ComposeConfig, got {type(config).__name__}")
            from dora_tune.kernels._compose_triton import compose_fwd_triton

            out, _ = compose_fwd_triton(
                as_rows("lora", lora), as_rows("base", base), g_vector(g), s, config or DEFAULT_COMPOSE_CONFIG
            )
            return out if base.dim() == 2 else out.view(base.shape)
    raise ValueError(f"impl must be one of {IMPLS} or 'auto', got {impl!r}")


# ----------------------------------------------------------------------------------------------- the op's spec


def _compose_runner(name: str, x: dict[str, Any], cfg: ComposeConfig | None) -> Any:
    return lambda: compose(x["lora"], x["base"], x["g"], x["s"], impl=name, config=cfg)


def compose_inputs(shape: dict[str, int], rnd: Any) -> dict[str, Any]:
    """Inputs of the compose ops at ``{"rows", "cols"}``: lora, base ``[rows, cols]``, ``g ≈ 1`` ``[cols]``, s."""
    rows, cols = shape["rows"], shape["cols"]
    return {"lora": rnd(rows, cols), "base": rnd(rows, cols), "g": 1 + rnd(cols, scale=0.01), "s": 0.5}


#: where compose_formula lives (the version source of every torch compose)
FORMULA_SOURCE = "dora_tune.kernels.compose:compose_formula"
#: compose's facts, configs, implementations, runner and inputs (:data:`dora_tune.kernels.OP_SPECS`)
COMPOSE_SPEC = OpSpec(
    ops.COMPOSE,
    ComposeConfig,
    DEFAULT_COMPOSE_CONFIG,
    impls=(
        ImplSpec("eager", ANY_DEVICE, (FORMULA_SOURCE,), selfcheck_tol=EAGER_TOL),
        ImplSpec(
            "triton",
            CUDA_ONLY,
            ("dora_tune.kernels._compose_triton",),
            lambda shape: [c.as_dict() for c in compose_config_space()],
            ComposeConfig.from_dict,
            selfcheck_tol=FUSED_TOL,
        ),
    ),
    runner=_compose_runner,
    inputs=compose_inputs,
)
