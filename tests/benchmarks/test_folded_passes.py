"""benchmarks/folded_passes.py: its measuring functions run every tile and piece (CPU smoke: the Triton passes under
the interpreter, the GPU timer replaced by one call; the figures themselves come from the device)."""

import torch
from benchutil import load_script

from dora_tune.kernels.dora_linear import _FOLDED_TILES


def test_every_pass_and_piece_is_timed(monkeypatch):
    fp = load_script("folded_passes")
    calls = []

    def once(fn, **_):
        fn()
        calls.append(1)
        return 1.0

    monkeypatch.setattr(fp.harness, "gpu_us", once)
    rec = fp.passes(40, 72, 5, torch.float32, "cpu")
    tiles = [f"{br}x{bc}w{w}" for br, bc, w in _FOLDED_TILES]
    assert {"copy", "add"} <= set(rec)
    assert all(f"fwd_{t}" in rec and f"eonly_{t}" in rec and f"bwd_{t}_i8" in rec for t in tiles)
    pieces = fp.pieces(24, 40, 5, torch.float32, "cpu")
    assert len(pieces) == 13 and len(calls) == len(rec) + 13
    assert fp._shapes("4096x4096x64,1024x14336x16") == [(4096, 4096, 64), (1024, 14336, 16)]
