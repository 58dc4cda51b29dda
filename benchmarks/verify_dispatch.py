"""Check the learned dispatch on shapes it never saw: regret of the model, the fixed crossover and the dispatcher.

The verification shapes (``benchmarks/verify_shapes.json``: 10 norm shapes and 10 rows×cols shapes for compose and
compose_train, none in the profiled sets) are swept by the profiler into their own database, so the best
implementation+config of each is measured. This script then asks, for every shape, what

* the **model** (the decision table ``dora-tune fit`` stored in the main database) picks,
* the **crossover** (the paper's fixed rule, :func:`dora_tune.tuning.evaluation.crossover_choice`) picks,
* the **dispatcher** (:class:`dora_tune.dispatch.runtime.Dispatcher` on the main database, i.e. what training code
  runs: the model where its cross-validation beats the crossover, else the crossover) picks,

and reports each pick's regret = its measured time ÷ the best measured time of that shape (geomean and max per op).
For the ops that race their shortlist at first use (``RACE_OPS``: the norm, compose_train) it adds

* **race_ideal** — the fastest measured config of the dispatcher's shortlist (a race without timing noise), and,
  with ``--race`` on the GPU,
* **race** — what :meth:`Dispatcher.settle` actually keeps after timing the shortlist on fresh inputs of the shape
  (its pick is scored by the verification sweep's time for that config, like every other pick; compose_train races
  once per decision-table cell, so a shape whose cell another shape raced first takes that winner, as in training).

On the GPU, ``--measure`` first times the picks the sweep did not cover (compose_train's two-stage sweep measures
only part of its forward × backward space; the shortlists included), each shape's together with its best trial, and
records them in the
verification database (the sweep's own confirmation stage has re-timed each shape's fastest trials; an older
verification database gets that from ``--confirm-only``). The verification database is not committed; these two
commands regenerate it on a GPU and score the shipped H200 tables on it (``docs/dispatch-and-race.md``, "Held-out
shapes"; for another GPU pass its own tuning database as ``--db``)::

    dora-tune profile --gpu auto --shapes benchmarks/verify_shapes.json --no-progress --db verify.sqlite
    python3 benchmarks/verify_dispatch.py --db dora_tune/caches/nvidia-h200.sqlite --verify verify.sqlite \\
        --measure --race

Without ``--measure`` (any machine) it only reads the two databases and writes
``<gpu-slug>-verify-dispatch.json`` (``$OUT/`` on the device machine, else ``benchmarks/results/``; ``--out``).
Either way it appends one result row per op and chooser (the harness, ``benchmarks/README.md``: item the chooser,
shape op, dtype, the two databases' file names and ``--shipped``; figures shapes, regret geomean and max), filed
under the GPU the verification database measured.
Timing (``--measure``): the harness's interleaved GPU times (``harness.call_times_us``, the profiler's confirmation
method); ``--race`` runs the dispatcher's own race. ``--device`` (default cuda when available) is where they run;
``--seed`` seeds the inputs they time.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import harness

from dora_tune.autotune_db import TuningDB, canonical_json, gpu_slug
from dora_tune.dispatch.decisions import DecisionTable
from dora_tune.dispatch.registry import registry
from dora_tune.dispatch.runtime import Dispatcher
from dora_tune.tuning.evaluation import crossover_choice

WHO = ("model", "crossover", "dispatcher")


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    return config.as_dict() if hasattr(config, "as_dict") else dict(config)


@functools.cache
def _table(db_path: str, gpu: str, op: str, dtype: str) -> DecisionTable | None:
    with TuningDB.open(db_path, readonly=True) as db:
        rows = db.models(gpu=gpu, op=op, dtype=dtype)
    return DecisionTable.from_json(rows[0].payload) if rows else None


@functools.cache
def _dispatcher(db_path: str, shipped: bool) -> Dispatcher:
    return Dispatcher(db_path, use_shipped=shipped, force_env="")


def picks(db_path: str, gpu: str, dtype: str, op: str, shape: dict[str, int], shipped: bool = False) -> dict[str, Any]:
    """What each chooser picks for ``shape``: ``{who: (impl, config dict)}`` for each of :data:`WHO` (no ``model``
    entry without a table), plus ``"dispatcher_source"``: the dispatcher's source (measured, model, heuristic)."""
    out: dict[str, Any] = {"crossover": crossover_choice(op, shape)}
    table = _table(db_path, gpu, op, dtype)
    if table is not None:
        out["model"] = table.lookup(shape)
    plan = _dispatcher(db_path, shipped).plan_for_gpu(table.gpu_name if table else gpu, op, shape, dtype)
    out["dispatcher"] = (plan.impl, _config_dict(plan.config))
    out["dispatcher_source"] = plan.source
    if plan.race:
        out["shortlist"] = [(plan.impl, _config_dict(c)) for c in plan.race]
    return out


