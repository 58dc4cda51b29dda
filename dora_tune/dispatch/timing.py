"""GPU timing as the profiler and the first-use race use it: GPU time per call, L2 flushed, the host kept out.

Kept apart from the profiler so that the dispatcher's race, which runs inside a training step, imports neither the
tuning database nor SQLAlchemy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["MIN_REPS", "gpu_times", "interleaved_times", "spin_cycles_per_ms", "wall_times"]

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


class _CudaTimer:
    """Times calls of one ``fn`` on the current CUDA device as :func:`gpu_times` describes: calling the timer with
    ``n`` runs ``n`` timed calls, each after a spin sized to the host's enqueue time and an L2 flush, and returns
    their GPU times in ms."""

    def __init__(self, fn: Callable[[], Any], flush: torch.Tensor, cycles_per_ms: float) -> None:
        self.fn, self.flush = fn, flush
        fn()  # the first call may compile or load kernels: not the host time of a call
        torch.cuda.synchronize()
        self.host_ms = 0.0
        for _ in range(3):  # the host's enqueue time of one call
            t0 = time.perf_counter()
            fn()
            self.host_ms = max(self.host_ms, (time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
        self.spin = int(cycles_per_ms * (1.5 * self.host_ms + 0.05))

    def __call__(self, n: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends, strict=True):
            torch.cuda._sleep(self.spin)
            self.flush.zero_()
            s.record()
            self.fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]

    def step_ms(self) -> float:
        """GPU time of one loop step (spin, flush and the call), from three timed calls."""
        return statistics.median(self(3)) + 1.5 * self.host_ms + 0.1

    def warm(self, warmup_ms: float, step_ms: float) -> None:
        for _ in range(max(1, int(warmup_ms / step_ms))):
            self.fn()


def gpu_times(fn: Callable[[], Any], *, warmup_ms: float, rep_ms: float) -> list[float]:
    """GPU time of each timed call of ``fn`` on the current CUDA device, in ms.

    The method of ``triton.testing.do_bench`` — the L2 cache flushed by zeroing 256 MB before each call, CUDA events
    around the call, the loop sized by an estimate — with one change: before each flush a spin kernel
    (``torch.cuda._sleep``) keeps the GPU busy for ~1.5× the host time one call takes to enqueue, so the GPU never
    waits for the host inside the timed span. do_bench's events also time the host whenever enqueuing ``fn`` takes
    longer than the flush (~75 µs on an H200), which makes every small op a measurement of the host: on the H200
    machine two runs of the same sweep disagreed by 1.16–1.50× in regret (docs/timing.md).
    """
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    timer = _CudaTimer(fn, flush, spin_cycles_per_ms())
    step = timer.step_ms()
    timer.warm(warmup_ms, step)
    return timer(max(MIN_REPS, int(rep_ms / step)))


def interleaved_times(
    fns: Sequence[Callable[[], Any]], device: torch.device, *, reps: int, rounds: int = 4, warmup_ms: float = 5.0
) -> list[list[float]]:
    """``reps`` timed calls of each of ``fns``, in µs, taken in ``rounds`` rounds that visit every function in turn,
    so that a drift of the machine (clocks, temperature, other work) during the run touches them all alike.

    On CUDA each call is timed as by :func:`gpu_times` (GPU time, L2 flushed, the host kept out by a spin); on the
    CPU by the wall clock. Returns one list of times per function, in the order of ``fns``.
    """
    if reps < 1 or rounds < 1:
        raise ValueError(f"reps and rounds must be ≥ 1, got {reps} and {rounds}")
    rounds = min(rounds, reps)
    per_round = [reps // rounds + (i < reps % rounds) for i in range(rounds)]
    out: list[list[float]] = [[] for _ in fns]
    if device.type == "cuda":
        with torch.cuda.device(device):
            flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")
            cycles = spin_cycles_per_ms()
            timers = [_CudaTimer(fn, flush, cycles) for fn in fns]
            for t in timers:
                t.warm(warmup_ms, t.step_ms())
            for n in per_round:
                for i, t in enumerate(timers):
                    out[i] += [ms * 1e3 for ms in t(n)]
        return out
    for fn in fns:
        t_end = time.perf_counter() + warmup_ms / 1e3
        fn()
        while time.perf_counter() < t_end:
            fn()
    for n in per_round:
        for i, fn in enumerate(fns):
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out[i].append((time.perf_counter() - t0) * 1e6)
    return out


def wall_times(fns: Sequence[Callable[[], Any]], device: torch.device, *, calls: int, rounds: int = 3) -> list[float]:
    """Per function, the wall time of one call (µs) when ``calls`` calls run back to back — what a training step
    pays for it, host included: the GPU is not held ahead, so a call whose launches cost the host more than its
    kernels cost the GPU shows its host time, and a GPU-bound call its GPU time. The least of ``rounds`` rounds
    (each visits every function in turn), synchronised before and after each batch."""
    if calls < 1 or rounds < 1:
        raise ValueError(f"calls and rounds must be ≥ 1, got {calls} and {rounds}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[i] = min(best[i], (time.perf_counter() - t0) / calls * 1e6)
    return best
