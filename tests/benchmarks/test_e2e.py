"""The end-to-end benchmark's CPU smoke run and its correctness criterion (benchmarks/e2e.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchutil import load_script, script_env

pytest.importorskip("peft")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e.py"


@pytest.fixture(scope="module")
def e2e():
    module = load_script("e2e")  # registered in sys.modules: its dataclasses look their module up
    try:
        yield module
    finally:
        del sys.modules[module.__name__]


def test_no_reference_tolerances_bound_bf16_rounding(e2e):
    u = 2.0**-8
    out, grad = e2e.default_tolerances("bf16", 2)
    # what two correct bf16 paths differed by on an H100 (2 layers; logits 2.28e-2, grads 5.05e-2) passes ...
    assert out > 2.28e-2 and grad > 5.05e-2
    # ... and stays a bound of rounding: a few u·√layers, far below an error of the formula (≥ 1e-1)
    assert out < 10 * u * 2**0.5 < 1e-1 and grad < 20 * u * 2**0.5 < 1.2e-1
    assert e2e.default_tolerances("bf16", 8)[0] == pytest.approx(2 * out)  # grows like √layers
    assert e2e.default_tolerances("fp16", 2)[0] == pytest.approx(out / 8)  # fp16 has 3 more bits
    assert e2e.default_tolerances("fp32", 2) == (1e-4, 1e-3)


def test_the_reference_run_is_the_default(e2e, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["e2e.py", "--device", "cpu", "--tiny"])
    assert e2e.parse_args().ref is True
    monkeypatch.setattr(sys, "argv", ["e2e.py", "--device", "cpu", "--tiny", "--no-ref"])
    assert e2e.parse_args().ref is False


def test_check_fails_beyond_tolerance_without_a_reference(e2e):
    args = type("Args", (), {"tol_out": 3.6e-2, "tol_grad": 8.3e-2})()
    diff = {"loss": 1e-4, "logits": 2.3e-2, "logits_nograd": 2.3e-2, "grad_lora_A": 5.6e-2}
    assert e2e.check(diff, args) == []
    assert e2e.check({**diff, "logits": 0.2, "grad_lora_A": 0.09}, args) == ["logits", "grad_lora_A"]


def test_cpu_smoke_run_without_reference(tmp_path):
    # also guards the script directory: no benchmark module may shadow a package transformers imports ("kernels")
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--no-ref", "--models", "llama-3-8b"]
    cmd += ["--out", str(out)]
    rows = tmp_path / "rows"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=script_env(rows))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["args"]["ref"] is False and res["args"]["tol_out"] == 1e-4
    model = res["models"]["llama-3-8b"]
    assert set(model["variants"]) >= {"peft_dora", "dora_tune", "lora"} and not model["failures"]
    # the headline figures also went out as result rows: one per variant, into the CPU's file
    recorded = [json.loads(line) for line in (rows / "cpu.jsonl").read_text().splitlines()]
    assert {r["item"] for r in recorded} == set(model["variants"]) and {r["script"] for r in recorded} == {"e2e"}
    for r in recorded:
        assert r["shape"]["model"] == "llama-3-8b" and r["shape"]["tokens"] == res["args"]["tokens"]
        assert r["figures"]["fwd_bwd_ms"] == pytest.approx(model["variants"][r["item"]]["fwd_bwd"]["ms"], rel=1e-5)
