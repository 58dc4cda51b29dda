"""Run-time dispatch: which implementation and config to run for an op at a shape, on a device.

Resolution order for ``(op, shape, dtype, device)``:

1. **measured** — the fastest trial of the current implementation versions for exactly this shape and dtype on this
   GPU model, in the user tuning DB, then in the shipped cache for this GPU (``dora_tune/caches/<slug>.sqlite``);
2. **model** — the fitted decision table for (op, dtype) of this GPU (user DB first, then the shipped cache); for a
   GPU with no table of its own, those of the nearest profiled GPU of the same architecture in the shipped caches
   (:func:`~dora_tune.autotune_db.gpus.nearest_gpu`: compute capability, then SMs, bandwidth and L2; "transferred
   from NVIDIA H100 80GB HBM3"), shortlisted and raced at first use like any model plan;
3. **heuristic** — the fixed crossover of the paper: fused forward always; fused backward only when
   ``cols ≥ 2048`` and ``rows·cols ≥ 2048·6144``; the fused norm always (default configs);
4. **fallback** — the torch implementation (always the case without CUDA + Triton).

**Race** (the ops of :data:`~dora_tune.dispatch.decisions.RACE_OPS`: the norm and compose_train): a model plan
carries the decision table's shortlist for its cell (the decision and its runners-up of the same implementation, 3
in all). At the first call with that key the kernel hands the dispatcher a closure over its own inputs, and
:meth:`Dispatcher.settle` times the shortlisted configs on them — interleaved rounds of GPU time with the L2 flushed,
as the profiler times a trial (:func:`~dora_tune.dispatch.timing.interleaved_times`), ~10–100 ms once the kernels
are compiled — and memoises the fastest, so later calls are plain lookups again. The norm races once per exact
shape; compose_train, whose shapes follow the token count, once per decision-table cell
(:data:`~dora_tune.dispatch.decisions.RACE_PER_CELL`: the other shapes of the cell take the winner without timing).
Not raced (the decision is kept): with ``DORA_TUNE_RACE=0`` or ``Dispatcher(race=False)``, with
``torch.use_deterministic_algorithms(True)`` (the choice would depend on timing), or while a CUDA graph is being
captured (that call only). The race costs a transient 256 MB flush buffer plus the outputs of the timed calls;
out of memory there, the decision is kept (one warning). Measured shapes are never raced.

Every config read from a database is validated before it can reach a kernel. A missing, corrupt, truncated or
foreign database, a stale kernel version or an invalid config never raises here: the dispatcher warns once, says
why in :meth:`Dispatcher.explain` (and ``dora-tune lookup``), and falls through to the next source.

Plans are memoised per (op, shape, dtype, device): a hot lookup is one dict access. Overrides: the
``DORA_TUNE_FORCE`` variable (``eager`` or ``triton``, read when the dispatcher is created) and the :func:`force`
context manager (per thread and task, via ``contextvars``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import gc
import json
import numbers
import operator
import os
import statistics
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dora_tune.autotune_db.common import canonical_json
from dora_tune.autotune_db.gpus import GpuFacts, gpu_facts, nearest_gpu
from dora_tune.dispatch.decisions import RACE_OPS, RACE_PER_CELL, race_shortlist
from dora_tune.kernels._common import DTYPE_NAME as _DTYPE_NAMES
from dora_tune.ops import OP_SHAPE_KEYS, OPS, SAME_RATE_DTYPE, SAME_RATE_TEXT

#: timed calls of each shortlisted config in a race, the rounds they are taken in, and the warm-up per config (ms)
RACE_REPS, RACE_ROUNDS, RACE_WARMUP_MS = 30, 3, 2.0
#: back-to-back calls of each shortlisted config whose wall time the race also takes (host included), per round
RACE_WALL_CALLS = 10
SOURCES = ("measured", "model", "heuristic", "fallback")
_FORCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("dora_tune_force", default=None)


#: the order model tables are tried in: (origin, whether of the sibling dtype) — this GPU's own tables (user DB, then
#: the shipped cache) of the dtype, then of its same-rate sibling, then the transferred ones in the same order
_TABLE_ORDER: dict[bool, tuple[tuple[str, bool], ...]] = {
    False: (("user", False), ("shipped", False), ("transfer", False)),
    True: (
        ("user", False),
        ("shipped", False),
        ("user", True),
        ("shipped", True),
        ("transfer", False),
        ("transfer", True),
    ),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run: ``impl`` with ``config`` (a validated config object, or None for torch implementations).

    ``source`` is one of :data:`SOURCES`; ``detail`` says which database, trial or rule decided. ``race`` holds the
    validated configs of ``impl`` to time at the first call (``config`` first; empty: nothing to race) — see
    :meth:`Dispatcher.settle`. ``race_cell`` names the decision-table cell whose shapes share that race (empty: the
    race is this shape's alone).
    """

    impl: str
    config: Any
    source: str
    detail: str
    race: tuple[Any, ...] = ()
    race_cell: tuple[Any, ...] = ()


@contextlib.contextmanager
def force(impl: str | None) -> Iterator[None]:
    """Within the block, plan only ``impl`` ("eager" = each op's torch implementation, "triton" = each op's Triton
    one: dora_linear's ``"fused"``), or lift a force (``None``). Per thread / asyncio task."""
    if impl not in (None, "eager", "triton"):
        raise ValueError(f"force() takes 'eager', 'triton' or None, got {impl!r}")
    token = _FORCE.set(impl)
    try:
        yield
    finally:
        _FORCE.reset(token)


