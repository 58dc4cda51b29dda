"""Each op's :class:`OpSpec`: its torch-free facts (:mod:`dora_tune.ops`) with what needs torch — the config
class, the default config, its implementations (:class:`ImplSpec`: devices, the sources their version hashes, the
config space to sweep), how to run it once and how to make inputs for it — as its kernel module declares it
(``NORM_SPEC`` in :mod:`~dora_tune.kernels.norm`, ``COMPOSE_SPEC``, ``COMPOSE_TRAIN_SPEC``,
``DORA_LINEAR_SPEC``);
:mod:`~dora_tune.kernels.catalog` (``dora_tune.kernels.OP_SPECS``) collects them. The registry of the profiler and
the planner (:mod:`dora_tune.dispatch.registry`) is a read of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from dora_tune.ops import OpFacts

#: the devices an implementation runs on: torch ones anywhere, Triton ones on CUDA
ANY_DEVICE, CUDA_ONLY = ("cuda", "cpu"), ("cuda",)


def no_configs(shape: dict[str, int]) -> list[dict]:
    """The config space of an implementation that takes no config: one empty config."""
    return [{}]


def no_config(data: dict) -> None:
    """The config parser of an implementation that takes no config: only ``{}``."""
    if data:
        raise ValueError(f"this implementation takes no config, got {data!r}")
    return None


@dataclasses.dataclass(frozen=True)
class ImplSpec:
    """One implementation of an op, as the profiler and the planner see it.

    Attributes:
        name: as the op's ``impl=`` takes it.
        devices: the device types it runs on.
        sources: what its version hashes — ``"module"`` (the whole file) or ``"module:qualname"`` — so that a change
            of what computes it makes its stored measurements stale, and nothing else does.
        space: the config dicts to sweep at a shape (``[{}]`` when it takes no config).
        parse_config: a config dict → the validated config object (None when it takes no config).
        space_keys: the shape keys ``space`` depends on.
        selfcheck_tol: the self-check's relative-error bound against float64, per dtype name.
    """

    name: str
    devices: tuple[str, ...]
    sources: tuple[str, ...]
    space: Callable[[dict[str, int]], list[dict]] = no_configs
    parse_config: Callable[[dict], Any] = no_config
    space_keys: tuple[str, ...] = ()
    selfcheck_tol: dict[str, float] = dataclasses.field(default_factory=dict)

    def tolerance(self, dtype: str) -> float:
        """The self-check's relative-error bound against float64 at ``dtype`` (``dora-tune selfcheck``)."""
        return self.selfcheck_tol[dtype]


#: relative-error bounds against float64 of the self-check, per dtype: fp32 accumulation everywhere; the norm's
#: implementations compute in float32 from the weights, a fused compose rounds its output once, a torch compose
#: rounds in the working dtype after every op
NORM_TOL = {"bf16": 1e-5, "fp16": 1e-5, "fp32": 1e-5}
FUSED_TOL = {"bf16": 8e-3, "fp16": 1e-3, "fp32": 1e-5}
EAGER_TOL = {"bf16": 3e-2, "fp16": 4e-3, "fp32": 1e-5}


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op: its :class:`~dora_tune.ops.OpFacts`, its Triton config class and default config, its
    implementations, ``runner(impl, inputs, config)`` → a zero-argument callable running it once (forward and
    backward for a training op), and ``inputs(shape, rnd)`` → the inputs ``runner`` takes, made with
    ``rnd(*size, scale=…)`` (random, never zero, in the trial's dtype, scaled like real DoRA tensors).

    ``crossover_choice(dims)`` is the paper's fixed crossover as a plan: ``(implementation, config or None)``."""

    facts: OpFacts
    config_class: type
    default_config: Any
    impls: tuple[ImplSpec, ...]
    runner: Callable[[str, dict[str, Any], Any], Callable[[], Any]]
    inputs: Callable[[dict[str, int], Callable[..., Any]], dict[str, Any]]

    def impl(self, name: str) -> ImplSpec:
        """The implementation called ``name``."""
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise ValueError(f"{self.name} has no implementation {name!r}; it has {[i.name for i in self.impls]}")

    @property
    def name(self) -> str:
        """The op's name (its facts')."""
        return self.facts.name

    def crossover_choice(self, dims: tuple[int, ...]) -> tuple[str, Any]:
        """``(the Triton implementation, the default config)`` or ``(the torch implementation, None)`` at ``dims``,
        by the fixed rule."""
        impl = self.facts.crossover(dims)
        return (impl, self.default_config) if impl == self.facts.triton_impl else (self.facts.torch_impl, None)
