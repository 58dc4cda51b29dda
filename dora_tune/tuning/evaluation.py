"""How good a cost model is: leave-shapes-out cross-validation (:func:`cross_validate`) against the paper's fixed
crossover (:func:`crossover_choice`) on the same shapes — top-1 and regret = time(chosen) / time(fastest measured),
geometric mean and max (:class:`Metrics`) — and the crossover's own figures (:func:`crossover_metrics`). The
cross-GPU evaluation (leave one GPU out) is :mod:`dora_tune.tuning.crossgpu`.

scikit-learn is imported inside the functions that need it, never at module level.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from dora_tune.autotune_db import EnvInfo, TrialRow, canonical_json
from dora_tune.dispatch.decisions import RACE_OPS, race_shortlist
from dora_tune.ops import OP_SHAPE_KEYS
from dora_tune.tuning.data import TrialData, prepare_trials
from dora_tune.tuning.estimators import DEFAULT_ESTIMATOR, FitResult, _fit_models


def crossover_choice(op: str, shape: Mapping[str, int]) -> tuple[str, dict[str, Any]]:
    """The paper's fixed crossover (:class:`~dora_tune.kernels.spec.OpSpec`): ``(implementation, config dict)`` at
    ``shape`` — Triton with the default config, or the torch implementation with ``{}``."""
    from dora_tune.kernels.catalog import OP_SPECS

    spec = OP_SPECS.get(op)
    if spec is None:
        raise ValueError(f"unknown op {op!r}; expected one of {list(OP_SHAPE_KEYS)}")
    impl, config = spec.crossover_choice(tuple(shape[k] for k in spec.facts.shape_keys))
    return impl, ({} if config is None else config.as_dict())


@dataclass(frozen=True)
class Metrics:
    """How good one chooser is over the shapes it was scored on.

    ``top1``: share of shapes where its choice is the fastest measured (implementation, config) (a tie in time
    counts); ``impl_top1``: share where its implementation is the fastest one's; ``regret_*``: time(chosen) /
    time(fastest measured), geometric mean and max; ``excluded``: shapes not scored (the crossover's choice was
    not measured there, or no regressor could predict any measured pair). The figures are None when no shape was
    scored.
    """

    n_shapes: int
    top1: float | None
    regret_geomean: float | None
    regret_max: float | None
    excluded: int = 0
    impl_top1: float | None = None

    @classmethod
    def from_outcomes(cls, outcomes: Sequence[tuple[float, float, bool]], excluded: int) -> Metrics:
        """Aggregate per-shape ``(time chosen, time of the fastest, same implementation as the fastest)``."""
        if not outcomes:
            return cls(0, None, None, None, excluded, None)
        r = np.asarray([t / best for t, best, _ in outcomes], dtype=np.float64)
        return cls(
            n_shapes=len(r),
            top1=float(np.mean(r <= 1.0)),
            regret_geomean=float(np.exp(np.mean(np.log(r)))),
            regret_max=float(r.max()),
            excluded=excluded,
            impl_top1=float(np.mean([same for _, _, same in outcomes])),
        )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Metrics:
        """Inverse of :meth:`to_json` (``impl_top1`` may be missing: metrics stored before it existed)."""
        return cls(**{f.name: data.get(f.name) if f.name == "impl_top1" else data[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class ShapeOutcome:
    """One held-out shape: the fastest measured pair, the model's and the crossover's choice (None: not scored)."""

    shape: dict[str, int]
    best_impl: str
    best_config: dict[str, Any]
    best_us: float
    model_impl: str | None
    model_config: dict[str, Any] | None
    model_us: float | None
    crossover_impl: str
    crossover_us: float | None  # None: the crossover's choice was not measured at this shape
    race_us: float | None = None  # the fastest of the model's shortlist (ops of RACE_OPS; None: not raced)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (configs left out but the best one's, to keep stored metrics small)."""
        out = asdict(self)
        del out["model_config"]
        return out


