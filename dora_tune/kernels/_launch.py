"""Lean launches of ``@triton.jit`` kernels: Triton's own launcher, without ``JITFunction.run``'s Python per call.

``lean(kernel)[grid](*args, **kwargs)`` launches exactly what ``kernel[grid](*args, **kwargs)`` launches. The first
launch of each specialisation goes through Triton unchanged; it returns the ``CompiledKernel``, whose launcher
(``compiled.run``), loaded function handle and packed metadata are kept under a *specialisation key*. Later launches
with the same key call that launcher directly, as the last line of ``JITFunction.run`` does::

    run(g0, g1, g2, stream, function, packed_metadata, None, None, None, *all_params_in_signature_order)

Why: ``JITFunction.run`` binds the arguments, specialises each one, builds a string cache key, reads knobs and the
current device and stream, checks the kernel's globals and builds launch metadata on every call: 17–60 µs of host
time per launch on the H100/H200 hosts, and the DoRA layer makes several launches per layer, so small shapes are
launch-bound. The lean path costs a few µs of Python: the key, two dict lookups, the launcher call. (Measured on a
slow 2-vCPU dev VM with a non-PGO CPython 3.11, for the DoRA backward call: 14 positionals with 7 tensors and 9
keywords: ~1.9 µs of key, of which ~1.1 µs is the tensors' ``dtype`` and ``data_ptr()``; ~5–6 µs for the whole
``lean(k)[grid](...)`` call, launcher call included; Triton's binder plus cache-key function alone take 5–7 µs there,
before the device, stream, knob, globals and launch-metadata work of the rest of ``JITFunction.run``.)

The key is ``(CUDA device index, kernel.debug, knobs.runtime.debug, call shape, specialization_key(...))``: the
``debug`` flags enter Triton's options; the call shape is the number of positionals and the keyword names in order,
which fixes where each signature parameter comes from (a positional, a keyword or the default). It is never coarser
than Triton's in-memory cache key (device, per-argument specialisation, options), so a hit is always the kernel
Triton would have picked; being finer only costs an extra first launch through Triton. Per argument, by the kind
of parameter it binds to:

- constexpr parameters, and keyword options such as ``num_warps``/``num_stages``: the exact value with its type
  (floats by ``float.hex``, so ``0.0``/``-0.0`` and ``1``/``1.0``/``True`` differ); only ``int``, ``float``, ``bool``,
  ``str``, ``None``, ``torch.dtype`` and scalar ``triton.language.dtype`` values (by name) are keyed, anything else
  launches through Triton;
- other parameters: a tensor (exactly ``torch.Tensor`` or ``nn.Parameter``) by dtype and ``data_ptr() % 16 == 0``;
  an int by ``== 1``, divisibility by 16 and width (i32 / i64 / u64 by range, the exact value beyond 64 bits);
  a float, a bool (by value) and ``None`` by kind. ``do_not_specialize``/``do_not_specialize_on_alignment`` are
  ignored: specialising anyway only makes the key finer.

Per call shape, a straight-line key function is generated for the argument classes first seen with it (as Triton
generates its binder); calls whose classes differ take the general loop, :func:`specialization_key`.

Every launch goes through Triton (``kernel[grid](...)``) instead when: ``DORA_TUNE_LEAN_LAUNCH=0``; Triton's
major.minor is not 3.6–3.9 (both decided once per process, at the first lean launch); the kernel is not a
``JITFunction`` using ``JITFunction.run`` itself (the interpreter's ``InterpretedFunction``, autotuners,
heuristics, a ``run`` patched onto the kernel before its first lean launch); its signature has keyword-only or
``*args`` parameters; the active Triton driver is not CUDA or does not launch on torch's current stream; the grid is
not a tuple of 1–3 entries (e.g. a callable); a launch enter/exit hook is set (profilers such as proton),
``knobs.compilation.instrumentation_mode`` is set or ``knobs.runtime.add_stages_inspection_hook`` is set; the kernel
has ``pre_run_hooks``; an argument has a type the key does not know; a global the kernel read has changed since it
compiled (Triton then raises its usual error); the call is one Triton rejects (missing or duplicated arguments); or
the launch through Triton did not return a ``CompiledKernel`` with ``run``, ``function`` and ``packed_metadata``.

A lean launch returns ``None`` (Triton's returns the ``CompiledKernel``). It skips what only matters with hooks set
(launch metadata) and nothing else that changes the launch. Use it in eager code and inside custom-op bodies: under
``torch.compile`` tracing call the kernel itself (dynamo knows ``JITFunction`` launches, not this wrapper).

Imports only torch; Triton is imported lazily at the first launch.
"""

