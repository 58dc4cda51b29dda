"""The regressors of the cost model and the per-implementation models fitted with them.

For one (environment, op, dtype) every implementation gets a regressor predicting ``ln(median_us)`` of an "ok"
trial from :class:`~dora_tune.tuning.features.FeatureSpec` features (shape, traffic, work, dtype, config, GPU)
(:func:`fit_op` → :class:`FitResult`). For a shape the model predicts each candidate (implementation, config) —
every config of the registry for that shape, plus, for compose_train's Triton path, the stage-2 (backward) configs
seen in the trials — and picks the argmin (:meth:`FitResult.choose`). The fitted regressors never leave the process.

scikit-learn is imported inside the functions that need it, never at module level.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dora_tune.autotune_db import EnvInfo, TrialRow, canonical_json
from dora_tune.tuning.data import TrialData, prepare_trials
from dora_tune.tuning.features import FeatureSpec

ESTIMATORS: tuple[str, ...] = ("extra_trees", "hist_gb", "knn", "linear_trees")
"""Regressors :func:`make_estimator` builds (``docs/cost-model.md``, "Estimator choice")."""

DEFAULT_ESTIMATOR = "linear_trees"
"""The regressor :func:`~dora_tune.tuning.fitting.fit` uses unless told otherwise (chosen on leave-shapes-out
regret, docs/cost-model.md)."""
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


# ------------------------------------------------------------------------------------------ fitted models


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


def _fit_models(data: TrialData, rows_idx: Sequence[int], estimator: str, seed: int) -> dict[str, ImplModel]:
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


def _seen_configs(data: TrialData) -> dict[str, list[dict[str, Any]]]:
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
    return _fit_data(prepare_trials(trials, op, dtype, env), estimator, seed)


def _fit_data(data: TrialData, estimator: str, seed: int) -> FitResult:
    models = _fit_models(data, range(len(data.rows)), estimator, seed)
    return FitResult(data.op, data.dtype, data.env, estimator, models, _seen_configs(data), data.shapes, len(data.rows))