@dataclass(frozen=True)
class CVReport:
    """Leave-shapes-out cross-validation of the cost model against the fixed crossover, on the same shapes.

    ``model`` is scored on every held-out shape, ``crossover`` on those where its choice was measured, and
    ``model_paired`` is the model on exactly the crossover's shapes (the like-for-like comparison). For the ops of
    :data:`~dora_tune.dispatch.decisions.RACE_OPS` on a CUDA GPU, ``race`` scores what the dispatcher runs there: the
    fastest measured of the model's shortlist (:func:`~dora_tune.dispatch.decisions.race_shortlist`); None otherwise.
    """

    op: str
    dtype: str
    estimator: str
    n_splits: int
    n_trials: int
    model: Metrics
    crossover: Metrics
    model_paired: Metrics
    shapes: list[ShapeOutcome] = field(default_factory=list)
    race: Metrics | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (what :func:`~dora_tune.tuning.fitting.fit` stores as the model's metrics, under
        ``"cv"``)."""
        out = asdict(self)
        out["shapes"] = [s.to_json() for s in self.shapes]
        return out


def cross_validate(
    trials: Sequence[TrialRow],
    op: str,
    dtype: str,
    n_splits: int = 5,
    *,
    env: EnvInfo | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    seed: int = 0,
) -> CVReport:
    """Leave-shapes-out cross-validation (``GroupKFold`` over shapes, at most ``n_splits`` folds, at most one per
    shape) of the cost model, and the fixed crossover's figures on the same shapes.

    For each held-out shape the model (fitted on the other folds' shapes) predicts every (impl, config) pair
    measured "ok" there and chooses the argmin; it is scored by the measured times: top-1 (its choice is the
    fastest measured) and regret = time(chosen) / time(fastest measured). The crossover (:func:`crossover_choice`)
    is scored the same way where its choice was measured; where it was not, the shape is excluded from the
    crossover's figures and counted in ``crossover.excluded``. Trials are filtered as in
    :func:`~dora_tune.tuning.estimators.fit_op`.

    Raises:
        ValueError: as :func:`~dora_tune.tuning.estimators.fit_op`, or fewer than 2 distinct shapes.
    """
    return _cv_data(prepare_trials(trials, op, dtype, env), n_splits, estimator, seed)


def _cv_data(data: TrialData, n_splits: int, estimator: str, seed: int) -> CVReport:
    from sklearn.model_selection import GroupKFold

    op, dtype = data.op, data.dtype
    if data.n_shapes < 2:
        raise ValueError(f"leave-shapes-out cross-validation needs ≥ 2 shapes, {op} {dtype} has {data.n_shapes}")
    splits = min(n_splits, data.n_shapes)
    by_shape: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(data.shape_index):
        by_shape[s].append(i)
    outcomes: dict[int, ShapeOutcome] = {}
    groups = np.asarray(data.shape_index)
    for train, test in GroupKFold(n_splits=splits).split(np.zeros(len(groups)), groups=groups):
        models = _fit_models(data, train, estimator, seed)
        fold = FitResult(op, dtype, data.env, estimator, models, {}, [], len(train))
        for s in sorted(set(groups[test].tolist())):
            outcomes[s] = _score_shape(fold, data, by_shape[s])
    shapes = [outcomes[s] for s in sorted(outcomes)]
    return CVReport(
        op=op,
        dtype=dtype,
        estimator=estimator,
        n_splits=splits,
        n_trials=len(data.rows),
        model=_metrics(shapes, "model"),
        crossover=_metrics(shapes, "crossover"),
        model_paired=_metrics([s for s in shapes if s.crossover_us is not None], "model"),
        shapes=shapes,
        race=_metrics(shapes, "race") if _races(data) else None,
    )


def _races(data: TrialData) -> bool:
    """Whether the dispatcher races this op's shortlist where these trials were measured (ops of ``RACE_OPS``, on a
    CUDA GPU: without one every op runs its torch implementation, nothing is raced)."""
    return data.op in RACE_OPS and data.env.kind == "cuda"


def _score_shape(fold: FitResult, data: TrialData, idx: Sequence[int]) -> ShapeOutcome:
    """The model's and the crossover's choice among the pairs measured at one held-out shape."""
    rows = [data.rows[i] for i in idx]
    shape = rows[0].shape
    best = min(rows, key=lambda t: t.median_us)
    pred = fold.predict_log_us([(t.shape, t.impl, t.config) for t in rows])
    model = None if np.all(np.isnan(pred)) else rows[int(np.nanargmin(pred))]
    race_us = None
    if model is not None and _races(data):
        order = np.argsort(np.where(np.isnan(pred), np.inf, pred), kind="stable")[: RACE_OPS[data.op]]
        raced = race_shortlist([(rows[i].impl, rows[i].config) for i in order])
        race_us = min(rows[i].median_us for i in order if (rows[i].impl, rows[i].config) in raced)
    x_impl, x_row = _crossover_row(data.op, rows)
    return ShapeOutcome(
        shape=dict(shape),
        best_impl=best.impl,
        best_config=best.config,
        best_us=best.median_us,
        model_impl=None if model is None else model.impl,
        model_config=None if model is None else model.config,
        model_us=None if model is None else model.median_us,
        crossover_impl=x_impl,
        crossover_us=None if x_row is None else x_row.median_us,
        race_us=race_us,
    )


def _crossover_row(op: str, rows: Sequence[TrialRow]) -> tuple[str, TrialRow | None]:
    """The crossover's implementation at the shape of ``rows`` (trials of one shape) and the trial of its choice
    (None: not measured)."""
    impl, config = crossover_choice(op, rows[0].shape)
    key = canonical_json(config)
    return impl, next((t for t in rows if t.impl == impl and canonical_json(t.config) == key), None)


def _metrics(shapes: Sequence[ShapeOutcome], who: str) -> Metrics:
    """Aggregate the model's (``who="model"``), the race's (``"race"``; its implementation is the model's) or the
    crossover's figures over the scored shapes."""
    outcomes, excluded = [], 0
    for s in shapes:
        t, impl = {
            "model": (s.model_us, s.model_impl),
            "race": (s.race_us, s.model_impl),
            "crossover": (s.crossover_us, s.crossover_impl),
        }[who]
        if t is None:
            excluded += 1
            continue
        outcomes.append((t, s.best_us, impl == s.best_impl))
    return Metrics.from_outcomes(outcomes, excluded)


def crossover_metrics(trials: Sequence[TrialRow], op: str, dtype: str) -> Metrics:
    """The fixed crossover's figures over every measured shape of ``trials`` (filtered as in
    :func:`~dora_tune.tuning.estimators.fit_op`)."""
    data = prepare_trials(trials, op, dtype, None)
    by_shape: dict[int, list[TrialRow]] = defaultdict(list)
    for t, s in zip(data.rows, data.shape_index, strict=True):
        by_shape[s].append(t)
    outcomes, excluded = [], 0
    for rows in by_shape.values():
        best = min(rows, key=lambda t: t.median_us)
        impl, hit = _crossover_row(op, rows)
        if hit is None:
            excluded += 1
            continue
        outcomes.append((hit.median_us, best.median_us, impl == best.impl))
    return Metrics.from_outcomes(outcomes, excluded)
