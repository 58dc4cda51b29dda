"""dora-tune: autotuned, dispatched DoRA kernels (factored row norm, fused compose) for PyTorch.

Importing this package is cheap: it opens no database and imports neither Triton nor scikit-learn. The kernels live
in :mod:`dora_tune.kernels`; :class:`DoRALinear` (from :mod:`dora_tune.nn.layer`) is imported on first access,
and the PEFT switch lives in :mod:`dora_tune.integrations.peft`.
"""

from typing import Any

__version__ = "0.1.0"  # the one source of the version (pyproject.toml reads it)

__all__ = ["DoRALinear", "__version__"]

_LAZY = {"DoRALinear": "dora_tune.nn.layer"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dora_tune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
