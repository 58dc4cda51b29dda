"""Run PEFT's DoRA Linear layers on dora-tune: ``enable(model=None)`` / ``disable()``.

PEFT (≥ 0.12) computes DoRA for a LoRA ``Linear`` in ``peft.tuners.lora.dora.DoraLinearLayer.forward(x, *, lora_A,
lora_B, scaling, base_layer, base_result=None, ...)``: the row norm ``‖W + s·B·A‖`` (built densely through an
identity matrix, detached), ``g = m / norm``, and the extra output ``(g − 1)·base + g·s·lora_B(lora_A(x))`` that
PEFT adds to the base layer's output. ``base`` is ``base_result − bias`` when PEFT passes the base output (dropout
inactive), else ``x·Wᵀ`` of the (dropped-out) ``x`` it was given — the semantics of every PEFT version since 0.12.

:func:`enable` replaces that method so that, for the layers it covers, the norm is :func:`~dora_tune.kernels.
factored_norm` (never building ``B·A``), computed once while W, A and B are unchanged (once per optimizer step in
training; :class:`~dora_tune.nn.layer.NormCache`), and the rest — the LoRA GEMMs through the adapters'
weights, ``g = m / n`` (rows with a zero norm get ``g = 1`` instead of PEFT's inf/NaN), PEFT's bias subtraction and
the composition — is :func:`~dora_tune.kernels.dora_layer.dora_layer` with ``impl="auto"`` (a few torch ops or one
autograd node around the fused kernels, whichever the first training step timed cheaper).
Everything else — dropout, input casts, adapter selection, merging — stays PEFT's. ``enable(model,
dropout_mode="lora_only")`` opts into dropout on the LoRA branch only (see :func:`enable`).

Where PEFT's LoRA ``Linear.forward`` would only call the base layer, then the DoRA layer, and add the two (one active
DoRA adapter, no dropout acting, the input in the base weight's dtype (the adapters may be float32, PEFT's default on
a bf16 model), no hooks on the base layer, no autocast, not merged or
disabled: :func:`_one_call_route`), :func:`enable` computes that whole call as one DoRA layer call with the full
output ``g ⊙ (x·Wᵀ + s·lora) + bias`` — PEFT's wrapper and the extra add and base-layer call are host time at small
token counts. Any other call goes to PEFT's ``Linear.forward`` unchanged.

Layers keep PEFT's own path (and dora-tune says so once per reason, with a ``RuntimeWarning``) when they are not a
plain case: DoRA on Embedding or Conv layers, ``fan_in_fan_out`` (Conv1D-style) weights, quantised or otherwise
non-plain base weights (bitsandbytes, HQQ, torchao, DTensor, ...), ``lora_bias=True``, scalings that are not Python
numbers, call arguments this module does not know (a newer PEFT) and subclasses of ``DoraLinearLayer``.

Numerics: dora-tune's norm is float32 from the input dtypes (PEFT's is computed in the activation dtype), so results
agree with PEFT's within the dtype's rounding, not bit for bit. :func:`disable` restores PEFT exactly.

Requires the ``peft`` extra (``pip install 'dora-tune[peft]'``).
"""

from __future__ import annotations

import inspect
import math
import sys
import threading
import warnings
import weakref
from typing import Any

import torch
from torch import nn

try:
    import peft
except ImportError as e:  # pragma: no cover - exercised by a test that hides peft
    raise ImportError(
        "dora_tune.integrations.peft needs PEFT, which is not installed: pip install 'dora-tune[peft]' "
        "(peft>=0.12, transformers>=4.45)"
    ) from e
try:
    from peft.tuners.lora.dora import DoraLinearLayer
except ImportError as e:  # pragma: no cover - depends on the installed PEFT
    raise ImportError(
        f"dora_tune.integrations.peft needs peft>=0.12 (peft.tuners.lora.dora.DoraLinearLayer); found peft "
        f"{getattr(peft, '__version__', '?')}: pip install -U 'dora-tune[peft]'"
    ) from e

