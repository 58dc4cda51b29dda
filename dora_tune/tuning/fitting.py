"""Fitting end to end: the cost model of every (environment, op, dtype) of a tuning DB with enough shapes is fitted
(:mod:`~dora_tune.tuning.estimators`), cross-validated (:mod:`~dora_tune.tuning.evaluation`) and compiled into a
:class:`~dora_tune.dispatch.decisions.DecisionTable` (:func:`compile_decisions`); what is stored
(:meth:`TuningDB.save_model`) is that table and the cross-validation metrics, both JSON (:func:`fit`).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dora_tune.autotune_db import TrialRow, TuningDB
from dora_tune.dispatch.decisions import RACE_OPS, DecisionTable
from dora_tune.ops import DTYPE_NAMES, OP_SHAPE_KEYS
from dora_tune.tuning.data import Measured, _best_data, _ranked_data, prepare_trials, shape_key
from dora_tune.tuning.estimators import DEFAULT_ESTIMATOR, ESTIMATORS, FitResult, _fit_data
from dora_tune.tuning.evaluation import Metrics, _cv_data

MIN_SHAPES = 3
"""Fewest distinct shapes an (environment, op, dtype) needs before :func:`fit` fits it."""


# ------------------------------------------------------------------------------------------------ compiling


def grid_axis(values: Sequence[int]) -> list[int]:
    """Bucket centres covering ``values``: every ``2^k`` and ``3·2^(k−1)`` (≈ half-octave steps) from the power of 2
    at or below the smallest value to the one at or above the largest, plus the values themselves."""
    lo, hi = min(values), max(values)
    k_lo, k_hi = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    out = set(int(v) for v in values)
    for k in range(k_lo, k_hi + 1):
        out.add(2**k)
        if 1 <= k < k_hi:
            out.add(3 * 2 ** (k - 1))  # 1.5·2^k
    return sorted(out)


def compile_decisions(
    models: FitResult,
    op: str,
    dtype: str,
    gpu_name: str,
    impl_versions: Mapping[str, str],
    shapes_seen: Sequence[Measured],
    *,
    planned: Sequence[Mapping[str, int]] | None = None,
    shortlist: int = 1,
    measured_ranked: Mapping[tuple[int, ...], Sequence[tuple[str, dict[str, Any]]]] | None = None,
) -> DecisionTable:
    """Evaluate the cost model on a grid of shape buckets and keep each grid point's argmin (impl, config) — and,
    with ``shortlist`` > 1, the next ``shortlist − 1`` candidates as its runners-up.

    The axes (:func:`grid_axis`) cover the measured shapes and the ``planned`` ones (default: the profiler's default
    set of ``op``, rows 1–32768, cols 512–28672, d 512–28672, r 8–768), in steps of about half an octave, and
    hold every measured value exactly: a grid point that is a measured shape takes its measured best
    (``shapes_seen``) instead of the model's prediction.

    Args:
        models: the fitted cost model of ``op``/``dtype``.
        op, dtype, gpu_name, impl_versions: recorded in the table.
        shapes_seen: the fastest measured pair per shape (:func:`~dora_tune.tuning.data.measured_best`).
        planned: more shapes the grid must cover.
        shortlist: candidates a cell holds (its decision and the runners-up), by predicted time; at a measured grid
            point by measured time (``measured_ranked``: shape key → its measured pairs, fastest first).
    """
    if planned is None:
        from dora_tune.tuning.shapes import default_shapes

        planned = default_shapes()[op]
    keys = OP_SHAPE_KEYS[op]
    every = [*(m.shape for m in shapes_seen), *models.shapes, *planned]
    if not every:
        raise ValueError("compile_decisions needs at least one measured or planned shape")
    axes = {k: grid_axis([int(s[k]) for s in every]) for k in keys}
    grid = [dict(zip(keys, p, strict=True)) for p in _product([axes[k] for k in keys])]
    measured = {shape_key(op, m.shape): (m.impl, m.config) for m in shapes_seen}
    cells: list[tuple[str, dict] | None] = [measured.get(shape_key(op, g)) for g in grid]
    runners: list[tuple[tuple[str, dict], ...]] = [() for _ in grid]
    for i, g in enumerate(grid):
        ranked = (measured_ranked or {}).get(shape_key(op, g))
        if cells[i] is not None and ranked:
            runners[i] = tuple((impl, dict(c)) for impl, c in ranked[1:shortlist])
    todo = [i for i, c in enumerate(cells) if c is None]
    # every candidate of every grid point still to decide, predicted per implementation in one batch
    cands = {i: models.candidates(grid[i]) for i in todo}
    flat = [(grid[i], impl, c) for i in todo for impl, c in cands[i]]
    pred = models.predict_log_us(flat)
    pos = 0
    for i in todo:
        n = len(cands[i])
        order = np.argsort(pred[pos : pos + n], kind="stable")[:shortlist]
        cells[i] = cands[i][int(order[0])]
        runners[i] = tuple((cands[i][int(j)][0], dict(cands[i][int(j)][1])) for j in order[1:])
        pos += n
    return DecisionTable(
        op=op,
        dtype=dtype,
        gpu_name=gpu_name,
        impl_versions=dict(impl_versions),
        axes=axes,
        cells=[(impl, dict(c)) for impl, c in cells],
        runners_up=runners if shortlist > 1 else [],
    )


def _product(axes: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Row-major cartesian product (the last axis fastest), as :class:`~dora_tune.dispatch.decisions.DecisionTable`
    lays out its cells."""
    import itertools

    return list(itertools.product(*axes))