def _norm_run(kernel: Any, x: dict[str, Any], cfg: Any) -> Any:
    return kernel(x["W"], x["A"], x["B"], x["s"], cfg)


def _race_runner(op: str, x: dict[str, Any]) -> Any:
    """The runner the kernels hand :meth:`Dispatcher.settle` for ``op`` on inputs ``x`` (:func:`make_inputs`)."""
    if op == "norm":
        from dora_tune.kernels._norm_triton import factored_norm_triton

        return functools.partial(_norm_run, factored_norm_triton, x)
    from dora_tune.kernels.compose_train import race_step

    return race_step(x["lora"], x["base"], x["g"], x["s"])


def race_runs(
    db_path: str,
    verify_path: str,
    gpu: str,
    dtype: str,
    shipped: bool = False,
    *,
    device: Any = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """On the GPU (``device``, default the current CUDA device): for every verification shape of an op that races,
    the config :meth:`Dispatcher.settle` keeps after timing the shortlist on fresh inputs (from ``seed``), and its
    detail line (the race's times). Keyed by "op shape-json"."""
    import torch

    from dora_tune.dispatch.decisions import RACE_OPS
    from dora_tune.tuning.shapes import OP_SHAPE_KEYS
    from dora_tune.tuning.trials import make_inputs

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())  # as the kernels key their plans (tensor.device)
    dispatcher = Dispatcher(db_path, use_shipped=shipped, force_env="", race=True)
    out = {}
    for op, s_json in sorted(measured(verify_path, gpu, dtype)):
        if op not in RACE_OPS:
            continue
        shape = json.loads(s_json)
        x = make_inputs(op, shape, dtype, device, seed=seed)
        dims = tuple(shape[k] for k in OP_SHAPE_KEYS[op])
        plan = dispatcher.plan_key(op, dims, dtype, device)
        settled = dispatcher.settle(op, dims, dtype, device, plan, _race_runner(op, x))
        out[f"{op} {s_json}"] = {
            "impl": settled.impl,
            "config": _config_dict(settled.config),
            "source": plan.source,
            "shortlist": len(plan.race),
            "detail": settled.detail,
        }
        print(f"  race {op} {dims}: {settled.detail}", flush=True)
    return out


def measured(verify_path: str, gpu: str, dtype: str) -> dict[tuple[str, str], dict[tuple[str, str], float]]:
    """``{(op, shape json): {(impl, config json): median µs}}`` of the ok trials."""
    out: dict[tuple[str, str], dict[tuple[str, str], float]] = defaultdict(dict)
    with TuningDB.open(verify_path, readonly=True) as db:
        for t in db.trials(gpu=gpu, dtype=dtype, status="ok"):
            out[(t.op, canonical_json(t.shape))][(t.impl, canonical_json(t.config))] = t.median_us
    return out


def verify_gpu(verify_path: str, gpu: str, dtype: str) -> str:
    """The name of the GPU whose trials the verification database holds (``gpu`` itself if it holds none)."""
    with TuningDB.open(verify_path, readonly=True) as db:
        trials = db.trials(gpu=gpu, dtype=dtype, status="ok")
    return trials[0].gpu_name if trials else gpu