try:  # the LoRA Linear layer holding the DoRA layer: its forward gets the one-call route (see _linear_forward)
    from peft.tuners.lora.layer import Linear as LoraLinear
except ImportError:  # pragma: no cover - depends on the installed PEFT
    LoraLinear = None

from dora_tune.auto import dora_layer_unchecked
from dora_tune.auto.custom_ops import cached_norm_op
from dora_tune.kernels._common import SUPPORTED_DTYPES
from dora_tune.nn.layer import DROPOUT_MODES, NormCache

__all__ = ["DoraTuneHandle", "disable", "enable", "is_enabled"]

_FLAG = "_dora_tune_enabled"  # instance attribute: this layer was enabled by enable(model)
_CACHE = "_dora_tune_norm_cache"  # instance attribute: the eval-mode NormCache
_VERDICT = "_dora_tune_verdict"  # instance attribute: (call key, _why_not's answer) of the last call checked
_ROUTE_VERDICT = "_dora_tune_route_verdict"  # the same for the one-call route of the LoRA Linear (_linear_forward)
_DROPOUT = "_dora_tune_dropout"  # instance attribute (dropout_mode="lora_only"): the LoRA dropout PEFT no longer sees
_REQUIRED = ("lora_A", "lora_B", "scaling", "base_layer")
_KNOWN = frozenset((*_REQUIRED, "base_result", "adapter_name"))

_LOCK = threading.RLock()
_ORIG: dict[type, tuple[bool, Any]] = {}  # patched class → (had its own forward, that forward)
_STATE = {"global": False}
_PEFT: dict[str, Any] = {}  # "forward": PEFT's DoraLinearLayer.forward, as found by the first enable()
_ENABLED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # layers flagged by enable(model)
_CACHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # layers holding a NormCache or a verdict
_SAID: set[str] = set()
# dropout_mode="lora_only": (the owner's lora_dropout ModuleDict, adapter name, DoRA layer holding the module)
_SWAPPED: list[tuple[weakref.ref, str, nn.Module]] = []


class DoraTuneHandle:
    """What :func:`enable` did: ``layers`` DoRA Linear layers flagged in the model (None for the global switch).

    Also a context manager: ``with enable(model): ...`` calls :func:`disable` on exit (which undoes every
    :func:`enable`, not only this one)."""

    def __init__(self, model: nn.Module | None, layers: int | None) -> None:
        self.model = model
        self.layers = layers

    def __enter__(self) -> DoraTuneHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        disable()

    def __repr__(self) -> str:
        where = "every PEFT DoRA Linear layer" if self.layers is None else f"{self.layers} layers of the model"
        return f"DoraTuneHandle({where})"


