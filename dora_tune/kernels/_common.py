"""Shared input checks, config base class and Triton helpers for the kernels.

Everything here is pure: no environment reads, no global state. Each op module (``norm``, ``compose``,
``compose_train``) validates its inputs through these helpers so that every public function reports bad input the
same way: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, device or value, and the message
names the argument and what was expected.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from dora_tune.ops import DTYPE_NAMES

#: the dtypes every op takes, by the names plans, databases and the CLI use (:data:`~dora_tune.ops.DTYPE_NAMES`)
DTYPES: dict[str, torch.dtype] = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32), strict=True))
#: each of those dtypes' name
DTYPE_NAME: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(DTYPES.values())
_DTYPE_NAMES = "bfloat16, float16 or float32"

C = TypeVar("C", bound="KernelConfig")


class Planner(Protocol):
    """What answers ``impl="auto"`` for a kernel function, handed in as its ``planner`` argument: the kernels import
    nothing above them. The front door (:mod:`dora_tune.auto`, whose functions are :mod:`dora_tune.kernels`' public
    ones) passes the run-time dispatcher's hooks (the module :mod:`dora_tune.dispatch.runtime`).

    - ``auto(op, dims, dtype, device, race)`` → a plan (``.impl``, ``.config``): the memoised choice for ``op`` at
      ``dims``; ``race`` (None: no race) is a factory of a runner of the caller's inputs, called only when a race of
      the plan's shortlist is due.
    - ``auto_failed(op, dims, dtype, device, failed, why)``: a planned config could not launch; re-plan without it.
    - ``auto_path(key, device, make_runners, default)`` → the name of the whole code path to run (a first-use race
      of the runners ``make_runners()`` builds).
    """

    def auto(
        self, op: str, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device, race: Any = None
    ) -> Any: ...

    def auto_failed(
        self, op: str, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device, failed: Any, why: str
    ) -> Any: ...

    def auto_path(
        self, key: tuple, device: torch.device, make_runners: Callable[[], dict[str, Callable[[], Any]]], default: str
    ) -> str: ...


def need_planner(function: str, planner: Planner | None) -> Planner:
    """``planner``, or the ``ValueError`` of an ``impl="auto"`` call of a kernel function that was given none."""
    if planner is None:
        raise ValueError(
            f"{function}: impl='auto' needs a planner; call dora_tune.kernels.{function} (the front door, "
            "dora_tune.auto), which plans with the dispatcher, or pass an implementation"
        )
    return planner


def check_tensor(name: str, t: Any, *, ndim: int | None = None, min_ndim: int = 1) -> torch.Tensor:
    """Check that ``t`` is a floating tensor of a supported dtype with the expected rank; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype {_DTYPE_NAMES}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got a {t.dim()}-d tensor")
    return t


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Check that all tensors live on one device; return it."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all must share a device")
    return first.device


def check_scale(scale: Any) -> float:
    """Check that ``scale`` is a finite real Python number (not a tensor); return it as float."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"scale must be a Python int or float, got {type(scale).__name__}")
    if torch.compiler.is_compiling():  # torch.compile(dynamic=True) may trace it as a symbolic float
        return scale
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def as_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """View ``t [..., cols]`` as ``[rows, cols]`` with unit column stride (copies only when it must)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


@functools.cache
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints: what ``triton.cdiv`` computes, without its per-call constexpr wrapping
    (~3 µs each on the host; launchers call it several times per launch)."""
    return -(-a // b)


@functools.cache
def triton_available() -> bool:
    """True when Triton can be imported (its kernels then run on CUDA, or on CPU under TRITON_INTERPRET=1). Decided
    once per process (a failed ``import`` is not cached by Python and cost ~10 µs per call on the hot path)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def require_triton(device: torch.device) -> None:
    """Raise a clear error when a Triton implementation cannot run on ``device``."""
    if not triton_available():
        raise RuntimeError("impl='triton' needs the triton package, which is not importable here")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"impl='triton' runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")


def config_field(*, lo: int, hi: int, pow2: bool = True) -> Any:
    """A dataclass field of a kernel config: an int in ``[lo, hi]``, a power of two unless ``pow2=False``."""
    return dataclasses.field(metadata={"lo": lo, "hi": hi, "pow2": pow2})


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Base of every kernel's launch config: frozen, hashable, validated on construction, JSON-safe.

    Subclasses declare integer fields with :func:`config_field`. A config read from anywhere (a database, JSON)
    goes through :meth:`from_dict`, which rejects unknown or missing keys and out-of-range values, so an invalid
    config never reaches a kernel launch.
    """

    op: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{type(self).__name__}.{f.name} must be an int, got {v!r}")
            lo, hi, pow2 = f.metadata["lo"], f.metadata["hi"], f.metadata["pow2"]
            if not lo <= v <= hi:
                raise ValueError(f"{type(self).__name__}.{f.name}={v} is outside [{lo}, {hi}]")
            if pow2 and not is_pow2(v):
                raise ValueError(f"{type(self).__name__}.{f.name}={v} must be a power of two")

    def as_dict(self) -> dict[str, int]:
        """The config as a plain dict of ints (canonical field order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Any) -> C:
        """Build and validate a config from a mapping; raise ``ValueError``/``TypeError`` on anything off."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__} must be built from a dict, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown or missing:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}, missing keys {missing}")
        return cls(**{n: data[n] for n in names})
