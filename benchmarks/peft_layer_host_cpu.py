"""Host cost of one tiny PEFT DoRA layer on the CPU: PEFT's own path against PEFT + dora-tune's ``enable()``.

Run (CPU, seconds): python benchmarks/peft_layer_host_cpu.py [--out benchmarks/results/cpu-peft-layer-host.json]

The layer is tiny (64×64, r 4, 8 rows) so that its arithmetic costs little and what is timed is the Python and
dispatch cost per call — the part of an eager training step that the host pays per adapted layer. ``timeit``: the
least of 5 repetitions of 3000 calls, in µs per call; training mode, with and without dropout, PEFT's dropout
semantics and ``dropout_mode="lora_only"``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import timeit
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import peft

    from dora_tune.integrations import peft as dp

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu-peft-layer-host.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    res: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "cpu": platform.processor() or platform.machine(),
        "items_us": {},
    }
    for p_drop in (0.0, 0.05):
        config = peft.LoraConfig(r=4, use_dora=True, target_modules=["0"], lora_dropout=p_drop)
        pm = peft.get_peft_model(nn.Sequential(nn.Linear(64, 64)), config).train()
        x = torch.randn(8, 64, requires_grad=True)

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
                us = min(timeit.repeat(fn, number=args.calls, repeat=5)) / args.calls * 1e6
                res["items_us"][f"p{p_drop}_{mode}_{what}"] = us
                print(f"dropout {p_drop} {mode:18s} {what:8s} {us:8.1f} µs")
            dp.disable()
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
