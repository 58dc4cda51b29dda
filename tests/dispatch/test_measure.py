"""The profiler's timing: quantiles and repetition counts come from the individual timed calls; on CUDA the times
are GPU time, not the host's launch time."""

import time

import pytest
import torch

from dora_tune.dispatch.profiler import measure
from dora_tune.dispatch.timing import MIN_REPS


def test_cpu_measure_reports_ordered_quantiles():
    res = measure(lambda: time.sleep(0.0002), torch.device("cpu"), warmup_ms=1, rep_ms=5)
    assert res.status == "ok" and res.reps >= 3
    assert 200 <= res.p20_us <= res.median_us <= res.p80_us


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


@pytest.mark.gpu
@pytest.mark.gpu_timing
def test_cuda_measure_matches_the_work():
    a = torch.randn(64 << 20, device="cuda")  # 256 MB read + 256 MB written: ~0.12 ms at ~4 TB/s
    res = measure(lambda: a.mul_(1.0), torch.device("cuda"), warmup_ms=5, rep_ms=20)
    assert 60 < res.median_us < 1000
