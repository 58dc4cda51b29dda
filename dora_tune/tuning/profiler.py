"""Profiler: time every op × implementation × config × shape × dtype and record each trial in the tuning DB.

Idempotent and resumable: a trial already in the database (any status) is not measured again, and each trial is
committed on its own, so an interrupted run (Ctrl-C, a killed process) keeps everything measured so far and never
leaves half a row. Failures (compile errors, out of resources, out of memory, invalid configs) are recorded with
their error text and the sweep goes on.

What a CUDA trial measures (:func:`measure`): its times (median, p20, p80) are GPU time (:func:`gpu_times`, the GPU
kept ahead of the host): what an op costs in a training step whose GPU is busy; the host's launch cost is not in
them (docs/timing.md). Then, as a separate figure (``wall_us``), the candidate is timed the way the
training step runs it, host included: the wall time of one call when :data:`RACE_WALL_CALLS` calls run back to back
with the GPU not held ahead, the least of :data:`RACE_ROUNDS` rounds (:func:`wall_times`, as the dispatcher's
first-use race takes it; fewer calls for long kernels, :func:`wall_plan`). Where launches cost the host more than the
kernels cost the GPU, the wall figure exceeds the GPU figure; ``dora-tune lookup`` shows both. A CPU trial's times
are wall-clock time already: no separate figure.

``compose_train``'s Triton configs pair a forward and a backward config; their product is too large to sweep, so
it is swept in two stages: forward configs with the default backward, then every backward config with the best
forward of stage one. Stage one tries the :data:`TRAIN_FWD_SHORTLIST` fastest configs of the same forward kernel
(and the default one) where ``compose`` was measured for that shape and dtype, every forward config otherwise: the
training forward is that kernel plus one more store, and the shortlist cuts compose_train's sweep of the default
set by 38 %. Every trial of both stages is a real measurement of the full training step.

``quick`` (``dora-tune profile --quick``): a new GPU in minutes. For each Triton implementation and shape only the
configs the dispatcher would consider on this GPU are timed — its plan's config and race shortlist from the
decision tables it has (this GPU's, or those transferred from a profiled GPU of the same architecture) — plus the
implementation's default config; the torch implementations as always. Where no table serves the GPU the full
space is swept. Then the cost model is refitted on what was measured (the CLI does it).

A run ends with a confirmation stage (:func:`confirm_shape`): each shape's :data:`CONFIRM_TOP` fastest trials are
re-timed together, interleaved, to :data:`CONFIRM_REPS` calls each, so that the best of near-equal configs — and
what the cost model is fitted and scored against — is not the luckiest of many short measurements. On CUDA their
wall time is re-measured too, the candidates side by side as the race takes it (a few hundred extra calls a shape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from dora_tune.autotune_db import EnvInfo, TrialResult, TrialRow, TuningDB, canonical_json
from dora_tune.dispatch.registry import Impl, registry
from dora_tune.dispatch.runtime import RACE_ROUNDS, RACE_WALL_CALLS
from dora_tune.dispatch.timing import gpu_times, interleaved_times, wall_times
from dora_tune.kernels.compose import DEFAULT_COMPOSE_CONFIG
from dora_tune.kernels.compose_train import DEFAULT_COMPOSE_TRAIN_CONFIG
from dora_tune.ops import OPS
from dora_tune.tuning.trials import make_inputs, train_bwd_stage


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM, where their handlers are Python functions (raising ``KeyboardInterrupt``),
    until the block ends, then run the first one's handler: a trial written to the database is then always counted
    too (an interrupt between the write and the count would leave the summary short of the database). Signals with
    the default or an ignore handler are left alone; off the main thread, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {s: h for s in (signal.SIGINT, signal.SIGTERM) if callable(h := signal.getsignal(s))}
    for s in held:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, h in held.items():
            signal.signal(s, h)
    if caught:
        held[caught[0]](caught[0], None)


#: forward configs of compose_train's stage one taken from the same shape's compose measurements.
TRAIN_FWD_SHORTLIST = 6
#: trials of a shape (any implementation) the confirmation stage re-times: its fastest this many.
CONFIRM_TOP = 8
#: timed calls each confirmed trial holds; a trial with fewer among its shape's fastest is re-timed. 100 (not 200)
#: is meant to keep the default set within 10 minutes on one H200: at 200 the stage took ~3.4 of ~11
#: (docs/profiling-and-cache.md).
CONFIRM_REPS = 100


@dataclasses.dataclass
class ProfileSummary:
    """What a profiling run did."""

    env: EnvInfo
    measured: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    warm_launches: int = 0
    warm_seconds: float = 0.0
    warm_error: str | None = None
    confirmed: int = 0
    confirm_failed: int = 0
    confirm_error: str | None = None  # the first failure's text
    narrowed: bool = False  # a quick run timed decision tables' shortlists (not the whole space) somewhere


#: a quick run re-times only each shape's 2 fastest trials (its shortlists hold 2–4 configs; re-timing every one
#: was most of the 202 s the default set took on an H100)
QUICK_CONFIRM_TOP = 2

ConfigChooser = Callable[[str, Impl, str, dict[str, int]], list[str] | None]
"""``f(op, impl, dtype, shape)`` → the canonical JSON configs to time, or None for the whole space."""


def quick_configs(gpu_name: str, db_location: str | None, summary: ProfileSummary | None = None) -> ConfigChooser:
    """The config chooser of a quick run on ``gpu_name``: ``f(op, impl, dtype, shape)`` → canonical JSON of the
    configs to time (the plan's config, its race shortlist and the default config of ``impl``), or None (time the
    whole space: a torch implementation, or no decision table serves this GPU). Plans as the dispatcher would with
    the database at ``db_location`` and the shipped caches. Each shortlist it names sets ``summary.narrowed``."""
    from dora_tune.dispatch.runtime import Dispatcher
    from dora_tune.kernels.catalog import OP_SPECS

    dispatcher = Dispatcher(db_location, force_env="", race=True)

    def choose(op: str, impl: Impl, dtype: str, shape: dict[str, int]) -> list[str] | None:
        if impl.name != OPS[op].triton_impl:
            return None
        plan = dispatcher.plan_for_gpu(gpu_name, op, shape, dtype)
        if plan.source not in ("model", "measured"):
            return None
        picked = [plan.config, *plan.race] if plan.impl == impl.name else []
        picked.append(OP_SPECS[op].default_config)
        out: dict[str, None] = {}
        for cfg in picked:
            out.setdefault(canonical_json(cfg.as_dict()))
        if summary is not None:
            summary.narrowed = True
        return list(out)

    return choose


@dataclasses.dataclass(frozen=True)
class _Task:
    op: str
    impl: Impl
    dtype: str
    shape: dict[str, int]
    configs: tuple[str, ...]  # canonical JSON of each config still to measure
    staged: bool = False  # compose_train's Triton sweep in two stages (not in a quick run)


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]


def trial_result(
    times_us: Sequence[float], peak_mem_bytes: int | None = None, wall_us: float | None = None
) -> TrialResult:
    """An "ok" :class:`TrialResult` of timed calls (µs): their median, p20 and p80 and their count, with the
    host-inclusive wall time per call when it was measured (``wall_us``)."""
    med, p20, p80 = _quantiles(list(times_us))
    return TrialResult("ok", med, p20, p80, len(times_us), peak_mem_bytes, wall_us=wall_us)


#: GPU time a trial's wall-time measurement may take (µs): back-to-back calls of a long kernel show its GPU time
#: anyway (no launch costs the host that much), so long calls get fewer of them (:func:`wall_plan`)
WALL_BUDGET_US = 3000.0


def wall_plan(gpu_us: float) -> tuple[int, int]:
    """``(calls, rounds)`` of the wall-time measurement of a call taking ``gpu_us`` of GPU time: the race's
    :data:`RACE_WALL_CALLS` × :data:`RACE_ROUNDS` while that fits :data:`WALL_BUDGET_US`, else one round of as many
    calls as fit (at least 2)."""
    n = int(WALL_BUDGET_US / max(gpu_us, 1.0))
    if n >= RACE_WALL_CALLS * RACE_ROUNDS:
        return RACE_WALL_CALLS, RACE_ROUNDS
    return max(2, min(RACE_WALL_CALLS, n)), 1


def measure(fn: Callable[[], Any], device: torch.device, *, warmup_ms: float, rep_ms: float) -> TrialResult:
    """Time ``fn``: on CUDA its GPU time by :func:`gpu_times` (median, p20, p80), then its wall time per call with
    the host included (:func:`wall_times`: :data:`RACE_WALL_CALLS` back-to-back calls, least of
    :data:`RACE_ROUNDS` rounds; ``wall_us``) and the peak memory above what was allocated before; on the CPU a
    wall-clock loop (``wall_us`` None: those times are wall time already)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            times = gpu_times(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
            calls, rounds = wall_plan(statistics.median(times) * 1e3)
            [wall] = wall_times([fn], device, calls=calls, rounds=rounds)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        return trial_result([ms * 1e3 for ms in times], int(peak), wall)
    fn()
    t_end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return trial_result(times)


def _failure(e: BaseException) -> TrialResult:
    text = f"{type(e).__name__}: {e}"[:2000]
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return TrialResult("oom", error=text)
    if isinstance(e, (ValueError, TypeError)):
        return TrialResult("invalid", error=text)
    return TrialResult("failed", error=text)


def plan(
    db: TuningDB,
    env: EnvInfo,
    device: torch.device,
    shapes: dict[str, list[dict[str, int]]],
    *,
    dtypes: tuple[str, ...],
    impls: tuple[str, ...] | None = None,
    quick: ConfigChooser | None = None,
) -> tuple[list[_Task], int, int]:
    """What remains to measure: tasks, the number of trials they hold (plus stage two of compose_train, counted
    ahead), and how many are already in the database. ``quick`` (:func:`quick_configs`): where it names configs,
    only those (no compose_train stages)."""
    tasks, todo, done = [], 0, 0
    default_bwd = DEFAULT_COMPOSE_TRAIN_CONFIG.bwd.as_dict()  # stage one's backward; stage two varies it
    for op, op_shapes in shapes.items():
        for impl in registry()[op]:
            if not impl.runs_on(device) or (impls and impl.name not in impls):
                continue
            for dtype in dtypes:
                have = db.measured_keys(env, op, impl.name, impl.version, dtype)
                for shape in op_shapes:
                    s_json = canonical_json(shape)
                    short = quick(op, impl, dtype, shape) if quick is not None else None
                    staged = short is None and op == "compose_train" and impl.name == "triton"
                    cfgs = short if short is not None else [canonical_json(c) for c in impl.configs(shape)]
                    if staged:
                        cfgs = _train_stage_one(db, env, dtype, shape, cfgs)
                    left = tuple(c for c in cfgs if (s_json, c) not in have)
                    done += len(cfgs) - len(left)
                    todo += len(left)
                    if staged:  # stage two, counted ahead
                        stage2_done = sum(1 for s, c in have if s == s_json and json.loads(c)["bwd"] != default_bwd)
                        todo += max(0, len(train_bwd_stage({})) - stage2_done)
                    tasks.append(_Task(op, impl, dtype, shape, left, staged))
    return tasks, todo, done


def _ok_trials(db: TuningDB, env: EnvInfo, impl: Impl, dtype: str, shape: dict[str, int]) -> list[TrialRow]:
    """The ok trials of ``impl`` (this version) for ``shape`` and ``dtype`` on ``env``'s GPU."""
    rows = db.trials(gpu=env.gpu_name, op=impl.op, impl=impl.name, dtype=dtype, shape=shape)
    return [t for t in rows if t.status == "ok" and t.impl_version == impl.version]


def _best_ok_config(db: TuningDB, env: EnvInfo, task: _Task) -> dict | None:
    rows = _ok_trials(db, env, task.impl, task.dtype, task.shape)
    return min(rows, key=lambda t: t.median_us).config if rows else None


def _train_stage_one(db: TuningDB, env: EnvInfo, dtype: str, shape: dict[str, int], cfgs: list[str]) -> list[str]:
    """The stage-one configs of compose_train (canonical JSON): those whose forward is among the
    :data:`TRAIN_FWD_SHORTLIST` fastest measured ``compose`` configs of this shape and dtype, or is the default
    forward config (the fixed crossover's choice, kept so that it can be compared); all of ``cfgs`` when fewer than
    that many were measured."""
    rows = _ok_trials(db, env, next(i for i in registry()["compose"] if i.name == "triton"), dtype, shape)
    if len(rows) < TRAIN_FWD_SHORTLIST:
        return cfgs
    best = {canonical_json(t.config) for t in sorted(rows, key=lambda t: t.median_us)[:TRAIN_FWD_SHORTLIST]}
    best.add(canonical_json(DEFAULT_COMPOSE_CONFIG.as_dict()))  # the fixed crossover's pick, measured to compare
    return [c for c in cfgs if canonical_json(json.loads(c)["fwd"]) in best]


def _task_configs(db: TuningDB, env: EnvInfo, task: _Task) -> Iterator[str]:
    yield from task.configs
    if task.staged:
        best = _best_ok_config(db, env, task)
        if best is not None:
            have = db.measured_keys(env, task.op, task.impl.name, task.impl.version, task.dtype)
            s_json = canonical_json(task.shape)
            for c in train_bwd_stage(best["fwd"]):
                if (s_json, canonical_json(c)) not in have:
                    yield canonical_json(c)


def _env_id(db: TuningDB, env: EnvInfo) -> int | None:
    """The row id of ``env`` in ``db`` (None: not stored)."""
    return next((e.id for e in db.environments(gpu=env.gpu_name) if e.info == env), None)


def confirm_candidates(
    db: TuningDB,
    env: EnvInfo,
    device: torch.device,
    op: str,
    dtype: str,
    shape: dict[str, int],
    *,
    impls: tuple[str, ...] | None = None,
    top: int = CONFIRM_TOP,
    reps: int = CONFIRM_REPS,
) -> list[tuple[Impl, TrialRow]]:
    """The trials the confirmation stage re-times at one shape: among the ``top`` fastest "ok" trials of ``env``
    (every implementation that runs on ``device``, at its current version), those with fewer than ``reps`` timed
    calls."""
    env_id = _env_id(db, env)
    if env_id is None or top < 1:
        return []
    cands = []
    for impl in registry()[op]:
        if impl.runs_on(device) and not (impls and impl.name not in impls):
            cands += [(impl, t) for t in _ok_trials(db, env, impl, dtype, shape) if t.env_id == env_id]
    cands.sort(key=lambda c: c[1].median_us)
    return [(impl, t) for impl, t in cands[:top] if t.reps < reps]


def confirm_shape(
    db: TuningDB,
    env: EnvInfo,
    device: torch.device,
    op: str,
    dtype: str,
    shape: dict[str, int],
    *,
    impls: tuple[str, ...] | None = None,
    top: int = CONFIRM_TOP,
    reps: int = CONFIRM_REPS,
    warmup_ms: float = 5.0,
    max_passes: int = 3,
) -> int:
    """Re-time the fastest trials of one shape until its ``top`` fastest each hold ≥ ``reps`` timed calls.

    The sweep gives each trial a short budget (``rep_ms``); for calls of a few µs, or configs within a few per cent of
    each other, that leaves the fastest trial partly a matter of luck (the minimum of many noisy medians is biased
    low), and the cost model is fitted and scored against it. This re-times the candidates together —
    :func:`interleaved_times`, ``reps`` calls each, the candidates taken in turn so that drift touches them alike —
    and replaces their rows (the peak memory measured by the sweep is kept). On CUDA the candidates' wall times
    (host included) are re-measured with them, side by side — :func:`wall_times`, as the dispatcher's race takes
    them — so that the rows' two figures come from one sitting; on the CPU they stay None. A trial the new times
    move into the top is re-timed in a further pass (at most ``max_passes``). Rows are written once a pass's timing
    is over, so an interruption loses at most that pass, never a row.

    Returns:
        the number of trials re-timed.
    """
    done = 0
    inputs = None
    for _ in range(max_passes):
        pending = confirm_candidates(db, env, device, op, dtype, shape, impls=impls, top=top, reps=reps)
        if not pending:
            break
        if inputs is None:
            inputs = make_inputs(op, shape, dtype, device)
        fns = [impl.runner(inputs, t.config) for impl, t in pending]
        times = interleaved_times(fns, device, reps=reps, warmup_ms=warmup_ms)
        walls: list[float | None] = [None] * len(fns)
        if device.type == "cuda":
            with torch.cuda.device(device):
                calls, rounds = wall_plan(max(statistics.median(ts) for ts in times))
                walls = list(wall_times(fns, device, calls=calls, rounds=rounds))
        for (impl, t), ts, wall in zip(pending, times, walls, strict=True):
            result = trial_result(ts, t.peak_mem_bytes, wall)
            db.record_trial(env, op, impl.name, impl.version, shape, dtype, t.config, result)
        done += len(pending)
    return done


def measured_shapes(db: TuningDB, env: EnvInfo) -> tuple[dict[str, list[dict[str, int]]], tuple[str, ...]]:
    """The shapes (per op, in the database's order) and dtypes of ``env``'s "ok" trials in ``db``: what
    ``confirm_only`` re-times when no shape set is given."""
    env_id = _env_id(db, env)
    shapes: dict[str, dict[str, dict[str, int]]] = {}
    dtypes: dict[str, None] = {}
    if env_id is not None:
        for t in db.trials(gpu=env.gpu_name, status="ok"):
            if t.env_id == env_id and t.op in registry():
                shapes.setdefault(t.op, {}).setdefault(canonical_json(t.shape), t.shape)
                dtypes.setdefault(t.dtype)
    return {op: list(v.values()) for op, v in shapes.items()}, tuple(dtypes)


def _warm_confirm(
    db: TuningDB,
    env: EnvInfo,
    device: torch.device,
    groups: list[tuple[str, str, dict[str, int]]],
    impls: tuple[str, ...] | None,
    top: int,
    reps: int,
    jobs: int,
    summary: ProfileSummary,
) -> None:
    """Compile the Triton configs the confirmation stage will re-time, in ``jobs`` processes (a database profiled
    on another machine holds none of them in this machine's Triton cache)."""
    from dora_tune.tuning.warm import warm_compile

    tasks = []
    for op, dtype, shape in groups:
        by_impl: dict[str, list[str]] = {}
        found = {}
        for impl, t in confirm_candidates(db, env, device, op, dtype, shape, impls=impls, top=top, reps=reps):
            by_impl.setdefault(impl.name, []).append(canonical_json(t.config))
            found[impl.name] = impl
        tasks += [_Task(op, found[name], dtype, shape, tuple(cfgs)) for name, cfgs in by_impl.items()]
    try:
        launches, seconds = warm_compile(tasks, device, jobs, stage_two=False)
        summary.warm_launches += launches
        summary.warm_seconds += seconds
    except Exception as e:  # warming only saves time
        summary.warm_error = summary.warm_error or f"{type(e).__name__}: {e}"


def progress_bar(enabled: bool) -> Any:
    """The profiler's one progress bar (rich): description, bar, done / total, elapsed, ETA; ``enabled=False``: a
    silent one."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, disable=not enabled, transient=False)


def profile(
    db: TuningDB,
    device: torch.device,
    env: EnvInfo,
    shapes: dict[str, list[dict[str, int]]],
    *,
    dtypes: tuple[str, ...] = ("bf16",),
    impls: tuple[str, ...] | None = None,
    warmup_ms: float = 5.0,
    rep_ms: float = 20.0,
    progress: bool = True,
    jobs: int = 0,
    on_trial: Callable[[], None] | None = None,
    confirm_top: int = CONFIRM_TOP,
    confirm_reps: int = CONFIRM_REPS,
    confirm_only: bool = False,
    quick: bool = False,
) -> ProfileSummary:
    """Measure what is missing from ``db`` for ``env`` and record every trial. See the module docstring.

    ``jobs > 0`` compiles the Triton configs first in that many processes (:mod:`dora_tune.tuning.warm`). Then
    each shape's ``confirm_top`` fastest trials are re-timed to ``confirm_reps`` calls each (:func:`confirm_shape`;
    ``confirm_top=0``: not at all) — also on a run that had nothing left to sweep, which is how a database
    profiled before the stage existed gets it. ``confirm_only``: no sweep, only that stage. ``quick``: time only
    the configs the dispatcher would consider on this GPU (:func:`quick_configs`; see the module docstring).
    """
    t0 = time.time()
    summary = ProfileSummary(env)
    tasks, todo = [], 0
    if not confirm_only:
        chooser = None
        if quick and device.type == "cuda":
            chooser = quick_configs(env.gpu_name, db.location, summary)
            confirm_top = min(confirm_top, QUICK_CONFIRM_TOP)
        tasks, todo, summary.skipped = plan(db, env, device, shapes, dtypes=dtypes, impls=impls, quick=chooser)
    if tasks and jobs > 0 and device.type == "cuda":
        from dora_tune.tuning.warm import warm_compile

        try:
            summary.warm_launches, summary.warm_seconds = warm_compile(tasks, device, jobs)
        except Exception as e:  # warming only saves time: the sweep compiles for itself
            summary.warm_error = f"{type(e).__name__}: {e}"
    with progress_bar(progress) as bar:
        pid = bar.add_task(f"profiling on {env.gpu_name}", total=todo, visible=not confirm_only)
        try:
            for task in tasks:
                if task.staged:  # compose may be measured by now
                    short = tuple(_train_stage_one(db, env, task.dtype, task.shape, list(task.configs)))
                    bar.update(pid, total=bar.tasks[pid].total - (len(task.configs) - len(short)))
                    task = dataclasses.replace(task, configs=short)
                inputs = None
                for c_json in _task_configs(db, env, task):
                    bar.update(
                        pid,
                        description=f"{task.op}/{task.impl.name} {task.dtype} "
                        f"{'x'.join(map(str, task.shape.values()))}",
                    )
                    config = json.loads(c_json)
                    try:
                        if inputs is None:
                            inputs = make_inputs(task.op, task.shape, task.dtype, device)
                        result = measure(task.impl.runner(inputs, config), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # recorded, and the sweep goes on
                        result = _failure(e)
                        if result.status == "oom":
                            inputs = None
                            torch.cuda.empty_cache()
                    with deferred_interrupts():  # written and counted, or neither
                        db.record_trial(
                            env, task.op, task.impl.name, task.impl.version, task.shape, task.dtype, config, result
                        )
                        summary.measured += 1
                        summary.failed += result.status != "ok"
                        if on_trial is not None:
                            on_trial()
                    bar.advance(pid)
                del inputs
            groups = [(op, dt, sh) for op, op_shapes in shapes.items() for dt in dtypes for sh in op_shapes]
            if confirm_top > 0 and groups and jobs > 0 and device.type == "cuda":
                _warm_confirm(db, env, device, groups, impls, confirm_top, confirm_reps, jobs, summary)
            if confirm_top > 0 and groups:
                cid = bar.add_task("confirming each shape's fastest", total=len(groups))
                for op, dtype, shape in groups:
                    try:
                        summary.confirmed += confirm_shape(
                            db,
                            env,
                            device,
                            op,
                            dtype,
                            shape,
                            impls=impls,
                            top=confirm_top,
                            reps=confirm_reps,
                            warmup_ms=warmup_ms,
                        )
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # the sweep's rows stay as they were; the next run tries again
                        summary.confirm_failed += 1
                        summary.confirm_error = summary.confirm_error or f"{op} {shape}: {type(e).__name__}: {e}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    bar.advance(cid)
        except KeyboardInterrupt:
            summary.interrupted = True
    summary.seconds = time.time() - t0
    return summary