def shipped_cache_path(gpu_name: str) -> Path:
    """Where the shipped cache for ``gpu_name`` would be (it may not exist)."""
    from dora_tune.autotune_db import gpu_slug

    return Path(__file__).resolve().parents[1] / "caches" / f"{gpu_slug(gpu_name)}.sqlite"


def _shape_key(op: str, shape: dict[str, int]) -> tuple[int, ...]:
    return tuple(int(shape[k]) for k in OP_SHAPE_KEYS[op])


#: per op, a getter of a shape dict's dimensions in ``OP_SHAPE_KEYS`` order (every op has two keys or more)
_DIMS_GETTERS = {op: operator.itemgetter(*keys) for op, keys in OP_SHAPE_KEYS.items()}


def shape_dims(op: str, shape: Mapping[str, int] | Sequence[int]) -> tuple[int, ...]:
    """The dimensions of ``op``'s ``shape`` (a dict keyed by ``OP_SHAPE_KEYS[op]`` or a sequence in that order), as
    a tuple of positive ints, checked.

    Raises:
        ValueError: an unknown op, a missing key, the wrong length, or a dimension below 1.
        TypeError: ``shape`` is neither a mapping nor a sequence, or a dimension is not an int.
    """
    keys = OP_SHAPE_KEYS.get(op)
    if keys is None:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(OP_SHAPE_KEYS)}")
    want = f"a dict with keys {list(keys)} or a sequence of {len(keys)} ints in that order"
    if isinstance(shape, Mapping):
        missing = [k for k in keys if k not in shape]
        if missing:
            raise ValueError(f"{op} shape {dict(shape)!r} lacks {missing}; expected {want}")
        values = [shape[k] for k in keys]
    elif isinstance(shape, Sequence) and not isinstance(shape, (str, bytes)):
        if len(shape) != len(keys):
            raise ValueError(f"{op} shape {tuple(shape)!r} has {len(shape)} dimensions; expected {want}")
        values = list(shape)
    else:
        raise TypeError(f"{op} shape must be {want}, not {type(shape).__name__}")
    dims = []
    for k, v in zip(keys, values, strict=True):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{op} shape: {k} must be a positive int, got {v!r} ({type(v).__name__})")
        if v < 1:
            raise ValueError(f"{op} shape: {k} must be a positive int, got {v!r}")
        dims.append(int(v))
    return tuple(dims)


@dataclasses.dataclass
class _Tables:
    """What one GPU model's databases say, loaded once."""

    gpu_name: str
    # (origin, op, canonical shape JSON, dtype) → {impl: (median_us, config JSON)}; origin "user" or "shipped"
    measured: dict[tuple[str, str, str, str], dict[str, tuple[float, str]]]
    models: dict[tuple[str, str, str], Any]  # (origin, op, dtype) → DecisionTable; origin "user", "shipped", "transfer"
    notes: list[str]
    # ops with no table of this GPU whose transfer waits until one of them is planned: (this GPU's facts, the ops)
    untransferred: tuple[GpuFacts, set[str]] | None = None


