"""The profiler's timing: quantiles and repetition counts come from the individual timed calls."""

import time

import pytest
import torch

from dora_tune.dispatch.profiler import measure


def test_cpu_measure_reports_ordered_quantiles():
    res = measure(lambda: time.sleep(0.0002), torch.device("cpu"), warmup_ms=1, rep_ms=5)
    assert res.status == "ok" and res.reps >= 3
    assert 200 <= res.p20_us <= res.median_us <= res.p80_us


@pytest.mark.gpu
def test_cuda_measure_counts_the_timed_calls():
    x = torch.randn(1 << 24, device="cuda")
    calls = []

    def fn():
        calls.append(1)
        x.mul_(1.0)

    res = measure(fn, torch.device("cuda"), warmup_ms=1, rep_ms=5)
    assert res.status == "ok" and 0 < res.p20_us <= res.median_us <= res.p80_us
    assert 1 <= res.reps < len(calls)  # every timed call, not an estimate from the budget
    assert res.peak_mem_bytes is not None
