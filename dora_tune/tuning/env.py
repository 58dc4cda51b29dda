"""Which devices are here, and the environment record a measurement is keyed by."""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from collections.abc import Iterator
from typing import Any

import torch

from dora_tune.autotune_db import EnvInfo, GpuFeatures
from dora_tune.autotune_db.common import bandwidth_gbs


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """One visible GPU."""

    index: int
    name: str
    memory_bytes: int
    driver: str
    source: str  # "nvml" or "torch"


@contextlib.contextmanager
def _nvml() -> Iterator[Any]:
    """``pynvml``, initialised for the block and shut down after; None where NVML is missing (no library, no
    driver: NVMLError_LibraryNotFound / DriverNotLoaded on machines without a GPU)."""
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        yield None
        return
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _text(v: Any) -> str:
    """An NVML string (bytes in older bindings)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def _nvml_gpus() -> list[GpuInfo] | None:
    """GPUs through NVML, or None where NVML is missing (no driver, no library): that means "ask torch"."""
    with _nvml() as nv:
        if nv is None:
            return None
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
            out = []
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                out.append(
                    GpuInfo(i, _text(nv.nvmlDeviceGetName(h)), int(nv.nvmlDeviceGetMemoryInfo(h).total), driver, "nvml")
                )
            return out
        except nv.NVMLError:
            return None


def _nvml_figures(index: int, uuid: str | None, count: int) -> tuple[int, int, int] | None:
    """``(max SM clock MHz, max memory clock MHz, memory bus width bits)`` of the GPU torch numbers ``index``, or None
    where NVML cannot answer. The NVML device is found by UUID (torch's numbering follows ``CUDA_VISIBLE_DEVICES``,
    NVML's does not), or by index when every GPU is visible to torch (``count`` = NVML's count)."""
    with _nvml() as nv:
        if nv is None:
            return None
        try:
            handle = None
            if uuid:
                want = uuid.lower().removeprefix("gpu-")
                for i in range(nv.nvmlDeviceGetCount()):
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    if _text(nv.nvmlDeviceGetUUID(h)).lower().removeprefix("gpu-") == want:
                        handle = h
                        break
            if handle is None and nv.nvmlDeviceGetCount() == count:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
            if handle is None:
                return None
            sm = int(nv.nvmlDeviceGetMaxClockInfo(handle, nv.NVML_CLOCK_SM))
            mem = int(nv.nvmlDeviceGetMaxClockInfo(handle, nv.NVML_CLOCK_MEM))
            return sm, mem, int(nv.nvmlDeviceGetMemoryBusWidth(handle))
        except (nv.NVMLError, AttributeError, ValueError):  # AttributeError: an nvidia-ml-py without the call
            return None


def device_features(device: torch.device) -> GpuFeatures:
    """What the GPU at ``device`` says about itself: L2 size from torch's device properties; max SM and memory
    clocks and the memory bus width from NVML, and the peak memory bandwidth they give
    (:func:`~dora_tune.autotune_db.common.bandwidth_gbs`). Where NVML cannot answer (no library, no driver access,
    a GPU it does not list) the NVML figures are 0 and ``source`` is ``"torch"``."""
    props = torch.cuda.get_device_properties(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(props, "uuid", None)
    figures = _nvml_figures(index, str(uuid) if uuid is not None else None, torch.cuda.device_count())
    l2 = int(getattr(props, "L2_cache_size", 0) or 0)
    if figures is None:
        return GpuFeatures(l2, 0.0, 0, 0, 0, "torch")
    sm, mem, bus = figures
    return GpuFeatures(l2, bandwidth_gbs(mem, bus), sm, mem, bus, "nvml")


def list_gpus() -> list[GpuInfo]:
    """Visible GPUs: NVML first (names, memory, driver), else ``torch.cuda``; ``[]`` on a machine without one.

    NVML numbers all GPUs of the machine; when ``CUDA_VISIBLE_DEVICES`` hides some, torch's view wins.
    """
    n_torch = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nvml = _nvml_gpus()
    if nvml is not None and len(nvml) == n_torch:
        return nvml
    gpus = []
    for i in range(n_torch):
        props = torch.cuda.get_device_properties(i)
        gpus.append(GpuInfo(i, props.name, int(props.total_memory), "unknown", "torch"))
    return gpus


def resolve_device(gpu: str) -> torch.device:
    """``--gpu`` value → device: ``auto`` (first CUDA GPU, else the CPU), ``cpu``, or a GPU index."""
    g = gpu.strip().lower()
    if g == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if g == "cpu":
        return torch.device("cpu")
    if g.isdigit():
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(g) >= n:
            raise ValueError(f"--gpu {g}: this machine has {n} CUDA GPU(s)")
        return torch.device("cuda", int(g))
    raise ValueError(f"--gpu must be 'auto', 'cpu', a GPU index, 'all' or indices like 0,1; got {gpu!r}")


def environment(device: torch.device) -> EnvInfo:
    """The environment record for measurements made on ``device`` (versions included; on a GPU, its
    :func:`device_features`)."""
    from dora_tune import __version__

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    if device.type == "cpu":
        cpu = platform.processor() or platform.machine() or "unknown"
        return EnvInfo(
            kind="cpu",
            gpu_name=f"CPU ({cpu})",
            compute_capability="",
            sm_count=0,
            memory_bytes=0,
            driver="",
            cuda="",
            torch=torch.__version__,
            triton=triton_v,
            dora_tune=__version__,
        )
    props = torch.cuda.get_device_properties(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    driver = next((g.driver for g in list_gpus() if g.index == index), "unknown")
    return EnvInfo(
        kind="cuda",
        gpu_name=props.name,
        compute_capability=f"{props.major}.{props.minor}",
        sm_count=int(props.multi_processor_count),
        memory_bytes=int(props.total_memory),
        driver=driver,
        cuda=str(torch.version.cuda or ""),
        torch=torch.__version__,
        triton=triton_v,
        dora_tune=__version__,
        features=device_features(device),
    )
