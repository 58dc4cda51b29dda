"""Host-side cost per call (µs) of each op on tiny CUDA inputs, where the GPU work is negligible.

Run: python benchmarks/overhead.py [--profile] [--out PATH]  — prints a table and writes ``--out`` (default
``$OUT/overhead.json``, else ``benchmarks/results/overhead.json``) and one result row per case (the harness,
``benchmarks/README.md``: item the case, shape 4×256 (norm 256×256, r 16), dtype; figure µs per call).

Timing: the harness's host timer (``harness.wall_us``): ``--calls`` back-to-back calls between two synchronisations,
divided by the calls, the least of ``--rounds`` batches (the first batch warms up). The GPU work is negligible, so
that is the host's cost of a call. ``--profile``: cProfile of the Triton training step (single-thread autograd).
"""

from __future__ import annotations

import argparse

import harness
import torch

from dora_tune.kernels import (
    DEFAULT_COMPOSE_CONFIG,
    DEFAULT_COMPOSE_TRAIN_CONFIG,
    compose,
    compose_train,
    factored_norm,
)
from dora_tune.kernels._compose_triton import compose_bwd_triton, compose_fwd_triton


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--calls", type=int, default=300, help="calls per timed batch (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="timed batches; the least counts (default %(default)s)")
    ap.add_argument("--profile", action="store_true", help="also cProfile 300 Triton training steps")
    harness.add_flags(
        ap, out_help="JSON path (default $OUT/overhead.json or benchmarks/results/)", device="cuda", dtype="bf16"
    )
    args = harness.resolve(ap.parse_args(), ap)
    rec = harness.start(__file__, args)
    dev, dt = args.device, args.torch_dtype
    torch.manual_seed(args.seed)
    lora = torch.randn(4, 256, device=dev, dtype=dt)
    base = torch.randn_like(lora)
    g = torch.ones(256, device=dev, dtype=dt)
    dout = torch.randn_like(lora)
    W = torch.randn(256, 256, device=dev, dtype=dt)
    A = torch.randn(16, 256, device=dev, dtype=dt)
    B = torch.randn(256, 16, device=dev, dtype=dt)
    lr, br, gr = (t.clone().requires_grad_() for t in (lora, base, g))
    _, inner = compose_fwd_triton(lora, base, g, 0.5, DEFAULT_COMPOSE_CONFIG, write_inner=True)

    def train(impl):
        o = compose_train(lr, br, gr, 0.5, impl=impl)
        torch.autograd.grad(o, (lr, br, gr), dout)

    def per_call_us(fn) -> float:
        return harness.wall_us(fn, dev, calls=args.calls, rounds=args.rounds)

    cases = {
        "torch add (one aten op)": lambda: torch.add(lora, base),
        "compose eager": lambda: compose(lora, base, g, 0.5, impl="eager"),
        "compose triton": lambda: compose(lora, base, g, 0.5, impl="triton"),
        "compose_fwd_triton launcher": lambda: compose_fwd_triton(lora, base, g, 0.5, DEFAULT_COMPOSE_CONFIG),
        "compose_bwd_triton launcher": lambda: compose_bwd_triton(
            dout,
            inner,
            g,
            0.5,
            DEFAULT_COMPOSE_TRAIN_CONFIG.bwd,
            lora_dtype=lora.dtype,
            need_dlora=True,
            need_dbase=True,
            need_dg=True,
        ),
        "train eager": lambda: train("eager"),
        "train triton": lambda: train("triton"),
        "norm triton": lambda: factored_norm(W, A, B, 0.5, impl="triton"),
        "norm factored_torch": lambda: factored_norm(W, A, B, 0.5, impl="factored_torch"),
    }
    res = {name: per_call_us(fn) for name, fn in cases.items()}
    torch.autograd.set_multithreading_enabled(False)
    res["train eager (autograd single-thread)"] = per_call_us(lambda: train("eager"))
    res["train triton (autograd single-thread)"] = per_call_us(lambda: train("triton"))
    torch.autograd.set_multithreading_enabled(True)
    norm_shape = {"d_out": 256, "d_in": 256, "r": 16, "dtype": args.dtype}
    compose_shape = {"rows": 4, "cols": 256, "dtype": args.dtype}
    for k, v in res.items():
        rec.record(norm_shape if k.startswith("norm") else compose_shape, {"us": v, "calls": args.calls}, item=k)
        print(f"{k:45s} {v:8.1f} us")
    if args.profile:  # where the host time of the Triton training step goes (single-thread autograd)
        import cProfile
        import pstats

        torch.autograd.set_multithreading_enabled(False)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            train("triton")
        torch.cuda.synchronize()
        prof.disable()
        torch.autograd.set_multithreading_enabled(True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    out = harness.write_json(args.out or harness.default_out("overhead.json"), res)
    print(f"wrote {out}; {rec.summary()}")


if __name__ == "__main__":
    main()
