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
whose one switch is ``DORA_TUNE_LEAN_LAUNCH=0``); this package opens no database and picks no configs by itself.

Imports point one way: no module of this package imports :mod:`dora_tune.dispatch`, :mod:`dora_tune.tuning` or
:mod:`dora_tune.nn`. A kernel function's ``impl="auto"`` asks the planner it is handed (``planner=``,
:class:`~dora_tune.kernels._common.Planner`); the public functions that plan — :func:`factored_norm`,
:func:`compose`, :func:`compose_train`, :func:`dora_compose_train`, :func:`dora_layer` — are the front door's
(:mod:`dora_tune.auto`: the dispatcher's plan, then these kernels), the same objects, resolved on first access by
this module's ``__getattr__``; importing this package imports neither the front door nor the dispatcher.

Each op's facts: :data:`OP_SPECS` (:class:`OpSpec`: the torch-free :class:`~dora_tune.ops.OpFacts` with the config
class and the default config, declared next to each op's kernels); the dtypes every op takes: :data:`DTYPES`.
"""

from typing import Any

from dora_tune.kernels._common import DTYPES
from dora_tune.kernels.catalog import OP_SPECS
from dora_tune.kernels.compose import (
    DEFAULT_COMPOSE_CONFIG,
    ComposeConfig,
    compose_config_space,
    compose_reference,
    dora_scale,
)
from dora_tune.kernels.compose_train import (
    DEFAULT_COMPOSE_TRAIN_CONFIG,
    ComposeBwdConfig,
    ComposeTrainConfig,
    compose_bwd_config_space,
    compose_train_config_space,
)
from dora_tune.kernels.dora_layer import dora_layer_reference
from dora_tune.kernels.dora_linear import (
    DEFAULT_DORA_LINEAR_CONFIG,
    DEFAULT_FOLDED_CONFIG,
    DoraLinearConfig,
    FoldedConfig,
    dora_linear_reference,
    dora_linear_tuning_space,
    folded_tuning_space,
)
from dora_tune.kernels.norm import (
    DEFAULT_NORM_CONFIG,
    NormConfig,
    norm_config_space,
    norm_reference,
    norm_tuning_space,
)
from dora_tune.kernels.spec import OpSpec

#: the public functions that plan (``impl="auto"``): the front door's, :mod:`dora_tune.auto`
_FRONT_DOOR = ("compose", "compose_train", "dora_compose_train", "dora_layer", "dora_linear", "factored_norm")
# four of them are named like this package's modules, which importing them bound here: the names are the functions
# (as they always were; the modules stay importable by their full names)
for _name in _FRONT_DOOR:
    globals().pop(_name, None)
del _name


def __getattr__(name: str) -> Any:
    if name not in _FRONT_DOOR:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import dora_tune.auto

    value = globals()[name] = getattr(dora_tune.auto, name)  # once: later reads are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FRONT_DOOR))


__all__ = [
    "DEFAULT_COMPOSE_CONFIG",
    "DEFAULT_COMPOSE_TRAIN_CONFIG",
    "DEFAULT_DORA_LINEAR_CONFIG",
    "DEFAULT_FOLDED_CONFIG",
    "DEFAULT_NORM_CONFIG",
    "DTYPES",
    "OP_SPECS",
    "ComposeBwdConfig",
    "ComposeConfig",
    "ComposeTrainConfig",
    "DoraLinearConfig",
    "FoldedConfig",
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
    "dora_linear",
    "dora_linear_reference",
    "dora_linear_tuning_space",
    "dora_scale",
    "factored_norm",
    "folded_tuning_space",
    "norm_config_space",
    "norm_reference",
    "norm_tuning_space",
]