from __future__ import annotations

import functools
import inspect
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "LEAN_ENV_VAR",
    "SUPPORTED_TRITON",
    "LeanKernel",
    "lean",
    "lean_enabled",
    "lean_supported",
    "specialization_key",
]

LEAN_ENV_VAR = "DORA_TUNE_LEAN_LAUNCH"
"""Environment variable: ``0`` (or ``false``/``off``/``no``) disables lean launches (read once, lazily)."""

SUPPORTED_TRITON: tuple[tuple[int, int], ...] = ((3, 6), (3, 7), (3, 8), (3, 9))
"""Triton major.minor versions whose ``JITFunction.run`` ends in the launcher call this module reproduces."""

_ATTR = "_dora_tune_lean"  # the LeanKernel memo, stored in the kernel object's own __dict__
_MAX_ENTRIES = 512  # per kernel; past it new specialisations launch through Triton (a runaway constexpr)
_MISSING = object()
_EMPTY = inspect.Parameter.empty

_TENSOR = torch.Tensor
_PARAMETER = torch.nn.Parameter
_EXACT = frozenset({int, bool, str, type(None), torch.dtype})
_FLOAT, _TRUE, _FALSE = "f", "T", "F"  # tags of runtime floats / bools: strings never equal the int codes below
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_U64_MAX = 2**64 - 1


def _is_tl_dtype(t: type) -> bool:
    """Whether ``t`` is exactly ``triton.language.dtype`` (a scalar dtype constexpr such as ``tl.bfloat16``; its
    pointer and block subclasses are not), told without importing Triton."""
    return t.__name__ == "dtype" and t.__module__ == "triton.language.core"


def specialization_key(values: Sequence[Any], exact: Sequence[bool]) -> tuple | None:
    """The specialisation part of the lean key for one call's argument values, or ``None`` if one has a type the
    key does not know (the call then launches through Triton).

    ``exact[i]`` says whether ``values[i]`` keys by exact value (it binds a ``tl.constexpr`` parameter or is a
    launch option such as ``num_warps``) or by Triton-style specialisation (any other parameter); the two sequences
    have the same length. See the module docstring for the rules. The key is flat (nested tuples cost hashing
    time): an exact value contributes two items (its class, then the value), a tensor two (dtype, aligned), any
    other value one; given the flags, the first item's kind tells which, so a key reads back unambiguously.
    """
    key: list[Any] = []
    append = key.append
    for a, cx in zip(values, exact):  # noqa: B905 -- equal lengths; strict= costs ~0.1 µs per call
        t = a.__class__
        if cx:
            if t is float:
                append(float)
                append(a.hex())  # not the float: 0.0 == -0.0 (and 1 == 1.0 == True) in a dict
            elif t in _EXACT:
                append(t)
                append(a)
            elif _is_tl_dtype(t):
                append(t)
                append(a.name)  # tl.dtype equality and Triton's cache key both go by the name
            else:
                return None
        elif t is _TENSOR or t is _PARAMETER:
            append(a.dtype)
            append(not a.data_ptr() & 15)
        elif t is int:
            if a == 1:
                append(1)
            elif _I32_MIN <= a <= _I32_MAX:
                append(3 if a & 15 else 2)  # & 15 on a negative int is its two's complement: same as % 16
            elif _I64_MIN <= a <= _I64_MAX:
                append(5 if a & 15 else 4)
            elif 0 <= a <= _U64_MAX:
                append(7 if a & 15 else 6)
            else:
                append((int, a))  # Triton rejects these; keyed exactly, in case a version does not
        elif t is float:
            append(_FLOAT)
        elif t is bool:
            append(_TRUE if a else _FALSE)
        elif a is None:
            append(None)
        else:
            return None
    return tuple(key)


