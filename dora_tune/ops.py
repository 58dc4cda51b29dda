"""The facts of each op that the dispatch and tuning layers need, written once (:class:`OpFacts`); torch-free.

The kernels of an op live in its module (:mod:`~dora_tune.kernels.norm`, :mod:`~dora_tune.kernels.compose`,
:mod:`~dora_tune.kernels.compose_train`, :mod:`~dora_tune.kernels.dora_linear`), which adds what needs torch — the
config class, the default config — in its ``*_SPEC`` (:class:`~dora_tune.kernels.OpSpec`). What needs no torch is here,
so that the modules that plan from stored decision tables stay torch-free: each op's shape keys, its implementations and
the torch one, the paper's fixed crossover (its rule and its text), and whether the dispatcher races a shortlist at
first use. Every table of these facts elsewhere (``OP_SHAPE_KEYS``, ``RACE_OPS``, the crossover of the planner and of
the cost model, the custom ops' implementation lists) is a read of :data:`OPS`; an op is added by adding its facts here
and its spec next to its kernels. This module imports nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

#: the dtype names plans, databases and the CLI use, in order (the torch dtypes: ``dora_tune.kernels.DTYPES``)
DTYPE_NAMES: tuple[str, ...] = ("bf16", "fp16", "fp32")

#: a dtype's same-rate sibling, whose decision table plans it where it has none of its own: fp16 and bf16 have the
#: same element size and the same tensor-core rate on every GPU with bf16 (sm 8.0+), so the kernels' memory traffic,
#: tiles, shared memory and occupancy — what a config decides — are the same
SAME_RATE_DTYPE: dict[str, str] = {"fp16": "bf16", "bf16": "fp16"}
SAME_RATE_TEXT = "fp16 and bf16 run the kernels at the same size and tensor-core rate"

#: the paper's fixed crossover for the training compose: fused iff cols ≥ this and rows·cols ≥ the next
CROSSOVER_TRAIN_MIN_COLS = 2048
CROSSOVER_TRAIN_MIN_ELEMS = 2048 * 6144


def cdiv(a: Any, b: Any) -> Any:
    """⌈a / b⌉ for ints or integer arrays (operators only)."""
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class LaunchGrid:
    """A Triton launch grid whose geometry the cost model uses as features.

    ``geometry(dims, cfg)`` → ``(programs, main-loop trips per program)`` from the shape's dims and the flattened
    config values (ints or integer arrays of one entry a row; written with operators only, so numpy arrays work);
    ``config_keys``: the flattened config keys it needs."""

    name: str
    config_keys: tuple[str, ...]
    geometry: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[Any, Any]]


def _norm_main_grid(dims: Mapping[str, Any], cfg: Mapping[str, Any]) -> tuple[Any, Any]:
    # cdiv(d_out, block_m) · cdiv(r, block_n) · S programs, S = cdiv(d_in, k_per_split) K ranges of
    # k_per_split = cdiv(cdiv(d_in, split_k), block_k) · block_k; each program loops k_per_split / block_k times
    o, i, r = dims["d_out"], dims["d_in"], dims["r"]
    k_per_split = cdiv(cdiv(i, cfg["split_k"]), cfg["block_k"]) * cfg["block_k"]
    programs = cdiv(o, cfg["block_m"]) * cdiv(r, cfg["block_n"]) * cdiv(i, k_per_split)
    return programs, k_per_split // cfg["block_k"]


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
        bytes: ``(shape, bytes per element)`` → the fewest bytes the op must move through memory (each input read
            once, each output written once): the memory floor of a kernel.
        flops: ``shape`` → its floating-point operations: the compute floor.
        race: how many configs of a decision-table cell's shortlist the dispatcher times at first use (0: none).
        race_per_cell: that race is run once per decision-table cell, its winner shared by the cell's shapes (ops whose
            shapes follow the token count, which may change every step), not once per shape.
        launch_grids: the Triton launch grids whose geometry the cost model takes as features (compose and
            compose_train have none: their grid features lowered neither CV regret, docs/cost-model.md).
        triton_impl: the implementation of Triton kernels with a config space (what ``force("triton")`` plans and
            the profiler sweeps).
        profiled_by_default: whether ``dora-tune profile`` measures the op when no ``--op`` names it (else only when
            named, or when a shapes file lists its shapes).
    """

    name: str
    shape_keys: tuple[str, ...]
    impls: tuple[str, ...]
    torch_impl: str
    crossover: Callable[[tuple[int, ...]], str]
    crossover_text: str
    bytes: Callable[[dict[str, int], int], int]
    flops: Callable[[dict[str, int]], int]
    race: int = 0
    race_per_cell: bool = False
    launch_grids: tuple[LaunchGrid, ...] = ()
    triton_impl: str = "triton"
    profiled_by_default: bool = True


