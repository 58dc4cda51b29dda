"""Every op's :class:`~dora_tune.kernels.spec.OpSpec`, by name, in the order of :data:`dora_tune.ops.OPS`: the
``*_SPEC`` each op's module declares next to its kernels, collected (also ``dora_tune.kernels.OP_SPECS``). The layers
above read the specs from here: the registry of versions (:mod:`dora_tune.dispatch.registry`), default configs, the
profiler's inputs and runners."""

from __future__ import annotations

from dora_tune.kernels.compose import COMPOSE_SPEC
from dora_tune.kernels.compose_train import COMPOSE_TRAIN_SPEC
from dora_tune.kernels.dora_linear import DORA_LINEAR_SPEC
from dora_tune.kernels.norm import NORM_SPEC
from dora_tune.kernels.spec import OpSpec

#: every op's spec, by name (the order of :data:`dora_tune.ops.OPS`)
OP_SPECS: dict[str, OpSpec] = {
    spec.name: spec for spec in (NORM_SPEC, COMPOSE_SPEC, COMPOSE_TRAIN_SPEC, DORA_LINEAR_SPEC)
}