def enable(model: nn.Module | None = None, *, dropout_mode: str = "peft") -> DoraTuneHandle:
    """Compute PEFT's DoRA Linear layers with dora-tune.

    Args:
        model: ``None`` patches globally: every PEFT DoRA Linear layer, existing and created later. A module (e.g. a
            ``PeftModel``) enables only the DoRA Linear layers inside it now.
        dropout_mode: ``"peft"`` (default): PEFT's semantics exactly — with ``lora_dropout > 0`` in training the DoRA
            delta is computed on the dropped-out input, which costs a second base GEMM. ``"lora_only"`` (needs a
            ``model``): dropout acts on the LoRA branch only, ``y = g ⊙ (x·Wᵀ + s·dropout(x)·Aᵀ·Bᵀ) + bias``
            (torchtune's choice) — a different model, not a faster PEFT. It moves each DoRA adapter's
            ``lora_dropout`` module out of PEFT's sight (an ``nn.Identity`` stands in; :func:`disable` puts it back).

    Functions ``torch.compile`` compiled before the call are dropped (``torch.compiler.reset()``) and trace again at
    their next call, so that no compiled code keeps PEFT's path; :func:`disable` does the same.

    Returns:
        A :class:`DoraTuneHandle` (usable as ``with enable(model): ...``).

    Raises:
        RuntimeError: the installed PEFT's ``DoraLinearLayer.forward`` does not have the arguments this module
            relies on (the message names the PEFT version).
        ValueError: an unknown ``dropout_mode``, or ``"lora_only"`` without a model.
    """
    if dropout_mode not in DROPOUT_MODES:
        raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {dropout_mode!r}")
    if dropout_mode == "lora_only" and model is None:
        raise ValueError("dropout_mode='lora_only' needs the model (enable(model, dropout_mode='lora_only'))")
    with _LOCK:
        _check_peft_api()
        if model is None:
            _install(shim_subclasses=True)
            _STATE["global"] = True
            _forget_compiled_code()
            return DoraTuneHandle(None, None)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        layers, others = [], set()
        for m in model.modules():
            if type(m) is DoraLinearLayer:
                layers.append(m)
            elif isinstance(m, DoraLinearLayer):
                others.add(type(m).__name__)
        if others:
            _say(
                f"PEFT DoRA layers of type {', '.join(sorted(others))} keep PEFT's own path (dora-tune covers "
                "DoRA on Linear layers only)"
            )
        if not layers:
            warnings.warn(
                "dora-tune: enable(model) found no PEFT DoRA Linear layer in the model (LoraConfig("
                "use_dora=True) adds them); nothing enabled",
                RuntimeWarning,
                stacklevel=2,
            )
            return DoraTuneHandle(model, 0)
        _install(shim_subclasses=False)
        for m in layers:
            m.__dict__[_FLAG] = True
            _ENABLED.add(m)
        _set_dropout_mode(model, dropout_mode)
        _forget_compiled_code()
        return DoraTuneHandle(model, len(layers))


def _set_dropout_mode(model: nn.Module, mode: str) -> None:
    """Move each DoRA adapter's LoRA dropout out of PEFT's sight (``"lora_only"``) or put it back (``"peft"``)."""
    for owner in model.modules():
        mags, drops = getattr(owner, "lora_magnitude_vector", None), getattr(owner, "lora_dropout", None)
        if not isinstance(mags, nn.ModuleDict) or not isinstance(drops, nn.ModuleDict):
            continue
        for name, dora in mags.items():
            if type(dora) is not DoraLinearLayer or name not in drops:
                continue
            held = dora.__dict__.get(_DROPOUT)
            if mode == "lora_only" and held is None and not isinstance(drops[name], nn.Identity):
                dora.__dict__[_DROPOUT] = drops[name]
                drops[name] = nn.Identity()
                _SWAPPED.append((weakref.ref(drops), name, dora))
            elif mode == "peft" and held is not None:
                drops[name] = held
                del dora.__dict__[_DROPOUT]


def _restore_dropouts() -> None:
    for ref, name, dora in _SWAPPED:
        drops, held = ref(), dora.__dict__.pop(_DROPOUT, None)
        if drops is not None and held is not None:
            drops[name] = held
    _SWAPPED.clear()


def disable() -> None:
    """Undo every :func:`enable`: PEFT's classes get their original methods back and no layer keeps a dora-tune
    flag or cache, so PEFT computes exactly what it computes without dora-tune. A no-op when nothing is enabled."""
    with _LOCK:
        changed = bool(_ORIG or _ENABLED or _SWAPPED)
        _restore_dropouts()
        for cls, (had_own, fwd) in _ORIG.items():
            if had_own:
                cls.forward = fwd
            else:  # pragma: no cover - every patched PEFT class defines its own forward
                delattr(cls, "forward")
        if DoraLinearLayer in _ORIG:
            if _PEFT.get("_apply") is not None:  # pragma: no cover - PEFT's class inherits nn.Module._apply
                DoraLinearLayer._apply = _PEFT["_apply"]
            else:
                del DoraLinearLayer._apply
        _ORIG.clear()
        _STATE["global"] = False
        for m in list(_ENABLED):
            m.__dict__.pop(_FLAG, None)
        _ENABLED.clear()
        for m in list(_CACHED):
            m.__dict__.pop(_CACHE, None)
            m.__dict__.pop(_VERDICT, None)
            m.__dict__.pop(_ROUTE_VERDICT, None)
        _CACHED.clear()
        if changed:
            _forget_compiled_code()


