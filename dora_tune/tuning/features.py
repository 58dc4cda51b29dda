"""Features of one timed call for the cost model: shape, traffic, work, dtype, launch config and GPU.

A :class:`FeatureSpec` fixes the layout for one (op, implementation): which flattened config keys it has. Its
vectors hold, in order (:meth:`FeatureSpec.names`):

* ``log2_<key>`` of each shape dimension (``OP_SHAPE_KEYS[op]`` order);
* ``log2_bytes`` and ``log2_flops`` (:func:`~dora_tune.tuning.trials.op_bytes` / ``op_flops``: the fewest bytes
  the op must move, its floating-point operations) and ``log2_intensity`` = log2(flops / bytes);
* ``dtype_bf16``, ``dtype_fp16``, ``dtype_fp32``: one-hot;
* ``log2_cfg_<key>`` of each numeric config value (nested compose_train configs flattened to ``fwd_*``/``bwd_*``;
  a key the config lacks gives 0);
* for a layout with a launch grid (:data:`LAUNCH_GRIDS`: the norm's Triton kernel), ``grid_<name>_log2_programs``,
  ``grid_<name>_wave_eff`` and ``grid_<name>_log2_loop_iters``: the programs the config launches at the shape, the
  share of the SM slots of the waves they take (``programs ÷ (ceil(programs / SMs) · SMs)``; log sizes alone cannot
  show a partial last wave) and the trip count of each program's main loop;
* GPU: ``gpu_sm_count``, ``gpu_log2_memory`` (bytes), ``gpu_bandwidth_tbs`` and ``gpu_l2_mb`` as the device
  reported them (NVML, torch's device properties; recorded with the environment), else published
  (:data:`~dora_tune.autotune_db.gpus.KNOWN_GPUS`)
  (0 where neither knows), ``gpu_unknown`` (1 when bandwidth or L2 is known from neither).

Pure numpy; no scikit-learn. torch is imported (through the traffic model of :mod:`~dora_tune.tuning.trials`) only
when vectors are built.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dora_tune.autotune_db import EnvInfo
from dora_tune.autotune_db.gpus import gpu_facts
from dora_tune.ops import DTYPE_NAMES as _DTYPE_NAMES
from dora_tune.ops import OP_SHAPE_KEYS, OPS, cdiv

DTYPE_NAMES: tuple[str, ...] = _DTYPE_NAMES
"""The dtypes of the one-hot block, in order (the registry's ``DTYPES`` keys)."""


def gpu_features(env: EnvInfo) -> list[float]:
    """``[sm_count, log2 memory bytes, bandwidth TB/s, L2 MB, unknown flag]`` of ``env``'s GPU.

    Bandwidth and L2 come from what the device said when the environment was recorded (``env.features``: NVML's
    peak memory bandwidth, torch's L2 size); each figure the device did not give falls back to the published one
    in :data:`~dora_tune.autotune_db.gpus.KNOWN_GPUS`, and to 0 with the unknown flag set when neither knows it
    (:func:`~dora_tune.autotune_db.gpus.gpu_facts`)."""
    mem = math.log2(env.memory_bytes) if env.memory_bytes > 0 else 0.0
    if env.kind != "cuda":
        return [float(env.sm_count), mem, 0.0, 0.0, 1.0]
    facts = gpu_facts(env.gpu_name, env.compute_capability, env.sm_count, env.features)
    bw, l2 = facts.bandwidth_tbs, facts.l2_mb
    return [float(env.sm_count), mem, bw or 0.0, l2 or 0.0, float(bw is None or l2 is None)]


def flatten_config(config: Mapping[str, Any]) -> dict[str, float]:
    """Numeric values of a config, nested dicts flattened with ``_`` (``{"fwd": {"block_r": 8}}`` → ``fwd_block_r``).

    Bools and non-numeric values are left out.
    """
    out: dict[str, float] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update({f"{k}_{kk}": vv for kk, vv in flatten_config(v).items()})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


LAUNCH_GRIDS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    op: tuple((g.name, g.config_keys) for g in facts.launch_grids) for op, facts in OPS.items() if facts.launch_grids
}
"""The launch grids with features, per op (its facts, :class:`~dora_tune.ops.LaunchGrid`): ``(name, the flattened
config keys the grid needs)``; a layout gets a grid's features when its config keys hold all of them (the Triton
implementation; configless ones have none)."""


