"""Host (CPU) time to enqueue one call of each DoRA building block, and of whole DoRA layers, on CUDA.

Run (GPU):  python benchmarks/host_overhead.py [--out benchmarks/results/h200-host-overhead.json]

Why: in ``benchmarks/e2e.py`` a training step is host-bound when the Python and launch work per adapted layer takes
longer than the GPU work it enqueues; the fused kernels then save GPU time the step never sees. This measures that
host work directly: before each batch of ``--calls`` calls a spin kernel (``torch.cuda._sleep``) holds the GPU, so
every launch only enqueues and the wall time of the batch ÷ calls is the host's cost of one call. Median of
``--batches`` batches, in µs. Keep ``--calls`` × launches per call well under CUDA's queue of pending launches
(~1000): past it a launch blocks until the spin ends, and the figure is no longer host time (a PEFT DoRA layer's
forward+backward launches ~60 kernels: 40 calls filled the queue and read 3.8 ms on the H100). Forward+backward
items build a fresh graph and run ``backward`` each call; their difference to the forward item is the host cost of
the backward (the autograd engine's thread).

Shapes (default): one Llama-3-8B q_proj, ``W [4096, 4096]``, r = 384, 4096 tokens, bf16 (``--dtype``).

Timing: on purpose not the harness's timers — the GPU timer would count the GPU's time and the host timer
(``harness.wall_us``) the slower of host and GPU, while this measures the host alone: :func:`host_us` holds the GPU
with a spin kernel sized from a harness-timed batch. Writes ``--out`` (default ``$OUT/h200-host-overhead.json`` or
``benchmarks/results/``) and one result row per item (the harness, ``benchmarks/README.md``: shape d, rank, tokens,
dtype; figures median and min µs per call).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import harness
import torch

try:  # GPU-only script; the kernel below needs triton.language at module level (its annotations are strings)
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None


def _empty_fn(a, b, c, d, e, f, n0, n1, n2, n3, n4, s, BLOCK: tl.constexpr):
    """A Triton kernel body that does nothing: 6 pointer, 5 int and 1 float arguments (launch cost only)."""


def host_us(fn: Callable[[], object], calls: int, batches: int) -> dict:
    """Median / min host µs per call of ``fn`` with the GPU held by a spin kernel (see the module docstring)."""
    from dora_tune.dispatch.timing import spin_cycles_per_ms

    for _ in range(5):
        fn()
    est_s = harness.wall_us(fn, "cuda", calls=calls) * calls / 1e6  # one batch, synchronised: host or GPU bound
    spin = int(spin_cycles_per_ms() * (3 * est_s * 1e3 + 1.0))
    per = []
    for _ in range(batches):
        torch.cuda._sleep(spin)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return {"median_us": statistics.median(per), "min_us": min(per), "calls": calls, "batches": batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--d", type=int, default=4096, help="in and out features of the layer")
    ap.add_argument("--rank", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=10, help="calls per batch (see the launch-queue note)")
    ap.add_argument("--batches", type=int, default=15)
    ap.add_argument("--cprofile", action="store_true", help="also cProfile the dora-tune layer (text in the JSON)")
    harness.add_flags(
        ap,
        out_help="JSON path (default $OUT/h200-host-overhead.json or benchmarks/results/)",
        device="cuda",
        dtype="bf16",
    )
    args = harness.resolve(ap.parse_args(), ap)
    rec = harness.start(__file__, args)

    import triton

    from dora_tune.dispatch.runtime import auto
    from dora_tune.kernels import compose, compose_train, dora_compose_train, dora_scale, factored_norm
    from dora_tune.kernels._norm_triton import factored_norm_triton
    from dora_tune.kernels.norm import DEFAULT_NORM_CONFIG

    _empty = triton.jit(_empty_fn)
    dev = args.device
    bf16 = args.torch_dtype  # the working dtype (bf16 unless --dtype)
    d, r, rows = args.d, args.rank, args.tokens
    s = 2.0
    torch.manual_seed(args.seed)
    W = torch.randn(d, d, device=dev, dtype=bf16) / d**0.5
    A = (torch.randn(r, d, device=dev, dtype=bf16) / d**0.5).requires_grad_()
    B = (torch.randn(d, r, device=dev, dtype=bf16) / r**0.5).requires_grad_()
    mag = torch.rand(d, device=dev, dtype=bf16).add_(0.5).requires_grad_()
    lora = torch.randn(rows, d, device=dev, dtype=bf16).requires_grad_()
    base = torch.randn(rows, d, device=dev, dtype=bf16).requires_grad_()
    dout = torch.randn(rows, d, device=dev, dtype=bf16)
    small = torch.randn(1024, device=dev)
    norm = factored_norm(W, A, B, s)
    g = dora_scale(mag, norm)
    ptrs = [torch.empty(16, device=dev) for _ in range(6)]

    def ct_fwdbwd(impl: str) -> Callable[[], None]:
        def f() -> None:
            gg = dora_scale(mag, norm)
            compose_train(lora, base, gg, s, impl=impl).backward(dout)

        return f

    from dora_tune.kernels import dora_layer
    from dora_tune.kernels._launch import lean

    x_in = torch.randn(rows, d, device=dev, dtype=bf16).requires_grad_()
    base_out = torch.randn(rows, d, device=dev, dtype=bf16).requires_grad_()
    items: dict[str, Callable[[], object]] = {
        "torch_add_small": lambda: small + small,
        "triton_empty_launch_12_args": lambda: _empty[(1,)](*ptrs, 1, 2, 3, 4, 5, 1.0, BLOCK=16),
        "triton_empty_launch_12_args_lean": lambda: lean(_empty)[(1,)](*ptrs, 1, 2, 3, 4, 5, 1.0, BLOCK=16),
        "dora_layer_node_fwd_auto": lambda: dora_layer(x_in, W, A, B, mag, norm, s, base_result=base_out),
        "dora_layer_node_fwd_bwd_auto": lambda: dora_layer(x_in, W, A, B, mag, norm, s, base_result=base_out).backward(
            dout
        ),
        "dispatch_auto_lookup": lambda: auto("compose", (rows, d), bf16, dev),
        "factored_norm_auto": lambda: factored_norm(W, A, B, s),
        "factored_norm_triton_direct": lambda: factored_norm_triton(W, A.detach(), B.detach(), s, DEFAULT_NORM_CONFIG),
        "dora_scale": lambda: dora_scale(mag, norm),
        "compose_nograd_auto": lambda: compose(lora.detach(), base.detach(), g.detach(), s),
        "compose_train_fwd_auto": lambda: compose_train(lora, base, g, s),
        "dora_scale+compose_train_fwd_bwd_auto": ct_fwdbwd("auto"),
        "dora_scale+compose_train_fwd_bwd_eager": ct_fwdbwd("eager"),
        "dora_scale+compose_train_fwd_bwd_triton": ct_fwdbwd("triton"),
        "dora_compose_train_fwd_auto": lambda: dora_compose_train(lora, base, mag, norm, s),
        "dora_compose_train_fwd_bwd_auto": lambda: dora_compose_train(lora, base, mag, norm, s).backward(dout),
    }

    layers = {}
    try:
        from peft import LoraConfig, get_peft_model

        from dora_tune.integrations import peft as dt_peft

        class One(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.proj = torch.nn.Linear(d, d, bias=False, device=dev, dtype=bf16)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.proj(x)

        x = torch.randn(rows, d, device=dev, dtype=bf16).requires_grad_()
        for name, use_dora in (("peft_dora", True), ("lora", False)):
            cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], use_dora=use_dora)
            m = get_peft_model(One(), cfg, autocast_adapter_dtype=False)
            layers[name] = m
    except ImportError as e:
        print(f"peft layers skipped: {e}")

    def layer_items(tag: str, m: torch.nn.Module) -> None:
        items[f"layer_{tag}_fwd"] = lambda: m(x)
        items[f"layer_{tag}_fwd_bwd"] = lambda: m(x).backward(dout)

    shape = {"d": d, "rank": r, "tokens": rows, "dtype": args.dtype}
    res: dict = {"env": rec.env, "shape": shape, "items": {}}
    from dora_tune import DoRALinear

    dl = DoRALinear(torch.nn.Linear(d, d, bias=False, device=dev, dtype=bf16), r=r, alpha=2 * r)
    with torch.no_grad():
        dl.lora_B.normal_(0, 0.01)
    layer_items("dora_linear", dl)
    if "lora" in layers:
        layer_items("lora", layers["lora"])
    if "peft_dora" in layers:
        layer_items("peft_dora", layers["peft_dora"])
    for name, fn in items.items():
        res["items"][name] = host_us(fn, args.calls, args.batches)
        rec.record(shape, res["items"][name], item=name)
        print(f"{name:45s} {res['items'][name]['median_us']:9.1f} µs", flush=True)
    if "peft_dora" in layers:
        with dt_peft.enable(layers["peft_dora"]):
            for tag, fn in (
                ("dora_tune_fwd", lambda: layers["peft_dora"](x)),
                ("dora_tune_fwd_bwd", lambda: layers["peft_dora"](x).backward(dout)),
            ):
                name = f"layer_{tag}"
                res["items"][name] = host_us(fn, args.calls, args.batches)
                rec.record(shape, res["items"][name], item=name)
                print(f"{name:45s} {res['items'][name]['median_us']:9.1f} µs", flush=True)
    if args.cprofile and "peft_dora" in layers:  # where the enabled layer's host time goes, by Python function
        import cProfile
        import io
        import pstats

        text = io.StringIO()
        peft_m = layers["peft_dora"]
        # the backward runs on the calling thread (cProfile sees one thread only)
        with dt_peft.enable(peft_m), torch.autograd.set_multithreading_enabled(False):
            for tag, fn in (
                ("PEFT + enable() forward+backward", lambda: peft_m(x).backward(dout)),
                ("DoRALinear forward+backward", lambda: dl(x).backward(dout)),
            ):
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(5 * args.calls):
                    fn()
                prof.disable()
                torch.cuda.synchronize()
                text.write(f"==== {tag}, {5 * args.calls} calls (cProfile inflates every Python call)\n")
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
        res["cprofile"] = text.getvalue()
    out = harness.write_json(args.out or harness.default_out("h200-host-overhead.json"), res)
    print(f"wrote {out}; {rec.summary()}")


if __name__ == "__main__":
    main()
