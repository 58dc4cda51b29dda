"""The ``impl="auto"`` front door: plan with :mod:`dora_tune.dispatch`, then run :mod:`dora_tune.kernels`.

The kernels import nothing above them: a kernel function that takes ``impl="auto"`` asks the planner it is handed
(its ``planner`` argument, :class:`~dora_tune.kernels._common.Planner`). This package is the one place that hands
them the dispatcher's (the hooks of :mod:`dora_tune.dispatch.runtime`: ``auto``, ``auto_failed``, ``auto_path``) and
that, while ``torch.compile`` traces, routes the ops to their custom ops (:mod:`dora_tune.auto.custom_ops`, planned
when they run). Imports point one way: this package → dispatch → kernels.

Its functions are the public ones of :mod:`dora_tune.kernels`, with the same signatures: ``dora_tune.kernels.compose``
is :func:`compose` here, resolved on first access by that package's ``__getattr__`` (the one reference from the
kernels package up to here, lazy: importing ``dora_tune.kernels`` imports neither this package nor the dispatcher).
The layers above (:mod:`dora_tune.nn`, :mod:`dora_tune.integrations.peft`) call them here.
"""

from __future__ import annotations

import torch
from torch.compiler import is_compiling

from dora_tune.auto.custom_ops import compose_op, compose_train_op, dora_linear_op, factored_norm_op
from dora_tune.dispatch import runtime

# the kernel functions by their modules (the package's names of these functions are this package's)
from dora_tune.kernels.compose import ComposeConfig, _dora_scale, check_compose_inputs, check_scale_inputs
from dora_tune.kernels.compose import compose as _compose
from dora_tune.kernels.compose_train import ComposeTrainConfig
from dora_tune.kernels.compose_train import compose_train as _compose_train
from dora_tune.kernels.compose_train import dora_compose_train as _dora_compose_train
from dora_tune.kernels.dora_layer import dora_layer as _dora_layer
from dora_tune.kernels.dora_layer import dora_layer_unchecked as _dora_layer_unchecked
from dora_tune.kernels.dora_linear import DoraLinearConfig, FoldedConfig, fused_layer_route
from dora_tune.kernels.dora_linear import dora_linear as _dora_linear
from dora_tune.kernels.norm import NormConfig, _check_norm_inputs
from dora_tune.kernels.norm import factored_norm as _factored_norm

__all__ = [
    "compose",
    "compose_train",
    "dora_compose_train",
    "dora_layer",
    "dora_layer_unchecked",
    "dora_linear",
    "factored_norm",
]


def factored_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
    config: NormConfig | None = None,
) -> torch.Tensor:
    """Row norm of ``W + scale·B·A``, never building ``B·A`` (except ``impl="dense"``): float32 ``[d_out]``, no
    gradient. Arguments as :func:`dora_tune.kernels.norm.factored_norm`; ``impl="auto"`` (the default) runs the
    dispatcher's plan. Under ``torch.compile``: one opaque custom op (``dora_tune::factored_norm``), planned when it
    runs."""
    if is_compiling():
        s = _check_norm_inputs(weight, lora_A, lora_B, scale)
        return factored_norm_op(weight, lora_A, lora_B, s, impl, config)
    return _factored_norm(weight, lora_A, lora_B, scale, impl=impl, config=config, planner=runtime)


def compose(
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
    config: ComposeConfig | None = None,
) -> torch.Tensor:
    """``(g−1)·base + g·(scale·lora)`` without autograd. Arguments as :func:`dora_tune.kernels.compose.compose`;
    ``impl="auto"`` (the default) runs the dispatcher's plan. Under ``torch.compile``: one opaque custom op
    (``dora_tune::compose``), planned when it runs."""
    if is_compiling():
        s = check_compose_inputs(lora, base, g, scale)
        return compose_op(lora, base, g, s, impl, config)
    return _compose(lora, base, g, scale, impl=impl, config=config, planner=runtime)


def compose_train(
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
    config: ComposeTrainConfig | None = None,
) -> torch.Tensor:
    """``(g−1)·base + g·(scale·lora)`` with autograd. Arguments as
    :func:`dora_tune.kernels.compose_train.compose_train`; ``impl="auto"`` (the default) runs the dispatcher's plan,
    racing a model plan's shortlist on these inputs at first use. Under ``torch.compile``: one opaque custom op with
    its autograd formula (``dora_tune::compose_train_fwd``), planned when it runs."""
    if is_compiling():
        s = check_compose_inputs(lora, base, g, scale)
        return compose_train_op(lora, base, g, s, impl, config)
    return _compose_train(lora, base, g, scale, impl=impl, config=config, planner=runtime)


def dora_compose_train(
    lora: torch.Tensor,
    base: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
    config: ComposeTrainConfig | None = None,
) -> torch.Tensor:
    """The DoRA delta for training, ``compose_train(lora, base, dora_scale(magnitude, norm), scale)``, with ``g``
    formed inside one autograd node on the Triton path. Arguments as
    :func:`dora_tune.kernels.compose_train.dora_compose_train`; ``impl="auto"`` (the default) runs the dispatcher's
    plan of op ``compose_train``. Under ``torch.compile``: the composition as written, its compose the custom op."""
    if is_compiling():
        check_scale_inputs(magnitude, norm)
        s = check_compose_inputs(lora, base, magnitude, scale)
        return compose_train(lora, base, _dora_scale(magnitude, norm), s, impl=impl, config=config)
    return _dora_compose_train(lora, base, magnitude, norm, scale, impl=impl, config=config, planner=runtime)


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
) -> torch.Tensor:
    """A DoRA layer's adapter (LoRA GEMMs, scale, compose) in one autograd node or a few torch ops. Arguments as
    :func:`dora_tune.kernels.dora_layer.dora_layer`; ``impl="auto"`` (the default) takes the path the dispatcher's
    first-use race found cheaper for the step, with the plan's config."""
    return _dora_layer(
        x,
        weight,
        lora_A,
        lora_B,
        magnitude,
        norm,
        scale,
        bias=bias,
        base_result=base_result,
        base_includes_bias=base_includes_bias,
        output=output,
        impl=impl,
        config=config,
        planner=runtime,
    )


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
) -> torch.Tensor:
    """A whole DoRA ``Linear``, ``g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias``, differentiable. Arguments as
    :func:`dora_tune.kernels.dora_linear.dora_linear`; ``impl="auto"`` (the default) runs the dispatcher's plan of op
    ``dora_linear`` (composed, fused or folded, and its config), racing a model plan's shortlist on these inputs at
    first use."""
    return _dora_linear(
        x, weight, bias, lora_A, lora_B, magnitude, norm, scale, impl=impl, config=config, planner=runtime
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
) -> torch.Tensor:
    """:func:`dora_layer` without the argument checks, for layers that validated their tensors once (see
    :func:`dora_tune.kernels.dora_layer.dora_layer_unchecked`); ``impl="auto"`` planned by the dispatcher. Under
    ``torch.compile`` with ``DORA_TUNE_FUSED_LINEAR=1``, a full-output layer computing its base output (frozen
    weight, one dtype) is the fused DoRA linear as one custom op (``dora_tune::dora_linear_fwd``)."""
    if is_compiling() and impl == "auto" and fused_layer_route(x, weight, bias, lora_A, lora_B, base_result, full):
        return dora_linear_op(x, weight, bias, lora_A, lora_B, magnitude, norm, scale)
    return _dora_layer_unchecked(
        x, weight, lora_A, lora_B, magnitude, norm, scale, bias, base_result, sub_bias, full, impl, config, runtime
    )