def _compile_key(types: Sequence[type], exact: Sequence[bool]) -> Callable[[tuple], tuple | None] | None:
    """A straight-line :func:`specialization_key` for values of exactly these classes (ints: only within i32),
    as Triton builds its binder: ``f(values)`` returns the same tuple as ``specialization_key(values, exact)``, or
    ``None`` when a value's class (or an int's range) differs, and the caller falls back to the general loop. About
    half the general loop's cost. ``None`` when a class is not keyable at all. The generated source names values by
    position only (``a0``, ``a1``, ...): nothing from the caller is pasted into it."""
    ns: dict[str, Any] = {"_T": _TENSOR, "_P": _PARAMETER}
    guards: list[str] = []
    items: list[str] = []
    for i, (t, cx) in enumerate(zip(types, exact, strict=True)):
        a = f"a{i}"
        if cx:
            if t is float:
                guards.append(f"{a}.__class__ is float")
                items += ["float", f"{a}.hex()"]
            elif t in _EXACT:
                ns[f"t{i}"] = t
                guards.append(f"{a}.__class__ is t{i}")
                items += [f"t{i}", a]
            elif _is_tl_dtype(t):
                ns[f"t{i}"] = t
                guards.append(f"{a}.__class__ is t{i}")
                items += [f"t{i}", f"{a}.name"]
            else:
                return None
        elif t is _TENSOR or t is _PARAMETER:
            guards.append(f"{a}.__class__ is {'_T' if t is _TENSOR else '_P'}")
            items += [f"{a}.dtype", f"not {a}.data_ptr() & 15"]
        elif t is int:
            guards.append(f"{a}.__class__ is int and {_I32_MIN} <= {a} <= {_I32_MAX}")
            items.append(f"(1 if {a} == 1 else 3 if {a} & 15 else 2)")
        elif t is float:
            guards.append(f"{a}.__class__ is float")
            items.append(repr(_FLOAT))
        elif t is bool:
            guards.append(f"{a}.__class__ is bool")
            items.append(f"({_TRUE!r} if {a} else {_FALSE!r})")
        elif t is type(None):
            guards.append(f"{a} is None")
            items.append("None")
        else:
            return None
    lines = ["def key(v):"]
    if types:
        lines.append("    " + ", ".join(f"a{i}" for i in range(len(types))) + ", = v")
    if guards:
        lines.append("    if not (" + " and ".join(guards) + "):\n        return None")
    lines.append("    return (" + "".join(f"{x}, " for x in items) + ")")
    exec("\n".join(lines), ns)
    return ns["key"]


@functools.cache
def lean_supported() -> bool:
    """Whether the installed Triton's major.minor is one whose launch path this module reproduces (checked once)."""
    try:
        import triton

        major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    except Exception:
        return False
    return (major, minor) in SUPPORTED_TRITON


