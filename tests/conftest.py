"""Test setup: on a machine without CUDA, Triton kernels run on CPU tensors under TRITON_INTERPRET=1.

The variable must be set before Triton decorates the kernels; dora_tune imports its Triton modules lazily, so
setting it here (before any test imports them) is enough.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when out has a NaN or inf (so NaN never passes)."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


@pytest.fixture
def triton_device() -> str:
    """Where Triton kernels run in this session: CUDA if present, else CPU under the interpreter, else skip."""
    if HAS_CUDA:
        return "cuda"
    if INTERPRET:
        return "cpu"
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def dev_for(request):
    """``dev_for(impl)``: the device to test ``impl`` on (Triton's device for "triton", else the CPU)."""
    return lambda impl: request.getfixturevalue("triton_device") if impl == "triton" else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