_GRID_PARTS = ("log2_programs", "wave_eff", "log2_loop_iters")


def launch_geometry(
    op: str, grid: str, dims: Mapping[str, np.ndarray], cfg: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Programs and main-loop trips per program (int64 ``[n]`` each) of the launch grid ``grid`` of ``op`` for shape
    dimensions ``dims`` and flattened config values ``cfg`` (int64 arrays of one entry a row, config values ≥ 1).

    The formulas are the op's facts (:attr:`~dora_tune.ops.OpFacts.launch_grids`), e.g. the norm's main kernel:
    ``cdiv(d_out, block_m) · cdiv(r, block_n) · S`` programs, ``S = cdiv(d_in, k_per_split)`` K ranges of
    ``k_per_split = cdiv(cdiv(d_in, split_k), block_k) · block_k``, each looping ``k_per_split / block_k`` times.
    """
    for g in OPS[op].launch_grids if op in OPS else ():
        if g.name == grid:
            return g.geometry(dims, cfg)
    raise ValueError(f"no launch grid {grid!r} for {op!r}")


def _log2(v: float) -> float:
    """log2 of a positive value; 0 for 0 or less (a missing or zero config value)."""
    return math.log2(v) if v > 0 else 0.0


@dataclass(frozen=True)
class FeatureSpec:
    """The feature layout of one (op, implementation): the flattened config keys it encodes, sorted."""

    op: str
    impl: str
    config_keys: tuple[str, ...]

    @property
    def grids(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The launch grids (:data:`LAUNCH_GRIDS`) whose config keys this layout has."""
        return tuple(g for g in LAUNCH_GRIDS.get(self.op, ()) if set(g[1]) <= set(self.config_keys))

    @classmethod
    def for_configs(cls, op: str, impl: str, configs: Iterable[Mapping[str, Any]]) -> FeatureSpec:
        """The layout covering every numeric key of ``configs`` (``()`` for a config-less implementation)."""
        if op not in OP_SHAPE_KEYS:
            raise ValueError(f"unknown op {op!r}; expected one of {list(OP_SHAPE_KEYS)}")
        keys: set[str] = set()
        for c in configs:
            keys.update(flatten_config(c))
        return cls(op, impl, tuple(sorted(keys)))

    def names(self) -> list[str]:
        """Names of the vector's entries, in order (see the module docstring)."""
        return [
            *(f"log2_{k}" for k in OP_SHAPE_KEYS[self.op]),
            "log2_bytes",
            "log2_flops",
            "log2_intensity",
            *(f"dtype_{d}" for d in DTYPE_NAMES),
            *(f"log2_cfg_{k}" for k in self.config_keys),
            *(f"grid_{g}_{part}" for g, _ in self.grids for part in _GRID_PARTS),
            "gpu_sm_count",
            "gpu_log2_memory",
            "gpu_bandwidth_tbs",
            "gpu_l2_mb",
            "gpu_unknown",
        ]

    def matrix(self, rows: Sequence[tuple[Mapping[str, int], str, Mapping[str, Any]]], env: EnvInfo) -> np.ndarray:
        """Feature matrix ``[len(rows), len(names())]`` (float64) of ``(shape, dtype, config)`` rows on ``env``.

        The shape part is computed once per distinct (shape, dtype) and the config part once per config object, so
        many configs at many shapes (a decision grid) cost little more than their distinct values.

        Raises:
            ValueError: an unknown dtype, or a shape lacking a key of the op.
        """
        from dora_tune.tuning.trials import op_bytes, op_flops  # torch: only when vectors are built

        keys = OP_SHAPE_KEYS[self.op]
        heads: dict[tuple[tuple[int, ...], str], int] = {}
        head_rows: list[list[float]] = []
        cfgs: dict[int, int] = {}
        cfg_rows: list[list[float]] = []
        head_dims: list[tuple[int, ...]] = []  # per distinct (shape, dtype): the dimensions
        cfg_values: list[list[float]] = []  # per distinct config: its values (0 where missing)
        head_idx = np.empty(len(rows), dtype=np.intp)
        cfg_idx = np.empty(len(rows), dtype=np.intp)
        for i, (shape, dtype, config) in enumerate(rows):
            try:
                dims = tuple(int(shape[k]) for k in keys)
            except KeyError:
                raise ValueError(f"a {self.op} shape needs the keys {list(keys)}, got {sorted(shape)}") from None
            h = heads.get((dims, dtype))
            if h is None:
                if dtype not in DTYPE_NAMES:
                    raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPE_NAMES)}")
                sd = dict(zip(keys, dims, strict=True))
                nbytes, flops = op_bytes(self.op, sd, dtype), op_flops(self.op, sd)
                head = [*(_log2(d) for d in dims), _log2(nbytes), _log2(flops), math.log2(flops / nbytes)]
                head_rows.append(head + [float(dtype == d) for d in DTYPE_NAMES])
                head_dims.append(dims)
                h = heads[(dims, dtype)] = len(head_rows) - 1
            c = cfgs.get(id(config))
            if c is None:
                flat = flatten_config(config)
                cfg_values.append([flat.get(k, 0.0) for k in self.config_keys])
                cfg_rows.append([_log2(v) for v in cfg_values[-1]])
                c = cfgs[id(config)] = len(cfg_rows) - 1
            head_idx[i], cfg_idx[i] = h, c
        n_head = len(keys) + 3 + len(DTYPE_NAMES)
        head_m = np.asarray(head_rows, dtype=np.float64).reshape(len(head_rows), n_head)
        cfg_m = np.asarray(cfg_rows, dtype=np.float64).reshape(len(cfg_rows), len(self.config_keys))
        gpu = np.broadcast_to(np.asarray(gpu_features(env), dtype=np.float64), (len(rows), 5))
        launch = self._launch(head_dims, cfg_values, head_idx, cfg_idx, env.sm_count)
        return np.hstack([head_m[head_idx], cfg_m[cfg_idx], launch, gpu])

    def _launch(
        self,
        head_dims: Sequence[tuple[int, ...]],
        cfg_values: Sequence[Sequence[float]],
        head_idx: np.ndarray,
        cfg_idx: np.ndarray,
        sm_count: int,
    ) -> np.ndarray:
        """The launch-grid block ``[n, 3 · len(grids)]``: per grid log2 programs, wave efficiency (one program an
        SM; 1 on a GPU of unknown SM count) and log2 main-loop trips; 0s in a row whose config lacks a value the
        grid needs."""
        n, grids, k = len(head_idx), self.grids, len(_GRID_PARTS)
        out = np.zeros((n, k * len(grids)))
        if not grids or n == 0:
            return out
        keys = OP_SHAPE_KEYS[self.op]
        d = np.asarray(head_dims, dtype=np.int64).reshape(-1, len(keys))[head_idx]
        c = np.rint(np.asarray(cfg_values, dtype=np.float64)).astype(np.int64)
        c = c.reshape(-1, len(self.config_keys))[cfg_idx]
        dims = {k: d[:, j] for j, k in enumerate(keys)}
        for gi, (name, need) in enumerate(grids):
            cols = [self.config_keys.index(k) for k in need]
            ok = np.all(c[:, cols] >= 1, axis=1)
            cfg = {k: np.maximum(c[:, j], 1) for k, j in zip(need, cols, strict=True)}
            programs, trips = launch_geometry(self.op, name, dims, cfg)
            programs = np.maximum(programs, 1)
            if sm_count > 0:
                wave = programs / (cdiv(programs, np.int64(sm_count)) * sm_count)
            else:
                wave = np.ones(n)
            out[:, k * gi] = np.where(ok, np.log2(programs), 0.0)
            out[:, k * gi + 1] = np.where(ok, wave, 0.0)
            out[:, k * gi + 2] = np.where(ok, np.log2(np.maximum(trips, 1)), 0.0)
        return out

    def vector(self, shape: Mapping[str, int], dtype: str, config: Mapping[str, Any], env: EnvInfo) -> np.ndarray:
        """The feature vector ``[len(names())]`` of one call (see :meth:`matrix`)."""
        return self.matrix([(shape, dtype, config)], env)[0]
