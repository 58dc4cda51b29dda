"""Deprecated aliases of moved modules: :func:`forwarder` makes the module ``__getattr__`` of an old path, which
finds each name at its new path, warns (``DeprecationWarning`` naming the new path) and returns it. The old modules
hold nothing else, so patching one of their attributes changes nothing: patch the new module."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def forwarder(old: str, new: Sequence[str], renamed: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """The ``__getattr__`` of module ``old``: a name is looked up in the ``new`` modules in order (``renamed``: old
    name → its name there); a name none of them has raises ``AttributeError``."""
    renamed = dict(renamed or {})

    def __getattr__(name: str) -> Any:
        target = renamed.get(name, name)
        for module_name in new:
            module = importlib.import_module(module_name)
            if hasattr(module, target):
                warnings.warn(
                    f"{old}.{name} moved to {module_name}.{target}; the old path will be removed in the next release",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, target)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