def _forget_compiled_code() -> None:
    """Drop every function ``torch.compile`` compiled in this process (``torch.compiler.reset()``; nothing to do
    before ``torch._dynamo`` is imported).

    Compiled code inlines the ``forward`` it traced, PEFT's or dora-tune's, and its guards need not re-check a class
    method patched later: on the H100 (torch 2.11) an enabled model compiled after a PEFT DoRA model of the same
    architecture ran that model's compiled PEFT code (its first step took no compile time and its first losses
    equalled PEFT's bit for bit). Each compiled module traces again at its next call, on the path now set."""
    if "torch._dynamo" in sys.modules:  # nothing can have been compiled before dynamo was imported
        torch.compiler.reset()


def is_enabled(layer: nn.Module | None = None) -> bool:
    """Whether dora-tune is on globally (``layer=None``) or for ``layer`` (a PEFT ``DoraLinearLayer``)."""
    if layer is None:
        return bool(_STATE["global"])
    return bool(_ORIG) and type(layer) is DoraLinearLayer and (_STATE["global"] or layer.__dict__.get(_FLAG, False))


# ----------------------------------------------------------------------------------------------- patching


def _check_peft_api() -> None:
    fwd = _ORIG[DoraLinearLayer][1] if DoraLinearLayer in _ORIG else DoraLinearLayer.forward
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        params = {}
    missing = [n for n in ("x", *_REQUIRED) if n not in params]
    if missing:
        raise RuntimeError(
            f"dora-tune cannot route this PEFT's DoRA: peft {getattr(peft, '__version__', '?')} "
            f"DoraLinearLayer.forward{inspect.signature(fwd) if params else ''} lacks {missing}; supported: peft "
            ">= 0.12 with forward(x, *, lora_A, lora_B, scaling, base_layer[, base_result, adapter_name])"
        )


def _install(*, shim_subclasses: bool) -> None:
    if DoraLinearLayer not in _ORIG:
        _ORIG[DoraLinearLayer] = ("forward" in DoraLinearLayer.__dict__, DoraLinearLayer.forward)
        _PEFT["forward"] = DoraLinearLayer.forward
        DoraLinearLayer.forward = _dora_forward
        _PEFT["_apply"] = DoraLinearLayer.__dict__.get("_apply")
        DoraLinearLayer._apply = _dora_apply
    if LoraLinear is not None and LoraLinear not in _ORIG and "forward" in LoraLinear.__dict__:
        _ORIG[LoraLinear] = (True, LoraLinear.__dict__["forward"])
        _PEFT["linear_forward"] = LoraLinear.__dict__["forward"]
        LoraLinear.forward = _linear_forward
    if shim_subclasses:
        for cls in _subclasses(DoraLinearLayer):
            if cls not in _ORIG and "forward" in cls.__dict__:
                _ORIG[cls] = (True, cls.__dict__["forward"])
                cls.forward = _make_shim(cls, cls.__dict__["forward"])


