"""The training-loop benchmark's CPU smoke runs (benchmarks/train_loop.py): one cell with every variant, a tiny grid."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from benchutil import load_script, script_env

pytest.importorskip("peft")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_loop.py"
VARIANTS = ("peft_dora", "dora_tune", "dora_linear", "lora")
TINY = ["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--rank", "4"]


def run(out: Path, *extra: str, variants: tuple[str, ...] = VARIANTS) -> dict:
    cmd = [sys.executable, str(SCRIPT), *TINY, "--variants", ",".join(variants), "--out", str(out), *extra]
    # tiny matmuls: one thread, no spinning pool on a busy machine; result rows next to the JSON, not in the repository
    env = script_env(out.parent / "rows", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_cpu_one_cell_every_variant_same_losses(tmp_path):
    every = (*VARIANTS, "dora_linear_node")  # the race without the folded linear too (on the CPU no race runs)
    res = run(tmp_path / "x.json", "--accum", "2", "--tokens", "16", variants=every)
    assert res["ok"] and not res["errors"] and not res["grid"] and not res["skipped_cells"]
    assert res["env"]["torch"] and "train_loop.py" in res["env"]["command"]
    (cell,) = res["cells"]
    assert (cell["tokens"], cell["rank"], cell["dropout"], cell["accum"]) == (16, 4, 0.0, 2)
    v = cell["variants"]
    assert set(v) == set(every)
    for name, r in v.items():
        assert "error" not in r, (name, r)
        times = [r["first_step_ms"], r["median_ms"], r["min_ms"], r["max_ms"], *r["steps_ms"]]
        assert all(math.isfinite(t) and t > 0 for t in times), (name, times)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and len(r["steps_ms"]) == 2
        assert len(r["losses"]) == (1 + 2) * 2 and all(math.isfinite(x) for x in r["losses"])  # every micro-step
        assert r["peak_MiB"] is None  # CPU
        assert r["speedup_vs_peft_dora"] == pytest.approx(v["peft_dora"]["median_ms"] / r["median_ms"])
        assert r["vs_lora"] == pytest.approx(r["median_ms"] / v["lora"]["median_ms"])
    assert v["peft_dora"]["loss_gap_vs_peft_dora"] is None
    # same math, fp32, no dropout: only rounding separates dora-tune and DoRALinear from PEFT over the whole run ...
    assert v["dora_tune"]["loss_gap_vs_peft_dora"] < 1e-4
    assert v["dora_linear"]["loss_gap_vs_peft_dora"] < 1e-4
    assert v["dora_linear_node"]["loss_gap_vs_peft_dora"] < 1e-4
    assert v["dora_tune"]["enabled_layers"] == 2 * 7  # 2 tiny layers, 7 projections each
    # ... while plain LoRA is another model (no magnitude): the gap is measured, not assumed
    assert v["lora"]["loss_gap_vs_peft_dora"] > 0
    models = res["blocks"]["r4-p0"]["models"]
    assert models["dora_linear"]["trainable_params"] == models["peft_dora"]["trainable_params"]
    assert models["lora"]["trainable_params"] < models["peft_dora"]["trainable_params"]
    # the headline figures also went out as result rows: one per variant, into the CPU's file
    recorded = [json.loads(line) for line in (tmp_path / "rows" / "cpu.jsonl").read_text().splitlines()]
    assert [r["item"] for r in recorded] == list(v)
    for r in recorded:
        assert r["script"] == "train_loop" and r["gpu"] == "cpu" and r["env"]["torch"]
        assert (r["shape"]["tokens"], r["shape"]["rank"], r["shape"]["accum"], r["shape"]["tiny"]) == (16, 4, 2, True)
        assert r["figures"]["median_ms"] == pytest.approx(v[r["item"]]["median_ms"], rel=1e-5)


def test_cpu_grid_writes_every_cell(tmp_path):
    grid = ["--grid", "--grid-tokens", "8,16", "--grid-ranks", "4", "--grid-dropouts", "0", "--grid-accums", "1"]
    res = run(tmp_path / "grid.json", *grid)
    assert res["ok"] and res["grid"] and not res["skipped_cells"]
    assert [(c["tokens"], c["rank"], c["dropout"], c["accum"]) for c in res["cells"]] == [
        (8, 4, 0.0, 1),
        (16, 4, 0.0, 1),
    ]
    for cell in res["cells"]:
        assert set(cell["variants"]) == set(VARIANTS)
        assert all(r["median_ms"] > 0 for r in cell["variants"].values())
        # at the initial weights DoRA computes LoRA's function (m = ‖W + s·B·A‖, so g = 1): every cell starts there
        first = [r["losses"][0] for r in cell["variants"].values()]
        assert max(first) - min(first) <= 1e-6 * abs(first[0])
    assert set(res["blocks"]) == {"r4-p0"} and set(res["blocks"]["r4-p0"]["models"]) == set(VARIANTS)


def test_cpu_grid_cells_start_from_the_same_weights(tmp_path):
    # two cells on the same batches: a model reused across cells must reload its initial adapters and a fresh AdamW
    grid = ["--grid", "--grid-tokens", "16,16", "--grid-ranks", "4", "--grid-dropouts", "0", "--grid-accums", "1"]
    res = run(tmp_path / "again.json", *grid, variants=("peft_dora", "dora_tune"))
    first, second = res["cells"]
    for v in ("peft_dora", "dora_tune"):
        assert first["variants"][v]["losses"] == second["variants"][v]["losses"]
        assert first["variants"][v]["losses"][0] != first["variants"][v]["losses"][-1]  # it trains


def test_cpu_lora_only_dropout_mode_and_profile(tmp_path):
    variants = ("dora_tune", "dora_linear")
    res = run(
        tmp_path / "lo.json",
        "--tokens",
        "16",
        "--dropout",
        "0.1",
        "--dropout-mode",
        "lora_only",
        "--profile",
        variants=variants,
    )
    assert res["ok"] and res["args"]["dropout_mode"] == "lora_only"
    (cell,) = res["cells"]
    for name in variants:
        r = cell["variants"][name]
        assert "error" not in r and all(math.isfinite(x) for x in r["losses"]), name
        assert "Self CPU" in r["profile"]["host_top"] and "path_races" in r["profile"]
        assert r["profile"]["syncs"] == {"count": 0, "sites": {}}  # the CPU has no device to wait for
        # the profiled step follows an optimizer step: every adapted layer recomputes its norm once, in its range
        (block,) = res["blocks"].values()
        assert r["profile"]["norm"]["calls"] == block["models"][name]["adapted_layers"] > 0, name


def test_cpu_float32_adapters_on_a_bf16_model(tmp_path):
    """--adapter-dtype fp32: PEFT's default (float32 adapters on a bf16 model) for every variant, recorded in the rows;
    dora-tune and DoRALinear stay within bf16 rounding of PEFT's losses."""
    variants = ("peft_dora", "dora_tune", "dora_linear")
    res = run(tmp_path / "a32.json", "--tokens", "16", "--dtype", "bf16", "--adapter-dtype", "fp32", variants=variants)
    assert res["ok"] and res["args"]["adapter_dtype"] == "fp32"
    models = res["blocks"]["r4-p0"]["models"]
    assert all(models[v]["adapter_dtypes"] == ["torch.float32"] for v in variants), models
    (cell,) = res["cells"]
    assert cell["variants"]["dora_tune"]["enabled_layers"] == 2 * 7
    for v in ("dora_tune", "dora_linear"):
        assert cell["variants"][v]["loss_gap_vs_peft_dora"] < 2e-2, v
    rows = [json.loads(line) for line in (tmp_path / "rows" / "cpu.jsonl").read_text().splitlines()]
    assert {r["shape"]["adapter_dtype"] for r in rows} == {"fp32"}


def test_sync_report_counts_only_synchronisations_by_the_line_that_made_them():
    tl = load_script("train_loop")
    with pytest.warns(UserWarning, match="something else"), tl._sync_warnings(False) as caught:
        for line in (3, 3, 7):
            warnings.warn_explicit("called a synchronizing CUDA operation", UserWarning, "/x/model.py", line)
        warnings.warn_explicit("something else", UserWarning, "/x/model.py", 9)  # shown, not counted
    assert tl.sync_report(caught) == {"count": 3, "sites": {"/x/model.py:3": 2, "/x/model.py:7": 1}}
    assert tl.sync_report([]) == {"count": 0, "sites": {}}


def test_sync_warnings_restore_the_debug_mode_even_when_the_step_fails(monkeypatch):
    tl = load_script("train_loop")
    modes = [0]
    monkeypatch.setattr(tl.torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(tl.torch.cuda, "set_sync_debug_mode", modes.append)
    with pytest.raises(RuntimeError, match="step failed"), tl._sync_warnings(True):
        assert modes[-1] == "warn"
        raise RuntimeError("step failed")
    assert modes == [0, "warn", 0]
