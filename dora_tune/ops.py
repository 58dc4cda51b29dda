"""The facts of each op that the dispatch and tuning layers need, written once (:class:`OpFacts`); torch-free.

The kernels of an op live in its module (:mod:`~dora_tune.kernels.norm`, :mod:`~dora_tune.kernels.compose`,
:mod:`~dora_tune.kernels.compose_train`), which adds what needs torch — the config class, the default config — in
its ``*_SPEC`` (:class:`~dora_tune.kernels.OpSpec`). What needs no torch is here, so that the modules that plan from
stored decision tables stay torch-free: each op's shape keys, its implementations and the torch one, the paper's
fixed crossover (its rule and its text), and whether the dispatcher races a shortlist at first use. Every table of
these facts elsewhere (``OP_SHAPE_KEYS``, ``RACE_OPS``, the crossover of the planner and of the cost model, the
custom ops' implementation lists) is a read of :data:`OPS`; an op is added by adding its facts here and its spec
next to its kernels. This module imports nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

#: the dtype names plans, databases and the CLI use, in order (the torch dtypes: ``dora_tune.kernels.DTYPES``)
DTYPE_NAMES: tuple[str, ...] = ("bf16", "fp16", "fp32")

#: the paper's fixed crossover for the training compose: fused iff cols ≥ this and rows·cols ≥ the next
CROSSOVER_TRAIN_MIN_COLS = 2048
CROSSOVER_TRAIN_MIN_ELEMS = 2048 * 6144


@dataclasses.dataclass(frozen=True)
class OpFacts:
    """What the rest of dora-tune knows about one op without importing torch.

    Attributes:
        name: the op's name in plans, databases and the CLI.
        shape_keys: the keys of a shape dict, in the order plans and decision tables key its dims.
        impls: the implementation names its ``impl=`` takes (besides ``"auto"``).
        torch_impl: the implementation that needs no Triton (a CPU's, and the fallback of every plan).
        crossover: the paper's fixed rule: dims in ``shape_keys`` order → the implementation it runs on a CUDA GPU
            with Triton (with the default config when that is ``"triton"``).
        crossover_text: that rule in words (plan details, ``dora-tune lookup``).
        race: how many configs of a decision-table cell's shortlist the dispatcher times at first use (0: none).
        race_per_cell: that race is run once per decision-table cell, its winner shared by the cell's shapes (ops whose
            shapes follow the token count, which may change every step), not once per shape.
    """

    name: str
    shape_keys: tuple[str, ...]
    impls: tuple[str, ...]
    torch_impl: str
    crossover: Callable[[tuple[int, ...]], str]
    crossover_text: str
    race: int = 0
    race_per_cell: bool = False


def _always_triton(dims: tuple[int, ...]) -> str:
    return "triton"


def _train_crossover(dims: tuple[int, ...]) -> str:
    rows, cols = dims
    return "triton" if cols >= CROSSOVER_TRAIN_MIN_COLS and rows * cols >= CROSSOVER_TRAIN_MIN_ELEMS else "eager"


#: the norm: raced once per weight shape (fixed for a whole run) — its call is a pure function of tensors the call
#: already has, and its config landscape has cliffs between split-K values that the cost model ranks within ~2 % of
#: each other (benchmarks/NOTES.md, "Race")
NORM = OpFacts(
    name="norm",
    shape_keys=("d_out", "d_in", "r"),
    impls=("dense", "factored_torch", "triton"),
    torch_impl="factored_torch",
    crossover=_always_triton,
    crossover_text="fixed rule: fused norm whenever Triton and CUDA are available",
    race=3,
)

COMPOSE = OpFacts(
    name="compose",
    shape_keys=("rows", "cols"),
    impls=("eager", "triton"),
    torch_impl="eager",
    crossover=_always_triton,
    crossover_text="fixed crossover: fused forward whenever Triton and CUDA are available",
)

#: the training compose: its forward × backward configs lie within a few per cent of each other at most shapes, more
#: than the model resolves; its shapes follow the token count, so one race serves a whole decision-table cell
COMPOSE_TRAIN = OpFacts(
    name="compose_train",
    shape_keys=("rows", "cols"),
    impls=("eager", "triton"),
    torch_impl="eager",
    crossover=_train_crossover,
    crossover_text="fixed crossover: fused backward iff cols ≥ 2048 and rows·cols ≥ 2048·6144",
    race=3,
    race_per_cell=True,
)

#: every op's facts, by name, in the order of the profiler, the CLI and the decision tables
OPS: dict[str, OpFacts] = {facts.name: facts for facts in (NORM, COMPOSE, COMPOSE_TRAIN)}