def _subclasses(cls: type) -> list[type]:
    out, todo = [], list(cls.__subclasses__())
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def _make_shim(cls: type, fwd: Any) -> Any:
    """PEFT's own ``fwd`` for DoRA layer types dora-tune does not cover, saying so once."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        _say(
            f"PEFT DoRA layers of type {cls.__name__} keep PEFT's own path (dora-tune covers DoRA on Linear "
            "layers only)"
        )
        return fwd(self, *args, **kwargs)

    forward.__wrapped__ = fwd  # type: ignore[attr-defined]
    return forward


def _say(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        warnings.warn(f"dora-tune: {message}", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------- the forward


def _plain(t: Any, ndim: int | None = None) -> bool:
    """A plain (not quantised, not a tensor subclass) float tensor of a supported dtype with data."""
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.dtype in SUPPORTED_DTYPES
        and (ndim is None or t.dim() == ndim)
        and t.device.type != "meta"
    )


def _why_not(self: nn.Module, x: Any, kwargs: dict[str, Any]) -> str | None:
    """Why this call must keep PEFT's path (a message), or None when dora-tune computes it."""
    if type(self) is not DoraLinearLayer:
        return f"{type(self).__name__} (a DoraLinearLayer subclass) keeps PEFT's own path"
    unknown = sorted(set(kwargs) - _KNOWN)
    if unknown or any(n not in kwargs for n in _REQUIRED):
        return f"DoraLinearLayer.forward called with arguments {sorted(kwargs)} (another PEFT version?); PEFT's path"
    if getattr(self, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style weights) keeps PEFT's DoRA path"
    lora_A, lora_B, base_layer, scaling = (kwargs[n] for n in ("lora_A", "lora_B", "base_layer", "scaling"))
    for name, mod in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(mod, nn.Linear) or not _plain(mod.weight, 2):
            return f"{name} is not an nn.Linear with a plain weight; PEFT's DoRA path"
        if mod.bias is not None:
            return "lora_bias=True keeps PEFT's DoRA path"
    W = getattr(base_layer, "weight", None)
    if hasattr(base_layer, "W_q") or not _plain(W, 2):
        return (
            f"base layer {type(base_layer).__name__} has a quantised or non-plain weight "
            f"({type(W).__name__}); PEFT's DoRA path"
        )
    mag = getattr(self, "weight", None)
    if not _plain(mag, 1):
        return "no plain magnitude vector on the DoRA layer; PEFT's DoRA path"
    d_out, d_in = W.shape
    A, B = lora_A.weight, lora_B.weight
    r = A.shape[0]
    shapes_ok = tuple(mag.shape) == (d_out,) and tuple(A.shape) == (r, d_in) and tuple(B.shape) == (d_out, r)
    if not shapes_ok:
        return "unexpected DoRA shapes (magnitude, lora_A, lora_B, base weight); PEFT's DoRA path"
    if A.dtype != B.dtype:
        return "lora_A and lora_B of different dtypes; PEFT's DoRA path"
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        return f"scaling of type {type(scaling).__name__} (not a finite Python number); PEFT's DoRA path"
    if not _plain(x) or x.dim() < 1 or x.shape[-1] != d_in:
        return "an input that is not a plain float tensor [..., in_features]; PEFT's DoRA path"
    base_result = kwargs.get("base_result")
    if base_result is not None and (not _plain(base_result) or base_result.shape[-1] != d_out):
        return "a base_result that is not a plain float tensor [..., out_features]; PEFT's DoRA path"
    dev = W.device
    if not (x.device == dev and A.device == dev and B.device == dev and mag.device == dev):
        return "tensors on different devices (offloading?); PEFT's DoRA path"
    return None


def _tensor_key(t: Any) -> tuple:
    """What :func:`_why_not` checks of a tensor argument: type, dtype, device, rank and last dimension."""
    if not isinstance(t, torch.Tensor):
        return (type(t),)
    return type(t), t.dtype, t.device, t.dim(), t.shape[-1] if t.dim() else None


def _module_key(m: Any) -> tuple:
    """What :func:`_why_not` checks of a module argument: its identity and type, and each parameter's and buffer's
    (or ``None``'s) type, dtype, device and shape."""
    if not isinstance(m, nn.Module):
        return id(m), type(m)
    tensors = (*m._parameters.items(), *m._buffers.items())
    return id(m), type(m), *((n, type(t), t.dtype, t.device, t.shape) if t is not None else (n,) for n, t in tensors)


