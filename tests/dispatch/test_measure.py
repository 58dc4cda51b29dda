"""The profiler's timing: on CUDA a host-bound call keeps the loop near its wall budget with enough repetitions."""

import time

import pytest
import torch

from dora_tune.dispatch.profiler import MIN_REPS, measure


def test_cpu_measure_reports_ordered_quantiles():
    res = measure(lambda: time.sleep(0.0002), torch.device("cpu"), warmup_ms=1, rep_ms=5)
    assert res.status == "ok" and res.reps >= 3
    assert 200 <= res.p20_us <= res.median_us <= res.p80_us


@pytest.mark.gpu
def test_host_bound_call_keeps_wall_budget_and_min_reps():
    x = torch.randn(1 << 20, device="cuda")

    def host_bound():  # ~1 ms of host time around a few µs of GPU work
        time.sleep(0.001)
        x.mul_(1.0)

    t0 = time.perf_counter()
    res = measure(host_bound, torch.device("cuda"), warmup_ms=5, rep_ms=20)
    wall = time.perf_counter() - t0
    assert res.status == "ok" and res.median_us < 500  # GPU time, not the host's
    assert wall < 0.25  # unscaled, do_bench would loop ~(25 ms / ~0.1 ms) × 1 ms ≈ 0.25 s or more
    assert res.reps >= MIN_REPS
