"""benchmarks/quick_vs_full.py: a quick run's picks scored by a full sweep's times."""

import math

from benchutil import load_script

from dora_tune.autotune_db import EnvInfo, TrialResult, TuningDB

GPU = EnvInfo("cuda", "NVIDIA H100 80GB HBM3", "9.0", 132, 80_000_000_000, "580", "13.0", "2.11.0", "3.6.0", "0.1.0")
A, B = {"d_out": 4096, "d_in": 4096, "r": 16}, {"d_out": 1024, "d_in": 4096, "r": 16}


def ok(us):
    return TrialResult("ok", median_us=us, p20_us=us, p80_us=us, reps=10)


def test_picks_are_scored_against_the_sweeps_best(tmp_path):
    qvf = load_script("quick_vs_full")
    quick, full = TuningDB.open(str(tmp_path / "q.sqlite")), TuningDB.open(str(tmp_path / "f.sqlite"))
    try:
        # shape A: the quick run picks block 64 (its fastest), which the sweep timed at 12 against its best 10
        quick.record_trial(GPU, "norm", "triton", "v", A, "bf16", {"block": 64}, ok(5.0))
        quick.record_trial(GPU, "norm", "triton", "v", A, "bf16", {"block": 32}, ok(6.0))
        for block, us in ((32, 10.0), (64, 12.0), (128, 20.0)):
            full.record_trial(GPU, "norm", "triton", "v", A, "bf16", {"block": block}, ok(us))
        # shape B: the quick pick is the sweep's best; a failed trial never counts
        quick.record_trial(GPU, "norm", "dense", "v", B, "bf16", {}, ok(3.0))
        quick.record_trial(GPU, "norm", "triton", "v", B, "bf16", {"block": 8}, TrialResult("failed", error="x"))
        full.record_trial(GPU, "norm", "dense", "v", B, "bf16", {}, ok(7.0))
        full.record_trial(GPU, "norm", "triton", "v", B, "bf16", {"block": 32}, ok(9.0))
        # compose: the quick pick was never timed by the sweep
        quick.record_trial(GPU, "compose", "triton", "v", {"rows": 8, "cols": 8}, "bf16", {"block": 1}, ok(1.0))
        full.record_trial(GPU, "compose", "triton", "v", {"rows": 8, "cols": 8}, "bf16", {"block": 2}, ok(1.0))
        found = qvf.compare(qvf.fastest(quick, "h100"), qvf.fastest(full, "h100"))
    finally:
        quick.close()
        full.close()
    norm = found["norm", "bf16"]
    assert norm["shapes"] == 2 and norm["untimed"] == 0
    assert math.isclose(norm["max"], 1.2) and math.isclose(norm["geomean"], math.sqrt(1.2))
    assert found["compose", "bf16"] == {"shapes": 0, "geomean": None, "max": None, "untimed": 1}