class Dispatcher:
    """Plans with an explicit, thread-safe memo. ``db`` is the user DB location (default: the usual one)."""

    def __init__(
        self,
        db: str | None = None,
        *,
        use_shipped: bool = True,
        force_env: str | None = None,
        race: bool | None = None,
    ) -> None:
        self.db = db
        self.use_shipped = use_shipped
        self._lock = threading.Lock()
        self._memo: dict[tuple, Plan] = {}
        # plan()'s arguments (device, dtype) → (dtype name, device or None for the current CUDA device)
        self._front: dict[tuple[Any, Any], tuple[str, Any]] = {}
        self._cuda_devices: dict[int, torch.device] = {}  # CUDA device index → its torch.device
        self._racing: set[tuple] = set()
        self._cell_wins: dict[tuple, Plan] = {}  # race cell key → the plan its race kept (RACE_PER_CELL ops)
        self._paths: dict[tuple, str] = {}  # (path key, device) → the path pick_path's race kept
        self._path_notes: dict[tuple, str] = {}  # (path key, device) → what that race measured
        self._tables: dict[str, _Tables] = {}
        self._warned: set[str] = set()
        self._notes: list[str] = []
        from dora_tune.kernels.norm import SharedNormCache

        #: norms the compiled path reuses between optimizer steps (``dora_tune::cached_norm``)
        self.norms = SharedNormCache(_auto_norm)
        env_force = os.environ.get("DORA_TUNE_FORCE") if force_env is None else force_env
        if env_force in ("", None):
            self.env_force = None
        elif env_force in ("eager", "triton"):
            self.env_force = env_force
        else:
            self.env_force = None
            self._warn(f"DORA_TUNE_FORCE={env_force!r} is not 'eager' or 'triton'; ignored")
        if race is None:
            env_race = os.environ.get("DORA_TUNE_RACE", "")
            race = env_race.strip().lower() not in ("0", "false", "no", "off")
            if env_race.strip().lower() not in ("", "0", "1", "false", "true", "no", "yes", "off", "on"):
                self._warn(f"DORA_TUNE_RACE={env_race!r} is not 0 or 1; racing stays on")
        self.race = race

    # ------------------------------------------------------------------ public
    def plan(
        self,
        op: str,
        shape: Mapping[str, int] | Sequence[int],
        dtype: torch.dtype | str,
        device: torch.device | str | int,
    ) -> Plan:
        """The plan for ``op`` at ``shape`` in ``dtype`` on ``device``.

        Args:
            op: "norm", "compose" or "compose_train".
            shape: the op's dimensions, as a dict keyed by ``OP_SHAPE_KEYS[op]`` (norm: ``d_out``, ``d_in``, ``r``;
                compose and compose_train: ``rows``, ``cols``) or as a sequence of positive ints in that order.
            dtype: a torch dtype or its short name ("bf16", "fp16", "fp32").
            device: a torch device or its string; "cuda" means the current CUDA device, keyed by its index as the
                kernels key their plans (by their tensors' device).

        A hot call (a key planned before) costs a few dict look-ups (~0.5 µs, 2-core CPU; docs/dispatch-and-race.md).

        Raises:
            ValueError: an unknown op, or a shape with a missing key, the wrong length, or a dimension below 1 (other
                keys of a dict are ignored).
            TypeError: a shape that is neither a mapping nor a sequence, or a dimension that is not an int.
        """
        front = self._front.get((device, dtype))
        if front is None:
            front = self._front_entry(device, dtype)
        dname, dev = front
        if dev is None:  # "cuda" without an index: the current device
            index = torch.cuda.current_device()
            dev = self._cuda_devices.get(index)
            if dev is None:
                dev = self._cuda_devices[index] = torch.device("cuda", index)
        forced = _FORCE.get() or self.env_force
        try:
            dims = _DIMS_GETTERS[op](shape) if type(shape) is dict else tuple(shape)  # type: ignore[arg-type]
            plan = self._memo.get((op, dims, dname, dev, forced))
        except (KeyError, TypeError):  # an unknown op, a missing key, unhashable or non-iterable: checked below
            plan = None
        if plan is not None:
            return plan
        return self.plan_key(op, shape_dims(op, shape), dname, dev)

    def _front_entry(self, device: torch.device | str | int, dtype: torch.dtype | str) -> tuple[str, Any]:
        """``(dtype name, device)`` of a ``plan`` call's arguments, memoised; the device None stands for the current
        CUDA device."""
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = None
        dname = dtype if isinstance(dtype, str) else _DTYPE_NAMES.get(dtype, str(dtype))
        self._front[(device, dtype)] = (dname, dev)
        return dname, dev

    def plan_key(self, op: str, dims: tuple[int, ...], dtype: str, device: torch.device) -> Plan:
        """The hot path: memoised on (op, dims, dtype, device, force)."""
        forced = _FORCE.get() or self.env_force
        key = (op, dims, dtype, device, forced)
        plan = self._memo.get(key)
        if plan is None:
            with self._lock:
                plan = self._memo.get(key)
                if plan is None:
                    plan = self._resolve(op, dims, dtype, device, forced)
                    self._memo[key] = plan
        return plan

    def reject(self, op: str, dims: tuple[int, ...], dtype: str, device: torch.device, failed: Plan, why: str) -> Plan:
        """Replace the memoised plan ``failed`` for this key after it failed to launch (e.g. a config needing more
        shared memory than the GPU has for these operand dtypes): the default config, or the torch implementation
        when the default is what failed. Warns once; returns the new plan."""
        forced = _FORCE.get() or self.env_force
        default, fused = _default_config(op), OPS[op].triton_impl
        if failed.impl == fused and failed.config != default:
            plan = Plan(fused, default, "heuristic", f"{failed.source} plan failed ({why}); default config")
        else:
            plan = Plan(
                OPS[op].torch_impl, None, "fallback", f"{failed.source} plan failed ({why}); torch implementation"
            )
        with self._lock:
            self._memo[(op, dims, dtype, device, forced)] = plan
        self._warn(
            f"{op} {dims} {dtype}: {failed.impl} {failed.config} failed to launch ({why}); using {plan.impl}"
            f"{' with the default config' if plan.config is not None else ''}"
        )
        return plan

    def settle(
        self, op: str, dims: tuple[int, ...], dtype: str, device: torch.device, plan: Plan, run: Callable[[Any], Any]
    ) -> Plan:
        """Race ``plan``'s shortlist (:attr:`Plan.race`) once and memoise the fastest config for this key.

        ``run(config)`` launches the op with ``config`` on the caller's own inputs (it must have no side effect the
        caller would see). A config that fails to launch drops out; if none launches, :meth:`reject` decides. A plan
        with a :attr:`Plan.race_cell` whose cell was raced already (at another shape) takes that race's result
        without timing. Not raced — the plan's own decision is kept — under deterministic algorithms, while a CUDA
        graph is captured (this call only, nothing memoised), while another thread races the same key or cell
        (likewise), or when the timed calls run out of memory (warns once). Returns the plan to run, without a
        shortlist.
        """
        if not plan.race:
            return plan
        forced = _FORCE.get() or self.env_force
        key = (op, dims, dtype, device, forced)
        cell = (op, dtype, device, forced, plan.race_cell) if plan.race_cell else None
        single = dataclasses.replace(plan, race=())
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return single
        with self._lock:
            current = self._memo.get(key)
            if current is not None and not current.race:
                return current  # another thread settled it
            won = self._cell_wins.get(cell) if cell else None
            if won is not None:
                self._memo[key] = won
                return won
            if (cell or key) in self._racing:
                return single
            self._racing.add(cell or key)
        try:
            settled, timed = self._race(op, dims, dtype, device, plan, single, run)
        finally:
            with self._lock:
                self._racing.discard(cell or key)
        if cell and timed:
            settled = dataclasses.replace(settled, detail=f"{settled.detail} (at {dims}; shared by its table cell)")
        with self._lock:
            self._memo[key] = settled
            if cell and timed:  # a race that did not run (deterministic, out of memory) leaves the cell open
                self._cell_wins[cell] = settled
        return settled

    def _race(
        self,
        op: str,
        dims: tuple[int, ...],
        dtype: str,
        device: torch.device,
        plan: Plan,
        single: Plan,
        run: Callable[[Any], Any],
    ) -> tuple[Plan, bool]:
        """The plan to keep, and whether the race ran (False: not raced, the decision kept)."""
        if torch.are_deterministic_algorithms_enabled():
            detail = f"{plan.detail}; not raced (deterministic algorithms are on)"
            return dataclasses.replace(single, detail=detail), False
        from triton.runtime.errors import OutOfResources

        from dora_tune.dispatch.timing import interleaved_times, wall_times

        ok, dropped = [], []
        try:
            for cfg in plan.race:
                try:
                    run(cfg)  # compiles it; a config that cannot launch here drops out
                except OutOfResources as e:
                    dropped.append(f"{cfg} ({str(e).split('.')[0]})")
                    continue
                ok.append(cfg)
            if not ok:
                why = "no shortlisted config launches: " + "; ".join(dropped)
                return self.reject(op, dims, dtype, device, single, why), True
            if len(ok) == 1:
                return dataclasses.replace(
                    single, config=ok[0], detail=f"{plan.detail}; the only shortlisted config that launches here"
                ), True
            fns = [functools.partial(run, cfg) for cfg in ok]
            times = interleaved_times(fns, device, reps=RACE_REPS, rounds=RACE_ROUNDS, warmup_ms=RACE_WARMUP_MS)
            walls = wall_times(fns, device, calls=RACE_WALL_CALLS, rounds=RACE_ROUNDS)
        except torch.cuda.OutOfMemoryError as e:
            self._warn(
                f"{op} {dims} {dtype}: not raced, out of memory while racing ({str(e).splitlines()[0]}); "
                "keeping the model's decision"
            )
            return dataclasses.replace(single, detail=f"{plan.detail}; not raced (out of memory)"), False
        medians = [statistics.median(t) for t in times]
        # what the step pays: the GPU time, or the wall time of back-to-back calls where the host is the bottleneck
        costs = [max(gpu, wall) for gpu, wall in zip(medians, walls, strict=True)]
        best = min(range(len(ok)), key=costs.__getitem__)
        raced = ", ".join(
            f"{_short(c)} gpu {us:.1f} / wall {w:.1f} µs" for c, us, w in zip(ok, medians, walls, strict=True)
        )
        return dataclasses.replace(single, config=ok[best], detail=f"{plan.detail}; raced at first use: {raced}"), True

    def pick_path(
        self,
        key: tuple,
        device: torch.device,
        make_runners: Callable[[], dict[str, Callable[[], Any]]],
        default: str,
    ) -> str:
        """The name of the cheaper of whole code paths (e.g. a one-node Triton DoRA layer against a few torch ops
        under torch's autograd), timed once per ``key`` the way a training step runs them: wall time of
        back-to-back calls (forward and backward), GPU not held ahead, so a launch-heavy path loses where the host
        is the bottleneck and a memory-heavy one where the GPU is. ``make_runners()`` returns name → a callable
        running that path on the caller's shapes without side effects the caller would see (called only when a
        race is due). ``DORA_TUNE_FORCE``/:func:`force` pick ``"eager"``/``"triton"`` without timing; no race (the
        ``default``) with racing off, under deterministic algorithms, during CUDA graph capture, under
        saved-tensors hooks (activation checkpointing: a later call races) or while another thread races the key;
        out of memory keeps the ``default`` (one warning); a path that raises at its first use is left out of the
        race (one warning; all failing: the ``default``). Memoised; :meth:`path_notes` says what each race
        measured."""
        forced = _FORCE.get() or self.env_force
        if forced is not None:
            return forced
        won = self._paths.get((key, device))
        if won is not None:
            return won
        if not self.race or torch.are_deterministic_algorithms_enabled():
            return default
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return default
        if _saved_tensors_hooks_active():  # e.g. inside activation checkpointing: the race's own backward would
            return default  # run through them; race at a later call
        with self._lock:
            if (key, device) in self._racing:
                return default
            self._racing.add((key, device))
        from dora_tune.dispatch.timing import wall_times

        try:
            runners, failed = {}, []
            for name, fn in make_runners().items():  # compile and warm each path; one that fails is left out
                try:
                    fn()
                    fn()
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:
                    failed.append(name)
                    self._warn(
                        f"{key[0]}: path {name!r} failed at its first use and is left out of the race "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                    )
                    continue
                runners[name] = fn
            if runners:
                walls = wall_times(list(runners.values()), device, calls=RACE_WALL_CALLS, rounds=RACE_ROUNDS)
                names = list(runners)
                won = names[min(range(len(names)), key=walls.__getitem__)]
                note = ", ".join(f"{n} {w:.0f} µs" for n, w in zip(names, walls, strict=True))
            else:
                won, note = default, "not raced (every path failed)"
            note += "".join(f", {n} failed" for n in failed)
        except torch.cuda.OutOfMemoryError as e:
            self._warn(f"{key[0]}: path not raced, out of memory ({str(e).splitlines()[0]}); using {default}")
            won, note = default, "not raced (out of memory)"
        finally:
            with self._lock:
                self._racing.discard((key, device))
        with self._lock:
            self._paths[(key, device)] = won
            self._path_notes[(key, device)] = f"{won} (raced at first use, wall per call: {note})"
        return won

    def path_notes(self) -> dict[tuple, str]:
        """What each path race of :meth:`pick_path` measured, by key."""
        with self._lock:
            return {k: v for (k, _), v in self._path_notes.items()}

    def plan_for_gpu(self, gpu_name: str, op: str, shape: dict[str, int], dtype: str) -> Plan:
        """Plan as if on a CUDA GPU named ``gpu_name`` with Triton available (for ``dora-tune lookup --gpu``)."""
        return self._resolve(op, _shape_key(op, shape), dtype, None, _FORCE.get() or self.env_force, gpu_name)

    def explain(self, gpu_name: str) -> list[str]:
        """Notes on the sources for ``gpu_name``: what was loaded, what was skipped and why."""
        return list(self._load(gpu_name).notes) + list(self._notes)

    def clear(self) -> None:
        """Forget every memoised plan and loaded table (e.g. after profiling more) and the compiled path's norms."""
        with self._lock:
            self._memo.clear()
            self._front.clear()
            self._tables.clear()
            self._cell_wins.clear()
            self._paths.clear()
            self._path_notes.clear()
            self.norms.clear()

    # ------------------------------------------------------------------ resolution
    def _resolve(
        self,
        op: str,
        dims: tuple[int, ...],
        dtype: str,
        device: torch.device | None,
        forced: str | None,
        gpu_name: str | None = None,
    ) -> Plan:
        from dora_tune.dispatch.registry import registry

        impls = {i.name: i for i in registry()[op]}
        torch_impl, fused = OPS[op].torch_impl, OPS[op].triton_impl
        if device is not None and (device.type != "cuda" or not torch.cuda.is_available() or not _triton_ok()):
            if device.type != "cuda":
                why = "no CUDA device"
            else:
                why = "CUDA is not available" if not torch.cuda.is_available() else "Triton is not importable"
            if forced == "triton":
                self._warn(f"DORA_TUNE_FORCE/force('triton') ignored: {why}")
            return Plan(torch_impl, None, "fallback", f"{why}: torch implementation")
        if gpu_name is None:
            gpu_name = torch.cuda.get_device_name(device)
        allowed = set(impls) if forced is None else ({fused} if forced == "triton" else {torch_impl})
        tables = self._load(gpu_name, device)
        if tables.untransferred is not None and op in tables.untransferred[1]:
            target, missing = tables.untransferred
            tables.untransferred = None
            with _gc_paused():
                self._transfer(tables, target, missing)
        # 1. measured, user DB then shipped cache (keyed by the canonical shape JSON, as stored)
        shape_json = canonical_json(dict(zip(OP_SHAPE_KEYS[op], dims, strict=True)))
        for origin in ("user", "shipped"):
            cands = tables.measured.get((origin, op, shape_json, dtype))
            if cands:
                ok = {n: v for n, v in cands.items() if n in allowed}
                for name, (us, cfg) in sorted(ok.items(), key=lambda kv: kv[1][0]):
                    parsed = self._parse(impls[name], json.loads(cfg), f"{origin} DB")
                    if parsed is not _INVALID:
                        return Plan(name, parsed, "measured", f"{origin} DB: {us:.1f} µs for this exact shape")
        # 2. model decisions (with the cell's shortlist to race, for the ops that race): this GPU's tables, of this
        # dtype, then of its same-rate sibling (fp16 ↔ bf16); then a profiled GPU's (transferred) in the same order
        sibling = SAME_RATE_DTYPE.get(dtype)
        for origin, of_sibling in _TABLE_ORDER[sibling is not None]:
            table = tables.models.get((origin, op, sibling if of_sibling else dtype))
            if table is None:
                continue
            shape = dict(zip(OP_SHAPE_KEYS[op], dims, strict=True))
            shortlist = table.shortlist(shape)
            name, cfg = shortlist[0]
            if name in allowed and name in impls:
                parsed = self._parse(impls[name], cfg, f"{origin} model")
                if parsed is not _INVALID:
                    race: tuple[Any, ...] = ()
                    if self.race and op in RACE_OPS and len(shortlist) > 1:
                        more = [
                            self._parse(impls[name], c, f"{origin} model") for _, c in race_shortlist(shortlist)[1:]
                        ]
                        race = (parsed, *(c for c in more if c is not _INVALID and c != parsed))
                    race = race if len(race) > 1 else ()
                    # RACE_PER_CELL ops: one race per cell of this table (settle adds op, dtype and device)
                    cell = (origin, table.cell_index(shape)) if race and op in RACE_PER_CELL else ()
                    if origin == "transfer":
                        where = f"decision table transferred from {table.gpu_name} (no table of this GPU)"
                    else:
                        where = f"{origin} DB decision table ({table.gpu_name})"
                    if table.dtype != dtype:
                        where += f" for {table.dtype} (no {dtype} table; {SAME_RATE_TEXT})"
                    return Plan(name, parsed, "model", where, race, cell)
        # 3. the fixed crossover
        if forced == "eager":
            return Plan(torch_impl, None, "fallback", "forced: torch implementation")
        facts = OPS[op]
        name = facts.crossover(dims)
        if forced == "triton":
            name = fused
        if name == fused:
            return Plan(fused, _default_config(op), "heuristic", facts.crossover_text)
        return Plan(torch_impl, None, "heuristic", f"{facts.crossover_text} → {torch_impl} at this shape")

    def _parse(self, impl: Any, cfg: dict, origin: str) -> Any:
        try:
            return impl.parse_config(cfg)
        except (TypeError, ValueError) as e:
            self._warn(f"{origin}: invalid {impl.op}/{impl.name} config {json.dumps(cfg)} ignored ({e})")
            return _INVALID

    # ------------------------------------------------------------------ loading
    def _load(self, gpu_name: str, device: torch.device | None = None) -> _Tables:
        tables = self._tables.get(gpu_name)
        if tables is None:
            tables = _Tables(gpu_name, {}, {}, [])
            with _gc_paused():
                self._read("user", self.db, tables)
                if self.use_shipped:
                    path = shipped_cache_path(gpu_name)
                    if path.is_file():
                        self._read("shipped", str(path), tables)
                    else:
                        tables.notes.append(f"shipped cache: none for {gpu_name} ({path.name})")
                    missing = set(OPS) - {op for _, op, _ in tables.models}
                    if missing == set(OPS):  # nobody profiled this GPU: every op plans from a transfer
                        self._transfer(tables, _target_facts(gpu_name, device), missing)
                    elif missing:  # an op its caches lack: transferred when first planned (a cache read saved)
                        tables.untransferred = (_target_facts(gpu_name, device), missing)
            self._tables[gpu_name] = tables
        return tables

    def _transfer(self, tables: _Tables, target: GpuFacts, ops: set[str]) -> None:
        """No decision table of the ``ops`` for this GPU (every op for a GPU nobody profiled; an op added after its
        cache was made): borrow those of a profiled GPU of the same architecture from the shipped caches, as origin
        ``"transfer"``: the GPU :func:`~dora_tune.autotune_db.gpus.nearest_gpu` picks among those with tables of
        any of ``ops`` (the same compute capability first, then the nearest by SMs, bandwidth and L2). Their plans
        are raced at first use like any model plan, so the configs are timed on this GPU before they stay. Measured
        on an H100 with the H200's shipped tables, 20 shapes of no preset (regret geomean / max): norm 1.006 /
        1.030, compose 1.012 / 1.054, compose_train 1.027 / 1.109 — the crossover 1.475 / 2.404, 1.022 / 1.041,
        1.846 / 3.462."""
        capability = target.capability
        if not capability:
            tables.notes.append("transfer: no compute capability known for this GPU; none")
            return
        found: dict[str, tuple[Path, GpuFacts]] = {}
        for path in sorted(shipped_cache_path("x").parent.glob("*.sqlite")):
            for facts in _cache_gpus(path):
                if facts.name != tables.gpu_name and facts.capability.split(".")[0] == capability.split(".")[0]:
                    found.setdefault(facts.name, (path, facts))
        sources: dict[str, _Tables] = {}
        for gpu, (path, _) in found.items():
            sources[gpu] = _Tables(gpu, {}, {}, [])
            self._read("shipped", str(path), sources[gpu])
        found = {gpu: v for gpu, v in found.items() if any(op in ops for _, op, _ in sources[gpu].models)}
        if not found:
            what = "" if ops == set(OPS) else f" with tables of {', '.join(sorted(ops))}"
            tables.notes.append(f"transfer: no profiled GPU of compute capability {capability}{what} shipped; none")
            return
        chosen = nearest_gpu(target, [f for _, f in found.values()])
        path, (name, cc) = found[chosen.name][0], (chosen.name, chosen.capability)
        taken = {key: t for key, t in sources[name].models.items() if key[1] in ops}
        for (_, op, dtype), table in taken.items():
            tables.models[("transfer", op, dtype)] = table
        why = "the same compute capability" if cc == capability else f"the same architecture (sm {cc})"
        why += f" as this GPU's {capability}"
        if len(found) > 1:
            why += f"; of {len(found)} such GPUs shipped, the nearest by SMs, bandwidth and L2"
        of = "" if ops == set(OPS) else f" (of {', '.join(sorted({op for _, op, _ in taken}))}: none of this GPU's)"
        raced = "; their plans are raced at first use on this GPU" if self.race else ""
        tables.notes.append(f"transferred from {name}: {len(taken)} decision tables of {path.name}{of} ({why}){raced}")

    def _read(self, origin: str, location: str | None, tables: _Tables) -> None:
        from dora_tune.autotune_db.common import DatabaseError, default_db_location
        from dora_tune.autotune_db.snapshot import read_snapshot
        from dora_tune.dispatch.registry import registry

        where = location or default_db_location()
        if "://" not in where and not Path(where).expanduser().is_file():
            tables.notes.append(f"{origin} DB: {where} does not exist")
            return
        versions = {(op, i.name): i.version for op, v in registry().items() for i in v}
        try:
            snapshot = read_snapshot(where, tables.gpu_name)
        except DatabaseError as e:
            self._warn(f"{origin} DB unusable, ignored: {e}")
            tables.notes.append(f"{origin} DB: unusable ({e})")
            return
        except Exception as e:  # never break training over a cache
            self._warn(f"{origin} DB unreadable, ignored: {type(e).__name__}: {e}")
            tables.notes.append(f"{origin} DB: unreadable ({type(e).__name__}: {e})")
            return
        used = stale = 0
        for op, impl, version, shape_json, dtype, config_json, median_us in snapshot.fastest:
            if versions.get((op, impl)) != version:
                stale += 1
                continue
            best = tables.measured.setdefault((origin, op, shape_json, dtype), {})
            if impl not in best or median_us < best[impl][0]:
                best[impl] = (median_us, config_json)
            used += 1
        if stale:
            self._warn(f"{origin} DB {where}: {stale} trials of other kernel versions ignored for {tables.gpu_name}")
        n_models = 0
        for stored in snapshot.tables:
            table = _decision_table(stored, versions, self, origin)
            if table is not None:
                tables.models[(origin, table.op, table.dtype)] = table
                n_models += 1
        tables.notes.append(
            f"{origin} DB {where}: {used} measured (implementation, shape) entries of {tables.gpu_name} in use, "
            f"{stale} of stale versions, {n_models} decision tables in use"
        )

    def _note(self, message: str) -> None:
        self._notes.append(message)

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"dora-tune dispatch: {message}", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic garbage collection inside: reading a cache allocates tens of thousands of short-lived tuples
    (no cycles), enough to set off a full collection, which in a process holding torch walks every object (70–110
    ms on a slow host against ~20 ms for the read itself). Collection resumes afterwards, unless it was off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_INVALID = object()


