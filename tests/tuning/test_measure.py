"""The profiler's timing: quantiles and repetition counts come from the individual timed calls; on CUDA the times
are GPU time, not the host's launch time, and the host-inclusive wall time is recorded beside them."""

import contextlib
import time

import pytest
import torch

from dora_tune.dispatch.runtime import RACE_ROUNDS, RACE_WALL_CALLS
from dora_tune.dispatch.timing import MIN_REPS
from dora_tune.tuning import profiler
from dora_tune.tuning.profiler import measure


def test_cpu_measure_reports_ordered_quantiles():
    res = measure(lambda: time.sleep(0.0002), torch.device("cpu"), warmup_ms=1, rep_ms=5)
    assert res.status == "ok" and res.reps >= 3
    assert 200 <= res.p20_us <= res.median_us <= res.p80_us
    assert res.wall_us is None  # CPU times are wall time already: no separate figure


def test_cuda_branch_records_the_wall_time_beside_the_gpu_time(monkeypatch):
    """The CUDA branch, with the timers and the device faked: GPU times from gpu_times, the wall time from
    wall_times with the race's call and round counts."""
    seen = {}

    def fake_wall_times(fns, device, *, calls, rounds):
        seen.update(fns=list(fns), device=device, calls=calls, rounds=rounds)
        return [45.6]

    monkeypatch.setattr(profiler, "gpu_times", lambda fn, *, warmup_ms, rep_ms: [0.010, 0.012, 0.0123, 0.014])
    monkeypatch.setattr(profiler, "wall_times", fake_wall_times)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 1124)

    def fn():
        return None

    res = measure(fn, torch.device("cuda"), warmup_ms=1, rep_ms=1)
    assert res.status == "ok" and res.reps == 4 and res.peak_mem_bytes == 1024
    assert res.median_us == pytest.approx(12.15) and res.wall_us == 45.6
    assert seen == {"fns": [fn], "device": torch.device("cuda"), "calls": RACE_WALL_CALLS, "rounds": RACE_ROUNDS}


@pytest.mark.gpu
@pytest.mark.gpu_timing
def test_cuda_measure_times_the_gpu_not_the_host():
    x = torch.randn(1 << 16, device="cuda")
    calls = []

    def host_bound():  # 2 ms of host time around ~5 µs of GPU work
        calls.append(1)
        time.sleep(0.002)
        x.mul_(1.0)

    res = measure(host_bound, torch.device("cuda"), warmup_ms=5, rep_ms=20)
    assert res.status == "ok" and 0 < res.p20_us <= res.median_us <= res.p80_us
    assert res.median_us < 200  # do_bench's events would span the 2 ms the host sleeps
    assert MIN_REPS <= res.reps < len(calls)  # every timed call counted, not an estimate from the budget
    assert res.peak_mem_bytes is not None
    assert res.wall_us > 1500  # the wall time holds the host's 2 ms a call


@pytest.mark.gpu
@pytest.mark.gpu_timing
def test_cuda_measure_matches_the_work():
    a = torch.randn(64 << 20, device="cuda")  # 256 MB read + 256 MB written: ~0.12 ms at ~4 TB/s
    res = measure(lambda: a.mul_(1.0), torch.device("cuda"), warmup_ms=5, rep_ms=20)
    assert 60 < res.median_us < 1000


def test_wall_plan_keeps_long_kernels_cheap():
    """Short calls get the race's calls × rounds; long ones one round within the budget, never fewer than 2 calls."""
    from dora_tune.dispatch.runtime import RACE_ROUNDS, RACE_WALL_CALLS
    from dora_tune.tuning.profiler import WALL_BUDGET_US, wall_plan

    assert wall_plan(5.0) == (RACE_WALL_CALLS, RACE_ROUNDS)
    assert wall_plan(0.0) == (RACE_WALL_CALLS, RACE_ROUNDS)
    for us in (150.0, 400.0, 1000.0, 5000.0, 1e6):
        calls, rounds = wall_plan(us)
        assert rounds == 1 and 2 <= calls <= RACE_WALL_CALLS
        assert calls == 2 or calls * us <= WALL_BUDGET_US