def _call_key(self: nn.Module, x: Any, kwargs: dict[str, Any]) -> tuple:
    """Everything :func:`_why_not`'s answer depends on, cheaper to build and compare than the checks themselves
    (module attribute lookups and ``hasattr`` misses are slow)."""
    scaling, base_result = kwargs.get("scaling"), kwargs.get("base_result")
    return (
        tuple(kwargs),
        type(scaling),
        scaling if type(scaling) in (int, float) else id(scaling),  # never a tensor: == must give a bool
        getattr(self, "fan_in_fan_out", False),
        _tensor_key(x),
        None if base_result is None else _tensor_key(base_result),
        _module_key(self),
        *(_module_key(kwargs.get(n)) for n in ("lora_A", "lora_B", "base_layer")),
    )


def _checked_why_not(self: nn.Module, x: Any, kwargs: dict[str, Any], slot: str = _VERDICT) -> str | None:
    """:func:`_why_not`, remembered per layer (in ``slot``: one per call site, whose keys differ) while the call's
    key (:func:`_call_key`) stays the same."""
    key = _call_key(self, x, kwargs)
    last = self.__dict__.get(slot)
    if last is not None and last[0] == key:
        return last[1]
    why = _why_not(self, x, kwargs)
    self.__dict__[slot] = (key, why)
    _CACHED.add(self)
    return why


