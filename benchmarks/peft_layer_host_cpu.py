"""Host cost of one tiny PEFT DoRA layer on the CPU: PEFT's own path against PEFT + dora-tune's ``enable()``.

Run (CPU, seconds): python benchmarks/peft_layer_host_cpu.py [--calls 3000]
                         [--out benchmarks/results/cpu-peft-layer-host.json]

The layer is tiny (64×64, r 4, 8 rows) so that its arithmetic costs little and what is timed is the Python and
dispatch cost per call — the part of an eager training step that the host pays per adapted layer. Timing: the
harness's host timer (``harness.wall_us``): the least of 5 batches of ``--calls`` back-to-back calls, in µs per call
(as ``timeit``'s least of 5 repetitions, which this script used before); training mode, with and without dropout,
PEFT's dropout semantics and ``dropout_mode="lora_only"``. Writes ``--out`` and one result row per item (the
harness, ``benchmarks/README.md``: item ``<mode>_<fwd|fwd_bwd>``, shape the layer and dropout).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import harness
import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000, help="calls per timed batch (default %(default)s)")
    harness.add_flags(ap, out_default=str(Path(__file__).parent / "results" / "cpu-peft-layer-host.json"))
    args = ap.parse_args()
    import peft

    from dora_tune.integrations import peft as dp

    rec = harness.start(__file__, args)
    cpu = torch.device("cpu")
    torch.manual_seed(args.seed)
    res: dict = {
        "python": rec.env["python"],
        "torch": rec.env["torch"],
        "peft": rec.env["peft"],
        "cpu": rec.env["cpu"],
        "env": rec.env,
        "items_us": {},
    }
    for p_drop in (0.0, 0.05):
        config = peft.LoraConfig(r=4, use_dora=True, target_modules=["0"], lora_dropout=p_drop)
        pm = peft.get_peft_model(nn.Sequential(nn.Linear(64, 64)), config).train()
        x = torch.randn(8, 64, requires_grad=True)
        shape = {"d": 64, "rank": 4, "rows": 8, "dropout": p_drop, "dtype": "fp32"}

        def fwd(model: nn.Module = pm, inp: torch.Tensor = x) -> None:
            model(inp)

        def fwd_bwd(model: nn.Module = pm, inp: torch.Tensor = x) -> None:
            model(inp).sum().backward()

        for mode in ("peft", "enable", "enable_lora_only"):
            if mode == "enable":
                dp.enable(pm)
            elif mode == "enable_lora_only":
                dp.enable(pm, dropout_mode="lora_only")
            for what, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                us = harness.wall_us(fn, cpu, calls=args.calls, rounds=5)
                res["items_us"][f"p{p_drop}_{mode}_{what}"] = us
                rec.record(shape, {"us": us, "calls": args.calls}, item=f"{mode}_{what}")
                print(f"dropout {p_drop} {mode:18s} {what:8s} {us:8.1f} µs")
            dp.disable()
    harness.write_json(args.out, res)
    print(f"wrote {args.out}; {rec.summary()}")


if __name__ == "__main__":
    main()
