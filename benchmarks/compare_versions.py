"""Compare two sweeps of one implementation, per shape: the fastest measured config before and after a kernel change.

Reads two tuning databases (each implementation at its newest version there, as ``dora-tune fit`` does), pairs their
shapes, and writes per shape the best time of each, their ratio and — for the norm — the best time of each
``split_k`` relative to that side's best (how much a wrong split costs), plus the ratio's geomean / min / max per
rank. CPU only; the GPU work is the two ``dora-tune profile`` runs::

    python3 benchmarks/compare_versions.py --before old.sqlite --after new.sqlite --op norm --impl triton \\
        --out benchmarks/results/h200-norm-epilogue.json

Both sweeps should come from the same GPU model; from two machines, expect ~2–4 % between them on unchanged code.
Nothing is timed (the databases hold the times). Writes ``--out`` and one result row per rank (or last shape key) and
one for all shapes (the harness, ``benchmarks/README.md``: shape op, implementation, dtype, both versions and the
group; figures shapes, after ÷ before geomean, min, max), filed under the GPU of the ``--after`` sweep.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from datetime import datetime, timezone

import harness

from dora_tune.autotune_db import TuningDB
from dora_tune.tuning.data import prepare_trials
from dora_tune.tuning.shapes import OP_SHAPE_KEYS


def sweep(path: str, gpu: str, op: str, impl: str, dtype: str) -> tuple[str, dict[tuple[int, ...], dict], str]:
    """(version, shape → {"best": µs, "by_split": {split_k: µs}}, GPU name) of ``impl``'s newest version in
    ``path``."""
    with TuningDB.open(path, readonly=True) as db:
        trials = db.trials(gpu=gpu, op=op, impl=impl)
    data = prepare_trials(trials, op, dtype, None)
    out: dict[tuple[int, ...], dict] = {}
    for t in data.rows:
        key = tuple(int(t.shape[k]) for k in OP_SHAPE_KEYS[op])
        e = out.setdefault(key, {"best": math.inf, "by_split": {}})
        e["best"] = min(e["best"], t.median_us)
        split = t.config.get("split_k")
        if split is not None:
            e["by_split"][split] = min(e["by_split"].get(split, math.inf), t.median_us)
    return data.versions[impl], out, trials[0].gpu_name if trials else gpu


def _geo(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--op", default="norm", choices=sorted(OP_SHAPE_KEYS))
    ap.add_argument("--impl", default="triton")
    ap.add_argument("--gpu", default="h200")
    harness.add_flags(
        ap,
        out_required=True,
        out_help="JSON path",
        dtype="bf16",
        dtype_choices=None,
        dtype_help="the trials' dtype",
        seed=None,
    )
    args = ap.parse_args()
    rec = harness.start(__file__, args)
    v0, before, _ = sweep(args.before, args.gpu, args.op, args.impl, args.dtype)
    v1, after, gpu_name = sweep(args.after, args.gpu, args.op, args.impl, args.dtype)
    shapes = sorted(set(before) & set(after))
    if not shapes:
        sys.exit("no shape is in both databases")
    rows, by_group = [], defaultdict(list)
    for key in shapes:
        b, a = before[key], after[key]
        ratio = a["best"] / b["best"]
        rows.append(
            {
                "shape": dict(zip(OP_SHAPE_KEYS[args.op], key, strict=True)),
                "before_us": b["best"],
                "after_us": a["best"],
                "after_over_before": ratio,
                "before_split_regret": {s: v / b["best"] for s, v in sorted(b["by_split"].items())},
                "after_split_regret": {s: v / a["best"] for s, v in sorted(a["by_split"].items())},
            }
        )
        by_group[key[-1]].append(ratio)
    ratios = [r["after_over_before"] for r in rows]
    summary = {
        "shapes": len(rows),
        "after_over_before": {"geomean": _geo(ratios), "min": min(ratios), "max": max(ratios)},
        f"by_{OP_SHAPE_KEYS[args.op][-1]}": {
            str(g): {"n": len(v), "geomean": _geo(v), "min": min(v), "max": max(v)} for g, v in sorted(by_group.items())
        },
    }
    out = {
        "date": datetime.now(timezone.utc).isoformat(),
        "op": args.op,
        "impl": args.impl,
        "before": {"db": args.before, "version": v0},
        "after": {"db": args.after, "version": v1},
        "summary": summary,
        "rows": rows,
    }
    harness.write_json(args.out, out)
    base = {"op": args.op, "impl": args.impl, "dtype": args.dtype, "before_version": v0, "after_version": v1}
    group = OP_SHAPE_KEYS[args.op][-1]
    rec.record({**base, group: "all"}, {"shapes": len(rows), **summary["after_over_before"]}, gpu=gpu_name)
    for g, v in summary[f"by_{group}"].items():
        figures = {"shapes": v["n"], "geomean": v["geomean"], "min": v["min"], "max": v["max"]}
        rec.record({**base, group: int(g)}, figures, gpu=gpu_name)
    s = summary["after_over_before"]
    print(
        f"{len(rows)} shapes, after / before best time: geomean {s['geomean']:.3f}, min {s['min']:.3f}, "
        f"max {s['max']:.3f}"
    )
    for g, v in summary[f"by_{OP_SHAPE_KEYS[args.op][-1]}"].items():
        print(
            f"  {OP_SHAPE_KEYS[args.op][-1]} {g:>6}: n {v['n']:3d}  geomean {v['geomean']:.3f}  "
            f"min {v['min']:.3f}  max {v['max']:.3f}"
        )
    print(f"wrote {args.out}; {rec.summary()}")


if __name__ == "__main__":
    main()
