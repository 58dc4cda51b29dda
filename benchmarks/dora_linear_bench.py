"""The DoRA linear (issue 20) — fused, folded and composed — against PEFT's DoRA and LoRA layers and cuBLAS, on one
GPU.

Run:  python benchmarks/dora_linear_bench.py [--quick] [--models llama-3-8b,qwen2.5-32b] [--ranks 16,64,384]
          [--tokens 512,4096,16384] [--sweep 24] [--no-fused]

For each projection of the models (every distinct ``(d_out, d_in)``), rank and token count it times, GPU time (the
harness's ``gpu_us``: L2 flushed, the host kept out), in µs:

* ``cublas_base``: ``x·Wᵀ`` alone; ``cublas_base_xa``: ``x·Wᵀ`` and ``x·Aᵀ`` (the forward target's denominator:
  fused forward ≤ 1.10× it at ≥ 4096 tokens);
* ``fused_fwd`` with the default config and with the best of ``--sweep`` configs of its space (each timed short,
  the winner again in full; ``--no-fused`` leaves the fused linear out), ``folded_fwd``, ``composed_fwd`` (today's
  path);
* forward + backward (x, A, B and m need gradients, as in training): ``fused``, ``folded``, ``composed``,
  ``peft_dora`` (PEFT's DoRA ``Linear``), ``peft_lora`` (plain LoRA, the floor of any DoRA: the fwd+bwd target is
  ≤ 1.0× it), each with its peak memory above the tensors it started from (``*_peak_MiB``);

and the relative error against float64 of each implementation's output and gradients at one small shape per
dtype. One row per (shape, item) (the harness); the JSON ``--out`` keeps everything.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import harness
import torch

from dora_tune.kernels.dora_linear import (
    DEFAULT_DORA_LINEAR_CONFIG,
    DoraLinearConfig,
    dora_linear,
    dora_linear_reference,
    dora_linear_tuning_space,
)
from dora_tune.tuning.shapes import MODEL_PRESETS


def make(rows: int, d_out: int, d_in: int, r: int, dtype: torch.dtype, dev: torch.device, seed: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (std * torch.randn(*shape, generator=gen)).to(dtype).to(dev)

    W, A, B = rnd(d_out, d_in, std=d_in**-0.5), rnd(r, d_in, std=d_in**-0.5), rnd(d_out, r, std=0.3 * r**-0.5)
    s = 2.0
    n = torch.linalg.vector_norm(W.float() + s * (B.float() @ A.float()), dim=1)
    m = (n * (1 + 0.1 * torch.randn(d_out, generator=gen).to(dev))).to(dtype)
    return {"x": rnd(rows, d_in), "W": W, "bias": None, "A": A, "B": B, "m": m, "n": n, "s": s, "dy": rnd(rows, d_out)}


def peft_layer(t: dict, use_dora: bool) -> torch.nn.Module:
    """PEFT's LoRA ``Linear`` around ``W`` with ``A``, ``B`` (and DoRA's magnitude ``m``) copied in."""
    from peft import LoraConfig, get_peft_model

    d_out, d_in = t["W"].shape
    r = t["A"].shape[0]

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out, bias=False, device=t["W"].device, dtype=t["W"].dtype)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    one = One()
    with torch.no_grad():
        one.proj.weight.copy_(t["W"])
    cfg = LoraConfig(r=r, lora_alpha=round(t["s"] * r), target_modules=["proj"], use_dora=use_dora)
    model = get_peft_model(one, cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t["A"])
        layer.lora_B["default"].weight.copy_(t["B"])
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(t["m"])
    return model


def fwd_bwd(fn: Any, x: torch.Tensor, dy: torch.Tensor) -> Any:
    def step() -> None:
        fn(x).backward(dy)

    return step


def peak_mib(step: Any, device: torch.device) -> float | None:
    """MiB allocated above what was held before, at the peak of one call of ``step`` (CUDA; None elsewhere): what a
    forward keeps for its backward plus the backward's temporaries (the gradients' buffers exist already)."""
    if device.type != "cuda":
        return None
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def time_configs(t: dict, configs: list[DoraLinearConfig]) -> tuple[DoraLinearConfig, float, int]:
    """The fastest of ``configs`` for the fused forward (a short timing each, the winner in full), its µs, and how
    many launched."""
    best, best_us, ok = None, float("inf"), 0
    args = (t["x"], t["W"], t["bias"], t["A"], t["B"], t["m"], t["n"], t["s"])
    with torch.no_grad():
        for c in configs:
            try:
                us = harness.gpu_us(lambda c=c: dora_linear(*args, impl="fused", config=c), warmup_ms=2, rep_ms=10)
            except Exception:  # out of resources at this shape: skipped
                continue
            ok += 1
            if us < best_us:
                best, best_us = c, us
        if best is None:
            raise RuntimeError("no config of the space launched")
        return best, harness.gpu_us(lambda: dora_linear(*args, impl="fused", config=best)), ok


def measure(t: dict, sweep: int, fused: bool = True) -> dict[str, Any]:
    x, W, A, B, m, n, s, dy = (t[k] for k in ("x", "W", "A", "B", "m", "n", "s", "dy"))
    rows, d_in = x.shape
    d_out, r = B.shape
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["cublas_base"] = harness.gpu_us(lambda: torch.mm(x, W.t()))
        out["cublas_base_xa"] = harness.gpu_us(lambda: (torch.mm(x, W.t()), torch.mm(x, A.t())))
        args = (x, W, None, A, B, m, n, s)
        if fused:
            out["fused_fwd_default"] = harness.gpu_us(lambda: dora_linear(*args, impl="fused"))
        out["folded_fwd"] = harness.gpu_us(lambda: dora_linear(*args, impl="folded"))
        out["composed_fwd"] = harness.gpu_us(lambda: dora_linear(*args, impl="composed"))
    xg = x.detach().clone().requires_grad_()
    Ag, Bg, mg = (v.detach().clone().requires_grad_() for v in (A, B, m))
    if fused:
        space = [DoraLinearConfig.from_dict(c) for c in dora_linear_tuning_space({"rows": rows, "d_out": d_out,
                                                                                 "d_in": d_in, "r": r})]  # fmt: skip
        step = max(1, len(space) // sweep) if sweep else len(space)
        configs = [DEFAULT_DORA_LINEAR_CONFIG, *space[::step]]
        best, out["fused_fwd_best"], out["configs_timed"] = time_configs(t, configs)
        out["best_config"] = best.as_dict()
        step = fwd_bwd(lambda xx: dora_linear(xx, W, None, Ag, Bg, mg, n, s, impl="fused", config=best), xg, dy)
        out["fused_fwd_bwd"] = harness.gpu_us(step)
        out["fused_peak_MiB"] = peak_mib(step, x.device)
    for impl in ("folded", "composed"):
        step = fwd_bwd(lambda xx, impl=impl: dora_linear(xx, W, None, Ag, Bg, mg, n, s, impl=impl), xg, dy)
        out[f"{impl}_fwd_bwd"] = harness.gpu_us(step)
        out[f"{impl}_peak_MiB"] = peak_mib(step, x.device)
    for name, dora in (("peft_dora", True), ("peft_lora", False)):
        try:
            layer = peft_layer(t, dora)
        except ImportError:
            continue
        with torch.no_grad():
            out[f"{name}_fwd"] = harness.gpu_us(lambda layer=layer: layer(x))
        out[f"{name}_fwd_bwd"] = harness.gpu_us(fwd_bwd(layer, xg, dy))
        out[f"{name}_peak_MiB"] = peak_mib(fwd_bwd(layer, xg, dy), x.device)
    fwd = {"fused": "fused_fwd_best", "folded": "folded_fwd", "composed": "composed_fwd"}
    for impl in ("fused", "folded", "composed") if fused else ("folded", "composed"):
        out[f"{impl}_fwd_vs_base_xa"] = out[fwd[impl]] / out["cublas_base_xa"]
        if "peft_lora_fwd_bwd" in out:
            out[f"{impl}_fwd_bwd_vs_lora"] = out[f"{impl}_fwd_bwd"] / out["peft_lora_fwd_bwd"]
        if impl != "composed":
            out[f"{impl}_fwd_bwd_vs_composed"] = out[f"{impl}_fwd_bwd"] / out["composed_fwd_bwd"]
    # the forward's floor: the base GEMM's rate over K = d_in + r
    out["floor_fwd"] = out["cublas_base"] * (d_in + r) / d_in
    return out


def errors(
    dtype: torch.dtype, dev: torch.device, seed: int, dims: tuple[int, int, int, int] = (512, 1024, 1024, 64)
) -> dict[str, float]:
    """Relative error against float64 of the output and each gradient, of each implementation (``dims``: rows,
    d_out, d_in, r)."""
    t = make(*dims, dtype, dev, seed)
    res: dict[str, float] = {}
    for impl in ("fused", "folded", "composed", "reference"):
        leaves = {k: t[k].detach().clone().requires_grad_() for k in ("x", "A", "B", "m")}
        if impl == "reference":
            leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
            y = dora_linear_reference(leaves["x"], t["W"], None, leaves["A"], leaves["B"], leaves["m"], t["n"], t["s"])
        else:
            y = dora_linear(leaves["x"], t["W"], None, leaves["A"], leaves["B"], leaves["m"], t["n"], t["s"], impl=impl)
        g = torch.autograd.grad(y, list(leaves.values()), t["dy"].to(y.dtype))
        res[impl] = (y, dict(zip(leaves, g, strict=True)))
    ry, rg = res.pop("reference")

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).norm() / b.norm()).item()

    out = {}
    for impl, (y, g) in res.items():
        out[f"{impl}_y"] = rel(y, ry)
        out.update({f"{impl}_d{k}": rel(g[k], rg[k]) for k in g})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama-3-8b,qwen2.5-32b")
    ap.add_argument("--ranks", default="16,64,384")
    ap.add_argument("--tokens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--sweep", type=int, default=24, help="configs of the space timed per shape (0: all)")
    ap.add_argument("--quick", action="store_true", help="llama-3-8b, r 64, 1024 and 4096 tokens, 8 configs")
    ap.add_argument("--no-fused", action="store_true", help="leave the fused linear (and its config sweep) out")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop between shapes after this long")
    harness.add_flags(ap, out_default=None, device="cuda", dtype="bf16", dtype_choices=("bf16", "fp16"))
    args = harness.resolve(ap.parse_args(), ap)
    if args.quick:
        args.models, args.ranks, args.tokens, args.sweep = "llama-3-8b", "64", "1024,4096", 8
    args.out = args.out or harness.default_out(f"{harness.slug(harness.gpu_name(args.device))}-dora-linear.json")
    rec = harness.start(__file__, args)
    dtype = harness.torch_dtype(args.dtype)
    t0 = time.time()
    res: dict[str, Any] = {"env": rec.env, "args": vars(args) | {"device": str(args.device)}, "shapes": []}
    res["errors"] = {name: errors(dt, args.device, args.seed) for name, dt in (("bf16", torch.bfloat16),
                                                                                ("fp16", torch.float16))}  # fmt: skip
    for name, e in res["errors"].items():
        rec.record({"dtype": name, "rows": 512, "d_out": 1024, "d_in": 1024, "r": 64}, e, item="errors_vs_float64")
        print(name, "error vs float64:", " ".join(f"{k} {v:.1e}" for k, v in e.items()), flush=True)
    projections = []
    for model in args.models.split(","):
        for d_out, d_in in MODEL_PRESETS[model].projections().values():
            if (d_out, d_in) not in projections:
                projections.append((d_out, d_in))
    for (d_out, d_in), r, rows in (
        (p, int(r), int(t)) for p in projections for r in args.ranks.split(",") for t in args.tokens.split(",")
    ):
        if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
            print(f"stopped after {args.max_minutes} minutes", flush=True)
            break
        t = make(rows, d_out, d_in, r, dtype, args.device, args.seed)
        fig = measure(t, args.sweep, fused=not args.no_fused)
        shape = {"rows": rows, "d_out": d_out, "d_in": d_in, "r": r, "dtype": args.dtype}
        res["shapes"].append({**shape, **fig})
        for item, v in fig.items():
            if isinstance(v, float) and "_vs_" not in item:
                rec.record(shape, {"us": v}, item=item)
        ratios = {k: v for k, v in fig.items() if "_vs_" in k}
        rec.record(shape, ratios, item="ratios")
        for impl in ("fused", "folded", "composed") if not args.no_fused else ("folded", "composed"):
            print(
                f"{rows:6d} × {d_out}×{d_in} r {r} {impl:8s}: fwd {fig[f'{impl}_fwd_vs_base_xa']:.2f}× cuBLAS "
                f"base+xAᵀ, fwd+bwd {fig[f'{impl}_fwd_bwd']:.1f} µs "
                f"({fig.get(f'{impl}_fwd_bwd_vs_lora', float('nan')):.2f}× PEFT LoRA)",
                flush=True,
            )
        harness.write_json(args.out, res)
        del t
    for key in ("fused_fwd_vs_base_xa", "folded_fwd_vs_base_xa", "folded_fwd_bwd_vs_lora", "composed_fwd_bwd_vs_lora"):
        big = [s[key] for s in res["shapes"] if s["rows"] >= 4096 and key in s]
        if big:
            print(f"{key}, ≥ 4096 tokens: geomean {statistics.geometric_mean(big):.3f}, max {max(big):.3f}")
    harness.write_json(args.out, res)
    print(f"wrote {args.out}; {rec.summary()}")


if __name__ == "__main__":
    main()