def measure_missing(
    db_path: str,
    verify_path: str,
    gpu: str,
    dtype: str,
    shipped: bool = False,
    *,
    device: Any = None,
    seed: int = 0,
) -> int:
    """Time every pick the verification sweep lacks (CUDA: ``device``, default ``cuda``) and record it; returns how
    many were measured.

    Each shape's missing picks are timed together with the shape's fastest measured trial — interleaved,
    :data:`~dora_tune.tuning.profiler.CONFIRM_REPS` calls each, as the profiler's confirmation stage does — and
    both are recorded, so that a pick and the best it is scored against come from the same machine and minutes (two
    machines of the pool can differ by a few per cent on calls of a few µs; docs/dispatch-and-race.md).
    """
    import torch

    from dora_tune.tuning.env import environment
    from dora_tune.tuning.profiler import CONFIRM_REPS, trial_result
    from dora_tune.tuning.trials import make_inputs

    device = torch.device(device if device is not None else "cuda")
    env = environment(device)
    have = measured(verify_path, gpu, dtype)
    impls = {(op, i.name): i for op, v in registry().items() for i in v}
    n = 0
    with TuningDB.open(verify_path) as vdb:
        for op, s_json in sorted(have):
            shape = json.loads(s_json)
            chosen = picks(db_path, gpu, dtype, op, shape, shipped)
            missing = {(i, canonical_json(c)) for i, c in (chosen[w] for w in WHO if w in chosen)}
            missing |= {(i, canonical_json(c)) for i, c in chosen.get("shortlist", ())}
            missing -= set(have[(op, s_json)])
            if not missing:
                continue
            best = min(have[(op, s_json)], key=have[(op, s_json)].get)
            pairs = [best, *sorted(missing)]
            inputs = make_inputs(op, shape, dtype, device, seed=seed)
            fns = [impls[(op, name)].runner(inputs, json.loads(cfg)) for name, cfg in pairs]
            peak = {
                (t.impl, canonical_json(t.config)): t.peak_mem_bytes
                for t in vdb.trials(gpu=gpu, op=op, dtype=dtype, shape=shape)
            }
            for (name, cfg), ts in zip(pairs, harness.call_times_us(fns, device, reps=CONFIRM_REPS), strict=True):
                impl, res = impls[(op, name)], trial_result(ts, peak.get((name, cfg)))
                vdb.record_trial(env, op, impl.name, impl.version, shape, dtype, json.loads(cfg), res)
                have[(op, s_json)][(name, cfg)] = res.median_us
            n += len(missing)
    return n


