"""Compiled dispatch decisions: a grid over shape buckets holding the (implementation, config) chosen for each.

The cost model (:mod:`dora_tune.tuning.fitting`, fit time, scikit-learn) evaluates its predictions on a grid of
shapes and stores the winner of each grid point in a :class:`DecisionTable`; run time only looks the table up. The
table is plain data: it travels as JSON (no pickle) and this module imports neither scikit-learn nor torch, so the
run-time path can load it cheaply.

Lookup: every shape dimension snaps to the nearest bucket centre of its axis in log2 space (values outside an axis
are clamped to its ends), and the cell at those centres holds the decision.

For the ops of :data:`RACE_OPS` a cell also holds runners-up: the next candidates by predicted time (or, at a
measured grid point, by measured time). At run time the dispatcher times the cell's shortlist once, on the call's
own inputs, and keeps the fastest (:mod:`dora_tune.dispatch.runtime`, "race").
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dora_tune.ops import DTYPE_NAMES, OP_SHAPE_KEYS, OPS

FORMAT = 2
"""Version of :meth:`DecisionTable.to_json`'s layout (``"format"`` key); :meth:`DecisionTable.from_json` also
reads format 1 (no runners-up)."""

RACE_OPS: dict[str, int] = {name: facts.race for name, facts in OPS.items() if facts.race}
"""Ops whose decisions are raced at first use, and the size of each cell's shortlist (the decision plus its
runners-up). The norm: its shapes are the weights', fixed for a whole run (one race per layer shape), its call is a
pure function of tensors the call already has, and its config landscape has cliffs between split-K values that the
cost model ranks within ~2 % of each other. compose_train: its forward × backward configs lie within a few per cent
of each other at most shapes, more than the model resolves; its shapes follow the token count, so one race serves
a whole decision-table cell (:data:`RACE_PER_CELL`). docs/dispatch-and-race.md, "Race"."""

RACE_PER_CELL: frozenset[str] = frozenset(name for name, facts in OPS.items() if facts.race_per_cell)
"""Ops of :data:`RACE_OPS` whose race is shared by every shape of a decision-table cell (the first shape of the cell
to run is timed; the others take its winner): ops whose shapes follow the batch's token count, which may change
every step. The other ops race once per exact shape."""

_DTYPES = DTYPE_NAMES


@dataclass(frozen=True)
class DecisionTable:
    """The decisions of one (op, dtype, GPU) over a grid of shape buckets.

    Attributes:
        op: "norm", "compose" or "compose_train".
        dtype: "bf16", "fp16" or "fp32".
        gpu_name: the GPU the decisions were fitted for (e.g. "NVIDIA H200").
        impl_versions: implementation name → source version hash of the trials the decisions were fitted on.
        axes: one entry per shape key, in ``OP_SHAPE_KEYS[op]`` order: the sorted, distinct, positive int bucket
            centres of that dimension (elements: rows, cols, d_out, d_in or r).
        cells: ``(impl, config)`` per grid point, flattened row-major over the axes (the last axis varies fastest),
            so ``len(cells)`` is the product of the axis lengths. Configs are shared with the table: do not mutate
            what :meth:`lookup` returns.
        runners_up: per grid point, the candidates that follow its decision, fastest first (empty tuples, or an
            empty list for a table without any).
    """

    op: str
    dtype: str
    gpu_name: str
    impl_versions: dict[str, str]
    axes: dict[str, list[int]]
    cells: list[tuple[str, dict]]
    runners_up: list[tuple[tuple[str, dict], ...]] = field(default_factory=list)
    # lookup helpers derived from ``axes``: per axis (shape key, geometric midpoints between neighbours, stride)
    _index: tuple[tuple[str, tuple[float, ...], int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check the structure (ValueError, as :meth:`from_json`) and precompute the lookup helpers."""
        _validate(self.op, self.dtype, self.gpu_name, self.impl_versions, self.axes, self.cells)
        _validate_runners_up(self.runners_up, len(self.cells))
        index = []
        stride = len(self.cells)
        for key in OP_SHAPE_KEYS[self.op]:
            centres = self.axes[key]
            stride //= len(centres)
            # v snaps to centres[i] when it lies below the geometric midpoint of centres[i] and centres[i + 1]
            mids = tuple(math.sqrt(a * b) for a, b in itertools.pairwise(centres))
            index.append((key, mids, stride))
        object.__setattr__(self, "_index", tuple(index))

    def lookup(self, shape: dict[str, int]) -> tuple[str, dict]:
        """The ``(impl, config)`` of the grid point nearest ``shape`` (log2 distance per axis, clamped to the ends).

        Args:
            shape: the op's shape dict (``rows``/``cols`` or ``d_out``/``d_in``/``r``), positive ints.

        Costs one bisection per axis.

        Raises:
            ValueError: a shape key of the op is missing.
        """
        return self.cells[self.cell_index(shape)]

    def shortlist(self, shape: dict[str, int]) -> list[tuple[str, dict]]:
        """The decision of the grid point nearest ``shape`` (as :meth:`lookup`) followed by its runners-up.

        Raises:
            ValueError: a shape key of the op is missing.
        """
        i = self.cell_index(shape)
        return [self.cells[i], *(self.runners_up[i] if self.runners_up else ())]

    def cell_index(self, shape: dict[str, int]) -> int:
        """Index (into :attr:`cells`) of the grid point nearest ``shape``, as :meth:`lookup` finds it.

        Raises:
            ValueError: a shape key of the op is missing.
        """
        flat = 0
        try:
            for key, mids, stride in self._index:
                flat += bisect_left(mids, shape[key]) * stride
        except KeyError as e:
            keys = list(OP_SHAPE_KEYS[self.op])
            raise ValueError(f"a {self.op} shape needs the keys {keys}, got {sorted(shape)}") from e
        return flat

    def to_json(self) -> dict[str, Any]:
        """The table as plain JSON types.

        Layout: ``{"format": 2, "op", "dtype", "gpu_name", "impl_versions", "axes": {key: [ints]},
        "choices": [[impl, config], ...], "cells": [index into choices, ...], "runners_up": [[index, ...], ...]}``:
        the distinct decisions are stored once (``choices``, in order of first use), ``cells`` holds an index per
        grid point and ``runners_up`` a list of indices per grid point (or is empty: no runners-up).
        """
        palette: dict[tuple[str, str], int] = {}
        choices: list[list[Any]] = []

        def index(impl: str, config: dict) -> int:
            key = (impl, _config_key(config))
            i = palette.get(key)
            if i is None:
                i = palette[key] = len(choices)
                choices.append([impl, config])
            return i

        cells = [index(impl, config) for impl, config in self.cells]
        runners_up = [[index(impl, config) for impl, config in r] for r in self.runners_up]
        return {
            "format": FORMAT,
            "op": self.op,
            "dtype": self.dtype,
            "gpu_name": self.gpu_name,
            "impl_versions": dict(self.impl_versions),
            "axes": {k: list(self.axes[k]) for k in OP_SHAPE_KEYS[self.op]},
            "choices": choices,
            "cells": cells,
            "runners_up": runners_up,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecisionTable:
        """Rebuild a table from :meth:`to_json`'s output, checking every part of it.

        Raises:
            ValueError: anything off — not a dict, unknown format, unknown op or dtype, axes that are not the op's
                shape keys or not sorted distinct positive ints, cells whose count is not the product of the axis
                lengths or that index no choice, a choice whose impl is not a str or whose config is not a dict.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a decision table must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt not in (1, FORMAT) or isinstance(fmt, bool):
            raise ValueError(f"decision table format {fmt!r} is not supported (expected 1 or {FORMAT})")
        expected = {"format", "op", "dtype", "gpu_name", "impl_versions", "axes", "choices", "cells"}
        if fmt == FORMAT:
            expected.add("runners_up")
        if set(data) != expected:
            missing, extra = sorted(expected - set(data)), sorted(set(data) - expected)
            raise ValueError(f"decision table keys: missing {missing}, unexpected {extra}")
        choices, cells = data["choices"], data["cells"]
        if not isinstance(choices, list):
            raise ValueError(f"decision table 'choices' must be a list, got {type(choices).__name__}")
        for i, c in enumerate(choices):
            if not isinstance(c, list) or len(c) != 2:
                raise ValueError(f"decision table choice {i} must be a [impl, config] pair, got {c!r}")
        if not isinstance(cells, list):
            raise ValueError(f"decision table 'cells' must be a list, got {type(cells).__name__}")

        palette = [tuple(c) for c in choices]  # shared by the cells using them (validated once each, see _validate)

        def decode(indices: list, where: Callable[[int], str]) -> list[tuple]:
            out = []
            for j, c in enumerate(indices):
                if type(c) is not int or not 0 <= c < len(palette):  # not a bool, not a float
                    raise ValueError(
                        f"decision table {where(j)} must index one of the {len(palette)} choices, got {c!r}"
                    )
                out.append(palette[c])
            return out

        decoded = decode(cells, lambda j: f"cell {j}")
        runners_up = data.get("runners_up", [])
        if not isinstance(runners_up, list) or not all(isinstance(r, list) for r in runners_up):
            raise ValueError(f"decision table 'runners_up' must be a list of lists, got {runners_up!r:.80}")
        runners = [tuple(decode(r, lambda j, i=i: f"runner-up of cell {i}")) for i, r in enumerate(runners_up)]
        axes = data["axes"]
        if not isinstance(axes, dict):
            raise ValueError(f"decision table 'axes' must be an object, got {type(axes).__name__}")
        impl_versions = data["impl_versions"]
        if not isinstance(impl_versions, dict):
            raise ValueError(f"decision table 'impl_versions' must be an object, got {type(impl_versions).__name__}")
        return cls(
            op=data["op"],
            dtype=data["dtype"],
            gpu_name=data["gpu_name"],
            impl_versions=dict(impl_versions),
            axes={k: list(v) if isinstance(v, list) else v for k, v in axes.items()},
            cells=decoded,
            runners_up=runners,
        )


def _config_key(config: dict) -> str:
    """A hashable, order-independent key of a config dict (sorted-keys repr of its nested items)."""
    return repr(sorted((k, _config_key(v) if isinstance(v, dict) else v) for k, v in config.items()))


def _validate(op: Any, dtype: Any, gpu_name: Any, impl_versions: Any, axes: Any, cells: Any) -> None:
    """ValueError with a clear message unless the parts make a well-formed table."""
    if op not in OP_SHAPE_KEYS:
        raise ValueError(f"decision table op must be one of {list(OP_SHAPE_KEYS)}, got {op!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"decision table dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if not isinstance(gpu_name, str) or not gpu_name:
        raise ValueError(f"decision table gpu_name must be a non-empty str, got {gpu_name!r}")
    if not isinstance(impl_versions, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in impl_versions.items()
    ):
        raise ValueError(f"decision table impl_versions must map str to str, got {impl_versions!r}")
    keys = OP_SHAPE_KEYS[op]
    if not isinstance(axes, dict) or set(axes) != set(keys):
        got = sorted(axes) if isinstance(axes, dict) else type(axes).__name__
        raise ValueError(f"decision table axes of {op} must be exactly {list(keys)}, got {got}")
    n = 1
    for k in keys:
        centres = axes[k]
        if not isinstance(centres, list) or not centres:
            raise ValueError(f"decision table axis {k!r} must be a non-empty list, got {centres!r}")
        for v in centres:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"decision table axis {k!r} must hold positive ints, got {v!r}")
        if any(a >= b for a, b in itertools.pairwise(centres)):
            raise ValueError(f"decision table axis {k!r} must be sorted ascending without repeats, got {centres}")
        n *= len(centres)
    if not isinstance(cells, list) or len(cells) != n:
        got = len(cells) if isinstance(cells, list) else type(cells).__name__
        raise ValueError(f"decision table needs {n} cells (the product of the axis lengths), got {got}")
    seen: set[int] = set()  # cells decoded from JSON share their palette's tuples: check each object once
    for i, cell in enumerate(cells):
        _check_pair(cell, f"cell {i}", seen)


def _check_pair(pair: Any, where: str, seen: set[int]) -> None:
    """ValueError unless ``pair`` is an ``(impl, config)`` tuple: a non-empty str and a dict. Objects whose id is in
    ``seen`` were checked already; ``pair``'s id is added."""
    if id(pair) in seen:
        return
    seen.add(id(pair))
    if not isinstance(pair, tuple) or len(pair) != 2:
        why = "must be a 2-tuple"
    elif not isinstance(pair[0], str) or not pair[0]:
        why = "impl must be a non-empty str"
    elif not isinstance(pair[1], dict):
        why = "config must be a dict"
    else:
        return
    raise ValueError(f"decision table {where} is not an (impl, config) pair: {why}, got {pair!r}")


def race_shortlist(shortlist: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """What the dispatcher races of a shortlist (decision first, then its runners-up): the decision and the
    runners-up of the same implementation (configs of one kernel, timed on the call's own inputs)."""
    if not shortlist:
        return []
    impl = shortlist[0][0]
    return [pair for pair in shortlist if pair[0] == impl]


def _validate_runners_up(runners_up: Any, n_cells: int) -> None:
    """ValueError unless ``runners_up`` is empty or holds one tuple of ``(impl, config)`` pairs per cell."""
    if not isinstance(runners_up, list) or (runners_up and len(runners_up) != n_cells):
        got = len(runners_up) if isinstance(runners_up, list) else type(runners_up).__name__
        raise ValueError(f"decision table runners_up must be empty or hold one entry per cell ({n_cells}), got {got}")
    seen: set[int] = set()  # shared pair objects (decoded from JSON) are checked once
    for i, entry in enumerate(runners_up):
        if not isinstance(entry, tuple):
            raise ValueError(f"decision table runners-up of cell {i} must be a tuple, got {entry!r}")
        for pair in entry:
            _check_pair(pair, f"runner-up of cell {i}", seen)


def beats_crossover(cv: dict[str, Any]) -> bool:
    """Whether a decision table's cross-validation (``CVReport.to_json()``) says it should be used at run time:
    its regret geomean on the shapes the fixed crossover was scored on is no worse than the crossover's (or the
    crossover could not be scored). A table that loses is kept for ``dora-tune report`` but not dispatched on."""
    crossover, model = cv.get("crossover") or {}, cv.get("model_paired") or {}
    if not crossover.get("n_shapes") or crossover.get("regret_geomean") is None:
        return True
    return model.get("regret_geomean") is not None and model["regret_geomean"] <= crossover["regret_geomean"]
