"""Profiler: time every op × implementation × config × shape × dtype and record each trial in the tuning DB.

Idempotent and resumable: a trial already in the database (any status) is not measured again, and each trial is
committed on its own, so an interrupted run (Ctrl-C, a killed process) keeps everything measured so far and never
leaves half a row. Failures (compile errors, out of resources, out of memory, invalid configs) are recorded with
their error text and the sweep goes on. Times are GPU time (:func:`gpu_times`): what an op costs in a training step
whose GPU is busy; the host's launch cost is not in them (benchmarks/NOTES.md, "Timing").

``compose_train``'s Triton configs pair a forward and a backward config; their product is too large to sweep, so
it is swept in two stages: forward configs with the default backward, then every backward config with the best
forward of stage one. Stage one tries the :data:`TRAIN_FWD_SHORTLIST` fastest configs of the same forward kernel
(and the default one) where ``compose`` was measured for that shape and dtype, every forward config otherwise: the
training forward is that kernel plus one more store, and the shortlist cuts compose_train's sweep of the default
set by 38 %. Every trial of both stages is a real measurement of the full training step.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dora_tune.autotune_db import EnvInfo, TrialResult, TrialRow, TuningDB, canonical_json
from dora_tune.dispatch.registry import Impl, make_inputs, registry, train_bwd_stage
from dora_tune.kernels.compose import DEFAULT_COMPOSE_CONFIG
from dora_tune.kernels.compose_train import DEFAULT_COMPOSE_TRAIN_CONFIG

#: forward configs of compose_train's stage one taken from the same shape's compose measurements.
TRAIN_FWD_SHORTLIST = 6


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


@dataclasses.dataclass(frozen=True)
class _Task:
    op: str
    impl: Impl
    dtype: str
    shape: dict[str, int]
    configs: tuple[str, ...]  # canonical JSON of each config still to measure


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]


#: fewest timed calls of a CUDA trial.
MIN_REPS = 10
_FLUSH_BYTES = 256 << 20  # L2 flush buffer, as triton.testing.do_bench


def spin_cycles_per_ms() -> float:
    """Cycles of ``torch.cuda._sleep`` a millisecond on the current CUDA device: the fastest of three 2²¹-cycle
    spins (an idle GPU starts at a low clock, and a spin sized from that rate would run short at full clock)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rate = 0.0
    for _ in range(3):
        start.record()
        torch.cuda._sleep(1 << 21)
        end.record()
        torch.cuda.synchronize()
        rate = max(rate, (1 << 21) / max(start.elapsed_time(end), 1e-6))
    return rate


