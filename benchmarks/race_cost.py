"""What the first-use race costs a training process (CUDA): the first call at shapes the shipped cache has not
measured, which races the model's 3-config shortlist on the call's own inputs, against a later call.

* ``--op norm``: the first ``factored_norm`` call at each shape (one race per shape).
* ``--op compose_train``: the first ``dora_compose_train`` forward at each shape (the race times forward + backward
  of each shortlisted config); shapes come in pairs of token counts of one decision-table cell, so the second of a
  pair shows the cell's shared winner (no race).

For each shape: the wall time of the first call (compiling or loading the shortlisted kernels, the timer's set-up
and the timed calls), of the second call (a memoised plan), the configs raced and their times, and the config kept.
Run it twice in a row: the first run compiles (empty Triton cache), the second loads the compiled kernels from
Triton's disk cache, as a restarted training job would::

    python3 benchmarks/race_cost.py --op norm --out benchmarks/results/h200-race-cost.json

Timing: the harness's host timer on one call (``harness.wall_us``: synchronised before and after): a first use is a
one-off event that includes compiling and racing, so wall time, host included, is what training pays. Writes
``--out`` and one result row per shape (the harness, ``benchmarks/README.md``: item ``first_use``, shape op, dims,
dtype and the plan's source; figures the first and second call's ms and the shortlist's size).
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

import harness
import torch

from dora_tune.dispatch import runtime
from dora_tune.kernels import dora_compose_train, factored_norm
from dora_tune.tuning.shapes import OP_SHAPE_KEYS
from dora_tune.tuning.trials import make_inputs

#: unmeasured shapes: norm — projections of real models (Llama-2-7B / 13B, Mixtral experts) at common ranks;
#: compose_train — token counts the default set lacks (pairs within one table cell) at projection widths
SHAPES = {
    "norm": [
        (4096, 11008, 64),
        (11008, 4096, 64),
        (5120, 13824, 16),
        (13824, 5120, 128),
        (14336, 4096, 96),
        (4096, 4096, 48),
    ],
    "compose_train": [
        (3000, 4096),
        (3100, 4096),
        (3000, 14336),
        (3100, 14336),
        (20000, 1024),
        (21000, 1024),
        (700, 11008),
        (650, 11008),
    ],
}


def _call(op: str, x: dict) -> None:
    if op == "norm":
        factored_norm(x["W"], x["A"], x["B"], x["s"])
    else:
        dora_compose_train(x["lora"], x["base"], x["m"], x["n"], x["s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=sorted(SHAPES), default="norm")
    harness.add_flags(ap, out_required=True, out_help="JSON path", device="cuda", dtype="bf16", dtype_choices=None)
    args = harness.resolve(ap.parse_args(), ap)
    rec = harness.start(__file__, args)
    device = args.device  # cuda:N, as the kernels key their plans (tensor.device)
    dispatcher = runtime.Dispatcher(force_env="", race=True)  # the default user DB (none) + the shipped cache
    runtime.reset_default_dispatcher(dispatcher)
    rows = []
    for dims in SHAPES[args.op]:
        shape = dict(zip(OP_SHAPE_KEYS[args.op], dims, strict=True))
        x = make_inputs(args.op, shape, args.dtype, device, seed=args.seed)
        if args.op == "compose_train":  # a DoRA layer's magnitude and (detached) norm in g's place
            x["m"], x["n"] = x["g"].float().requires_grad_(), torch.ones_like(x["g"], dtype=torch.float32)
        plan = dispatcher.plan_key(args.op, dims, args.dtype, device)
        times = [harness.wall_us(lambda x=x: _call(args.op, x), device) / 1e3 for _ in range(2)]
        kept = dispatcher.plan_key(args.op, dims, args.dtype, device)
        row = {
            "shape": list(dims),
            "source": plan.source,
            "raced": len(plan.race),
            "first_call_ms": times[0],
            "second_call_ms": times[1],
            "decision": plan.config.as_dict() if plan.config else None,
            "kept": kept.config.as_dict() if kept.config else None,
            "detail": kept.detail,
        }
        rows.append(row)
        figures = {"first_call_ms": times[0], "second_call_ms": times[1], "raced": len(plan.race)}
        rec.record({"op": args.op, **shape, "dtype": args.dtype, "plan_source": plan.source}, figures, item="first_use")
        print(
            f"{args.op} {dims}: {plan.source}, {len(plan.race)} in the shortlist, first call {times[0]:.1f} ms, "
            f"second {times[1]:.2f} ms; {kept.detail}",
            flush=True,
        )
    out = {
        "date": datetime.now(timezone.utc).isoformat(),
        "gpu": torch.cuda.get_device_name(device),
        "op": args.op,
        "rows": rows,
    }
    harness.write_json(args.out, out)
    print(f"wrote {args.out}; {rec.summary()}")


if __name__ == "__main__":
    main()
