"""Moved: ``DoRALinear`` and ``NormCache`` live in :mod:`dora_tune.nn` (``dora_tune.nn.layer``). This alias is
deprecated and will be removed in the next release; ``dora_tune.DoRALinear`` is unchanged."""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    from dora_tune.nn import layer

    value = getattr(layer, name)  # AttributeError for a name the module never had
    warnings.warn(
        f"dora_tune.dispatch.layer.{name} moved to dora_tune.nn.layer.{name}; the old path will be removed in the "
        "next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