def gpu_times(fn: Callable[[], Any], *, warmup_ms: float, rep_ms: float) -> list[float]:
    """GPU time of each timed call of ``fn`` on the current CUDA device, in ms.

    The method of ``triton.testing.do_bench`` — the L2 cache flushed by zeroing 256 MB before each call, CUDA events
    around the call, the loop sized by an estimate — with one change: before each flush a spin kernel
    (``torch.cuda._sleep``) keeps the GPU busy for ~1.5× the host time one call takes to enqueue, so the GPU never
    waits for the host inside the timed span. do_bench's events also time the host whenever enqueuing ``fn`` takes
    longer than the flush (~75 µs on an H200), which makes every small op a measurement of the host: on the H200
    machine two runs of the same sweep disagreed by 1.16–1.50× in regret (benchmarks/NOTES.md, "Timing").
    """
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    cycles_per_ms = spin_cycles_per_ms()
    host_ms = 0.0
    for _ in range(3):  # the host's enqueue time of one call
        t0 = time.perf_counter()
        fn()
        host_ms = max(host_ms, (time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    spin = int(cycles_per_ms * (1.5 * host_ms + 0.05))

    def timed(n: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends, strict=True):
            torch.cuda._sleep(spin)
            flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]

    est = statistics.median(timed(3))
    per_call = est + 1.5 * host_ms + 0.1  # GPU time of one loop step: spin, flush and the call
    for _ in range(max(1, int(warmup_ms / per_call))):
        fn()
    return timed(max(MIN_REPS, int(rep_ms / per_call)))


def measure(fn: Callable[[], Any], device: torch.device, *, warmup_ms: float, rep_ms: float) -> TrialResult:
    """Time ``fn``: on CUDA its GPU time by :func:`gpu_times` (median, p20, p80) and the peak memory above what was
    allocated before; on the CPU a wall-clock loop."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            fn()
            torch.cuda.synchronize()
            times = gpu_times(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
            med, p20, p80 = _quantiles(times)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        return TrialResult("ok", med * 1e3, p20 * 1e3, p80 * 1e3, len(times), int(peak))
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
    med, p20, p80 = _quantiles(times)
    return TrialResult("ok", med, p20, p80, len(times), None)


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
) -> tuple[list[_Task], int, int]:
    """What remains to measure: tasks, the number of trials they hold (plus stage two of compose_train, counted
    ahead), and how many are already in the database."""
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
                    cfgs = [canonical_json(c) for c in impl.configs(shape)]
                    if op == "compose_train" and impl.name == "triton":
                        cfgs = _train_stage_one(db, env, dtype, shape, cfgs)
                    left = tuple(c for c in cfgs if (s_json, c) not in have)
                    done += len(cfgs) - len(left)
                    todo += len(left)
                    if op == "compose_train" and impl.name == "triton":  # stage two, counted ahead
                        stage2_done = sum(1 for s, c in have if s == s_json and json.loads(c)["bwd"] != default_bwd)
                        todo += max(0, len(train_bwd_stage({})) - stage2_done)
                    tasks.append(_Task(op, impl, dtype, shape, left))
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
    if task.op == "compose_train" and task.impl.name == "triton":
        best = _best_ok_config(db, env, task)
        if best is not None:
            have = db.measured_keys(env, task.op, task.impl.name, task.impl.version, task.dtype)
            s_json = canonical_json(task.shape)
            for c in train_bwd_stage(best["fwd"]):
                if (s_json, canonical_json(c)) not in have:
                    yield canonical_json(c)


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
) -> ProfileSummary:
    """Measure what is missing from ``db`` for ``env`` and record every trial. See the module docstring.

    ``jobs > 0`` compiles the Triton configs first in that many processes (:mod:`dora_tune.dispatch.warm`).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    t0 = time.time()
    summary = ProfileSummary(env)
    tasks, todo, summary.skipped = plan(db, env, device, shapes, dtypes=dtypes, impls=impls)
    if jobs > 0 and device.type == "cuda":
        from dora_tune.dispatch.warm import warm_compile

        try:
            summary.warm_launches, summary.warm_seconds = warm_compile(tasks, device, jobs)
        except Exception as e:  # warming only saves time: the sweep compiles for itself
            summary.warm_error = f"{type(e).__name__}: {e}"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, disable=not progress, transient=False) as bar:
        pid = bar.add_task(f"profiling on {env.gpu_name}", total=todo)
        try:
            for task in tasks:
                if task.op == "compose_train" and task.impl.name == "triton":  # compose may be measured by now
                    short = tuple(_train_stage_one(db, env, task.dtype, task.shape, list(task.configs)))
                    bar.update(pid, total=bar.tasks[pid].total - (len(task.configs) - len(short)))
                    task = dataclasses.replace(task, configs=short)
                inputs = None
                for c_json in _task_configs(db, env, task):
                    bar.update(pid, description=f"{task.op}/{task.impl.name} {task.dtype} "
                                                f"{'x'.join(map(str, task.shape.values()))}")  # fmt: skip
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
                    db.record_trial(env, task.op, task.impl.name, task.impl.version, task.shape, task.dtype, config,
                                    result)  # fmt: skip
                    summary.measured += 1
                    summary.failed += result.status != "ok"
                    bar.advance(pid)
                    if on_trial is not None:
                        on_trial()
                del inputs
        except KeyboardInterrupt:
            summary.interrupted = True
    summary.seconds = time.time() - t0
    return summary
