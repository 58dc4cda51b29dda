"""Self-check: run every kernel implementation against its float64 reference on the device at hand.

Used by ``dora-tune selfcheck`` (the README's main job until profiling lands). Triton implementations run on CUDA,
or on the CPU when ``TRITON_INTERPRET=1`` is set before the first Triton kernel is imported; otherwise they are
reported as skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import torch

from dora_tune import ops
from dora_tune.kernels import (
    OP_SPECS,
    compose,
    compose_reference,
    compose_train,
    dora_linear,
    dora_linear_reference,
    factored_norm,
    norm_reference,
)
from dora_tune.kernels._common import DTYPES, triton_available


def tolerance(op: str, impl: str, dtype: str) -> float:
    """The relative-error bound of ``impl`` of ``op`` at ``dtype`` against float64 (its implementation spec's)."""
    return OP_SPECS[op].impl(impl).tolerance(dtype)


@dataclasses.dataclass
class CheckResult:
    """One row of the self-check table."""

    op: str
    impl: str
    dtype: str
    shape: str
    relerr: float | None
    tolerance: float
    ms: float | None
    status: str  # "ok", "FAIL" or "skipped: <why>"


def _relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm().item()
    return (out - ref.detach().double()).norm().item() / (den or 1.0)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=20, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def triton_skip_reason(device: torch.device) -> str | None:
    """Why Triton implementations cannot run on ``device`` here, or None if they can."""
    if not triton_available():
        return "triton not importable"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU without TRITON_INTERPRET=1"
    return None


def run_selfcheck(device: str | torch.device | None = None, *, small: bool | None = None) -> list[CheckResult]:
    """Check every op × implementation × dtype on ``device`` (default: CUDA if present, else CPU).

    ``small`` (default: True on CPU) uses shapes that the CPU interpreter runs in seconds.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = dev.type == "cpu" if small is None else small
    gen = torch.Generator(device="cpu").manual_seed(0)
    norm_shape = (67, 130, 9) if small else (4096, 4096 + 40, 384)
    comp_shape = (3, 5, 131) if small else (2, 2048, 4096 + 8)
    linear_shape = (3, 5, 67, 131, 9) if small else (2, 1024, 4096 + 8, 4096, 64)  # lead..., d_out, d_in, r
    triton_why = triton_skip_reason(dev)
    results: list[CheckResult] = []

    def rnd(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(dev)

    def record(op: str, impl: str, dname: str, shape: tuple, spec_op: str, run: Callable, ref: Callable) -> None:
        tol = tolerance(spec_op, impl, dname)
        shape_s = "x".join(map(str, shape))
        if "cpu" not in OP_SPECS[spec_op].impl(impl).devices and triton_why:  # a Triton implementation
            results.append(CheckResult(op, impl, dname, shape_s, None, tol, None, f"skipped: {triton_why}"))
            return
        try:
            err = run()
            ms = _time_ms(ref, dev)
            status = "ok" if err <= tol else "FAIL"
        except Exception as e:  # a broken kernel is a failed check, not a crashed command
            err, ms, status = None, None, f"FAIL: {type(e).__name__}: {e}"
        results.append(CheckResult(op, impl, dname, shape_s, err, tol, ms, status))

    for dname, dt in DTYPES.items():
        d_out, d_in, r = norm_shape
        W, A, B = rnd(d_out, d_in, dtype=dt, scale=0.02), rnd(r, d_in, dtype=dt, scale=0.05), rnd(d_out, r, dtype=dt)
        nref = norm_reference(W, A, B, 2.0)
        for impl in ops.NORM.impls:
            record(
                "factored_norm",
                impl,
                dname,
                norm_shape,
                "norm",
                lambda impl=impl: _relerr(factored_norm(W, A, B, 2.0, impl=impl), nref),
                lambda impl=impl: factored_norm(W, A, B, 2.0, impl=impl),
            )

        lora, base = rnd(*comp_shape, dtype=dt), rnd(*comp_shape, dtype=dt)
        g = (1 + 0.05 * torch.randn(comp_shape[-1], generator=gen)).to(dt).to(dev)
        dout = rnd(*comp_shape, dtype=dt)
        cref = compose_reference(lora, base, g, 0.5).reshape(base.shape)
        leaves64 = [t.double().requires_grad_() for t in (lora, base, g)]
        tref = compose_reference(*leaves64, 0.5).reshape(base.shape)
        tgrads = torch.autograd.grad(tref, leaves64, dout.double())
        for impl in ops.COMPOSE.impls:
            record(
                "compose",
                impl,
                dname,
                comp_shape,
                "compose",
                lambda impl=impl: _relerr(compose(lora, base, g, 0.5, impl=impl), cref),
                lambda impl=impl: compose(lora, base, g, 0.5, impl=impl),
            )

            def train(impl: str = impl) -> list[torch.Tensor]:
                leaves = [t.clone().requires_grad_() for t in (lora, base, g)]
                out = compose_train(*leaves, 0.5, impl=impl)
                return [out, *torch.autograd.grad(out, leaves, dout)]

            record(
                "compose_train",
                impl,
                dname,
                comp_shape,
                "compose_train",
                lambda train=train: max(_relerr(a, b) for a, b in zip(train(), [tref, *tgrads], strict=True)),
                train,
            )

        *lead, d_out, d_in, r = linear_shape
        x, W, A = rnd(*lead, d_in, dtype=dt), rnd(d_out, d_in, dtype=dt, scale=d_in**-0.5), rnd(r, d_in, dtype=dt)
        B, bias = rnd(d_out, r, dtype=dt, scale=0.1), rnd(d_out, dtype=dt)
        n = norm_reference(W, A * d_in**-0.5, B, 2.0).float()
        m = (n * (1 + 0.05 * torch.randn(d_out, generator=gen).to(dev))).to(dt)
        A = A * d_in**-0.5
        dy = rnd(*lead, d_out, dtype=dt)
        lin64 = [t.double().requires_grad_() for t in (x, A, B, m)]
        lref = dora_linear_reference(lin64[0], W, bias, *lin64[1:], n, 2.0)
        lgrads = torch.autograd.grad(lref, lin64, dy.double())
        for impl in ops.DORA_LINEAR.impls:

            def linear(impl: str = impl) -> list[torch.Tensor]:
                xs, As, Bs, ms = (t.clone().requires_grad_() for t in (x, A, B, m))
                out = dora_linear(xs, W, bias, As, Bs, ms, n, 2.0, impl=impl)
                return [out, *torch.autograd.grad(out, (xs, As, Bs, ms), dy)]

            record(
                "dora_linear",
                impl,
                dname,
                tuple(linear_shape),
                "dora_linear",
                lambda linear=linear: max(_relerr(a, b) for a, b in zip(linear(), [lref, *lgrads], strict=True)),
                linear,
            )
    return results
