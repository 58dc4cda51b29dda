"""Implementation registry: for each op, its implementations with their versions — a read of the op specs
(:data:`dora_tune.kernels.OP_SPECS`: devices, version sources, config spaces, runners and input recipes are declared
next to each op's kernels) — and the hashing of versions. The dispatcher reads it at run time (which stored
measurements and decision tables are current); what only a trial needs — its random inputs, the second stage of the
compose_train sweep, an op's bytes and FLOPs — is :mod:`dora_tune.tuning.trials`.

An implementation's *version* is a hash of the source that computes it — the Triton kernel module (kernels and
launcher), the autograd Function, or the torch function — so a kernel change makes old measurements of it stale
instead of silently reused, while edits elsewhere (docs, validation, dispatch hooks) keep the measurements valid.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import linecache
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dora_tune._moved import forwarder

#: Source versions whose GPU behaviour is that of an earlier version: ``(op, impl, new hash) → the earlier hash``,
#: under which measurements, decision tables and new trials are then kept. Only for edits that cannot change what
#: runs on the GPU — the same compiled kernels, grids and configs — each entry with its reason; any further edit of
#: the sources gives a new hash outside this table, and measurements go stale as usual.
SAME_KERNELS_AS: dict[tuple[str, str, str], str] = {
    # launches through kernels._launch.lean and Python-side cdiv (host-side launch path only; issue 16)
    ("norm", "triton", "1c87f26aadd8"): "48e079663d13",
    ("compose", "triton", "3c9df2433c3c"): "fe0db9ce1e81",
    ("compose_train", "triton", "3a44e5caf115"): "ad5362f1dd1f",
    # stop 28: the fused linear's autograd Function became one shared with the folded linear (dora_linear:_LinearFn:
    # the same forward and backward functions called), and the d_m store of the one-node backward kernel a Triton
    # helper shared with the folded pass (_dora_triton._store_dm, inlined: the same kernels, grids and launches)
    ("dora_linear", "fused", "4b34a2f84f5d"): "d82ebe3e3d9a",
    ("dora_linear", "composed", "9f7608b80459"): "dd8c4c4a8743",
}


@functools.cache
def source_version(sources: tuple[str, ...]) -> str:
    """12-hex-digit hash of ``sources``: each ``"module"`` (the whole file) or ``"module:qualname"`` (that object's
    source)."""
    h = hashlib.sha256()
    for spec in sources:
        module_name, _, qualname = spec.partition(":")
        if qualname:
            h.update(_object_source(importlib.import_module(module_name), qualname).encode())
        else:  # the file, found without running it (a Triton module would import Triton)
            found = importlib.util.find_spec(module_name)
            if found is None or found.origin is None:
                raise ModuleNotFoundError(f"no source file for module {module_name!r}")
            h.update(Path(found.origin).read_bytes())
    return h.hexdigest()[:12]


def _object_source(module: Any, qualname: str) -> str:
    """``inspect.getsource`` of ``module.<qualname>``. For an undecorated top-level class whose ``class`` line is
    the only one of its name, the same text is cut from the file directly: ``inspect`` would parse the whole module
    to find that line (~0.1 s on a slow host, at the first dispatched call of a process)."""
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if inspect.isclass(obj) and "." not in qualname:
        lines = linecache.getlines(inspect.getsourcefile(obj) or "")
        head = re.compile(rf"class\s+{re.escape(qualname)}\b")
        starts = [i for i, line in enumerate(lines) if head.match(line)]
        if len(starts) == 1 and not (starts[0] and lines[starts[0] - 1].lstrip().startswith("@")):
            return "".join(inspect.getblock(lines[starts[0] :]))
    return inspect.getsource(obj)


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of one op."""

    op: str
    name: str
    devices: tuple[str, ...]
    sources: tuple[str, ...]  # what the version hashes: "module" or "module:qualname"
    configs: Callable[[dict[str, int]], list[dict]]  # the tuning space for a shape; [{}] when configless
    parse_config: Callable[[dict], Any]  # dict → validated config object (None when configless)
    space_keys: tuple[str, ...] = ()  # the shape keys `configs` depends on (its result is a function of these)

    @property
    def version(self) -> str:
        v = source_version(self.sources)
        return SAME_KERNELS_AS.get((self.op, self.name, v), v)

    def runs_on(self, device: torch.device) -> bool:
        return device.type in self.devices

    def runner(self, inputs: dict[str, Any], config: dict) -> Callable[[], Any]:
        """A zero-argument callable that runs the op once on ``inputs`` with ``config``."""
        from dora_tune.kernels.catalog import OP_SPECS

        return OP_SPECS[self.op].runner(self.name, inputs, self.parse_config(config))


def _registry() -> dict[str, list[Impl]]:
    from dora_tune.kernels.catalog import OP_SPECS

    return {
        op: [Impl(op, i.name, i.devices, i.sources, i.space, i.parse_config, i.space_keys) for i in spec.impls]
        for op, spec in OP_SPECS.items()
    }


@functools.cache
def registry() -> dict[str, tuple[Impl, ...]]:
    """``op → implementations`` (built on first use, from the op specs)."""
    return {op: tuple(v) for op, v in _registry().items()}


#: names this module had before the trial helpers moved to :mod:`dora_tune.tuning.trials` (deprecated here)
_MOVED = ("DTYPES", "make_inputs", "op_bytes", "op_flops", "train_bwd_stage")
_forward = forwarder(__name__, ["dora_tune.tuning.trials"])


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return _forward(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
