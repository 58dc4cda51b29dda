"""The folded DoRA linear's two Triton passes alone, against same-bytes torch ops (their bandwidth floor), on one GPU.

Per shape (rows × cols, rank r; bf16; GPU µs, L2 flushed, ``harness.gpu_us``):
- floors: ``copy`` (read 1, write 1: the forward pass's bytes) and ``add`` (read 2, write 1: the backward's);
- ``fwd_<tile>``: ``y = g ⊙ (base + (s·u)·Bᵀ)`` for each tile of the folded space;
- ``bwd_<tile>_i<k>``: ``e = g ⊙ d_y`` and ``d_m`` (k row tiles a program), ``eonly_<tile>``: ``e`` alone;
and at the first shape the backward's and forward's other pieces (the cuBLAS GEMMs around the passes, and PEFT
LoRA's corresponding ops), for the layer's time budget.

    python3 benchmarks/folded_passes.py [--shapes 4096x4096x64,4096x14336x64,1024x4096x64] [--out F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import harness
import torch


def _shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        rows, cols, r = (int(v) for v in item.lower().split("x"))
        out.append((rows, cols, r))
    return out


def passes(rows: int, cols: int, r: int, dt: torch.dtype, dev: str) -> dict[str, float]:
    """The floors and every tile's forward and backward pass at one shape."""
    from dora_tune.kernels._folded_triton import folded_bwd_triton, folded_fwd_triton
    from dora_tune.kernels.dora_linear import _FOLDED_TILES, FoldedConfig

    dy = torch.randn(rows, cols, device=dev, dtype=dt)
    base, e = torch.randn_like(dy), torch.empty_like(dy)
    us = torch.randn(rows, r, device=dev, dtype=dt)
    B = torch.randn(cols, r, device=dev, dtype=dt) * 0.1
    m, n = torch.rand(cols, device=dev, dtype=dt) + 0.5, torch.rand(cols, device=dev) + 0.5
    rec = {"copy": harness.gpu_us(lambda: torch.mul(base, 2.0, out=e))}
    rec["add"] = harness.gpu_us(lambda: torch.add(dy, base, out=e))

    def fwd(cfg: FoldedConfig) -> float:
        return harness.gpu_us(lambda: folded_fwd_triton(base, us, B, m, n, None, cfg, in_place=False))

    def bwd(cfg: FoldedConfig, keep: torch.Tensor | None) -> float:
        return harness.gpu_us(lambda: folded_bwd_triton(dy, keep, us, B, m, n, cfg, need_e=True, m_dtype=dt))

    for br, bc, w in _FOLDED_TILES:
        tile = f"{br}x{bc}w{w}"
        rec[f"fwd_{tile}"] = fwd(FoldedConfig(br, bc, 4, w))
        rec[f"eonly_{tile}"] = bwd(FoldedConfig(br, bc, 4, w), None)
        for it in (1, 4, 8):
            rec[f"bwd_{tile}_i{it}"] = bwd(FoldedConfig(br, bc, it, w), base)
    return rec


def pieces(rows: int, d: int, r: int, dt: torch.dtype, dev: str) -> dict[str, float]:
    """A square layer's (rows × d × d, rank r) forward and backward pieces: the folded path's and PEFT LoRA's."""
    from dora_tune.kernels._folded_triton import folded_bwd_triton, folded_fwd_triton
    from dora_tune.kernels.dora_linear import DEFAULT_FOLDED_CONFIG as cfg

    x, W = torch.randn(rows, d, device=dev, dtype=dt), torch.randn(d, d, device=dev, dtype=dt) * 0.02
    A, B = torch.randn(r, d, device=dev, dtype=dt) * 0.02, torch.randn(d, r, device=dev, dtype=dt) * 0.02
    dy, base, e, y = (torch.randn(rows, d, device=dev, dtype=dt) for _ in range(4))
    us, dus = torch.randn(rows, r, device=dev, dtype=dt), torch.randn(rows, r, device=dev, dtype=dt)
    m, n = torch.rand(d, device=dev, dtype=dt) + 0.5, torch.rand(d, device=dev) + 0.5
    dx, dx2 = torch.empty(rows, d, device=dev, dtype=dt), torch.empty(rows, d, device=dev, dtype=dt)
    t = harness.gpu_us
    return {
        "fwd_base_xW": t(lambda: torch.mm(x, W.t(), out=base)),
        "fwd_us": t(lambda: torch.addmm(x.new_empty(()), x, A.t(), beta=0, alpha=2.0)),
        "fwd_pass": t(lambda: folded_fwd_triton(base, us, B, m, n, None, cfg, in_place=False)),
        "lora_fwd_uBt": t(lambda: torch.mm(us, B.t(), out=e)),
        "lora_fwd_add": t(lambda: torch.add(base, e, out=y)),
        "bwd_pass": t(lambda: folded_bwd_triton(dy, base, us, B, m, n, cfg, need_e=True, m_dtype=dt)),
        "bwd_dx_eW": t(lambda: torch.mm(e, W, out=dx)),
        "bwd_dx_addmm_dusA": t(lambda: dx.addmm_(dus, A, alpha=2.0)),
        "bwd_dus_eB": t(lambda: torch.mm(e, B)),
        "bwd_dB_eTus": t(lambda: torch.mm(e.t(), us)),
        "bwd_dA_dusTx": t(lambda: torch.addmm(dus.new_empty(()), dus.t(), x, beta=0, alpha=2.0)),
        "lora_bwd_vA": t(lambda: torch.mm(dus, A, out=dx2)),
        "lora_bwd_add_dx": t(lambda: torch.add(dx, dx2, out=dx)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096x64,4096x14336x64,1024x4096x64", help="rows x cols x r, ...")
    harness.add_flags(ap, out_default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(args.seed)
    out: dict[str, Any] = {"env": harness.environment("cuda"), "shapes": []}
    for rows, cols, r in _shapes(args.shapes):
        rec = {"rows": rows, "cols": cols, "r": r, **passes(rows, cols, r, torch.bfloat16, "cuda")}
        fwd = min((v, k) for k, v in rec.items() if k.startswith("fwd_"))
        bwd = min((v, k) for k, v in rec.items() if k.startswith("bwd_"))
        print(
            f"{rows} x {cols} r {r}: copy {rec['copy']:.1f} µs, add {rec['add']:.1f}; best forward pass "
            f"{fwd[0]:.1f} ({fwd[1]}), best backward pass {bwd[0]:.1f} ({bwd[1]})",
            flush=True,
        )
        out["shapes"].append(rec)
    rows, cols, r = _shapes(args.shapes)[0]
    out["pieces"] = {"rows": rows, "d": cols, "r": r, **pieces(rows, cols, r, torch.bfloat16, "cuda")}
    print("pieces (µs):", json.dumps({k: round(v, 1) for k, v in out["pieces"].items()}))
    path = Path(args.out or harness.default_out("folded-passes.json"))
    harness.write_json(path, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