@functools.cache
def lean_enabled() -> bool:
    """Whether lean launches may be used in this process: :func:`lean_supported` and ``DORA_TUNE_LEAN_LAUNCH`` not
    off. Decided once, at the first call (the first lean launch), never at import."""
    if os.environ.get(LEAN_ENV_VAR, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return lean_supported()


@functools.cache
def _cuda_launch_env() -> tuple[Callable[[], int], Callable[[int], int]] | None:
    """``(current_device, current_raw_stream)`` callables that agree with the active Triton driver, or ``None``
    when that driver is not CUDA (another backend may specialise differently, e.g. AMD's buffer-ops pointer range)
    or does not launch on torch's current stream. Decided once per process."""
    try:
        from triton.runtime import driver

        active = driver.active
        if active.get_current_target().backend != "cuda":
            return None
        get_device, get_stream = torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream
        device = active.get_current_device()
        if device != get_device() or active.get_current_stream(device) != get_stream(device):
            return None
        return get_device, get_stream
    except Exception:
        return None


class LeanKernel:
    """A ``@triton.jit`` kernel plus a memo of its launchers; ``lean_kernel[grid](*args, **kwargs)`` launches it.

    Build it with :func:`lean` (memoised per kernel). ``entries`` maps keys ``(device, kernel.debug,
    knobs.runtime.debug, call shape, specialization_key(...))`` to ``(run, function, packed_metadata,
    global_checks)``. ``plans`` maps a call shape (the number of positionals, then the keyword names in order) to
    ``(exact flags, gather, fast key)`` or to ``False`` when lean launches cannot serve that shape (a missing or
    duplicated argument: Triton raises). ``gather`` rebuilds the parameters in signature order from the
    positionals, the keywords and the defaults (``None``: the values already are); ``fast key`` is
    :func:`_compile_key`'s function for the classes first seen with that shape (``None``: none).
    """

    __slots__ = (
        "_active",
        "_comp",
        "_constexpr",
        "_env",
        "_hookchain",
        "_rt",
        "_runtime_names",
        "defaults",
        "entries",
        "kernel",
        "names",
        "plans",
    )

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.entries: dict[tuple, tuple] = {}
        self.plans: dict[Any, Any] = {}
        self._active: bool | None = None  # decided at the first launch
        self.names: tuple[str, ...] = ()
        self.defaults: tuple[Any, ...] = ()
        self._constexpr: tuple[bool, ...] = ()
        self._runtime_names: frozenset[str] = frozenset()
        self._env: tuple[Callable[[], int], Callable[[int], int]] | None = None
        self._rt: Any = None
        self._comp: Any = None
        self._hookchain: type | None = None

    def __repr__(self) -> str:
        name = getattr(self.kernel, "__name__", type(self.kernel).__name__)
        return f"LeanKernel({name}, active={self._active}, entries={len(self.entries)})"

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        """A launcher for ``grid``. It returns what Triton's launch returns when it launches through Triton (the
        ``CompiledKernel``) and ``None`` on a lean launch. Only a plain tuple of 1–3 ints launches lean."""
        if self._active is False:
            return self.kernel[grid]
        launch = self._launch

        def launcher(*args: Any, **kwargs: Any) -> Any:
            return launch(grid, args, kwargs)

        return launcher

    # ------------------------------------------------------------------------------------------------ hot path

    def _launch(self, grid: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        kernel = self.kernel
        if self._active is not True and (self._active is False or not self._try_activate()):
            return kernel[grid](*args, **kwargs)
        if grid.__class__ is not tuple or not 0 < len(grid) < 4:
            return kernel[grid](*args, **kwargs)  # a callable grid (needs the bound arguments), a list, ...
        rt = self._rt
        # Launch hooks are HookChains (empty = off) but may be assigned any callable. These knobs are plain
        # attributes (~45 ns a read here); the env-var-backed knobs are descriptors reading os.environ (~175 ns):
        # none of those is read on this path (Triton only reads fpsan_homomorphic_casts, which acts only under an
        # instrumentation_mode, and that mode sends every launch through Triton).
        h = rt.launch_enter_hook
        if h is not None and (h.__class__ is not self._hookchain or h.calls):
            return kernel[grid](*args, **kwargs)
        h = rt.launch_exit_hook
        if h is not None and (h.__class__ is not self._hookchain or h.calls):
            return kernel[grid](*args, **kwargs)
        if kernel.pre_run_hooks or self._comp.instrumentation_mode or rt.add_stages_inspection_hook is not None:
            return kernel[grid](*args, **kwargs)
        if kwargs:
            shape: Any = (len(args), *kwargs)
            values = (*args, *kwargs.values())
        else:
            shape = len(args)
            values = args
        spec = entry = None
        try:  # no launch inside: an error from Triton's launch must not make it launch twice
            plan = self.plans.get(shape)
            if plan is None:
                plan = self._plan(shape, values)
            if plan is not False:
                spec = plan[2](values) if plan[2] is not None else None
                if spec is None:
                    spec = specialization_key(values, plan[0])
            if spec is not None:
                device = self._env[0]()
                key = (device, kernel.debug, rt.debug, shape, spec)
                entry = self.entries.get(key)
        except Exception:  # an odd value (e.g. an unhashable constexpr): Triton decides
            spec = None
        if spec is None:
            return kernel[grid](*args, **kwargs)
        if entry is None:
            return self._first_launch(key, grid, args, kwargs)
        run, function, packed_metadata, checks = entry
        if checks:
            for name, value, scope in checks:  # JITFunction.run's "global changed since compile" check
                if scope.get(name, _MISSING) != value:
                    return kernel[grid](*args, **kwargs)  # raises Triton's RuntimeError
        gather = plan[1]
        if gather is not None:
            values = gather(values)
        n = len(grid)
        run(
            grid[0],
            grid[1] if n > 1 else 1,
            grid[2] if n > 2 else 1,
            self._env[1](device),
            function,
            packed_metadata,
            None,  # launch_metadata: only read by launch hooks
            None,  # launch_enter_hook
            None,  # launch_exit_hook
            *values,
        )
        return None

    # ------------------------------------------------------------------------------------------------ slow path

    def _try_activate(self) -> bool:
        """:meth:`_activate`, where any surprise (a Triton whose objects look different) means "not lean"."""
        try:
            return self._activate()
        except Exception:
            self._active = False
            return False

    def _activate(self) -> bool:
        """Decide once whether this kernel can launch lean; fill the per-kernel tables."""
        self._active = False
        if not lean_enabled():
            return False
        import triton
        from triton.runtime.jit import JITFunction

        kernel = self.kernel
        if not isinstance(kernel, JITFunction) or type(kernel).run is not JITFunction.run or "run" in vars(kernel):
            return False  # not Triton's own run (a subclass's, or one patched onto this kernel): it decides
        params = list(kernel.signature.parameters.values())
        if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            return False
        if len(kernel.params) != len(params):
            return False
        env = _cuda_launch_env()
        if env is None:
            return False
        knobs = triton.knobs
        rt, comp = knobs.runtime, knobs.compilation
        needed = (
            (rt, ("launch_enter_hook", "launch_exit_hook", "add_stages_inspection_hook", "debug")),
            (comp, ("instrumentation_mode",)),
            (kernel, ("pre_run_hooks", "debug", "used_global_vals")),
        )
        if not all(hasattr(obj, a) for obj, names in needed for a in names):
            return False  # the hot path reads these: a Triton without them is not one this module knows
        self._env = env
        self._rt, self._comp = rt, comp
        self._hookchain = getattr(knobs, "HookChain", None)
        self.names = tuple(p.name for p in params)
        self.defaults = tuple(p.default for p in params)
        self._constexpr = tuple(bool(kp.is_constexpr) for kp in kernel.params)
        self._runtime_names = frozenset(n for n, cx in zip(self.names, self._constexpr, strict=True) if not cx)
        self._active = True
        return True

    def _plan(self, shape: Any, values: tuple) -> Any:
        """The plan of a call shape (see the class docstring), memoised in ``plans``; its straight-line key is
        compiled for the classes of this call's ``values``."""
        nargs, kwnames = (shape, ()) if isinstance(shape, int) else (shape[0], shape[1:])
        plan: Any = False
        if nargs <= len(self.names) and not set(kwnames) & set(self.names[:nargs]):
            exact = (*self._constexpr[:nargs], *(n not in self._runtime_names for n in kwnames))
            nvalues = nargs + len(kwnames)
            order, pad = [], []
            for i, (name, default) in enumerate(zip(self.names, self.defaults, strict=True)):
                if i < nargs:
                    order.append(i)
                elif name in kwnames:
                    order.append(nargs + kwnames.index(name))
                elif default is not _EMPTY:
                    order.append(nvalues + len(pad))
                    pad.append(default)
                else:
                    break  # a required parameter is missing: Triton raises
            else:
                gather = None if order == list(range(nvalues)) else _gatherer(order, tuple(pad))
                plan = (exact, gather, _compile_key([v.__class__ for v in values], exact))
        if len(self.plans) < _MAX_ENTRIES:
            self.plans[shape] = plan
        return plan

    def _first_launch(self, key: tuple, grid: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Launch through Triton and keep the compiled kernel's launcher under ``key``."""
        kernel = self.kernel
        compiled = kernel[grid](*args, **kwargs)
        try:
            run = compiled.run
            function = compiled.function
            packed_metadata = compiled.packed_metadata
            checks = tuple((name, v, scope) for (name, _), (v, scope) in kernel.used_global_vals.items())
        except Exception:
            return compiled
        if function is not None and callable(run) and len(self.entries) < _MAX_ENTRIES:
            self.entries[key] = (run, function, packed_metadata, checks)
        return compiled


def _gatherer(order: list[int], pad: tuple) -> Callable[[tuple], tuple]:
    """``values -> parameters in signature order``: ``order[j]`` indexes ``(*values, *pad)``."""
    if not pad and order == list(range(len(order))):
        return operator.itemgetter(slice(0, len(order)))  # only trailing options (num_warps=...) to drop
    if len(order) == 1:
        (i,) = order
        return (lambda v: (v[i],)) if not pad else (lambda v: ((*v, *pad)[i],))
    get = operator.itemgetter(*order)
    return get if not pad else (lambda v: get(v + pad))


def lean(kernel: Any) -> LeanKernel:
    """The :class:`LeanKernel` of ``kernel`` (anything launched as ``kernel[grid](...)``), memoised on the kernel.

    The memo lives in the kernel object's own ``__dict__`` (it dies with the kernel); an object without one gets a
    fresh, unmemoised wrapper, which launches correctly but re-learns its launchers.
    """
    try:
        return kernel.__dict__[_ATTR]
    except (KeyError, AttributeError, TypeError):
        pass
    lk = LeanKernel(kernel)
    try:
        kernel.__dict__[_ATTR] = lk
    except (AttributeError, TypeError):
        pass
    return lk
