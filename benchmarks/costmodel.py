"""Compare the cost model's estimators by leave-shapes-out cross-validation (CPU only, no GPU needed).

Two data sets:

* ``h200``: the shipped cache ``dora_tune/caches/nvidia-h200.sqlite`` (real: the default shape set, 42 compose /
  compose_train shapes and 54 norm shapes, bf16, every config of the tuning space).
* ``synthetic``: the profiler's default shape set (42 compose / compose_train shapes, 54 norm shapes) timed by a
  made-up but H200-like cost law with 3 % log-normal noise (below): host overheads, traffic at the measured 4.25 TB/s
  copy bandwidth, tensor-core work at 694 TFLOP/s, and Triton configs losing efficiency to masked tiles, partial
  last waves and too few or too many elements per thread. It shows how each estimator learns a crossover and
  config effects from a realistic number of shapes; it is not a measurement of a GPU.

For every (data set, op, estimator) it prints the model's and the fixed crossover's top-1 and regret (geomean,
max) and the fit + cross-validation time, and writes ``benchmarks/results/costmodel-estimators.json`` (``--out``)
and one result row each (the harness, ``benchmarks/README.md``: item the estimator, shape data set and op; figures
top-1 and regret of the model, the paired model and the crossover, and the seconds), filed under ``nvidia-h200``
for the H200 data and ``cpu`` for the synthetic data (no GPU measured it). ``--seed``: the synthetic noise and the
estimators' seed (default 0). Nothing is timed but the fits' bookkeeping.

    python3 benchmarks/costmodel.py [--estimators extra_trees,hist_gb,knn,linear_trees] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import harness
import numpy as np

import dora_tune
from dora_tune.autotune_db import TrialRow, TuningDB
from dora_tune.dispatch.registry import registry
from dora_tune.tuning.estimators import ESTIMATORS
from dora_tune.tuning.evaluation import cross_validate
from dora_tune.tuning.shapes import default_shapes
from dora_tune.tuning.trials import train_bwd_stage

BW = 4.25e6  # bytes per µs (H200 copy, docs/norm.md)
PEAK = 694e6  # bf16 FLOP per µs
SMS = 132
CACHE = Path(dora_tune.__file__).parent / "caches" / "nvidia-h200.sqlite"


def _waves(programs: int, per_sm: int) -> float:
    """Efficiency of ``programs`` over SMS·per_sm slots: the partial last wave idles part of the GPU."""
    w = programs / (SMS * per_sm)
    return w / math.ceil(w)


def _tile_eff(rows: int, cols: int, br: int, bc: int, w: int) -> float:
    """Compose kernel efficiency of a block_r × block_c tile with w warps at rows × cols."""
    pr, pc = math.ceil(rows / br), math.ceil(cols / bc)
    util = rows * cols / (pr * br * pc * bc)
    ept = br * bc / (32 * w)
    return 0.95 * util * (0.5 + 0.5 * _waves(pr * pc, 4)) / (1 + 0.15 * abs(math.log2(ept / 16)))


def synthetic_time(op: str, impl: str, shape: dict, config: dict) -> float:
    """The made-up H200-like time (µs, before noise) of one call."""
    if op in ("compose", "compose_train"):
        rows, cols = shape["rows"], shape["cols"]
        n = rows * cols
        if op == "compose":
            if impl == "eager":
                return 40 + 22 * n / BW
            return 9 + 0.3 * math.log2(config["num_warps"]) + 6 * n / (BW * _tile_eff(rows, cols, **_rcw(config)))
        if impl == "eager":
            return 200 + 52 * n / BW
        f, b = config["fwd"], config["bwd"]
        eff_b = _tile_eff(math.ceil(rows / b["row_iters"]), cols, b["block_r"], b["block_c"], b["num_warps"])
        return 230 + 6 * n / (BW * _tile_eff(rows, cols, **_rcw(f))) + 10 * n / (BW * min(1.0, 1.2 * eff_b))
    o, i, r = shape["d_out"], shape["d_in"], shape["r"]
    w_bytes, gemm = 2 * o * i, 2 * o * i * r
    if impl == "dense":
        return 35 + 4 * w_bytes / BW + gemm / (0.7 * PEAK)
    if impl == "factored_torch":
        return 150 + 3 * w_bytes / BW + gemm / (0.45 * PEAK) + 2 * r * r * (i + o) / (0.3 * PEAK)
    bm, bn, sk, st = config["block_m"], config["block_n"], config["split_k"], config["num_stages"]
    tiles_n = math.ceil(r / bn)
    n_util = r / (tiles_n * bn)
    programs = math.ceil(o / bm) * tiles_n * sk
    eff = 0.8 * n_util * (0.4 + 0.6 * _waves(programs, 1)) * (1.0 if st == 4 else 0.93) * (1 - 0.03 * (sk - 1))
    return 45 + 8 * sk + max(w_bytes * tiles_n / (BW * 0.9), gemm / (PEAK * eff))


def _rcw(c: dict) -> dict:
    return {"br": c["block_r"], "bc": c["block_c"], "w": c["num_warps"]}


def synthetic_trials(op: str, seed: int = 0) -> list[TrialRow]:
    """Every implementation × registry config × default-set shape of ``op``, timed by :func:`synthetic_time` with
    3 % log-normal noise (compose_train: stage 1, then stage 2 at the best stage-1 forward, like the profiler)."""
    rng = np.random.default_rng(seed)
    now = datetime.now(timezone.utc)
    out = []

    def row(impl: str, shape: dict, config: dict) -> TrialRow:
        us = synthetic_time(op, impl, shape, config) * math.exp(rng.normal(0, 0.03))
        return TrialRow(1, "NVIDIA H200", op, impl, "v1", shape, "bf16", config, "ok", us, us, us, 10, None, None, now)

    for shape in default_shapes()[op]:
        for impl in registry()[op]:
            rows = [row(impl.name, shape, c) for c in impl.configs(shape)]
            out += rows
            if op == "compose_train" and impl.name == "triton":
                best = min(rows, key=lambda t: t.median_us).config["fwd"]
                seen = {json.dumps(t.config, sort_keys=True) for t in rows}
                out += [
                    row("triton", shape, c) for c in train_bwd_stage(best) if json.dumps(c, sort_keys=True) not in seen
                ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    harness.add_flags(ap, out_default=str(Path(__file__).parent / "results" / "costmodel-estimators.json"))
    args = ap.parse_args()
    rec = harness.start(__file__, args)
    with TuningDB.open(str(CACHE), readonly=True) as db:
        h200 = db.trials(status="ok")
    gpus = {"h200": h200[0].gpu_name if h200 else "NVIDIA H200", "synthetic": None}
    sets = {"h200": {op: h200 for op in ("norm", "compose", "compose_train")}}
    sets["synthetic"] = {op: synthetic_trials(op, args.seed) for op in ("norm", "compose", "compose_train")}
    results = []
    print(
        f"{'data':<10} {'op':<14} {'estimator':<13} {'shapes':>6} | model top1 (impl) geo / max | paired geo / max "
        "| crossover top1 (impl) geo / max (excluded) | s"
    )
    for name, per_op in sets.items():
        for op, trials in per_op.items():
            for est in args.estimators.split(","):
                t0 = time.perf_counter()
                cv = cross_validate(trials, op, "bf16", estimator=est, seed=args.seed)
                dt = time.perf_counter() - t0
                m, p, x = cv.model, cv.model_paired, cv.crossover
                results.append({"data": name, "op": op, "estimator": est, "seconds": round(dt, 2), **cv.to_json()})
                results[-1].pop("shapes")
                figures = {"shapes": m.n_shapes, "seconds": dt}
                for tag, r in (("model", m), ("paired", p), ("crossover", x)):
                    figures |= {f"{tag}_regret_geomean": r.regret_geomean, f"{tag}_regret_max": r.regret_max}
                    if tag != "paired":
                        figures |= {f"{tag}_top1": r.top1, f"{tag}_impl_top1": r.impl_top1}
                figures["crossover_excluded"] = x.excluded
                rec.record({"data": name, "op": op, "dtype": "bf16"}, figures, item=est, gpu=gpus[name])
                print(
                    f"{name:<10} {op:<14} {est:<13} {m.n_shapes:>6} | {m.top1:.2f} ({m.impl_top1:.2f}) "
                    f"{m.regret_geomean:.3f} / {m.regret_max:.3f} | {p.regret_geomean:.3f} / {p.regret_max:.3f} | "
                    f"{x.top1:.2f} ({x.impl_top1:.2f}) {x.regret_geomean:.3f} / {x.regret_max:.3f} ({x.excluded}) "
                    f"| {dt:.1f}"
                )
    harness.write_json(args.out, results)
    print(f"wrote {args.out}; {rec.summary()}")


if __name__ == "__main__":
    main()
