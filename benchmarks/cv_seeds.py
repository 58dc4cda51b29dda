"""Leave-shapes-out CV regret of the cost model over several fit seeds, for one or more tuning databases (CPU only).

One seed's figures move by ~0.002 in geomean and by one shape's worth in max (the trees' randomness), so
comparisons of data or model changes use the mean over seeds. For every (database, op) it prints each seed's
geomean / max and their mean — for the ops that race (``RACE_OPS``: the norm, compose_train) also the race's (the
fastest measured of the model's shortlist: what the dispatcher runs) — and writes them to ``--out``::

    python3 benchmarks/cv_seeds.py --db before=old.sqlite --db after=dora_tune/caches/nvidia-h200.sqlite \\
        --op compose_train --op norm --seeds 3 --out /tmp/cv.json

``--seed S`` starts the fit seeds at S (seeds S … S + ``--seeds`` − 1; default 0). Nothing is timed (the ``seconds``
are the fits' bookkeeping). Writes ``--out`` and one result row per (database, op) (the harness,
``benchmarks/README.md``: shape op, dtype, database name and file, seeds; figures the means), filed under the GPU
the database measured.
"""

from __future__ import annotations

import argparse
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import harness

from dora_tune.autotune_db import TuningDB
from dora_tune.tuning import evaluation


def cv_over_seeds(path: str, gpu: str, op: str, dtype: str, seeds: int, first_seed: int = 0) -> dict:
    """Each seed's CV regret (geomean, max) of ``op`` on the database at ``path``, and the geometric mean of the
    geomeans and the mean of the maxima (``gpu_name``: the GPU the database measured)."""
    with TuningDB.open(path, readonly=True) as db:
        env = db.environments(gpu=gpu)[0].info
        trials = db.trials(gpu=gpu, op=op)
    runs = []
    for seed in range(first_seed, first_seed + seeds):
        t0 = time.time()
        r = evaluation.cross_validate(trials, op, dtype, env=env, seed=seed)
        runs.append(
            {
                "seed": seed,
                "geomean": r.model.regret_geomean,
                "max": r.model.regret_max,
                "crossover_geomean": r.crossover.regret_geomean,
                "seconds": time.time() - t0,
            }
        )
        if r.race is not None:  # the ops that race their shortlist at first use: what the dispatcher runs
            runs[-1] |= {"race_geomean": r.race.regret_geomean, "race_max": r.race.regret_max}
    out = {
        "gpu_name": env.gpu_name,
        "runs": runs,
        "mean_geomean": math.exp(sum(math.log(x["geomean"]) for x in runs) / len(runs)),
        "mean_max": sum(x["max"] for x in runs) / len(runs),
    }
    if all("race_geomean" in x for x in runs):
        out["mean_race_geomean"] = math.exp(sum(math.log(x["race_geomean"]) for x in runs) / len(runs))
        out["mean_race_max"] = sum(x["race_max"] for x in runs) / len(runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument("--op", action="append", required=True, choices=["norm", "compose", "compose_train"])
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--seeds", type=int, default=3, help="how many fit seeds (default %(default)s)")
    harness.add_flags(
        ap, out_required=True, out_help="JSON path", dtype="bf16", dtype_choices=None, dtype_help="the trials' dtype"
    )
    args = ap.parse_args()
    rec = harness.start(__file__, args)
    out: dict = {"date": datetime.now(timezone.utc).isoformat(), "seeds": args.seeds, "results": {}, "env": rec.env}
    for item in args.db:
        name, _, path = item.partition("=")
        if not path:
            ap.error(f"--db needs NAME=PATH, got {item!r}")
        for op in args.op:
            res = cv_over_seeds(path, args.gpu, op, args.dtype, args.seeds, args.seed)
            out["results"].setdefault(name, {"path": path})[op] = res
            shape = {"op": op, "dtype": args.dtype, "db": name, "file": Path(path).name, "seeds": args.seeds}
            shape |= {"first_seed": args.seed}
            figures = {k: v for k, v in res.items() if k.startswith("mean_")}
            rec.record(shape, figures, gpu=res["gpu_name"])
            per_seed = ", ".join(f"{x['geomean']:.4f} / {x['max']:.3f}" for x in res["runs"])
            race = (
                f"  race mean {res['mean_race_geomean']:.4f} / {res['mean_race_max']:.3f}"
                if "mean_race_geomean" in res
                else ""
            )
            print(
                f"{name:10s} {op:14s} {per_seed}  mean {res['mean_geomean']:.4f} / {res['mean_max']:.3f}{race}",
                flush=True,
            )
    harness.write_json(args.out, out)
    print(f"wrote {args.out}; {rec.summary()}")


if __name__ == "__main__":
    main()
