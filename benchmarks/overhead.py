"""Host-side cost per call (µs) of each op on tiny CUDA inputs, where the GPU work is negligible.

Run: python benchmarks/overhead.py   — prints a table and writes $OUT/overhead.json (or benchmarks/results/).
Each figure is wall time over N back-to-back calls followed by one synchronize, divided by N.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dora_tune.kernels import (
    DEFAULT_COMPOSE_CONFIG,
    DEFAULT_COMPOSE_TRAIN_CONFIG,
    compose,
    compose_train,
    factored_norm,
)
from dora_tune.kernels._compose_triton import compose_bwd_triton, compose_fwd_triton


def per_call_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    dev = "cuda"
    lora = torch.randn(4, 256, device=dev, dtype=torch.bfloat16)
    base = torch.randn_like(lora)
    g = torch.ones(256, device=dev, dtype=torch.bfloat16)
    dout = torch.randn_like(lora)
    W = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
    A = torch.randn(16, 256, device=dev, dtype=torch.bfloat16)
    B = torch.randn(256, 16, device=dev, dtype=torch.bfloat16)
    lr, br, gr = (t.clone().requires_grad_() for t in (lora, base, g))
    _, inner = compose_fwd_triton(lora, base, g, 0.5, DEFAULT_COMPOSE_CONFIG, write_inner=True)

    def train(impl):
        o = compose_train(lr, br, gr, 0.5, impl=impl)
        torch.autograd.grad(o, (lr, br, gr), dout)

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
    for k, v in res.items():
        print(f"{k:45s} {v:8.1f} us")
    if "--profile" in sys.argv:  # where the host time of the Triton training step goes (single-thread autograd)
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
    path = Path(os.environ.get("OUT", "benchmarks/results")) / "overhead.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
