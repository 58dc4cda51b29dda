"""Each op's :class:`OpSpec`: its torch-free facts (:mod:`dora_tune.ops`) with what needs torch — the config
class and the default config — as its kernel module declares it (``NORM_SPEC`` in :mod:`~dora_tune.kernels.norm`,
``COMPOSE_SPEC``, ``COMPOSE_TRAIN_SPEC``); :func:`op_specs` (``dora_tune.kernels.OP_SPECS``) collects them."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from dora_tune.ops import OpFacts


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op: its :class:`~dora_tune.ops.OpFacts`, its Triton config class and default config.

    ``crossover_choice(dims)`` is the paper's fixed crossover as a plan: ``(implementation, config or None)``."""

    facts: OpFacts
    config_class: type
    default_config: Any

    @property
    def name(self) -> str:
        """The op's name (its facts')."""
        return self.facts.name

    def crossover_choice(self, dims: tuple[int, ...]) -> tuple[str, Any]:
        """``("triton", the default config)`` or ``(the torch implementation, None)`` at ``dims``, by the fixed rule."""
        impl = self.facts.crossover(dims)
        return (impl, self.default_config) if impl == "triton" else (self.facts.torch_impl, None)


@functools.cache
def op_specs() -> dict[str, OpSpec]:
    """Every op's spec, by name, in the order of :data:`dora_tune.ops.OPS` (``dora_tune.kernels.OP_SPECS``)."""
    from dora_tune.kernels.compose import COMPOSE_SPEC
    from dora_tune.kernels.compose_train import COMPOSE_TRAIN_SPEC
    from dora_tune.kernels.norm import NORM_SPEC

    return {spec.name: spec for spec in (NORM_SPEC, COMPOSE_SPEC, COMPOSE_TRAIN_SPEC)}