def _short(config: Any) -> str:
    """A config in a few characters for plan details (its field values, in order)."""
    values = config.as_dict().values() if hasattr(config, "as_dict") else [config]
    return "/".join(str(v) for v in values)


def crossover_impl(op: str, shape: dict[str, int]) -> str:
    """The paper's fixed rule for ``op`` at ``shape`` on a CUDA GPU with Triton: the Triton impl or the torch one."""
    return OPS[op].crossover(_shape_key(op, shape))


def _default_config(op: str) -> Any:
    from dora_tune.kernels.catalog import OP_SPECS

    return OP_SPECS[op].default_config


def _decision_table(stored: tuple[str, str, str, str], versions: dict, dispatcher: Dispatcher, origin: str) -> Any:
    """The usable decision table of one stored model ``(op, dtype, payload JSON, metrics JSON)``, else None (with a
    warning when it is unreadable or fitted for other kernel versions, a note when it loses to the crossover)."""
    from dora_tune.dispatch.decisions import DecisionTable, beats_crossover

    op, dtype, payload, metrics = stored
    try:
        table = DecisionTable.from_json(json.loads(payload))
        wins = beats_crossover((json.loads(metrics) or {}).get("cv", {}))
    except Exception as e:
        dispatcher._warn(f"{origin} DB: decision table for {op}/{dtype} unreadable, ignored ({e})")
        return None
    if not wins:
        dispatcher._note(
            f"{origin} DB: decision table for {table.op}/{table.dtype} loses to the fixed crossover in "
            "cross-validation; not used"
        )
        return None
    stale = [n for n, v in table.impl_versions.items() if versions.get((table.op, n)) != v]
    if stale:
        dispatcher._warn(
            f"{origin} DB: decision table for {table.op}/{table.dtype} was fitted for other versions "
            f"of {', '.join(stale)}; ignored"
        )
        return None
    return table


