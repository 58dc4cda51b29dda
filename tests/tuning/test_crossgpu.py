"""Leave-one-GPU-out on a synthetic multi-GPU database whose times follow a known law across GPUs."""

import dataclasses

import pytest

from dora_tune.autotune_db import EnvInfo, GpuFeatures, TuningDB
from dora_tune.tuning.crossgpu import GpuTrials, leave_one_gpu_out, nearest_gpu

from conftest import COLS, FACTORS, ROWS, ok


def gpu(name, cc, sms, bw_gbs, l2_mb):
    f = GpuFeatures(l2_mb * 2**20, bw_gbs, 1980, 2619, 5120, "nvml")
    return EnvInfo("cuda", name, cc, sms, 80 * 2**30, "580", "13.0", "2.11.0", "3.6.0", "0.1.0", features=f)


A100 = gpu("NVIDIA A100-SXM4-80GB", "8.0", 108, 2039.0, 40)
H100 = gpu("NVIDIA H100 80GB HBM3", "9.0", 132, 3352.0, 50)
H200 = gpu("NVIDIA H200", "9.0", 132, 4915.0, 60)


def law(impl, rows, cols, bw_gbs, factor=1.0):
    """Memory-bound times scale with 1/bandwidth; eager pays 8 launches, the fused kernel one but more per element
    of a slower path at small n: the eager/fused crossover moves with the GPU's bandwidth."""
    n = rows * cols
    per = 3352.0 / bw_gbs
    return 40 + n * 1e-3 * per if impl == "eager" else (300 + n * 0.25e-3 * per) * factor


def fill(db, env):
    from dora_tune.dispatch.registry import registry
    from dora_tune.kernels import DEFAULT_COMPOSE_TRAIN_CONFIG

    impls = {i.name: i for i in registry()["compose_train"]}
    default = DEFAULT_COMPOSE_TRAIN_CONFIG.as_dict()
    configs = [default, *[c for c in impls["triton"].configs({"rows": 1, "cols": 1}) if c != default][:3]]
    bw = env.features.mem_bandwidth_gbs
    for rows in ROWS:
        for cols in COLS:
            shape = {"rows": rows, "cols": cols}
            db.record_trial(
                env,
                "compose_train",
                "eager",
                impls["eager"].version,
                shape,
                "bf16",
                {},
                ok(law("eager", rows, cols, bw)),
            )
            for cfg, f in zip(configs, FACTORS, strict=True):
                db.record_trial(
                    env,
                    "compose_train",
                    "triton",
                    impls["triton"].version,
                    shape,
                    "bf16",
                    cfg,
                    ok(law("triton", rows, cols, bw, f)),
                )


@pytest.fixture
def groups(tmp_path):
    with TuningDB.open(str(tmp_path / "multi.sqlite")) as db:
        for env in (A100, H100, H200):
            fill(db, env)
        envs = {e.gpu_name: e for e in db.environments()}
        trials = db.trials()
    return [GpuTrials(envs[n].info, [t for t in trials if t.gpu_name == n]) for n in sorted(envs)]


def test_leave_one_gpu_out_recovers_the_law(groups):
    report = {h.gpu_name: h for h in leave_one_gpu_out(groups, "compose_train", "bf16")}
    assert set(report) == {A100.gpu_name, H100.gpu_name, H200.gpu_name}
    h100 = report[H100.gpu_name]
    assert h100.transfer_from == H200.gpu_name  # the same compute capability first
    assert report[A100.gpu_name].transfer_from == H100.gpu_name  # no sm 8.0 left: the nearest by features
    assert set(h100.trained_on) == {A100.gpu_name, H200.gpu_name} and h100.n_shapes == len(ROWS) * len(COLS)
    for h in report.values():
        assert h.model.regret_geomean <= 1.05 and h.model.regret_max <= 1.35, h
        assert h.crossover.regret_geomean > h.model.regret_geomean, h  # the fixed rule does not follow the GPU
    # interpolating between two measured GPUs (H100 between the A100 and the H200) is where features pay most
    assert h100.model.regret_geomean <= h100.transfer.regret_geomean + 1e-9


def test_leave_one_gpu_out_needs_two_gpus(groups):
    with pytest.raises(ValueError, match="≥ 2 GPUs"):
        leave_one_gpu_out(groups[:1], "compose_train", "bf16")
    with pytest.raises(ValueError, match="≥ 2 GPUs"):
        leave_one_gpu_out(groups, "norm", "bf16")  # no norm trials at all


def test_nearest_gpu_prefers_the_architecture_then_the_features():
    b200 = gpu("NVIDIA B200", "10.0", 148, 8000.0, 126)
    assert nearest_gpu(H100, [A100, H200]) == H200
    assert nearest_gpu(b200, [A100, H100, H200]) == H200  # no sm 10.x: the nearest bandwidth, SMs and L2
    assert nearest_gpu(dataclasses.replace(A100, gpu_name="A100 twin"), [H100, A100]) == A100
    with pytest.raises(ValueError):
        nearest_gpu(H100, [])