def _norm_bytes(shape: dict[str, int], elem: int) -> int:
    o, i, r = shape["d_out"], shape["d_in"], shape["r"]
    return elem * (o * i + r * i + o * r) + 4 * o  # W, A, B read; the float32 norm written


def _norm_flops(shape: dict[str, int]) -> int:
    o, i, r = shape["d_out"], shape["d_in"], shape["r"]
    return 2 * o * i * r + 2 * r * r * (i + o)  # the U GEMM, then G = A·Aᵀ and B·G


def _always_triton(dims: tuple[int, ...]) -> str:
    return "triton"


def _train_crossover(dims: tuple[int, ...]) -> str:
    rows, cols = dims
    return "triton" if cols >= CROSSOVER_TRAIN_MIN_COLS and rows * cols >= CROSSOVER_TRAIN_MIN_ELEMS else "eager"


#: the norm: raced once per weight shape (fixed for a whole run) — its call is a pure function of tensors the call
#: already has, and its config landscape has cliffs between split-K values that the cost model ranks within ~2 % of
#: each other (docs/dispatch-and-race.md, "Race")
NORM = OpFacts(
    name="norm",
    shape_keys=("d_out", "d_in", "r"),
    impls=("dense", "factored_torch", "triton"),
    torch_impl="factored_torch",
    crossover=_always_triton,
    crossover_text="fixed rule: fused norm whenever Triton and CUDA are available",
    bytes=_norm_bytes,
    flops=_norm_flops,
    race=3,
    launch_grids=(LaunchGrid("main", ("block_m", "block_n", "block_k", "split_k"), _norm_main_grid),),
)

COMPOSE = OpFacts(
    name="compose",
    shape_keys=("rows", "cols"),
    impls=("eager", "triton"),
    torch_impl="eager",
    crossover=_always_triton,
    crossover_text="fixed crossover: fused forward whenever Triton and CUDA are available",
    bytes=lambda shape, elem: elem * shape["rows"] * shape["cols"] * 3,  # lora, base read; out written
    flops=lambda shape: shape["rows"] * shape["cols"] * 4,
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
    # forward: lora, base read, out and inner written; backward: dout, inner read, d_lora, d_base written
    bytes=lambda shape, elem: elem * shape["rows"] * shape["cols"] * 8,
    flops=lambda shape: shape["rows"] * shape["cols"] * 10,
    race=3,
    race_per_cell=True,
)


def _linear_bytes(shape: dict[str, int], elem: int) -> int:
    t, o, i, r = shape["rows"], shape["d_out"], shape["d_in"], shape["r"]
    # forward: x, W, A, B read, y and y_pre written; backward: dy, y_pre, W, A, B read, dx written (W frozen)
    return elem * (2 * t * i + 2 * o * i + 2 * r * (i + o) + 4 * t * o)


def _linear_flops(shape: dict[str, int]) -> int:
    t, o, i, r = shape["rows"], shape["d_out"], shape["d_in"], shape["r"]
    # x·Wᵀ and d_y·W; u = x·Aᵀ, u·Bᵀ, v = e·B, v·A, d_B = eᵀ·u, d_A = vᵀ·x
    return 4 * t * o * i + 6 * t * r * (i + o)


def _always_composed(dims: tuple[int, ...]) -> str:
    return "composed"


#: the whole DoRA linear, forward and backward (issue 20): the composed path (cuBLAS base and LoRA GEMMs, the fused
#: compose), the fused linear (one Triton GEMM with the DoRA epilogue each way) or the folded one (cuBLAS GEMMs with
#: the LoRA tail accumulated into the base output, one scale pass each way); its shapes follow the token
#: count, so one race serves a decision-table cell, as for compose_train. Profiled only when asked for: its trials
#: cost a layer's GEMMs (266 s for its 45 default shapes on an H100) and the fused linear lost to the composed path
#: at every one of them (docs/fused-linear.md); a GPU without its table plans it by a profiled GPU's (transfer)
DORA_LINEAR = OpFacts(
    name="dora_linear",
    shape_keys=("rows", "d_out", "d_in", "r"),
    impls=("composed", "fused", "folded"),
    torch_impl="composed",
    crossover=_always_composed,
    crossover_text="no fixed rule (the paper has no fused linear): the composed path",
    bytes=_linear_bytes,
    flops=_linear_flops,
    race=3,
    race_per_cell=True,
    triton_impl="fused",
    profiled_by_default=False,
)

#: every op's facts, by name, in the order of the profiler, the CLI and the decision tables
OPS: dict[str, OpFacts] = {facts.name: facts for facts in (NORM, COMPOSE, COMPOSE_TRAIN, DORA_LINEAR)}
#: each op's shape keys, in the order plans and decision tables key its dims
OP_SHAPE_KEYS: dict[str, tuple[str, ...]] = {name: facts.shape_keys for name, facts in OPS.items()}