#: compute capability by GPU family, for a GPU named without a device to ask (``dora-tune lookup --gpu``); a device
#: present is asked (``torch.cuda.get_device_capability``)
_FAMILY_CAPABILITY = (
    ("gh200", "9.0"),
    ("h200", "9.0"),
    ("h100", "9.0"),
    ("h800", "9.0"),
    ("h20", "9.0"),
    ("a100", "8.0"),
    ("a800", "8.0"),
    ("l40", "8.9"),
    ("l4", "8.9"),
    ("a10", "8.6"),
)


def _capability(gpu_name: str, device: torch.device | None) -> str | None:
    """``"major.minor"`` of the GPU: asked from the device when there is one, else from its family's name."""
    if device is not None and device.type == "cuda":
        try:
            major, minor = torch.cuda.get_device_capability(device)
            return f"{major}.{minor}"
        except Exception:  # a stand-in device in tests, a driver without the query
            pass
    from dora_tune.autotune_db import gpu_slug

    slug = gpu_slug(gpu_name)
    return next((cc for family, cc in _FAMILY_CAPABILITY if family in slug.split("-")), None)


def _target_facts(gpu_name: str, device: torch.device | None) -> GpuFacts:
    """This GPU's facts for the transfer rule: capability, SMs and L2 from the device when there is one (bandwidth
    from the published figures: NVML is not asked at run time), else what its name tells."""
    sm_count = l2_bytes = 0
    if device is not None and device.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(device)
            sm_count, l2_bytes = int(props.multi_processor_count), int(getattr(props, "L2_cache_size", 0))
        except Exception:  # a stand-in device in tests, a driver without the query
            pass
    return gpu_facts(gpu_name, _capability(gpu_name, device) or "", sm_count, l2_bytes=l2_bytes)


