"""Host-side cost of run-time dispatch (no GPU needed): the memoised hot lookup and the first-use load.

The first use is timed twice: in this process (the database read, after the imports and with earlier loads having
warmed SQLite), and in fresh processes that have imported only torch and dora_tune — as training code meets it: the
first dispatched plan, imports of the dispatch modules included (``fresh_*``, with the heavy modules it imported).

Run: python benchmarks/dispatch.py [--trials 10000] [--shipped "NVIDIA H200"] [--out FILE]  — writes
benchmarks/results/dispatch.json unless ``--out`` says otherwise, and result rows (the harness,
``benchmarks/README.md``): item ``synthetic`` (shape: trials) with the load and hot-path figures, and with
``--shipped`` item ``shipped`` (shape: the GPU model) with its first use. ``--shipped`` also times the first use of
the shipped cache of that GPU model (no user database), as training code on that GPU meets it.

Timing: the harness's host timer (``harness.wall_us``): a first use is one call on a fresh dispatcher (the median
of 5 such, 7 for the shipped cache), a hot path one batch of 10⁶ calls. The fresh-process figures are timed inside
the child process (``perf_counter`` around the imports and the first plan: the only clock there).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import torch

from dora_tune.autotune_db import EnvInfo, TrialResult, TuningDB
from dora_tune.dispatch.registry import registry
from dora_tune.dispatch.runtime import Dispatcher, auto

GPU = "Synthetic GPU"


def make_db(path: str, n: int) -> float:
    env = EnvInfo("cuda", GPU, "9.0", 132, 141 << 30, "1", "13.0", torch.__version__, "3.6", "0.1.0")
    impls = [i for i in registry()["compose"]]
    t0 = time.time()
    with TuningDB.open(path) as db:
        for k in range(n):
            impl = impls[k % 2]
            cfgs = impl.configs({"rows": 1, "cols": 1})
            cfg = cfgs[(k // 2) % len(cfgs)]
            shape = {"rows": 1 + (k // (2 * len(cfgs))) % 4096, "cols": 4096}
            us = 10.0 + (k % 97)
            db.record_trial(
                env, "compose", impl.name, impl.version, shape, "bf16", cfg, TrialResult("ok", us, us, us, 9)
            )
    return time.time() - t0


_FRESH = """
import sys, time
import torch, dora_tune
t0 = time.perf_counter()
from dora_tune.dispatch import Dispatcher
d = Dispatcher({db!r}, use_shipped={shipped}, force_env="")
p = d.plan_for_gpu({gpu!r}, "compose", {{"rows": 2048, "cols": 4096}}, "bf16")
ms = (time.perf_counter() - t0) * 1e3
print(ms, p.source, ",".join(m for m in ("sqlalchemy", "sklearn", "triton") if m in sys.modules) or "-")
"""


def fresh_first_plan(db: str, gpu: str, shipped: bool, runs: int = 7) -> dict:
    """The first dispatched plan in fresh processes (torch and dora_tune imported first, as this process finds
    them: the child inherits the environment): median and range, ms."""
    code = _FRESH.format(db=db, gpu=gpu, shipped=shipped)
    times, seen = [], set()
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        seen.add((out[1], out[2]))
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "source_and_heavy_imports": sorted(seen),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--shipped", default=None, help="GPU name whose shipped cache's first use to time")
    harness.add_flags(ap, out_default=str(Path(__file__).parent / "results" / "dispatch.json"), seed=None)
    args = ap.parse_args()
    rec = harness.start(__file__, args)
    cpu = torch.device("cpu")
    res: dict = {"python": sys.version.split()[0], "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "t.sqlite")
        res["db_build_s"] = make_db(path, args.trials)
        loads = []
        for _ in range(5):
            d = Dispatcher(path, use_shipped=False, force_env="")
            loads.append(harness.wall_us(lambda d=d: d._load(GPU), cpu) / 1e3)
        res["first_use_load_ms"] = sorted(loads)[len(loads) // 2]
        res["trials"] = args.trials
        res["fresh_first_plan"] = fresh_first_plan(path, GPU, shipped=False)
        d = Dispatcher(path, use_shipped=False, force_env="")
        dev = cpu
        d.plan_key("compose", (2048, 4096), "bf16", dev)
        n = 1_000_000
        res["hot_plan_key_us"] = harness.wall_us(lambda: d.plan_key("compose", (2048, 4096), "bf16", dev), cpu, calls=n)
        auto("compose", (2048, 4096), torch.bfloat16, dev)
        res["hot_auto_us"] = harness.wall_us(lambda: auto("compose", (2048, 4096), torch.bfloat16, dev), cpu, calls=n)
        # the public plan(): a shape dict or tuple, the dtype and device as users write them
        devname = "cuda" if torch.cuda.is_available() else "cpu"
        shape = {"rows": 2048, "cols": 4096}
        for label, args_ in (("dict", (shape, torch.bfloat16, devname)), ("tuple", ((2048, 4096), "bf16", devname))):
            d.plan("compose", *args_)
            t = harness.wall_us(lambda a=args_: d.plan("compose", *a), cpu, calls=n)
            res[f"hot_plan_{label}_{devname}_us"] = t
        res["dict_get_us"] = harness.wall_us(lambda: d._memo.get(("x",)), cpu, calls=n)
        if args.shipped:
            loads = []
            for _ in range(7):
                d = Dispatcher(str(Path(tmp) / "absent.sqlite"), use_shipped=True, force_env="")
                loads.append(harness.wall_us(lambda d=d: d._load(args.shipped), cpu) / 1e3)
            res["shipped_first_use_load_ms"] = sorted(loads)[len(loads) // 2]
            res["shipped_notes"] = d.explain(args.shipped)
            absent = str(Path(tmp) / "absent.sqlite")
            res["shipped_fresh_first_plan"] = fresh_first_plan(absent, args.shipped, shipped=True)
    for k, v in res.items():
        print(f"{k:22s} {v:.3f}" if isinstance(v, float) else f"{k:22s} {v}")
    fresh = {f"fresh_first_plan_{k}": v for k, v in res["fresh_first_plan"].items() if k.endswith("_ms")}
    hot = {k: v for k, v in res.items() if k.startswith(("hot_", "dict_get")) or k == "first_use_load_ms"}
    rec.record({"trials": args.trials}, {**hot, **fresh, "db_build_s": res["db_build_s"]}, item="synthetic")
    if args.shipped:
        fresh = {f"fresh_first_plan_{k}": v for k, v in res["shipped_fresh_first_plan"].items() if k.endswith("_ms")}
        figures = {"first_use_load_ms": res["shipped_first_use_load_ms"], **fresh}
        rec.record({"gpu_model": args.shipped}, figures, item="shipped")
    harness.write_json(args.out, res)
    print(f"wrote {args.out}; {rec.summary()}")


if __name__ == "__main__":
    main()
