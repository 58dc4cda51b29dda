"""How good are a `dora-tune profile --quick` run's choices? Each shape's fastest trial of the quick database (its
pick), timed in a full sweep of the same GPU model: that time ÷ the full sweep's best at the shape (1.0 = the quick
run found the sweep's best). Per op and dtype: geomean, max, and how many picks the full sweep never timed (a
compose_train fwd × bwd pair the sweep's two stages did not pair).

    python3 benchmarks/quick_vs_full.py --quick h100-quick.sqlite --full h100-full.sqlite --gpu h100
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from typing import Any

import harness

from dora_tune.autotune_db import TuningDB


def _key(row: Any) -> tuple[str, str, str]:
    return row.op, json.dumps(row.shape, sort_keys=True), row.dtype


def _choice(row: Any) -> tuple[str, str]:
    return row.impl, json.dumps(row.config, sort_keys=True)


def fastest(db: TuningDB, gpu: str | None) -> dict[tuple[str, str, str], dict[tuple[str, str], float]]:
    """(op, shape, dtype) → (impl, config) → the least median time of its "ok" trials."""
    out: dict[tuple[str, str, str], dict[tuple[str, str], float]] = defaultdict(dict)
    for row in db.trials(gpu=gpu, status="ok"):
        if row.median_us is None:
            continue
        times = out[_key(row)]
        times[_choice(row)] = min(row.median_us, times.get(_choice(row), math.inf))
    return out


def compare(quick: dict, full: dict) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (op, dtype): the ratios of the quick picks' full-sweep times to the sweep's best, and the untimed count."""
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    untimed: dict[tuple[str, str], int] = defaultdict(int)
    for key, times in quick.items():
        swept = full.get(key)
        if not swept:
            continue
        pick = min(times, key=times.get)
        if pick in swept:
            ratios[key[0], key[2]].append(swept[pick] / min(swept.values()))
        else:
            untimed[key[0], key[2]] += 1
    out = {}
    for group in sorted(set(ratios) | set(untimed)):
        r = ratios.get(group, [])
        out[group] = {
            "shapes": len(r),
            "geomean": math.exp(sum(map(math.log, r)) / len(r)) if r else None,
            "max": max(r) if r else None,
            "untimed": untimed.get(group, 0),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", required=True, help="the quick run's database")
    p.add_argument("--full", required=True, help="a full sweep's database (the same GPU model)")
    p.add_argument("--gpu", default=None, help="GPU name or slug in both databases (default: every GPU)")
    harness.add_flags(p, out_default=None, out_help="JSON of the figures (default: none written)", seed=None)
    args = p.parse_args()
    quick_db, full_db = TuningDB.open(args.quick, readonly=True), TuningDB.open(args.full, readonly=True)
    try:
        found = compare(fastest(quick_db, args.gpu), fastest(full_db, args.gpu))
    finally:
        quick_db.close()
        full_db.close()
    for (op, dtype), f in found.items():
        g = "-" if f["geomean"] is None else f"{f['geomean']:.3f}"
        m = "-" if f["max"] is None else f"{f['max']:.3f}"
        head = f"{op:14s} {dtype:5s} shapes {f['shapes']:4d}"
        print(f"{head}  geomean {g}  max {m}  picks the sweep never timed {f['untimed']}")
    if args.out:
        rows = [{"op": op, "dtype": dtype, **f} for (op, dtype), f in found.items()]
        harness.write_json(args.out, {"quick": args.quick, "full": args.full, "gpu": args.gpu, "figures": rows})


if __name__ == "__main__":
    main()
