"""Run-time choice of implementation for each op.

For now the rule is fixed: the Triton implementation on CUDA tensors when Triton imports, else the torch one. The
learned, database-backed dispatcher (cost model, memoised plans) replaces :func:`default_impl` in a later issue.
"""

from __future__ import annotations

import torch

from dora_tune.kernels._common import triton_available

_TORCH_IMPL = {"norm": "factored_torch", "compose": "eager", "compose_train": "eager"}


def default_impl(op: str, device: torch.device) -> str:
    """Implementation used by ``impl="auto"`` for ``op`` on ``device``: ``"triton"`` on CUDA, else the torch one."""
    if op not in _TORCH_IMPL:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_TORCH_IMPL)}")
    if device.type == "cuda" and triton_available():
        return "triton"
    return _TORCH_IMPL[op]
