"""The fused-linear benchmark's logic on the CPU (its timings need CUDA): every item it measures runs, with the GPU
timer replaced by a call counter and the Triton kernels under the interpreter."""

import pytest
import torch
from benchutil import load_script


def test_measure_and_errors_run_every_item(monkeypatch):
    pytest.importorskip("peft")
    bench = load_script("dora_linear_bench")
    calls = []

    def fake_gpu_us(fn, **kw):
        fn()
        calls.append(1)
        return 1.0

    monkeypatch.setattr(bench.harness, "gpu_us", fake_gpu_us)
    t = bench.make(8, 40, 24, 4, torch.float32, torch.device("cpu"), 0)
    fig = bench.measure(t, sweep=2)
    for item in ("cublas_base", "cublas_base_xa", "fused_fwd_default", "composed_fwd", "fused_fwd_best",
                 "fused_fwd_bwd", "composed_fwd_bwd", "folded_fwd", "folded_fwd_bwd", "peft_dora_fwd",
                 "peft_dora_fwd_bwd", "peft_lora_fwd", "peft_lora_fwd_bwd"):  # fmt: skip
        assert fig[item] == 1.0, item
    assert fig["configs_timed"] >= 2 and set(fig["best_config"]) == {
        "block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages"
    }  # fmt: skip
    assert fig["fused_fwd_vs_base_xa"] == fig["fused_fwd_bwd_vs_lora"] == fig["folded_fwd_bwd_vs_composed"] == 1.0
    assert fig["folded_peak_MiB"] is None and fig["peft_lora_peak_MiB"] is None  # peak memory: CUDA only
    lean = bench.measure(t, sweep=2, fused=False)  # --no-fused: no fused item, no config sweep
    assert not any(k.startswith("fused") for k in lean) and "configs_timed" not in lean
    assert lean["folded_fwd_bwd_vs_lora"] == lean["composed_fwd_bwd_vs_lora"] == 1.0
    errs = bench.errors(torch.bfloat16, torch.device("cpu"), 0, dims=(16, 40, 24, 4))
    impls = ("fused", "folded", "composed")
    assert set(errs) == {f"{i}_{k}" for i in impls for k in ("y", "dx", "dA", "dB", "dm")}
    assert all(0 < v < 3e-2 for v in errs.values()), errs
