"""Facts about GPU models beyond a trial's environment row, and the rule that picks which profiled GPU's plans a GPU
nobody profiled borrows.

* :data:`KNOWN_GPUS` / :func:`gpu_spec`: published figures (HBM bandwidth, L2), the fallback where the device did
  not report its own (an environment recorded before schema 3, a GPU without NVML, a plan asked for by name only).
* :class:`GpuFacts` / :func:`gpu_facts`: what the rule compares — compute capability, SMs, bandwidth and L2, each
  as the device said it, else published, else unknown.
* :func:`nearest_gpu`: the same compute capability first, then the same architecture (major version), then any;
  among those the nearest by SMs, bandwidth and L2 (sum of |log ratio| over the figures both know), the name
  breaking ties. The run-time dispatcher's transfer (:mod:`dora_tune.dispatch.runtime`) and the leave-one-GPU-out
  evaluation (:mod:`dora_tune.tuning.crossgpu`) both use it.

Standard library only: the run-time dispatcher imports this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dora_tune.autotune_db.common import GpuFeatures, gpu_slug


@dataclass(frozen=True)
class GpuSpec:
    """Published figures of one GPU model: HBM bandwidth (TB/s), L2 size (MB), and the copy bandwidth we measured
    (TB/s, read + write; None where not measured)."""

    bandwidth_tbs: float
    l2_mb: float
    measured_copy_tbs: float | None = None


KNOWN_GPUS: dict[str, GpuSpec] = {
    "h200": GpuSpec(4.8, 60.0, 4.25),  # H200 SXM 141 GB HBM3e; copy measured in docs/norm.md
    "h100-sxm": GpuSpec(3.35, 50.0),  # H100 SXM5 80 GB HBM3 (NVML: "NVIDIA H100 80GB HBM3")
    "a100-80gb": GpuSpec(2.0, 40.0),  # A100 80 GB (SXM4 2.04 TB/s, PCIe 1.94 TB/s)
}
"""Published figures of known GPUs by key (:func:`gpu_spec` maps a GPU name to its key): the fallback where the
device did not report its own (an environment recorded before schema 3, or without NVML)."""


def gpu_spec(gpu_name: str) -> GpuSpec | None:
    """The :data:`KNOWN_GPUS` entry of a GPU name as NVML reports it ("NVIDIA H200", "NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-80GB"), or None when it is not known (H100 PCIe/NVL too: other bandwidths)."""
    slug = gpu_slug(gpu_name)
    if "h200" in slug:
        return KNOWN_GPUS["h200"]
    if "h100" in slug and ("sxm" in slug or "hbm3" in slug) and "pcie" not in slug and "nvl" not in slug:
        return KNOWN_GPUS["h100-sxm"]
    if "a100" in slug and "80gb" in slug:
        return KNOWN_GPUS["a100-80gb"]
    return None


@dataclass(frozen=True)
class GpuFacts:
    """What the transfer rule compares of one GPU: ``name``, compute ``capability`` ("9.0"; "" unknown),
    ``sm_count`` (0 unknown), memory ``bandwidth_tbs`` and ``l2_mb`` (None unknown)."""

    name: str
    capability: str
    sm_count: int
    bandwidth_tbs: float | None
    l2_mb: float | None


def gpu_facts(
    name: str,
    capability: str,
    sm_count: int,
    features: GpuFeatures | None = None,
    *,
    l2_bytes: int = 0,
    bandwidth_gbs: float = 0.0,
) -> GpuFacts:
    """The facts of a GPU: bandwidth and L2 as the device said them (``features``, else ``bandwidth_gbs`` /
    ``l2_bytes``; 0 = not said), each missing figure from :data:`KNOWN_GPUS`, else unknown."""
    spec = gpu_spec(name)
    if features is not None:
        l2_bytes, bandwidth_gbs = features.l2_bytes, features.mem_bandwidth_gbs
    bw = bandwidth_gbs / 1e3 if bandwidth_gbs > 0 else None
    l2 = l2_bytes / 2**20 if l2_bytes > 0 else None
    if spec is not None:
        bw = spec.bandwidth_tbs if bw is None else bw
        l2 = spec.l2_mb if l2 is None else l2
    return GpuFacts(name, capability or "", max(int(sm_count), 0), bw, l2)


def feature_distance(a: GpuFacts, b: GpuFacts) -> float:
    """Sum of |log ratio| of SMs, bandwidth and L2 over the figures both GPUs know (0 when they share none)."""
    pairs = ((a.sm_count or None, b.sm_count or None), (a.bandwidth_tbs, b.bandwidth_tbs), (a.l2_mb, b.l2_mb))
    return sum(abs(math.log(x / y)) for x, y in pairs if x and y)


def nearest_gpu(target: GpuFacts, candidates: Sequence[GpuFacts]) -> GpuFacts:
    """The candidate a plan for ``target`` should come from: the same compute capability, else the same
    architecture (major version), else any; among those the nearest by :func:`feature_distance`, then the name."""
    if not candidates:
        raise ValueError("no candidate GPU")
    cc = target.capability

    def rank(c: GpuFacts) -> tuple:
        same = bool(cc) and c.capability == cc
        arch = bool(cc) and c.capability.split(".")[0] == cc.split(".")[0]
        return (not same, not arch, feature_distance(target, c), c.name)

    return min(candidates, key=rank)