def report(
    db_path: str,
    verify_path: str,
    gpu: str,
    dtype: str,
    races: dict[str, dict[str, Any]] | None = None,
    shipped: bool = False,
) -> dict[str, Any]:
    """Per op and chooser: regret geomean and max over the verification shapes, and every shape's detail
    (``races``: :func:`race_runs`' output, scored as the "race" chooser)."""
    times = measured(verify_path, gpu, dtype)
    result: dict[str, Any] = {"shapes": [], "summary": {}, "races": races or {}}
    per: dict[tuple[str, str], list[float]] = defaultdict(list)
    for op, s_json in sorted(times, key=lambda k: (k[0], json.loads(k[1]).get("cols", 0))):
        shape = json.loads(s_json)
        t = times[(op, s_json)]
        best_key = min(t, key=t.get)
        row: dict[str, Any] = {"op": op, "shape": shape, "best": [best_key[0], json.loads(best_key[1]), t[best_key]]}
        chosen = picks(db_path, gpu, dtype, op, shape, shipped)
        row["dispatcher_source"] = chosen.pop("dispatcher_source")
        shortlist = chosen.pop("shortlist", None)
        if shortlist:
            timed = [(t[key], pair) for pair in shortlist if (key := (pair[0], canonical_json(pair[1]))) in t]
            if len(timed) == len(shortlist):
                chosen["race_ideal"] = min(timed, key=lambda p: p[0])[1]
        run = (races or {}).get(f"{op} {s_json}")
        if run is not None:
            chosen["race"] = (run["impl"], run["config"])
        for who, (impl, cfg) in chosen.items():
            us = t.get((impl, canonical_json(cfg)))
            row[who] = {"impl": impl, "config": cfg, "us": us, "regret": None if us is None else us / t[best_key]}
            if us is not None:
                per[(op, who)].append(us / t[best_key])
        result["shapes"].append(row)
    for (op, who), regrets in sorted(per.items()):
        geo = math.exp(sum(map(math.log, regrets)) / len(regrets))
        result["summary"].setdefault(op, {})[who] = {
            "n_shapes": len(regrets),
            "regret_geomean": round(geo, 4),
            "regret_max": round(max(regrets), 4),
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", required=True, help="main tuning DB holding the fitted models (dora-tune fit)")
    ap.add_argument("--verify", required=True, help="DB of the verification sweep")
    ap.add_argument("--gpu", default="NVIDIA H200")
    ap.add_argument("--measure", action="store_true", help="first time the picks the sweep lacks (needs CUDA)")
    ap.add_argument(
        "--race", action="store_true", help="run the dispatcher's race at each shape of a racing op (needs CUDA)"
    )
    shipped_help = "the dispatcher also reads the shipped caches (transfer from a same-architecture GPU's tables)"
    ap.add_argument("--shipped", action="store_true", help=shipped_help)
    harness.add_flags(
        ap,
        out_help="JSON output (default $OUT/<gpu-slug>-verify-dispatch.json on the device machine, else "
        "benchmarks/results/<gpu-slug>-verify-dispatch.json; the slug of --gpu)",
        device="auto",
        dtype="bf16",
        dtype_choices=None,
        dtype_help="the trials' dtype (default %(default)s)",
    )
    args = harness.resolve(ap.parse_args(), ap)
    if args.out is None:
        args.out = harness.default_out(f"{gpu_slug(args.gpu)}-verify-dispatch.json")
    if (args.measure or args.race) and args.device.type != "cuda":
        ap.error("--measure and --race need a CUDA device")
    rec = harness.start(__file__, args)
    on = {"device": args.device, "seed": args.seed}
    if args.measure:
        n = measure_missing(args.db, args.verify, args.gpu, args.dtype, args.shipped, **on)
        print(f"measured {n} missing picks")
    races = race_runs(args.db, args.verify, args.gpu, args.dtype, args.shipped, **on) if args.race else None
    res = report(args.db, args.verify, args.gpu, args.dtype, races, args.shipped)
    for op, by in res["summary"].items():
        cells = "  ".join(
            f"{w} {v['regret_geomean']:.3f}/{v['regret_max']:.3f} (n={v['n_shapes']})" for w, v in sorted(by.items())
        )
        print(f"{op:14s} regret geomean/max: {cells}")
    for row in res["shapes"]:
        dims = " ".join(f"{k}={v}" for k, v in row["shape"].items())
        regs = " ".join(
            f"{w}={row[w]['impl']}:{row[w]['regret']:.2f}" if row.get(w) and row[w]["regret"] else f"{w}=unmeasured"
            for w in (*WHO, "race_ideal", "race")
            if w in row or w in WHO
        )
        print(f"  {row['op']:14s} {dims:28s} best {row['best'][0]} {row['best'][2]:8.1f} µs  {regs}")
    gpu_name = verify_gpu(args.verify, args.gpu, args.dtype)
    base = {"dtype": args.dtype, "db": Path(args.db).name, "verify": Path(args.verify).name, "shipped": args.shipped}
    for op, by in res["summary"].items():
        for who, figures in by.items():
            rec.record({"op": op, **base}, figures, item=who, gpu=gpu_name)
    harness.write_json(args.out, res)
    print(f"wrote {args.out}; {rec.summary()}")


if __name__ == "__main__":
    main()
