"""One cost model over several GPUs, scored by leaving one GPU out (``dora-tune fit --cross-gpu``).

The per-GPU cost model (:mod:`~dora_tune.tuning.estimators`) sees one GPU, so its GPU features are constant and
say nothing. Fitted on the trials of several GPUs, each row carrying its own GPU's features
(:func:`~dora_tune.tuning.features.gpu_features`: SMs, memory, bandwidth and L2 as the device reported them), one
regressor per implementation can learn how times move between GPUs. :func:`leave_one_gpu_out` asks what a GPU
nobody profiled would get: for each GPU in turn, fit on the others and choose on its measured shapes, scored
against what was measured there — beside two other ways to plan an unseen GPU: the transfer rule (the per-GPU model
of the nearest profiled GPU: same compute capability first, then nearest by features; what the dispatcher does
with a shipped cache's tables) and the paper's fixed crossover.

scikit-learn is imported by the fitting functions only, never at module level.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from dora_tune.autotune_db import EnvInfo, TrialRow, canonical_json, gpus
from dora_tune.autotune_db.gpus import GpuFacts, gpu_facts
from dora_tune.tuning.data import TrialData, prepare_trials
from dora_tune.tuning.estimators import DEFAULT_ESTIMATOR, FitResult, _fit_data, _seen_configs, fit_impls
from dora_tune.tuning.evaluation import Metrics, _metrics, _races, _score_shape
from dora_tune.tuning.fitting import MIN_SHAPES


@dataclass(frozen=True)
class GpuTrials:
    """One GPU's trials, with the environment they were measured in (its features included)."""

    env: EnvInfo
    trials: Sequence[TrialRow]


@dataclass(frozen=True)
class HeldOut:
    """How three planners do on one GPU left out of the fit: the cross-GPU ``model`` (fitted on the other GPUs),
    the ``transfer`` rule (the per-GPU model of ``transfer_from``) and the ``crossover``; ``*_race``: the
    dispatcher's race among the model's shortlist (ops that race), None otherwise."""

    gpu_name: str
    trained_on: tuple[str, ...]
    transfer_from: str
    n_shapes: int
    model: Metrics
    model_race: Metrics | None
    transfer: Metrics
    transfer_race: Metrics | None
    crossover: Metrics


def facts_of(env: EnvInfo) -> GpuFacts:
    """What the transfer rule compares of an environment's GPU (its recorded features, else published figures)."""
    return gpu_facts(env.gpu_name, env.compute_capability, env.sm_count, env.features)


def nearest_gpu(target: EnvInfo, candidates: Sequence[EnvInfo]) -> EnvInfo:
    """The candidate GPU a plan for ``target`` should come from, by the dispatcher's transfer rule
    (:func:`dora_tune.autotune_db.gpus.nearest_gpu`: the same compute capability, else architecture, else any; then
    the nearest by SMs, bandwidth and L2; then the name)."""
    if not candidates:
        raise ValueError("no candidate GPU")
    facts = [facts_of(c) for c in candidates]
    return candidates[facts.index(gpus.nearest_gpu(facts_of(target), facts))]


def _data_of(group: GpuTrials, op: str, dtype: str) -> TrialData | None:
    try:
        return prepare_trials(group.trials, op, dtype, group.env)
    except ValueError:  # no usable trial of this op/dtype
        return None


def fit_cross_gpu(
    datas: Sequence[TrialData], target: EnvInfo, estimator: str = DEFAULT_ESTIMATOR, seed: int = 0
) -> FitResult:
    """One regressor per implementation over the rows of every GPU in ``datas`` (each row with its own GPU's
    features), predicting for ``target``. An implementation is fitted on the rows at its newest version among the
    GPUs (older versions' rows are left out)."""
    op, dtype = datas[0].op, datas[0].dtype
    newest: dict[str, tuple] = {}
    for d in datas:
        for t in d.rows:
            if t.impl not in newest or t.created_at > newest[t.impl][0]:
                newest[t.impl] = (t.created_at, t.impl_version)
    versions = {impl: v for impl, (_, v) in newest.items()}
    rows = [(d.env, t) for d in datas for t in d.rows if t.impl_version == versions[t.impl]]
    models = fit_impls(op, rows, versions, estimator, seed)
    seen: dict[str, dict] = defaultdict(dict)
    for d in datas:
        for impl, cfgs in _seen_configs(d).items():
            for c in cfgs:
                seen[impl].setdefault(canonical_json(c), c)
    shapes = sorted({tuple(s.values()) for d in datas for s in d.shapes})
    keys = list(datas[0].shapes[0]) if datas[0].shapes else []
    return FitResult(
        op,
        dtype,
        target,
        estimator,
        models,
        {k: list(v.values()) for k, v in seen.items()},
        [dict(zip(keys, s, strict=True)) for s in shapes],
        sum(len(d.rows) for d in datas),
    )


def _score(fold: FitResult, held: TrialData) -> tuple[Metrics, Metrics | None, Metrics]:
    by_shape: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(held.shape_index):
        by_shape[s].append(i)
    shapes = [_score_shape(fold, held, idx) for _, idx in sorted(by_shape.items())]
    race = _metrics(shapes, "race") if _races(held) else None
    return _metrics(shapes, "model"), race, _metrics(shapes, "crossover")


def leave_one_gpu_out(
    groups: Sequence[GpuTrials],
    op: str,
    dtype: str,
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    seed: int = 0,
    min_shapes: int = MIN_SHAPES,
) -> list[HeldOut]:
    """For each GPU with at least ``min_shapes`` measured shapes of ``op``/``dtype``: fit the cross-GPU model on the
    other GPUs (:func:`fit_cross_gpu`) and the transfer rule's per-GPU model of the nearest other GPU
    (:func:`nearest_gpu`), and score both — and the crossover — on the held-out GPU's measured shapes (each
    shape's choice among the pairs measured there, regret against its fastest). One GPU per name: a second
    environment of the same GPU is merged into the first (another driver or torch is the same silicon).

    Raises:
        ValueError: fewer than two GPUs with usable trials.
    """
    by_gpu: dict[str, tuple[EnvInfo, list[TrialRow]]] = {}
    for g in groups:
        if g.env.kind == "cuda":
            rows = by_gpu.setdefault(g.env.gpu_name, (g.env, []))[1]
            rows.extend(t for t in g.trials if (t.op, t.dtype) == (op, dtype))
    datas = {}
    for name, (env, rows) in by_gpu.items():
        if not rows:
            continue
        first = rows[0].env_id  # prepare_trials takes one environment: another of the same GPU takes the first's id
        d = _data_of(GpuTrials(env, [t if t.env_id == first else replace(t, env_id=first) for t in rows]), op, dtype)
        if d is not None:
            datas[name] = d
    if len(datas) < 2:
        raise ValueError(f"leave-one-GPU-out needs trials of ≥ 2 GPUs for {op} {dtype}, got {sorted(datas)}")
    out = []
    for name, held in sorted(datas.items()):
        if held.n_shapes < min_shapes:
            continue
        others = [d for n, d in sorted(datas.items()) if n != name]
        model, model_race, crossover = _score(fit_cross_gpu(others, held.env, estimator, seed), held)
        source = nearest_gpu(held.env, [d.env for d in others])
        src = next(d for d in others if d.env is source)
        transfer, transfer_race, _ = _score(_fit_data(src, estimator, seed), held)
        out.append(
            HeldOut(
                name,
                tuple(d.env.gpu_name for d in others),
                source.gpu_name,
                held.n_shapes,
                model,
                model_race,
                transfer,
                transfer_race,
                crossover,
            )
        )
    return out
