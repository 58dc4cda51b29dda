"""Kernel benchmark on one CUDA GPU: ceilings, then every implementation of each op against its floor.

Run:  python benchmarks/kernel_bench.py [--quick] [--ops norm,compose,train]
          [--out benchmarks/results/h200-kernels.json]

For each shape it prints and records: time (the harness's GPU timer ``harness.gpu_us``, i.e. the median of
``dora_tune.dispatch.timing.gpu_times``: GPU time, L2 flushed, the host kept out; ms or µs), the floor (max(bytes /
copy bandwidth, FLOPs / bf16 matmul rate), both measured at the start of the same run), achieved bandwidth, extra
peak memory above the inputs, and the relative error ‖out − ref‖ / ‖ref‖ against float64. Triton implementations are
timed with the best config of a sweep over their config space (a short timing per config, then a full measurement
of the winner) and with the default config. Runs before this harness timed with ``triton.testing.do_bench``, whose
events also count the host where a call enqueues slower than the GPU runs it (small shapes). On purpose, a second
figure for a few implementations: CUDA-graph replay (``do_bench_cudagraph``, ``graph_ms`` / ``graph_us``).

Writes ``--out`` (default ``$OUT/h200-kernels.json`` or ``benchmarks/results/``) after each op, and one result row
per shape and implementation (the harness, ``benchmarks/README.md``: item the implementation, shape op and dims;
figures its time, ratio to the floor, bandwidth, extra memory, error) plus one of the ceilings. bf16 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import harness
import torch
import triton
from triton.testing import do_bench_cudagraph

from dora_tune.kernels import (
    DEFAULT_COMPOSE_CONFIG,
    DEFAULT_COMPOSE_TRAIN_CONFIG,
    DEFAULT_NORM_CONFIG,
    ComposeBwdConfig,
    ComposeConfig,
    ComposeTrainConfig,
    NormConfig,
    compose,
    compose_bwd_config_space,
    compose_config_space,
    compose_reference,
    compose_train,
    factored_norm,
    norm_config_space,
    norm_reference,
    norm_tuning_space,
)
from dora_tune.kernels._compose_triton import compose_bwd_triton, compose_fwd_triton

DEV = "cuda"  # the current CUDA device (``--device`` makes it so)
BF16 = torch.bfloat16
SEED = 0  # ``--seed``: added to each shape's generator seed
NORM_SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
NORM_RANKS = [16, 384, 768]
COMPOSE_SHAPES = [(512, 4096), (2048, 4096), (4096, 4096), (2048, 6144), (8192, 8192), (32768, 8192), (8192, 28672)]


def bench(fn, rep: int = 100, warmup: int = 25) -> float:
    """Median GPU time in ms: the harness's GPU timer, ``warmup`` and ``rep`` ms as do_bench's."""
    return harness.gpu_us(fn, warmup_ms=warmup, rep_ms=rep) / 1e3


def graph_ms(fn) -> float | None:
    """GPU-only time: median over CUDA-graph replays (no host launch cost). None if fn cannot be captured."""
    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:
        print(f"    (cuda graph capture failed: {type(e).__name__}: {str(e)[:100]})", flush=True)
        return None


def _warm_worker(job: tuple[str, list[dict]]) -> int:
    """Compile (launch once, tiny inputs with the benchmark's specialisations) each config; fills Triton's disk
    cache so the sweeps in the parent process only load binaries."""
    op, cfgs = job
    dev, n = DEV, 0
    if op == "norm":
        mats = []
        for r in (16, 384):  # r = 16 → one tile (SINGLE_TILE); r = 384 → partials
            mats.append(tuple(torch.randn(*sh, device=dev, dtype=BF16) for sh in ((256, 1024), (r, 1024), (256, r))))
        for c in cfgs:
            cfg = NormConfig.from_dict(c)
            for W, A, B in mats:
                if cfg in norm_config_space(A.shape[0]):
                    try:  # a config over the shared-memory limit fails here; the sweep records it
                        factored_norm(W, A, B, 1.0, impl="triton", config=cfg)
                        n += 1
                    except Exception:
                        pass
    else:
        lora, base = (torch.randn(64, 1024, device=dev, dtype=BF16) for _ in range(2))
        g = torch.ones(1024, device=dev, dtype=BF16)
        for c in cfgs:
            if op == "compose":
                cfg = ComposeConfig.from_dict(c)
                compose_fwd_triton(lora, base, g, 0.5, cfg)
                compose_fwd_triton(lora, base, g, 0.5, cfg, write_inner=True)
            else:
                compose_bwd_triton(
                    lora,
                    base,
                    g,
                    0.5,
                    ComposeBwdConfig.from_dict(c),
                    lora_dtype=BF16,
                    need_dlora=True,
                    need_dbase=True,
                    need_dg=True,
                )
            n += 1
    torch.cuda.synchronize()
    return n


def warm_compile(jobs: int, full_sweep: bool) -> float:
    """Compile every config the sweeps will try in ``jobs`` processes; return the seconds it took."""
    import concurrent.futures as cf
    import multiprocessing as mp

    t0 = time.time()
    norm_cfgs = {c for r in (16, 384) for c in (norm_config_space(r) if full_sweep else norm_tuning_space(r))}
    # split_k does not change the compiled kernel beyond SINGLE_TILE: warm one split_k>1 and split_k=1 per tile.
    norm_cfgs = sorted({dataclasses.replace(c, split_k=min(c.split_k, 2)) for c in norm_cfgs}, key=str)
    work = [("norm", [c.as_dict()]) for c in norm_cfgs]
    work += [("compose", [c.as_dict()]) for c in compose_config_space()]
    work += [("bwd", [c.as_dict()]) for c in compose_bwd_config_space()]
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        done = sum(ex.map(_warm_worker, work))
    print(f"warm compile: {done} launches in {time.time() - t0:.0f} s with {jobs} processes", flush=True)
    return time.time() - t0


def peak_extra_mb(fn) -> float:
    """Peak allocated memory during ``fn()`` above what was allocated before, in MiB (outputs included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del out
    return extra / 2**20


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def sweep(run_cfg, configs, rep: int) -> tuple[object, float, int]:
    """Time each config briefly; return (best config, its ms, number of failed configs)."""
    best, best_t, failed = None, math.inf, 0
    for cfg in configs:
        try:
            run_cfg(cfg)
            torch.cuda.synchronize()
            t = bench(lambda cfg=cfg: run_cfg(cfg), rep=rep, warmup=5)
        except Exception as e:  # out of resources and the like: record and go on
            failed += 1
            print(f"    config {cfg} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        if t < best_t:
            best, best_t = cfg, t
    return best, best_t, failed


def ceilings() -> dict:
    n = 1 << 30
    x = torch.randn(n, device=DEV, dtype=BF16)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    copy = 2 * x.numel() * 2 / (t * 1e-3)
    x = y = None
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    b = torch.randn_like(a)
    t = bench(lambda: a @ b)
    mm = 2 * 8192**3 / (t * 1e-3)
    a = b = None
    torch.cuda.empty_cache()
    return {"copy_Bps": copy, "mm_flops": mm}


# ---- baselines that are not library implementations (context only) ----
def dense_bf16(W, A, B, s):  # PEFT-style: W + s·(B@A) in the working dtype
    return torch.linalg.norm(W + s * (B @ A), dim=1)


def peft_eye(W, A, B, s):  # PEFT's lora_B(lora_A(eye)) materialises an identity [d_in, d_in]
    eye = torch.eye(A.shape[1], device=W.device, dtype=W.dtype)
    return torch.linalg.norm(W + s * (eye @ A.t() @ B.t()).t(), dim=1)


def run_norm(ceil: dict, quick: bool, full_sweep: bool) -> list[dict]:
    shapes = [(do, di, r) for (do, di) in NORM_SHAPES for r in NORM_RANKS]
    if quick:
        shapes = [(8192, 8192, 384), (8192, 28672, 384), (4096, 4096, 16)]
    rows = []
    for d_out, d_in, r in shapes:
        rows.append(norm_shape(ceil, d_out, d_in, r, quick, full_sweep))
        torch.cuda.empty_cache()
    return rows


def norm_shape(ceil: dict, d_out: int, d_in: int, r: int, quick: bool, full_sweep: bool) -> dict:
    g = torch.Generator(device=DEV).manual_seed(SEED + d_out + d_in + r)
    W = torch.randn(d_out, d_in, device=DEV, dtype=BF16, generator=g) * 0.02
    A = torch.randn(r, d_in, device=DEV, dtype=BF16, generator=g) / math.sqrt(d_in)
    B = torch.randn(d_out, r, device=DEV, dtype=BF16, generator=g) * 0.02
    s = 2.0
    ref = norm_reference(W, A, B, s)
    nbytes = 2 * (d_out * d_in + r * d_in + d_out * r) + 4 * d_out
    flops = 2 * d_out * d_in * r + 2 * r * r * d_in + 2 * d_out * r * r
    floor_ms = max(nbytes / ceil["copy_Bps"], flops / ceil["mm_flops"]) * 1e3
    row = {"shape": [d_out, d_in, r], "floor_ms": floor_ms, "bytes": nbytes, "flops": flops, "impls": {}}
    t0 = time.time()
    space = norm_config_space(r) if full_sweep else norm_tuning_space(r)
    best, _, failed = sweep(
        lambda c: factored_norm(W, A, B, s, impl="triton", config=c), space, rep=10 if quick else 20
    )
    row["sweep"] = {"configs": len(space), "failed": failed, "seconds": time.time() - t0, "best": best.as_dict()}
    cands = {
        "triton": lambda: factored_norm(W, A, B, s, impl="triton", config=best),
        "triton_default": lambda: factored_norm(W, A, B, s, impl="triton", config=DEFAULT_NORM_CONFIG),
        "factored_torch": lambda: factored_norm(W, A, B, s, impl="factored_torch"),
        "dense": lambda: factored_norm(W, A, B, s, impl="dense"),
        "baseline_dense_bf16": lambda: dense_bf16(W, A, B, s),
        "baseline_peft_eye": lambda: peft_eye(W, A, B, s),
    }
    for name, fn in cands.items():
        try:
            ms = bench(fn)
            row["impls"][name] = {
                "ms": ms,
                "x_floor": ms / floor_ms,
                "extra_MB": peak_extra_mb(fn),
                "relerr": relerr(fn(), ref),
                "TFLOPs": flops / (ms * 1e-3) / 1e12,
                "graph_ms": graph_ms(fn) if name in ("triton", "baseline_dense_bf16") else None,
            }
        except torch.cuda.OutOfMemoryError:
            row["impls"][name] = {"ms": None, "error": "oom"}
        torch.cuda.empty_cache()
    tri = row["impls"]["triton"]
    print(
        f"norm {d_out}x{d_in} r{r}: floor {floor_ms:.3f} ms | triton {tri['ms']:.3f} ({tri['x_floor']:.2f}x, "
        f"graph {_ms(tri.get('graph_ms'))}, {tri['extra_MB']:.1f} MB, err {tri['relerr']:.1e})"
        + "".join(f" | {k} {_ms(v.get('ms'))}" for k, v in row["impls"].items() if k != "triton")
        + f" | best {best.as_dict()} [{row['sweep']['seconds']:.0f}s]",
        flush=True,
    )
    return row


def compose_inputs(rows: int, cols: int):
    gen = torch.Generator(device=DEV).manual_seed(SEED + rows * 7 + cols)
    lora = torch.randn(rows, cols, device=DEV, dtype=BF16, generator=gen)
    base = torch.randn(rows, cols, device=DEV, dtype=BF16, generator=gen)
    g = (1 + 0.01 * torch.randn(cols, device=DEV, generator=gen)).to(BF16)
    return lora, base, g, 0.5


def run_compose(ceil: dict, quick: bool) -> list[dict]:
    out = []
    for rows, cols in COMPOSE_SHAPES[:3] if quick else COMPOSE_SHAPES:
        out.append(compose_shape(ceil, rows, cols))
        torch.cuda.empty_cache()
    return out


def compose_shape(ceil: dict, rows: int, cols: int) -> dict:
    lora, base, g, s = compose_inputs(rows, cols)
    ref = compose_reference(lora, base, g, s)
    nbytes = 3 * rows * cols * 2
    floor_us = nbytes / ceil["copy_Bps"] * 1e6
    t0 = time.time()
    space = compose_config_space()
    best, _, failed = sweep(lambda c: compose(lora, base, g, s, impl="triton", config=c), space, rep=10)
    sweep_info = {"configs": len(space), "failed": failed, "seconds": time.time() - t0, "best": best.as_dict()}
    row = {"shape": [rows, cols], "floor_us": floor_us, "bytes": nbytes, "impls": {}, "sweep": sweep_info}
    cands = {
        "triton": lambda: compose(lora, base, g, s, impl="triton", config=best),
        "triton_default": lambda: compose(lora, base, g, s, impl="triton", config=DEFAULT_COMPOSE_CONFIG),
        "eager": lambda: compose(lora, base, g, s, impl="eager"),
    }
    for name, fn in cands.items():
        us = bench(fn) * 1e3
        row["impls"][name] = {
            "us": us,
            "x_floor": us / floor_us,
            "GBps": nbytes / (us * 1e-6) / 1e9,
            "frac_copy_bw": nbytes / (us * 1e-6) / ceil["copy_Bps"],
            "extra_MB": peak_extra_mb(fn),
            "relerr": relerr(fn(), ref),
            "graph_us": (lambda v: None if v is None else v * 1e3)(graph_ms(fn)),
        }
    tri, eag = row["impls"]["triton"], row["impls"]["eager"]
    print(
        f"compose {rows}x{cols}: floor {floor_us:.1f} us | triton {tri['us']:.1f} ({tri['frac_copy_bw'] * 100:.0f}% "
        f"of copy bw, graph {_ms(tri['graph_us'])}, err {tri['relerr']:.1e})"
        f" | default {row['impls']['triton_default']['us']:.1f} | eager "
        f"{eag['us']:.1f} (graph {_ms(eag['graph_us'])}, err {eag['relerr']:.1e}) | best {best.as_dict()}",
        flush=True,
    )
    return row


def run_train(ceil: dict, quick: bool) -> list[dict]:
    out = []
    for rows, cols in COMPOSE_SHAPES[:3] if quick else COMPOSE_SHAPES:
        out.append(train_shape(ceil, rows, cols))
        torch.cuda.empty_cache()
    return out


def train_shape(ceil: dict, rows: int, cols: int) -> dict:
    lora, base, g, s = compose_inputs(rows, cols)
    dout = torch.randn_like(lora)
    gvec = g.contiguous()
    nbytes = 8 * rows * cols * 2
    floor_us = nbytes / ceil["copy_Bps"] * 1e6
    t0 = time.time()
    # The two halves are independent: tune the forward (writing inner) and the backward separately.
    fbest, _, ff = sweep(
        lambda c: compose_fwd_triton(lora, base, gvec, s, c, write_inner=True), compose_config_space(), rep=10
    )
    _, inner = compose_fwd_triton(lora, base, gvec, s, fbest, write_inner=True)
    bbest, _, bf = sweep(
        lambda c: compose_bwd_triton(
            dout, inner, gvec, s, c, lora_dtype=BF16, need_dlora=True, need_dbase=True, need_dg=True
        ),
        compose_bwd_config_space(),
        rep=10,
    )
    best = ComposeTrainConfig(fbest, bbest)
    row = {
        "shape": [rows, cols],
        "floor_us": floor_us,
        "bytes": nbytes,
        "impls": {},
        "sweep": {"failed": ff + bf, "seconds": time.time() - t0, "best": best.as_dict()},
    }
    lr, br, gr = (t.clone().requires_grad_() for t in (lora, base, g))
    l64, b64, g64 = (t.double().requires_grad_() for t in (lora, base, g))
    ref_out = compose_reference(l64, b64, g64, s)
    ref_grads = torch.autograd.grad(ref_out, (l64, b64, g64), dout.double())

    def step(impl, cfg=None):
        o = compose_train(lr, br, gr, s, impl=impl, config=cfg)
        return (o, *torch.autograd.grad(o, (lr, br, gr), dout))

    cands = {
        "triton": lambda: step("triton", best),
        "triton_default": lambda: step("triton", DEFAULT_COMPOSE_TRAIN_CONFIG),
        "eager": lambda: step("eager"),
    }
    for name, fn in cands.items():
        us = bench(fn) * 1e3
        res = fn()
        errs = [relerr(x, y) for x, y in zip(res, (ref_out, *ref_grads), strict=True)]
        row["impls"][name] = {
            "us": us,
            "x_floor": us / floor_us,
            "extra_MB": peak_extra_mb(fn),
            "relerr_out_dlora_dbase_dg": errs,
        }
    tri, eag = row["impls"]["triton"], row["impls"]["eager"]
    print(
        f"train {rows}x{cols}: floor {floor_us:.1f} us | triton {tri['us']:.1f} ({tri['x_floor']:.2f}x floor, "
        f"errs {[f'{e:.1e}' for e in tri['relerr_out_dlora_dbase_dg']]}) | default "
        f"{row['impls']['triton_default']['us']:.1f} | eager {eag['us']:.1f} | best {best.as_dict()} "
        f"[{row['sweep']['seconds']:.0f}s]",
        flush=True,
    )
    return row


SHAPE_KEYS = {"norm": ("d_out", "d_in", "r"), "compose": ("rows", "cols"), "compose_train": ("rows", "cols")}


def record_rows(rec: harness.Recorder, op: str, rows: list[dict]) -> None:
    """One result row per shape and implementation of ``op`` (numbers only; the JSON keeps the rest)."""
    for row in rows:
        shape = {"op": op, **dict(zip(SHAPE_KEYS[op], row["shape"], strict=True)), "dtype": "bf16"}
        for name, r in row["impls"].items():
            figures = {k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            errs = r.get("relerr_out_dlora_dbase_dg")
            if errs:
                figures["relerr_max"] = max(errs)
            if name == "triton":
                figures |= {
                    f"sweep_{k}": row["sweep"][k] for k in ("configs", "failed", "seconds") if k in row["sweep"]
                }
            rec.record(shape, figures, item=name)


def main() -> None:
    global SEED
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--ops", default="norm,compose,train")
    ap.add_argument("--full-sweep", action="store_true", help="sweep the whole norm config space (slow to compile)")
    ap.add_argument("--jobs", type=int, default=0, help="compile the sweeps' configs first in this many processes")
    harness.add_flags(ap, out_help="JSON path (default: $OUT/h200-kernels.json or benchmarks/results)", device="cuda")
    args = harness.resolve(ap.parse_args(), ap)
    SEED = args.seed
    rec = harness.start(__file__, args)
    res = {
        "device": rec.env["device"],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": rec.env["date"],
        "command": rec.env["command"],
        "env": rec.env,
    }
    t0 = time.time()
    res.update(ceilings())
    rec.record({"dtype": "bf16"}, {"copy_Bps": res["copy_Bps"], "mm_flops": res["mm_flops"]}, item="ceilings")
    print(
        f"{res['device']}: copy {res['copy_Bps'] / 1e12:.2f} TB/s, bf16 mm {res['mm_flops'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    path = Path(args.out or harness.default_out("h200-kernels.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.jobs > 0:
        try:
            res["warm_compile_seconds"] = warm_compile(args.jobs, args.full_sweep)
        except Exception as e:  # the sweeps compile for themselves then
            print(f"warm compile failed ({type(e).__name__}: {e}); sweeps will compile serially", flush=True)
    ops = args.ops.split(",")
    for op, key, fn in (
        ("norm", "norm", lambda: run_norm(res, args.quick, args.full_sweep)),
        ("compose", "compose", lambda: run_compose(res, args.quick)),
        ("train", "compose_train", lambda: run_train(res, args.quick)),
    ):
        if op in ops:
            res[key] = fn()
            res["seconds"] = time.time() - t0
            path.write_text(json.dumps(res, indent=1))  # after each op: a cut-short run keeps what it measured
            record_rows(rec, key, res[key])
    print(f"wrote {path} in {res.get('seconds', time.time() - t0):.0f} s; {rec.summary()}")


if __name__ == "__main__":
    main()