# ---------------------------------------------------------------------------------------------- end to end


@dataclass(frozen=True)
class FitSummary:
    """What :func:`fit` did for one (environment, op, dtype)."""

    env_id: int
    gpu_name: str
    op: str
    dtype: str
    n_trials: int
    n_shapes: int
    estimator: str
    model: Metrics
    crossover: Metrics
    model_paired: Metrics
    fit_seconds: float
    n_cells: int
    race: Metrics | None = None  # the dispatcher's race among the model's shortlist (ops of RACE_OPS)


def fit(
    db: TuningDB,
    *,
    gpu: str | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    n_splits: int = 5,
    min_shapes: int = MIN_SHAPES,
    dtypes: Sequence[str] | None = None,
    ops: Sequence[str] | None = None,
) -> list[FitSummary]:
    """Fit, cross-validate and compile the cost model of every (environment, op, dtype) of ``db`` with at least
    ``min_shapes`` distinct measured shapes, and store each decision table and its metrics
    (:meth:`TuningDB.save_model`, replacing older ones).

    Args:
        db: a writable tuning database.
        gpu: only environments of this GPU (name, slug or part of a name, as :meth:`TuningDB.trials`).
        estimator: one of :data:`~dora_tune.tuning.estimators.ESTIMATORS`.
        n_splits: folds of the leave-shapes-out cross-validation.
        min_shapes: fewest distinct shapes to fit.
        dtypes: only these dtypes (e.g. ``["bf16"]`` after a ``--quick`` fp16 run, whose shortlists alone would fit
            an fp16 table that plans unseen shapes worse than the bf16 table they came from); None: every dtype.
        ops: only these ops (e.g. an op just added to a database whose other tables stay as they are); None: all.

    Returns:
        One summary per fitted (environment, op, dtype), ordered by GPU, op, dtype; empty when nothing qualifies.

    Raises:
        DatabaseError: the database is read-only or cannot be read or written.
        ValueError: an unknown estimator.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {list(ESTIMATORS)}")
    if dtypes is not None and not set(dtypes) <= set(DTYPE_NAMES):
        raise ValueError(f"unknown dtype(s) {sorted(set(dtypes) - set(DTYPE_NAMES))}; expected {list(DTYPE_NAMES)}")
    if ops is not None and not set(ops) <= set(OP_SHAPE_KEYS):
        raise ValueError(f"unknown op(s) {sorted(set(ops) - set(OP_SHAPE_KEYS))}; expected {list(OP_SHAPE_KEYS)}")
    wanted = set(DTYPE_NAMES if dtypes is None else dtypes)
    wanted_ops = set(OP_SHAPE_KEYS if ops is None else ops)
    envs = {e.id: e for e in db.environments(gpu=gpu)}
    groups: dict[tuple[int, str, str], list[TrialRow]] = defaultdict(list)
    for t in db.trials(gpu=gpu, status="ok"):
        if t.env_id in envs and t.op in wanted_ops and t.dtype in wanted:
            groups[(t.env_id, t.op, t.dtype)].append(t)
    out = []
    for (env_id, op, dtype), trials in sorted(groups.items(), key=lambda kv: (envs[kv[0][0]].gpu_name, kv[0])):
        env = envs[env_id].info
        try:
            data = prepare_trials(trials, op, dtype, env)
        except ValueError:  # no trial with a well-formed shape
            continue
        if data.n_shapes < min_shapes:
            continue
        t0 = time.perf_counter()
        result = _fit_data(data, estimator, 0)
        cv = _cv_data(data, n_splits, estimator, 0)
        k = RACE_OPS.get(op, 1)
        table = compile_decisions(
            result,
            op,
            dtype,
            env.gpu_name,
            result.impl_versions,
            _best_data(data),
            shortlist=k,
            measured_ranked=_ranked_data(data, k) if k > 1 else None,
        )
        seconds = time.perf_counter() - t0
        metrics = {
            "n_trials": result.n_trials,
            "n_shapes": len(result.shapes),
            "fit_seconds": round(seconds, 3),
            "cv": cv.to_json(),
        }
        db.save_model(env, op, dtype, estimator, table.to_json(), metrics)
        out.append(
            FitSummary(
                env_id=env_id,
                gpu_name=env.gpu_name,
                op=op,
                dtype=dtype,
                n_trials=result.n_trials,
                n_shapes=len(result.shapes),
                estimator=estimator,
                model=cv.model,
                crossover=cv.crossover,
                model_paired=cv.model_paired,
                fit_seconds=seconds,
                n_cells=len(table.cells),
                race=cv.race,
            )
        )
    return out
