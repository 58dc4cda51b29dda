"""Implementation registry: for each op, its implementations, their versions, configs, inputs and runners.

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
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dora_tune.dispatch.shapes import OP_SHAPE_KEYS
from dora_tune.kernels._common import DTYPES as _DTYPES

DTYPES: dict[str, torch.dtype] = _DTYPES  # the kernels' one table
_ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}


#: Source versions whose GPU behaviour is that of an earlier version: ``(op, impl, new hash) → the earlier hash``,
#: under which measurements, decision tables and new trials are then kept. Only for edits that cannot change what
#: runs on the GPU — the same compiled kernels, grids and configs — each entry with its reason; any further edit of
#: the sources gives a new hash outside this table, and measurements go stale as usual.
SAME_KERNELS_AS: dict[tuple[str, str, str], str] = {
    # launches through kernels._launch.lean and Python-side cdiv (host-side launch path only; issue 16)
    ("norm", "triton", "1c87f26aadd8"): "48e079663d13",
    ("compose", "triton", "3c9df2433c3c"): "fe0db9ce1e81",
    ("compose_train", "triton", "3a44e5caf115"): "ad5362f1dd1f",
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


def op_bytes(op: str, shape: dict[str, int], dtype: str) -> int:
    """Fewest bytes the op must move through memory (each input read once, each output written once)."""
    e = _ELEM[dtype]
    if op == "norm":
        o, i, r = shape["d_out"], shape["d_in"], shape["r"]
        return e * (o * i + r * i + o * r) + 4 * o
    n = shape["rows"] * shape["cols"]
    return e * n * (3 if op == "compose" else 8)


def op_flops(op: str, shape: dict[str, int]) -> int:
    """Floating-point operations of the op (the factored norm: the U GEMM plus G and B·G)."""
    if op == "norm":
        o, i, r = shape["d_out"], shape["d_in"], shape["r"]
        return 2 * o * i * r + 2 * r * r * (i + o)
    n = shape["rows"] * shape["cols"]
    return n * (4 if op == "compose" else 10)


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
        cfg = self.parse_config(config)
        return _RUNNERS[self.op](self.name, inputs, cfg)


def make_inputs(op: str, shape: dict[str, int], dtype: str, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Random inputs (never zeros) for ``op`` at ``shape``, scaled like real DoRA tensors."""
    if set(shape) != set(OP_SHAPE_KEYS[op]):
        raise ValueError(f"{op} shape needs keys {OP_SHAPE_KEYS[op]}, got {sorted(shape)}")
    dt = DTYPES[dtype]
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, device=device, generator=g) * scale).to(dt)

    if op == "norm":
        o, i, r = shape["d_out"], shape["d_in"], shape["r"]
        return {
            "W": rnd(o, i, scale=0.02),
            "A": rnd(r, i, scale=1 / math.sqrt(i)),
            "B": rnd(o, r, scale=0.02),
            "s": 2.0,
        }
    rows, cols = shape["rows"], shape["cols"]
    out = {"lora": rnd(rows, cols), "base": rnd(rows, cols), "g": 1 + rnd(cols, scale=0.01), "s": 0.5}
    if op == "compose_train":
        out["dout"] = rnd(rows, cols)
        out["leaves"] = [out[k].clone().requires_grad_() for k in ("lora", "base", "g")]
    return out


def _norm_runner(name: str, x: dict[str, Any], cfg: Any) -> Callable[[], Any]:
    from dora_tune.kernels import factored_norm

    return lambda: factored_norm(x["W"], x["A"], x["B"], x["s"], impl=name, config=cfg)


def _compose_runner(name: str, x: dict[str, Any], cfg: Any) -> Callable[[], Any]:
    from dora_tune.kernels import compose

    return lambda: compose(x["lora"], x["base"], x["g"], x["s"], impl=name, config=cfg)


def _train_runner(name: str, x: dict[str, Any], cfg: Any) -> Callable[[], Any]:
    from dora_tune.kernels import compose_train

    leaves, dout = x["leaves"], x["dout"]

    def step() -> Any:
        out = compose_train(*leaves, x["s"], impl=name, config=cfg)
        return torch.autograd.grad(out, leaves, dout)

    return step


_RUNNERS = {"norm": _norm_runner, "compose": _compose_runner, "compose_train": _train_runner}


def _no_config(data: dict) -> None:
    if data:
        raise ValueError(f"this implementation takes no config, got {data!r}")
    return None


def _registry() -> dict[str, list[Impl]]:
    from dora_tune.kernels import (
        DEFAULT_COMPOSE_TRAIN_CONFIG,
        DEFAULT_NORM_CONFIG,
        ComposeConfig,
        ComposeTrainConfig,
        NormConfig,
        compose_config_space,
        norm_tuning_space,
    )

    none: Callable[[dict[str, int]], list[dict]] = lambda shape: [{}]  # noqa: E731
    both, cuda = ("cuda", "cpu"), ("cuda",)
    k = "dora_tune.kernels."
    formula, fused_train = k + "compose:compose_formula", k + "compose_train:_ComposeTrainFn"
    default_bwd = DEFAULT_COMPOSE_TRAIN_CONFIG.bwd.as_dict()

    def norm_space(rank: int) -> list[dict]:
        # the tuning space, plus the default config (the fixed crossover's pick, measured so it can be compared)
        space = [c.as_dict() for c in norm_tuning_space(rank)]
        default = DEFAULT_NORM_CONFIG.as_dict()
        return space if default in space else [*space, default]

    def train_space(shape: dict[str, int]) -> list[dict]:
        # Stage 1 of the coordinate sweep: every forward config with the default backward (the profiler adds
        # stage 2, the backward configs with the best forward, once stage 1 is measured).
        return [{"fwd": f.as_dict(), "bwd": default_bwd} for f in compose_config_space()]

    return {
        "norm": [
            Impl("norm", "dense", both, (k + "norm:norm_reference",), none, _no_config),
            Impl("norm", "factored_torch", both, (k + "norm:norm_factored_torch",), none, _no_config),
            Impl(
                "norm",
                "triton",
                cuda,
                (k + "_norm_triton",),
                lambda shape: norm_space(shape["r"]),
                NormConfig.from_dict,
                ("r",),
            ),
        ],
        "compose": [
            Impl("compose", "eager", both, (formula,), none, _no_config),
            Impl(
                "compose",
                "triton",
                cuda,
                (k + "_compose_triton",),
                lambda shape: [c.as_dict() for c in compose_config_space()],
                ComposeConfig.from_dict,
            ),
        ],
        "compose_train": [
            Impl("compose_train", "eager", both, (formula,), none, _no_config),
            Impl(
                "compose_train",
                "triton",
                cuda,
                (k + "_compose_triton", fused_train),
                train_space,
                ComposeTrainConfig.from_dict,
            ),
        ],
    }


@functools.cache
def registry() -> dict[str, tuple[Impl, ...]]:
    """``op → implementations`` (built on first use; importing this module imports no kernels)."""
    return {op: tuple(v) for op, v in _registry().items()}


def train_bwd_stage(best_fwd: dict) -> list[dict]:
    """Stage 2 of the compose_train sweep: every backward config with the best forward of stage 1."""
    from dora_tune.kernels import compose_bwd_config_space

    return [{"fwd": best_fwd, "bwd": b.as_dict()} for b in compose_bwd_config_space()]
