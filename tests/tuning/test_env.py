"""The environment record and the GPU features read from the device (torch's properties, NVML), on stand-ins."""

import dataclasses
import sys
import types

import pytest
import torch

from dora_tune.autotune_db import EnvInfo, GpuFeatures
from dora_tune.autotune_db.gpus import KNOWN_GPUS
from dora_tune.tuning import env as env_mod
from dora_tune.tuning.features import gpu_features

H100_UUID = "GPU-5f0e3c1a-0000-1111-2222-333344445555"


class FakeNVMLError(Exception):
    pass


def fake_pynvml(devices, *, init_error=False, missing_call=False):
    """A stand-in ``pynvml`` module: ``devices`` is a list of dicts (uuid, sm, mem, bus)."""
    m = types.SimpleNamespace(NVMLError=FakeNVMLError, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, calls=[])

    def init():
        if init_error:
            raise FakeNVMLError("driver not loaded")
        m.calls.append("init")

    m.nvmlInit = init
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    m.nvmlDeviceGetUUID = lambda h: h["uuid"].encode()  # older bindings return bytes
    m.nvmlDeviceGetMaxClockInfo = lambda h, kind: h["sm"] if kind == 1 else h["mem"]
    if not missing_call:
        m.nvmlDeviceGetMemoryBusWidth = lambda h: h["bus"]
    return m


def stand_in_gpu(monkeypatch, *, count=1, uuid=H100_UUID[4:], l2=50 * 2**20):
    props = types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3",
        major=9,
        minor=0,
        multi_processor_count=132,
        total_memory=80 * 2**30,
        L2_cache_size=l2,
        uuid=uuid,
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return props


H100 = {"uuid": H100_UUID, "sm": 1980, "mem": 2619, "bus": 5120}
OTHER = {"uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "sm": 1410, "mem": 1593, "bus": 5120}


def test_features_from_torch_and_nvml(monkeypatch):
    stand_in_gpu(monkeypatch)
    nvml = fake_pynvml([OTHER, H100])  # NVML lists another GPU first: found by UUID, not by index
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    f = env_mod.device_features(torch.device("cuda", 0))
    assert f == GpuFeatures(50 * 2**20, f.mem_bandwidth_gbs, 1980, 2619, 5120, "nvml")
    assert f.mem_bandwidth_gbs == pytest.approx(3352.32)  # the published 3.35 TB/s of an H100 SXM
    assert nvml.calls[-1] == "shutdown"


@pytest.mark.parametrize("how", ["no_library", "init_fails", "old_binding", "not_listed"])
def test_features_without_nvml_fall_back_to_torch(monkeypatch, how):
    stand_in_gpu(monkeypatch, count=1)
    modules = sys.modules
    if how == "no_library":
        monkeypatch.setitem(modules, "pynvml", None)  # what an absent package looks like to import
    elif how == "init_fails":
        monkeypatch.setitem(modules, "pynvml", fake_pynvml([H100], init_error=True))
    elif how == "old_binding":
        monkeypatch.setitem(modules, "pynvml", fake_pynvml([H100], missing_call=True))
    else:  # NVML sees two GPUs, torch one, and no UUID matches: no guessing by index
        monkeypatch.setitem(modules, "pynvml", fake_pynvml([OTHER, dict(OTHER, uuid="GPU-b")]))
    f = env_mod.device_features(torch.device("cuda", 0))
    assert f == GpuFeatures(50 * 2**20, 0.0, 0, 0, 0, "torch")


def test_environment_records_features_on_a_gpu_and_none_on_the_cpu(monkeypatch):
    cpu = env_mod.environment(torch.device("cpu"))
    assert cpu.kind == "cpu" and cpu.features is None
    stand_in_gpu(monkeypatch)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([H100]))
    monkeypatch.setattr(env_mod, "list_gpus", lambda: [])
    gpu = env_mod.environment(torch.device("cuda", 0))
    assert gpu.gpu_name == "NVIDIA H100 80GB HBM3" and gpu.compute_capability == "9.0" and gpu.sm_count == 132
    assert gpu.features is not None and gpu.features.bus_width_bits == 5120
    assert gpu == dataclasses.replace(gpu, features=None)  # features describe the GPU, not the environment


BASE = EnvInfo("cuda", "NVIDIA H100 80GB HBM3", "9.0", 132, 80 * 2**30, "", "", "", "", "")


def test_cost_model_gpu_features_prefer_the_device_and_fall_back_to_the_table():
    spec = KNOWN_GPUS["h100-sxm"]
    assert gpu_features(BASE)[2:] == [spec.bandwidth_tbs, spec.l2_mb, 0.0]  # recorded before schema 3: the table
    dev = GpuFeatures(50 * 2**20, 3352.32, 1980, 2619, 5120, "nvml")
    assert gpu_features(dataclasses.replace(BASE, features=dev))[2:] == [pytest.approx(3.35232), 50.0, 0.0]
    torch_only = GpuFeatures(50 * 2**20, 0.0, 0, 0, 0, "torch")  # no NVML: bandwidth from the table
    assert gpu_features(dataclasses.replace(BASE, features=torch_only))[2:] == [spec.bandwidth_tbs, 50.0, 0.0]
    unseen = dataclasses.replace(BASE, gpu_name="NVIDIA B200", features=dev)  # not in the table: the device's
    assert gpu_features(unseen)[2:] == [pytest.approx(3.35232), 50.0, 0.0]
    assert gpu_features(dataclasses.replace(unseen, features=torch_only))[2:] == [0.0, 50.0, 1.0]
    assert gpu_features(dataclasses.replace(unseen, features=None))[2:] == [0.0, 0.0, 1.0]
    cpu = EnvInfo("cpu", "CPU (x86_64)", "", 0, 0, "", "", "", "", "", features=dev)  # a CPU has no GPU figures
    assert gpu_features(cpu)[2:] == [0.0, 0.0, 1.0]
