"""DoRA kernels: each op has a PyTorch reference, torch and Triton implementations, launch configs and a config space.

Public ops (the contract later layers build on):

- :func:`factored_norm` — row norm of ``W + s·B·A`` (float32 ``[d_out]``), never building ``B·A``.
- :func:`compose` — ``(g−1)·base + g·(s·lora)`` without autograd.
- :func:`compose_train` — the same with autograd (fused forward/backward in Triton).
- :func:`dora_scale` — ``g = m / n`` with the zero-norm policy (``g = 1`` where ``n = 0``).
- :func:`dora_compose_train` — ``compose_train`` with ``g = dora_scale(m, n)`` formed inside its one autograd node.
- :func:`dora_layer` — a DoRA layer's adapter (LoRA GEMMs, scale, compose) as one autograd node or a few torch ops,
  whichever the dispatcher's first-use race found cheaper for the step.

Triton kernels are imported only when a Triton implementation runs (through :func:`~dora_tune.kernels._launch.lean`,
whose one switch is ``DORA_TUNE_LEAN_LAUNCH=0``); this package opens no database and picks no configs by itself
(``impl="auto"`` asks :mod:`dora_tune.dispatch`).

Each op's facts: :data:`OP_SPECS` (:class:`OpSpec`: the torch-free :class:`~dora_tune.ops.OpFacts` with the config
class and the default config, declared next to each op's kernels); the dtypes every op takes: :data:`DTYPES`.
"""

from dora_tune.kernels._common import DTYPES
from dora_tune.kernels.compose import (
    DEFAULT_COMPOSE_CONFIG,
    ComposeConfig,
    compose,
    compose_config_space,
    compose_reference,
    dora_scale,
)
from dora_tune.kernels.compose_train import (
    DEFAULT_COMPOSE_TRAIN_CONFIG,
    ComposeBwdConfig,
    ComposeTrainConfig,
    compose_bwd_config_space,
    compose_train,
    compose_train_config_space,
    dora_compose_train,
)
from dora_tune.kernels.dora_layer import dora_layer, dora_layer_reference
from dora_tune.kernels.norm import (
    DEFAULT_NORM_CONFIG,
    NormConfig,
    factored_norm,
    norm_config_space,
    norm_reference,
    norm_tuning_space,
)
from dora_tune.kernels.spec import OpSpec, op_specs

#: every op's :class:`OpSpec`, by name (the order of :data:`dora_tune.ops.OPS`)
OP_SPECS: dict[str, OpSpec] = op_specs()

__all__ = [
    "DEFAULT_COMPOSE_CONFIG",
    "DEFAULT_COMPOSE_TRAIN_CONFIG",
    "DEFAULT_NORM_CONFIG",
    "DTYPES",
    "OP_SPECS",
    "ComposeBwdConfig",
    "ComposeConfig",
    "ComposeTrainConfig",
    "NormConfig",
    "OpSpec",
    "compose",
    "compose_bwd_config_space",
    "compose_config_space",
    "compose_reference",
    "compose_train",
    "compose_train_config_space",
    "dora_compose_train",
    "dora_layer",
    "dora_layer_reference",
    "dora_scale",
    "factored_norm",
    "norm_config_space",
    "norm_reference",
    "norm_tuning_space",
]