def _norm(self: nn.Module, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    if torch.compiler.is_compiling():  # one opaque op that reuses the norm while W, A and B are unchanged
        return cached_norm_op(W, A, B, scale)
    cache = self.__dict__.get(_CACHE)
    if cache is None:
        cache = self.__dict__[_CACHE] = NormCache()
        _CACHED.add(self)
    return cache(W, A, B, scale)


def _dora_apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    """``nn.Module._apply`` of a DoRA layer while dora-tune is installed: a dtype or device move drops the norm
    cache (its key holds storage addresses, which the move frees for reuse)."""
    cache = self.__dict__.get(_CACHE)
    if cache is not None:
        cache.clear()
    parent = _PEFT.get("_apply") or nn.Module._apply
    return parent(self, fn, recurse)


def _hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` would run hooks (its own or global module hooks) that a direct computation skips."""
    glob = nn.modules.module
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or getattr(m, "_backward_pre_hooks", None)
        or getattr(glob, "_global_forward_hooks", None)
        or getattr(glob, "_global_forward_pre_hooks", None)
        or getattr(glob, "_global_backward_hooks", None)
        or getattr(glob, "_global_backward_pre_hooks", None)
    )


def _one_call_route(self: nn.Module, x: Any) -> tuple | None:
    """``(dora layer, base layer, lora_A, lora_B, scale)`` when the whole LoRA ``Linear`` call can be one DoRA
    layer call — ``y = g ⊙ (x·Wᵀ + s·B·A·x) + bias``, what PEFT computes as ``base_layer(x) + delta`` — else None.

    That needs: one active DoRA adapter on a layer dora-tune covers (the same checks as the DoRA layer's own call),
    adapters neither merged nor disabled, no dropout acting (eval, or ``lora_dropout`` 0; with dropout PEFT's
    semantics use the dropped-out input for the delta only, and ``dropout_mode="lora_only"`` keeps its own route),
    input in the base weight's dtype (adapters of any float dtype), no hooks on the base layer or global module hooks
    (the base layer is not called), no autocast and no ``torch.compile`` tracing (those keep the measured routes)."""
    if type(x) is not torch.Tensor or self.disable_adapters or self.merged or torch.compiler.is_compiling():
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    active = self.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    mods = self._modules  # the adapters' ModuleDicts, read without nn.Module.__getattr__'s slow path
    mags, lora_As, lora_Bs, dropouts = (
        mods.get(k) for k in ("lora_magnitude_vector", "lora_A", "lora_B", "lora_dropout")
    )
    if mags is None or lora_As is None or lora_Bs is None or dropouts is None:
        return None
    if name not in mags or name not in lora_As or not self.use_dora.get(name, False):
        return None
    dora = mags[name]
    if type(dora) is not DoraLinearLayer or not (_STATE["global"] or dora.__dict__.get(_FLAG, False)):
        return None
    if getattr(dora, "_kwargs", None):  # PEFT < 0.13 initialises the magnitude in the DoRA layer's first forward
        return None
    if self.training and (not isinstance(dropouts[name], nn.Identity) or _DROPOUT in dora.__dict__):
        return None
    base_layer = self.get_base_layer()
    lora_A, lora_B = lora_As[name], lora_Bs[name]
    if _hooked(base_layer):
        return None
    W, A = getattr(base_layer, "weight", None), getattr(lora_A, "weight", None)
    # the input in the base layer's dtype (PEFT's base call takes it as it comes); the adapters may be of another
    # (PEFT's default upcasts them to float32 on a bf16 model): the LoRA branch then runs on x cast to theirs, as
    # PEFT's does, and the output is cast back to the base's dtype, as PEFT's is
    if not isinstance(W, torch.Tensor) or not isinstance(A, torch.Tensor) or x.dtype != W.dtype:
        return None
    scaling = self.scaling[name]
    kwargs = {"lora_A": lora_A, "lora_B": lora_B, "scaling": scaling, "base_layer": base_layer}
    if _checked_why_not(dora, x, kwargs, _ROUTE_VERDICT) is not None:
        return None
    return dora, base_layer, lora_A, lora_B, float(scaling)


def _linear_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Replacement of PEFT's LoRA ``Linear.forward``: an enabled DoRA layer's whole call as one DoRA layer call
    (:func:`_one_call_route`) — PEFT's wrapper, the base layer's call and the ``result + delta`` add cost the host
    more than the DoRA work at small token counts; anything else goes to PEFT's forward unchanged."""
    orig = _PEFT["linear_forward"]
    route = None if (args or kwargs or type(self) is not LoraLinear) else _one_call_route(self, x)
    if route is None:
        return orig(self, x, *args, **kwargs)
    dora, base_layer, lora_A, lora_B, scale = route
    W, A, B = base_layer.weight, lora_A.weight, lora_B.weight
    norm = _norm(dora, W, A, B, scale)
    bias = getattr(base_layer, "bias", None)
    return dora_layer_unchecked(x, W, A, B, dora.weight, norm, scale, bias, None, sub_bias=False, full=True)


def _dora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Replacement of ``DoraLinearLayer.forward``: the DoRA delta PEFT adds to the base output, by dora-tune."""
    orig = _PEFT["forward"]  # kept after disable(): a call racing with it still gets PEFT's method
    if args or not (_STATE["global"] or self.__dict__.get(_FLAG, False)):
        return orig(self, x, *args, **kwargs)
    if getattr(self, "_kwargs", None):  # PEFT < 0.13 initialises the magnitude on the first forward
        return orig(self, x, **kwargs)
    why = _checked_why_not(self, x, kwargs)
    if why is not None:
        _say(why)
        dropout = self.__dict__.get(_DROPOUT)
        if dropout is not None and self.training:  # PEFT's path keeps PEFT's dropout semantics
            _say("dropout_mode='lora_only' does not apply to layers on PEFT's path: PEFT's dropout semantics there")
            x, kwargs = dropout(x), {**kwargs, "base_result": None}
        return orig(self, x, **kwargs)
    lora_A, lora_B, base_layer = kwargs["lora_A"], kwargs["lora_B"], kwargs["base_layer"]
    scale = float(kwargs["scaling"])
    W, A, B = base_layer.weight, lora_A.weight, lora_B.weight
    norm = _norm(self, W, A, B, scale)
    base_result = kwargs.get("base_result")
    bias = getattr(base_layer, "bias", None)
    dropout = self.__dict__.get(_DROPOUT)
    if dropout is not None and self.training:  # dropout_mode="lora_only": PEFT saw an Identity and passed base_result
        x = dropout(x)
    # PEFT: base_result is the base layer's output with its bias; without it (dropout active) the base is x·Wᵀ of
    # the dropped-out input, computed inside the node
    return dora_layer_unchecked(x, W, A, B, self.weight, norm, scale, bias, base_result, sub_bias=True, full=False)
