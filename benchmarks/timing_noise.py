"""How reproducible is a trial's time? ``triton.testing.do_bench`` vs the profiler's :func:`gpu_times`, run-to-run.

For a few small and mid-size shapes of each op (where the host's launch time is comparable to the GPU time), every
listed implementation+config is timed ``--runs`` times by each method, the runs interleaved so that each sees the same
machine conditions. Printed per item: the median of each method, its spread over the runs (max ÷ min), and the
host's enqueue time of one call. A method whose spread is large cannot rank configs that differ by less.

    python3 benchmarks/timing_noise.py [--runs 5] [--out benchmarks/results/h200-timing-noise.json]

Timing: two methods on purpose — comparing them is the point: ``do_bench`` against the harness's GPU timer
(``harness.gpu_us``, i.e. ``gpu_times``); the host's enqueue time is one unsynchronised call (perf_counter around
the launch only). Writes ``--out`` and one result row per item (the harness, ``benchmarks/README.md``: shape the op,
its dims, dtype and config index; item the implementation; figures each method's median and spread, host µs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import harness
import torch

from dora_tune.dispatch.registry import registry
from dora_tune.tuning.trials import make_inputs

ITEMS = [  # (op, shape, impl, config index in the registry's space or None)
    ("norm", {"d_out": 4096, "d_in": 4096, "r": 16}, "triton", 0),
    ("norm", {"d_out": 4096, "d_in": 4096, "r": 16}, "triton", -1),
    ("norm", {"d_out": 6144, "d_in": 2048, "r": 256}, "triton", 0),
    ("norm", {"d_out": 6144, "d_in": 2048, "r": 256}, "dense", None),
    ("compose", {"rows": 64, "cols": 18432}, "triton", 0),
    ("compose", {"rows": 64, "cols": 18432}, "triton", 30),
    ("compose", {"rows": 2048, "cols": 1536}, "triton", 0),
    ("compose", {"rows": 2048, "cols": 1536}, "eager", None),
    ("compose_train", {"rows": 2048, "cols": 1536}, "triton", 0),
    ("compose_train", {"rows": 2048, "cols": 1536}, "eager", None),
    ("compose_train", {"rows": 8192, "cols": 2560}, "triton", 0),
    ("compose_train", {"rows": 8192, "cols": 2560}, "eager", None),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    harness.add_flags(
        ap,
        out_default=str(Path(__file__).parent / "results" / "h200-timing-noise.json"),
        device="cuda",
        dtype="bf16",
    )
    args = harness.resolve(ap.parse_args(), ap)
    rec = harness.start(__file__, args)
    from triton.testing import do_bench

    device = args.device
    fns = []
    for op, shape, name, idx in ITEMS:
        impl = next(i for i in registry()[op] if i.name == name)
        cfg = impl.configs(shape)[idx] if idx is not None else {}
        fn = impl.runner(make_inputs(op, shape, args.dtype, device, seed=args.seed), cfg)
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host_us = (time.perf_counter() - t0) * 1e6
        torch.cuda.synchronize()
        fns.append((op, shape, name, cfg, fn, host_us))
    res: dict[int, dict[str, list[float]]] = {k: {"do_bench": [], "gpu_times": []} for k in range(len(fns))}
    for _ in range(args.runs):
        for k, (*_, fn, _h) in enumerate(fns):
            res[k]["do_bench"].append(do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3)
            res[k]["gpu_times"].append(harness.gpu_us(fn, warmup_ms=5, rep_ms=20))
    out = []
    print(
        f"{'op':14s} {'shape':18s} {'impl':7s} {'host µs':>8s} {'do_bench µs':>12s} {'spread':>7s} "
        f"{'gpu_times µs':>13s} {'spread':>7s}"
    )
    for k, (op, shape, name, cfg, _fn, host_us) in enumerate(fns):
        row = {"op": op, "shape": shape, "impl": name, "config": cfg, "host_enqueue_us": round(host_us, 1)}
        cells = []
        figures = {"host_enqueue_us": host_us, "runs": args.runs}
        for method, xs in res[k].items():
            med, spread = statistics.median(xs), max(xs) / min(xs)
            row[method] = {"runs_us": [round(x, 2) for x in xs], "median_us": round(med, 2), "spread": round(spread, 3)}
            figures |= {f"{method}_median_us": med, f"{method}_spread": spread}
            cells.append(f"{med:12.1f} {spread:7.2f}")
        config_index = ITEMS[k][3]
        rec.record({"op": op, **shape, "dtype": args.dtype, "config_index": config_index}, figures, item=name)
        dims = "x".join(map(str, shape.values()))
        print(f"{op:14s} {dims:18s} {name:7s} {host_us:8.1f} {cells[0]} {cells[1]:>21s}")
        out.append(row)
    spreads = {m: statistics.median(r[m]["spread"] for r in out) for m in ("do_bench", "gpu_times")}
    print("median spread:", spreads)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": args.runs, **rec.env}
    harness.write_json(args.out, {"env": env, "median_spread": spreads, "items": out})
    print(f"wrote {args.out}; {rec.summary()}")


if __name__ == "__main__":
    main()
