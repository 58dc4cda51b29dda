"""The learned cost model: fit per-implementation time regressors on the tuning DB, cross-validate them against the
paper's fixed crossover, and compile them into a :class:`~dora_tune.dispatch.decisions.DecisionTable`.

For one (environment, op, dtype) every implementation gets a regressor predicting ``ln(median_us)`` of an "ok"
trial from :class:`~dora_tune.dispatch.features.FeatureSpec` features (shape, traffic, work, dtype, config, GPU).
For a shape the model predicts each candidate (implementation, config) — every config of the registry for that
shape, plus, for compose_train's Triton path, the stage-2 (backward) configs seen in the trials — and picks the
argmin. The fitted regressors never leave the process: what is stored (:meth:`TuningDB.save_model`) is the compiled
decision table and the cross-validation metrics, both JSON.

scikit-learn is imported inside the functions that need it, never at module level.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np

from dora_tune.autotune_db import EnvInfo, TrialRow, TuningDB, canonical_json
from dora_tune.dispatch.decisions import RACE_OPS, DecisionTable, race_shortlist
from dora_tune.dispatch.features import DTYPE_NAMES, FeatureSpec
from dora_tune.dispatch.shapes import OP_SHAPE_KEYS

ESTIMATORS: tuple[str, ...] = ("extra_trees", "hist_gb", "knn", "linear_trees")
"""Regressors :func:`make_estimator` builds (``docs/cost-model.md``, "Estimator choice")."""

DEFAULT_ESTIMATOR = "linear_trees"
"""The regressor :func:`fit` uses unless told otherwise (chosen on leave-shapes-out regret, docs/cost-model.md)."""

MIN_SHAPES = 3
"""Fewest distinct shapes an (environment, op, dtype) needs before :func:`fit` fits it."""

TREE_FOCUS: dict[str, float] = {"compose": 0.1, "norm": 0.1}
"""Per op, the ``focus`` of ``linear_trees``' config trees (:class:`LinearTrees`); an op not listed weighs every
trial the same. Chosen on leave-shapes-out regret over fit seeds and on the held-out shapes (``caches/README.md``);
compose_train's regret was worse with it (CV 1.016 / 1.090 against 1.014 / 1.077; on the confirmed trials, mean over
fit seeds 0–2, 1.0130 / 1.103 against 1.0105 / 1.053)."""


# ------------------------------------------------------------------------------------------------- estimators


def make_estimator(name: str, spec: FeatureSpec, n_samples: int, *, seed: int = 0) -> Any:
    """An unfitted regressor ``name`` (one of :data:`ESTIMATORS`) for ``spec``'s features and ``n_samples`` rows.

    * ``extra_trees``: ``ExtraTreesRegressor`` (200 trees, leaves of 1), deterministic for a seed;
    * ``hist_gb``: ``HistGradientBoostingRegressor`` (300 rounds, leaves of ≥ n/10 up to 20 samples);
    * ``knn``: standardised features, ``KNeighborsRegressor`` (5 neighbours or fewer, distance weights);
    * ``linear_trees``: :class:`LinearTrees`, a power law in bytes and FLOPs plus extra trees on what it leaves,
      the configs' effects fitted relative to each shape's fastest measured time (weighted towards the fastest
      configs for the ops of :data:`TREE_FOCUS`).
    """
    if name == "extra_trees":
        from sklearn.ensemble import ExtraTreesRegressor

        return ExtraTreesRegressor(n_estimators=200, min_samples_leaf=1, random_state=seed)
    if name == "hist_gb":
        from sklearn.ensemble import HistGradientBoostingRegressor

        leaf = max(1, min(20, n_samples // 10))
        return HistGradientBoostingRegressor(
            max_iter=300, min_samples_leaf=leaf, early_stopping=False, random_state=seed
        )
    if name == "knn":
        from sklearn.neighbors import KNeighborsRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(
            StandardScaler(), KNeighborsRegressor(n_neighbors=max(1, min(5, n_samples)), weights="distance")
        )
    if name == "linear_trees":
        names = spec.names()
        shape_columns = [i for i, n in enumerate(names) if not n.startswith(("log2_cfg_", "grid_"))]
        return LinearTrees(
            [names.index("log2_bytes"), names.index("log2_flops")],
            seed=seed,
            shape_columns=shape_columns,
            focus=TREE_FOCUS.get(spec.op),
        )
    raise ValueError(f"unknown estimator {name!r}; expected one of {list(ESTIMATORS)}")


class LinearTrees:
    """``ln t ≈ a + b·log2 bytes + c·log2 flops`` (ridge on standardised columns) plus extra trees fitted on the
    residual over every feature.

    The linear part carries the trend in problem size and extrapolates it (a power law) above the largest measured
    size, where trees alone would stay flat: large calls are bandwidth- or compute-bound, their time grows with
    size. Below the smallest measured size it is held flat (its inputs are clipped there): small calls are bound by
    launch and host overheads, their time stops shrinking, and a power law would predict times no GPU reaches. The
    trees add the config effects and what the trend misses. Follows the scikit-learn ``fit``/``predict`` protocol
    (scikit-learn is imported in :meth:`fit`).

    With ``shape_columns`` (the features that depend on the shape alone) and other columns besides, the fit has
    two parts, so the trees that rank configs see no differences between shapes: a :class:`LinearTrees` over the
    shape columns predicts each shape's fastest time (``min ln t`` of its rows; one row a shape), and extra trees
    over every feature predict ``ln t`` minus that minimum of its shape. The prediction is their sum, an absolute
    time still (implementations are compared by it). With ``focus`` those trees weigh each row by
    ``exp(−(ln t − min ln t) / focus)`` = ``(t_min / t)^(1/focus)``: the configs near their shape's fastest decide
    the splits, so the trees spend their capacity ranking the candidates that can win rather than the slow ones
    (at 0.1 a config 7 % slower than its shape's fastest counts half, one 26 % slower a tenth).

    Args:
        columns: indices of the trend's inputs in the feature matrix (``log2_bytes`` and ``log2_flops``).
        seed: the trees' random seed.
        alpha: the ridge penalty (on standardised inputs).
        shape_columns: indices of the shape-only features (the trend's inputs among them); empty: one part.
        focus: the weights' scale in ln t (two-part fit only); None: every row weighs the same.
    """

    n_trees = 100
    """Trees in each extra-trees part."""

    def __init__(
        self,
        columns: Sequence[int],
        *,
        seed: int = 0,
        alpha: float = 1e-2,
        shape_columns: Sequence[int] = (),
        focus: float | None = None,
    ) -> None:
        self.columns = list(columns)
        self.seed = seed
        self.alpha = alpha
        self.shape_columns = list(shape_columns)
        self.focus = focus

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearTrees:
        """Fit on features ``x [n, f]`` and targets ``y [n]`` (ln µs)."""
        from sklearn.ensemble import ExtraTreesRegressor
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if self.shape_columns and len(self.shape_columns) < x.shape[1]:
            xs = x[:, self.shape_columns]
            shapes, first, group = np.unique(xs, axis=0, return_index=True, return_inverse=True)
            group = group.ravel()
            fastest = np.full(len(shapes), np.inf)
            np.minimum.at(fastest, group, y)
            trend = [self.shape_columns.index(c) for c in self.columns]
            self.shape_model_: LinearTrees | None = LinearTrees(trend, seed=self.seed, alpha=self.alpha)
            self.shape_model_.fit(xs[first], fastest)
            relative = y - fastest[group]
            weight = None if self.focus is None else np.exp(-relative / self.focus)
            self.trees_ = ExtraTreesRegressor(n_estimators=self.n_trees, random_state=self.seed)
            self.trees_.fit(x, relative, sample_weight=weight)
            return self
        self.shape_model_ = None
        self.floor_ = x[:, self.columns].min(axis=0)
        self.linear_ = make_pipeline(StandardScaler(), Ridge(alpha=self.alpha)).fit(x[:, self.columns], y)
        residual = y - self.linear_.predict(x[:, self.columns])
        self.trees_ = ExtraTreesRegressor(n_estimators=self.n_trees, random_state=self.seed).fit(x, residual)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted ln µs ``[n]`` of features ``x [n, f]``."""
        if self.shape_model_ is not None:
            return self.shape_model_.predict(x[:, self.shape_columns]) + self.trees_.predict(x)
        return self.linear_.predict(np.maximum(x[:, self.columns], self.floor_)) + self.trees_.predict(x)


# ------------------------------------------------------------------------------------------------- the data


class Measured(NamedTuple):
    """The fastest measured (implementation, config) of one shape, and its median time (µs)."""

    shape: dict[str, int]
    impl: str
    config: dict[str, Any]
    median_us: float


@dataclass(frozen=True)
class _Data:
    """The usable trials of one (environment, op, dtype): "ok", each implementation at its newest version."""

    op: str
    dtype: str
    env: EnvInfo
    rows: list[TrialRow]
    versions: dict[str, str]  # impl → the version kept
    shapes: list[dict[str, int]]  # distinct, sorted
    shape_index: list[int]  # per row: index into shapes

    @property
    def n_shapes(self) -> int:
        return len(self.shapes)


def _shape_key(op: str, shape: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(int(shape[k]) for k in OP_SHAPE_KEYS[op])


def _prepare(trials: Sequence[TrialRow], op: str, dtype: str, env: EnvInfo | None) -> _Data:
    """Keep the "ok" trials of ``op``/``dtype`` with a well-formed shape (exactly the op's keys), each
    implementation at its newest version (that of its latest trial)."""
    if op not in OP_SHAPE_KEYS:
        raise ValueError(f"unknown op {op!r}; expected one of {list(OP_SHAPE_KEYS)}")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPE_NAMES)}")
    rows = [
        t
        for t in trials
        if t.op == op
        and t.dtype == dtype
        and t.status == "ok"
        and t.median_us is not None
        and t.median_us > 0
        and set(t.shape) == set(OP_SHAPE_KEYS[op])
    ]
    if not rows:
        raise ValueError(f"no 'ok' {op} {dtype} trials to fit")
    envs = {t.env_id for t in rows}
    if len(envs) > 1:
        raise ValueError(f"{op} {dtype} trials come from {len(envs)} environments; fit one environment at a time")
    newest: dict[str, tuple[Any, str]] = {}
    for t in rows:
        if t.impl not in newest or t.created_at > newest[t.impl][0]:
            newest[t.impl] = (t.created_at, t.impl_version)
    versions = {impl: v for impl, (_, v) in sorted(newest.items())}
    rows = [t for t in rows if t.impl_version == versions[t.impl]]
    keys = sorted({_shape_key(op, t.shape) for t in rows})
    pos = {k: i for i, k in enumerate(keys)}
    if env is None:
        name = rows[0].gpu_name
        kind = "cpu" if name.lower().startswith("cpu") else "cuda"
        env = EnvInfo(kind, name, "", 0, 0, "", "", "", "", "")
    return _Data(
        op=op,
        dtype=dtype,
        env=env,
        rows=rows,
        versions=versions,
        shapes=[dict(zip(OP_SHAPE_KEYS[op], k, strict=True)) for k in keys],
        shape_index=[pos[_shape_key(op, t.shape)] for t in rows],
    )


# ------------------------------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class ImplModel:
    """The fitted regressor of one implementation: ``ln(median_us)`` from :attr:`spec`'s features."""

    impl: str
    version: str
    spec: FeatureSpec
    regressor: Any
    n_trials: int

    def predict_log_us(
        self, rows: Sequence[tuple[Mapping[str, int], str, Mapping[str, Any]]], env: EnvInfo
    ) -> np.ndarray:
        """Predicted ``ln(µs)`` ``[len(rows)]`` of ``(shape, dtype, config)`` rows on ``env``."""
        if not rows:
            return np.empty(0)
        return np.asarray(self.regressor.predict(self.spec.matrix(rows, env)), dtype=np.float64)


@dataclass(frozen=True)
class FitResult:
    """The cost model of one (environment, op, dtype): a regressor per implementation and what it was fitted on."""

    op: str
    dtype: str
    env: EnvInfo
    estimator: str
    models: dict[str, ImplModel]
    seen_configs: dict[str, list[dict[str, Any]]]  # impl → distinct configs of its trials
    shapes: list[dict[str, int]]  # distinct measured shapes
    n_trials: int
    # caches of candidates(): registry config spaces by the shape keys they depend on, and candidate lists by (impl,
    # id of the registry's list) — the memo keeps those lists alive, so their ids stay unique
    _memo: dict[tuple, list] = field(default_factory=dict, repr=False, compare=False)
    _candidates: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def impl_versions(self) -> dict[str, str]:
        """Implementation → the version its regressor was fitted on."""
        return {name: m.version for name, m in self.models.items()}

    def candidates(self, shape: Mapping[str, int]) -> list[tuple[str, dict[str, Any]]]:
        """Every (impl, config) the model chooses among at ``shape`` (see :func:`candidate_configs`)."""
        out = []
        for impl in self.models:
            registered = _registry_configs(self.op, impl, shape, self._memo)
            key = (impl, id(registered))
            configs = self._candidates.get(key)
            if configs is None:
                configs = self._candidates[key] = _merge_configs(self.op, impl, registered, self.seen_configs[impl])
            out += [(impl, c) for c in configs]
        return out

    def predict_log_us(self, pairs: Sequence[tuple[Mapping[str, int], str, Mapping[str, Any]]]) -> np.ndarray:
        """Predicted ``ln(µs)`` ``[len(pairs)]`` of ``(shape, impl, config)`` triples; NaN for an impl not modelled."""
        out = np.full(len(pairs), np.nan)
        by_impl: dict[str, list[int]] = defaultdict(list)
        for i, (_, impl, _) in enumerate(pairs):
            by_impl[impl].append(i)
        for impl, idx in by_impl.items():
            model = self.models.get(impl)
            if model is not None:
                out[idx] = model.predict_log_us([(pairs[i][0], self.dtype, pairs[i][2]) for i in idx], self.env)
        return out

    def choose(self, shape: Mapping[str, int]) -> tuple[str, dict[str, Any], float]:
        """The candidate with the least predicted time at ``shape``: ``(impl, config, predicted µs)``."""
        cands = self.candidates(shape)
        pred = self.predict_log_us([(shape, impl, c) for impl, c in cands])
        best = int(np.argmin(pred))
        return cands[best][0], cands[best][1], float(math.exp(pred[best]))


def candidate_configs(
    op: str, impl: str, shape: Mapping[str, int], seen: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The configs of ``impl`` to consider at ``shape``: the registry's tuning space for that shape
    (``Impl.configs(shape)``); for compose_train's Triton path also the configs in ``seen`` (the backward configs of
    the profiler's second stage); for an implementation the registry does not know, ``seen``."""
    return _merge_configs(op, impl, _registry_configs(op, impl, shape), seen)


def _registry_configs(
    op: str, impl: str, shape: Mapping[str, int], memo: dict[tuple, list] | None = None
) -> list[dict[str, Any]] | None:
    """``Impl.configs(shape)`` of the registry's ``impl``; None when the registry has no such implementation.

    With ``memo``, a space is built once per value of the shape keys it depends on (``Impl.space_keys``; the
    norm's reads only ``r``), so a decision grid builds each space once.
    """
    from dora_tune.dispatch.registry import registry

    found = next((i for i in registry().get(op, ()) if i.name == impl), None)
    if found is None:
        return None
    if memo is None:
        return list(found.configs(dict(shape)))
    key = (op, impl, *(shape[k] for k in found.space_keys))
    if key not in memo:
        memo[key] = list(found.configs(dict(shape)))
    return memo[key]


def _merge_configs(
    op: str, impl: str, registered: list[dict[str, Any]] | None, seen: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The candidate configs from the registry's (None: unknown impl → ``seen``) and the seen ones, deduplicated."""
    if registered is None:
        configs = [dict(c) for c in seen]
    elif op == "compose_train" and impl == "triton":
        configs = registered + [dict(c) for c in seen]
    else:
        configs = registered
    out, keys = [], set()
    for c in configs:
        k = json.dumps(c, sort_keys=True)
        if k not in keys:
            keys.add(k)
            out.append(c)
    return out


def _fit_models(data: _Data, rows_idx: Sequence[int], estimator: str, seed: int) -> dict[str, ImplModel]:
    """One regressor per implementation over the rows ``rows_idx`` of ``data``."""
    return fit_impls(data.op, [(data.env, data.rows[i]) for i in rows_idx], data.versions, estimator, seed)


def fit_impls(
    op: str, rows: Sequence[tuple[EnvInfo, TrialRow]], versions: Mapping[str, str], estimator: str, seed: int
) -> dict[str, ImplModel]:
    """One regressor per implementation over ``(environment, trial)`` rows, each row's features with its own
    environment's GPU features (one environment for the per-GPU model, several for the cross-GPU one)."""
    by_impl: dict[str, list[tuple[EnvInfo, TrialRow]]] = defaultdict(list)
    for env, t in rows:
        by_impl[t.impl].append((env, t))
    models = {}
    for impl, pairs in sorted(by_impl.items()):
        spec = FeatureSpec.for_configs(op, impl, (t.config for _, t in pairs))
        blocks: dict[int, tuple[EnvInfo, list[TrialRow]]] = {}
        for env, t in pairs:
            blocks.setdefault(id(env), (env, []))[1].append(t)
        x = np.vstack([spec.matrix([(t.shape, t.dtype, t.config) for t in ts], env) for env, ts in blocks.values()])
        y = np.log(np.array([t.median_us for _, ts in blocks.values() for t in ts], dtype=np.float64))
        reg = make_estimator(estimator, spec, len(y), seed=seed)
        reg.fit(x, y)
        models[impl] = ImplModel(impl, versions[impl], spec, reg, len(y))
    return models


def _seen_configs(data: _Data) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for t in data.rows:
        out[t.impl].setdefault(canonical_json(t.config), t.config)
    return {impl: list(v.values()) for impl, v in out.items()}


def fit_op(
    trials: Sequence[TrialRow],
    op: str,
    dtype: str,
    *,
    env: EnvInfo | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    seed: int = 0,
) -> FitResult:
    """Fit the cost model of ``op``/``dtype`` on ``trials`` (of one environment).

    Only "ok" trials count, each implementation at its newest version (the version of its latest trial).

    Args:
        trials: trials of one environment (others ops and dtypes are ignored).
        op: "norm", "compose" or "compose_train"; dtype: "bf16", "fp16" or "fp32".
        env: the environment, for the GPU features; None builds one from the trials' GPU name (unknown SMs and
            memory: they are constant within one environment, so the fit does not depend on them).
        estimator: one of :data:`ESTIMATORS`.
        seed: the estimators' random seed.

    Raises:
        ValueError: no usable trial, trials of several environments, an unknown op, dtype or estimator.
    """
    return _fit_data(_prepare(trials, op, dtype, env), estimator, seed)


def _fit_data(data: _Data, estimator: str, seed: int) -> FitResult:
    models = _fit_models(data, range(len(data.rows)), estimator, seed)
    return FitResult(data.op, data.dtype, data.env, estimator, models, _seen_configs(data), data.shapes, len(data.rows))


# ---------------------------------------------------------------------------------------- cross-validation


def crossover_choice(op: str, shape: Mapping[str, int]) -> tuple[str, dict[str, Any]]:
    """The paper's fixed crossover (:class:`~dora_tune.kernels.spec.OpSpec`): ``(implementation, config dict)`` at
    ``shape`` — Triton with the default config, or the torch implementation with ``{}``."""
    from dora_tune.kernels import OP_SPECS

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
    fastest measured of the model's shortlist (:func:`race_shortlist`); None otherwise.
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
        """Plain JSON types (what :func:`fit` stores as the model's metrics, under ``"cv"``)."""
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
    crossover's figures and counted in ``crossover.excluded``. Trials are filtered as in :func:`fit_op`.

    Raises:
        ValueError: as :func:`fit_op`, or fewer than 2 distinct shapes.
    """
    return _cv_data(_prepare(trials, op, dtype, env), n_splits, estimator, seed)


def _cv_data(data: _Data, n_splits: int, estimator: str, seed: int) -> CVReport:
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


def _races(data: _Data) -> bool:
    """Whether the dispatcher races this op's shortlist where these trials were measured (ops of ``RACE_OPS``, on a
    CUDA GPU: without one every op runs its torch implementation, nothing is raced)."""
    return data.op in RACE_OPS and data.env.kind == "cuda"


def _score_shape(fold: FitResult, data: _Data, idx: Sequence[int]) -> ShapeOutcome:
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
    """The fixed crossover's figures over every measured shape of ``trials`` (filtered as in :func:`fit_op`)."""
    data = _prepare(trials, op, dtype, None)
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


# ------------------------------------------------------------------------------------------------ compiling


def measured_best(trials: Sequence[TrialRow], op: str, dtype: str) -> list[Measured]:
    """The fastest "ok" (impl, config) of each measured shape (trials filtered as in :func:`fit_op`)."""
    return _best_data(_prepare(trials, op, dtype, None))


def _best_data(data: _Data) -> list[Measured]:
    best: dict[int, TrialRow] = {}
    for t, s in zip(data.rows, data.shape_index, strict=True):
        if s not in best or t.median_us < best[s].median_us:
            best[s] = t
    return [Measured(dict(data.shapes[s]), t.impl, t.config, t.median_us) for s, t in sorted(best.items())]


def _ranked_data(data: _Data, k: int) -> dict[tuple[int, ...], list[tuple[str, dict[str, Any]]]]:
    """Shape key → its ``k`` fastest measured (impl, config), fastest first."""
    by_shape: dict[int, list[TrialRow]] = defaultdict(list)
    for t, s in zip(data.rows, data.shape_index, strict=True):
        by_shape[s].append(t)
    return {
        _shape_key(data.op, data.shapes[s]): [(t.impl, t.config) for t in sorted(rows, key=lambda t: t.median_us)[:k]]
        for s, rows in by_shape.items()
    }


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
        shapes_seen: the fastest measured pair per shape (:func:`measured_best`).
        planned: more shapes the grid must cover.
        shortlist: candidates a cell holds (its decision and the runners-up), by predicted time; at a measured grid
            point by measured time (``measured_ranked``: shape key → its measured pairs, fastest first).
    """
    if planned is None:
        from dora_tune.dispatch.shapes import default_shapes

        planned = default_shapes()[op]
    keys = OP_SHAPE_KEYS[op]
    every = [*(m.shape for m in shapes_seen), *models.shapes, *planned]
    if not every:
        raise ValueError("compile_decisions needs at least one measured or planned shape")
    axes = {k: grid_axis([int(s[k]) for s in every]) for k in keys}
    grid = [dict(zip(keys, p, strict=True)) for p in _product([axes[k] for k in keys])]
    measured = {_shape_key(op, m.shape): (m.impl, m.config) for m in shapes_seen}
    cells: list[tuple[str, dict] | None] = [measured.get(_shape_key(op, g)) for g in grid]
    runners: list[tuple[tuple[str, dict], ...]] = [() for _ in grid]
    for i, g in enumerate(grid):
        ranked = (measured_ranked or {}).get(_shape_key(op, g))
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
    """Row-major cartesian product (the last axis fastest), as :class:`DecisionTable` lays out its cells."""
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
) -> list[FitSummary]:
    """Fit, cross-validate and compile the cost model of every (environment, op, dtype) of ``db`` with at least
    ``min_shapes`` distinct measured shapes, and store each decision table and its metrics
    (:meth:`TuningDB.save_model`, replacing older ones).

    Args:
        db: a writable tuning database.
        gpu: only environments of this GPU (name, slug or part of a name, as :meth:`TuningDB.trials`).
        estimator: one of :data:`ESTIMATORS`.
        n_splits: folds of the leave-shapes-out cross-validation.
        min_shapes: fewest distinct shapes to fit.

    Returns:
        One summary per fitted (environment, op, dtype), ordered by GPU, op, dtype; empty when nothing qualifies.

    Raises:
        DatabaseError: the database is read-only or cannot be read or written.
        ValueError: an unknown estimator.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {list(ESTIMATORS)}")
    envs = {e.id: e for e in db.environments(gpu=gpu)}
    groups: dict[tuple[int, str, str], list[TrialRow]] = defaultdict(list)
    for t in db.trials(gpu=gpu, status="ok"):
        if t.env_id in envs and t.op in OP_SHAPE_KEYS and t.dtype in DTYPE_NAMES:
            groups[(t.env_id, t.op, t.dtype)].append(t)
    out = []
    for (env_id, op, dtype), trials in sorted(groups.items(), key=lambda kv: (envs[kv[0][0]].gpu_name, kv[0])):
        env = envs[env_id].info
        try:
            data = _prepare(trials, op, dtype, env)
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