def _cache_gpus(path: Path) -> list[GpuFacts]:
    """The facts of the CUDA GPUs of a shipped cache (its environments, with the features the device recorded where
    the cache has them; read-only; none when it cannot be read)."""
    import sqlite3
    from urllib.parse import quote

    env_sql = "SELECT {} FROM environments e{} WHERE e.compute_capability != ''"
    cols = "e.gpu_name, e.compute_capability, e.sm_count"
    feats = ", f.l2_bytes, f.mem_bandwidth_gbs"
    try:
        conn = sqlite3.connect(f"file:{quote(str(path), safe='/')}?mode=ro", uri=True, timeout=5.0)
        try:
            try:  # schema 3 and later: the device-read features
                rows = conn.execute(
                    env_sql.format(cols + feats, " LEFT JOIN gpu_features f ON f.env_id = e.id")
                ).fetchall()
            except sqlite3.OperationalError:  # an older cache: no gpu_features table
                rows = [(*r, None, None) for r in conn.execute(env_sql.format(cols, "")).fetchall()]
        finally:
            conn.close()
    except sqlite3.Error:
        return []
    out = []
    for name, cc, sms, l2, bw in rows:
        if not name or not cc:
            continue
        out.append(gpu_facts(str(name), str(cc), int(sms or 0), l2_bytes=int(l2 or 0), bandwidth_gbs=float(bw or 0)))
    return out


