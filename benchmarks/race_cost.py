"""What the norm's first-use race costs a training process (CUDA): the first ``factored_norm`` call at shapes the
shipped cache has not measured, which races the model's 3-config shortlist on its own inputs, against a later call.

For each shape: the wall time of the first call (compiling or loading the shortlisted kernels, the timer's set-up
and the timed calls), of the second call (a memoised plan), the configs raced and their times, and the config kept.
Run it twice in a row: the first run compiles (empty Triton cache), the second loads the compiled kernels from
Triton's disk cache, as a restarted training job would::

    python3 benchmarks/race_cost.py --out benchmarks/results/h200-race-cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dora_tune.dispatch import runtime
from dora_tune.dispatch.registry import make_inputs
from dora_tune.kernels import factored_norm

#: unmeasured norm shapes of real models (Llama-2-7B / 13B projections, Mixtral experts) at common ranks
SHAPES = [(4096, 11008, 64), (11008, 4096, 64), (5120, 13824, 16), (13824, 5120, 128), (14336, 4096, 96),
          (4096, 4096, 48)]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())  # as the kernels key their plans (tensor.device)
    dispatcher = runtime.Dispatcher(force_env="", race=True)  # the default user DB (none) + the shipped cache
    runtime.reset_default_dispatcher(dispatcher)
    rows = []
    for d_out, d_in, r in SHAPES:
        x = make_inputs("norm", {"d_out": d_out, "d_in": d_in, "r": r}, args.dtype, device)
        plan = dispatcher.plan_key("norm", (d_out, d_in, r), args.dtype, device)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            factored_norm(x["W"], x["A"], x["B"], x["s"])
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        kept = dispatcher.plan_key("norm", (d_out, d_in, r), args.dtype, device)
        row = {"shape": [d_out, d_in, r], "source": plan.source, "raced": len(plan.race),
               "first_call_ms": times[0], "second_call_ms": times[1],
               "decision": plan.config.as_dict() if plan.config else None,
               "kept": kept.config.as_dict() if kept.config else None, "detail": kept.detail}  # fmt: skip
        rows.append(row)
        print(f"{d_out}x{d_in} r{r}: {plan.source}, {len(plan.race)} raced, first call {times[0]:.1f} ms, "
              f"second {times[1]:.2f} ms; {kept.detail}", flush=True)  # fmt: skip
    out = {"date": datetime.now(timezone.utc).isoformat(), "gpu": torch.cuda.get_device_name(device), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
