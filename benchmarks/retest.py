"""Retest regret: how well one profiling run's choices hold up on another run of the same trials.

For every shape measured (ok) in both databases with at least 3 common (implementation, config) pairs, the pair
fastest in ``A`` is scored by its time in ``B``: regret = B(pair) ÷ the fastest of the common pairs in ``B``. The
geomean / max per op is the floor under any model's regret on data timed like this. Used on the two discarded
do_bench-timed H200 sweeps (docs/timing.md); runs on any machine:

    python3 benchmarks/retest.py A.sqlite B.sqlite [--out benchmarks/results/h200-retest-do_bench.json]

Nothing is timed (the databases hold the times). Writes ``--out`` when given, and always one result row per op and
subset (the harness, ``benchmarks/README.md``: shape op, dtype, subset and the two databases' file names; figures
shapes, regret geomean and max), filed under the GPU that measured ``A``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import harness

from dora_tune.autotune_db import TuningDB, canonical_json


def load(path: str, dtype: str, gpus: set[str] | None = None) -> dict[tuple[str, str], dict[tuple[str, str], float]]:
    """``{(op, shape json): {(impl, config json): median µs}}`` of the ok trials of ``dtype`` (their GPU names
    added to ``gpus``)."""
    out: dict[tuple[str, str], dict[tuple[str, str], float]] = defaultdict(dict)
    with TuningDB.open(path, readonly=True) as db:
        for t in db.trials(dtype=dtype, status="ok"):
            out[(t.op, canonical_json(t.shape))][(t.impl, canonical_json(t.config))] = t.median_us
            if gpus is not None:
                gpus.add(t.gpu_name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    harness.add_flags(ap, out_help="JSON path (default: none written)", dtype="bf16", dtype_choices=None, seed=None)
    args = ap.parse_args()
    rec = harness.start(__file__, args)
    gpus: set[str] = set()
    a, b = load(args.a, args.dtype, gpus), load(args.b, args.dtype)
    gpu = sorted(gpus)[0] if len(gpus) == 1 else None  # the GPU of A's trials (none: several, or no trials)
    res: dict[str, dict] = {}
    for op in ("norm", "compose", "compose_train"):
        regrets = {"all": [], "best_lt_20us": [], "best_ge_20us": []}
        for key in a.keys() & b.keys():
            common = a[key].keys() & b[key].keys()
            if key[0] != op or len(common) < 3:
                continue
            pick = min(sorted(common), key=lambda c: a[key][c])  # ties (timer resolution) broken by name
            best = min(b[key][c] for c in common)
            r = b[key][pick] / best
            regrets["all"].append(r)
            regrets["best_lt_20us" if best < 20 else "best_ge_20us"].append(r)
        res[op] = {
            k: {
                "n_shapes": len(v),
                "regret_geomean": round(math.exp(sum(map(math.log, v)) / len(v)), 4),
                "regret_max": round(max(v), 4),
            }
            if v
            else {"n_shapes": 0}
            for k, v in regrets.items()
        }
        for subset, figures in res[op].items():
            shape = {"op": op, "dtype": args.dtype, "subset": subset, "a": Path(args.a).name, "b": Path(args.b).name}
            rec.record(shape, figures, gpu=gpu)
        print(op, json.dumps(res[op]))
    if args.out:
        harness.write_json(args.out, {"a": args.a, "b": args.b, "dtype": args.dtype, "ops": res})
        print(f"wrote {args.out}")
    print(rec.summary())


if __name__ == "__main__":
    main()
