"""The trials a cost model is fitted on: :func:`prepare_trials` keeps the usable ones of one (environment, op,
dtype) as :class:`TrialData` (each implementation at its newest version), and each measured shape's fastest pairs
(:func:`measured_best`), which compiled decision tables take as they are at measured grid points."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from dora_tune.autotune_db import EnvInfo, TrialRow
from dora_tune.ops import DTYPE_NAMES, OP_SHAPE_KEYS


class Measured(NamedTuple):
    """The fastest measured (implementation, config) of one shape, and its median time (µs)."""

    shape: dict[str, int]
    impl: str
    config: dict[str, Any]
    median_us: float


@dataclass(frozen=True)
class TrialData:
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


def shape_key(op: str, shape: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(int(shape[k]) for k in OP_SHAPE_KEYS[op])


def prepare_trials(trials: Sequence[TrialRow], op: str, dtype: str, env: EnvInfo | None) -> TrialData:
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
    keys = sorted({shape_key(op, t.shape) for t in rows})
    pos = {k: i for i, k in enumerate(keys)}
    if env is None:
        name = rows[0].gpu_name
        kind = "cpu" if name.lower().startswith("cpu") else "cuda"
        env = EnvInfo(kind, name, "", 0, 0, "", "", "", "", "")
    return TrialData(
        op=op,
        dtype=dtype,
        env=env,
        rows=rows,
        versions=versions,
        shapes=[dict(zip(OP_SHAPE_KEYS[op], k, strict=True)) for k in keys],
        shape_index=[pos[shape_key(op, t.shape)] for t in rows],
    )


def measured_best(trials: Sequence[TrialRow], op: str, dtype: str) -> list[Measured]:
    """The fastest "ok" (impl, config) of each measured shape (trials filtered as in
    :func:`~dora_tune.tuning.estimators.fit_op`)."""
    return _best_data(prepare_trials(trials, op, dtype, None))


def _best_data(data: TrialData) -> list[Measured]:
    best: dict[int, TrialRow] = {}
    for t, s in zip(data.rows, data.shape_index, strict=True):
        if s not in best or t.median_us < best[s].median_us:
            best[s] = t
    return [Measured(dict(data.shapes[s]), t.impl, t.config, t.median_us) for s, t in sorted(best.items())]


def _ranked_data(data: TrialData, k: int) -> dict[tuple[int, ...], list[tuple[str, dict[str, Any]]]]:
    """Shape key → its ``k`` fastest measured (impl, config), fastest first."""
    by_shape: dict[int, list[TrialRow]] = defaultdict(list)
    for t, s in zip(data.rows, data.shape_index, strict=True):
        by_shape[s].append(t)
    return {
        shape_key(data.op, data.shapes[s]): [(t.impl, t.config) for t in sorted(rows, key=lambda t: t.median_us)[:k]]
        for s, rows in by_shape.items()
    }