@functools.cache
def _triton_ok() -> bool:
    from dora_tune.kernels._common import triton_available

    return triton_available()


_DEFAULT: Dispatcher | None = None
_DEFAULT_LOCK = threading.Lock()


def default_dispatcher() -> Dispatcher:
    """The process-wide dispatcher (the one explicit cache), created on first use."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = Dispatcher()
    return _DEFAULT


def reset_default_dispatcher(dispatcher: Dispatcher | None = None) -> None:
    """Replace (or drop, with None) the process-wide dispatcher, e.g. after changing ``DORA_TUNE_DB``."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        _DEFAULT = dispatcher


def plan(
    op: str, shape: Mapping[str, int] | Sequence[int], dtype: torch.dtype | str, device: torch.device | str | int
) -> Plan:
    """:meth:`Dispatcher.plan` of the process-wide dispatcher (``shape``: a dict keyed by ``OP_SHAPE_KEYS[op]`` or a
    sequence in that order)."""
    return default_dispatcher().plan(op, shape, dtype, device)


def auto(
    op: str,
    dims: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    race: Callable[[], Callable[[Any], Any]] | None = None,
) -> Plan:
    """The kernels' ``impl="auto"`` hook: the process-wide plan for ``op`` (hot path, memoised). With
    :func:`auto_path` and :func:`auto_failed` it makes this module the kernels' planner
    (:class:`~dora_tune.kernels._common.Planner`), which the front door (:mod:`dora_tune.auto`) hands them.

    ``race``: a factory of the runner :meth:`Dispatcher.settle` times on the caller's inputs (None: the caller cannot
    race, e.g. it brought its own config). It is called only when the plan still has a shortlist — the first call of
    a key whose model cell holds one — and the settled plan is returned."""
    d = default_dispatcher()
    name = _DTYPE_NAMES.get(dtype, str(dtype))
    plan = d.plan_key(op, dims, name, device)
    if plan.race and race is not None:
        return d.settle(op, dims, name, device, plan, race())
    return plan


def _auto_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """The norm with ``impl="auto"``, planned by this module's hooks: what the dispatcher's ``SharedNormCache``
    computes."""
    from dora_tune.kernels.norm import factored_norm

    return factored_norm(weight, lora_A, lora_B, scale, planner=sys.modules[__name__])


def _saved_tensors_hooks_active() -> bool:
    """Whether autograd's saved-tensors hooks are set (activation checkpointing, offloading): True when unknown."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except Exception:  # pragma: no cover - a torch without this private query
        return True


def auto_path(
    key: tuple, device: torch.device, make_runners: Callable[[], dict[str, Callable[[], Any]]], default: str
) -> str:
    """The kernels' hook for a choice between whole code paths: :meth:`Dispatcher.pick_path` of the process-wide
    dispatcher."""
    return default_dispatcher().pick_path(key, device, make_runners, default)


def auto_failed(
    op: str, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device, failed: Plan, why: str
) -> Plan:
    """The kernels' hook when a plan from :func:`auto` failed to launch: :meth:`Dispatcher.reject`."""
    return default_dispatcher().reject(op, dims, _DTYPE_NAMES.get(dtype, str(dtype)), device, failed, why)
