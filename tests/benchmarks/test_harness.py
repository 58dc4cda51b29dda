"""The benchmarks' harness (benchmarks/harness.py): shared flags, environment capture, result rows and their query,
and every script's command line (``--help``) and CPU smoke paths."""

import argparse
import concurrent.futures as cf
import json
import math
import subprocess
import sys

import pytest
import torch
from benchutil import BENCH, load_script, run_script, script_env

SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


@pytest.fixture(scope="module")
def harness():
    return load_script("harness")


@pytest.fixture
def rows_dir(tmp_path, monkeypatch):
    """A results directory for rows written in this process (``$DORA_TUNE_BENCH_RESULTS``; ``$OUT`` unset)."""
    path = tmp_path / "results"
    monkeypatch.setenv("DORA_TUNE_BENCH_RESULTS", str(path))
    monkeypatch.delenv("OUT", raising=False)
    return path


# ---------------------------------------------------------------- flags
def test_add_flags_registers_the_shared_flags(harness):
    ap = harness.add_flags(argparse.ArgumentParser(), device="auto", dtype=True)
    args = harness.resolve(ap.parse_args(["--device", "cpu"]), ap)
    assert args.device == torch.device("cpu") and args.dtype == "fp32" and args.torch_dtype == torch.float32
    assert (args.seed, args.note, args.record, args.out) == (0, None, True, None)
    argv = ["--device", "cpu", "--dtype", "bf16", "--seed", "3", "--note", "a b", "--no-record", "--out", "f.json"]
    args = harness.resolve(ap.parse_args(argv), ap)
    assert (args.dtype, args.torch_dtype, args.seed, args.note, args.record, args.out) == (
        "bf16",
        torch.bfloat16,
        3,
        "a b",
        False,
        "f.json",
    )
    with pytest.raises(SystemExit):  # the dtype names only
        ap.parse_args(["--dtype", "float32"])


def test_add_flags_only_where_they_apply(harness):
    ap = harness.add_flags(argparse.ArgumentParser(), out_required=True, seed=None)
    args = harness.resolve(ap.parse_args(["--out", "x"]), ap)
    assert not hasattr(args, "device") and not hasattr(args, "dtype") and not hasattr(args, "seed")
    for argv in (["--out", "x", "--device", "cpu"], ["--out", "x", "--dtype", "bf16"], ["--out", "x", "--seed", "1"]):
        with pytest.raises(SystemExit):
            ap.parse_args(argv)
    with pytest.raises(SystemExit):  # --out required
        ap.parse_args([])
    # a database dtype: any name, its own default; a default out path
    ap = harness.add_flags(argparse.ArgumentParser(), out_default="d.json", dtype="bf16", dtype_choices=None, seed=7)
    args = harness.resolve(ap.parse_args(["--dtype", "whatever"]), ap)
    assert (args.out, args.dtype, args.torch_dtype, args.seed) == ("d.json", "whatever", None, 7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_scripts_refuse_a_machine_without_cuda(harness, capsys):
    ap = harness.add_flags(argparse.ArgumentParser(), device="cuda")
    with pytest.raises(SystemExit):
        harness.resolve(ap.parse_args([]), ap)
    assert "CUDA is not available" in capsys.readouterr().err
    ap = harness.add_flags(argparse.ArgumentParser(), device="cuda")
    with pytest.raises(SystemExit):  # a CUDA-only script does not run on the CPU
        harness.resolve(ap.parse_args(["--device", "cpu"]), ap)


def test_default_out_follows_out(harness, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert harness.default_out("x.json") == str(tmp_path / "x.json")
    monkeypatch.delenv("OUT")
    assert harness.default_out("x.json") == str(harness.REPO / "benchmarks" / "results" / "x.json")


# ---------------------------------------------------------------- environment
def test_environment_fields(harness):
    env = harness.environment("cpu")
    for key in ("device", "python", "torch", "cuda", "triton", "peft", "transformers", "dora_tune", "date", "command"):
        assert key in env, key
    assert env["device"].startswith("cpu") and env["torch"] == torch.__version__
    assert len(env["dora_tune_source_sha256"]) == 16 and int(env["dora_tune_source_sha256"], 16) >= 0
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    compact = harness.compact_env(env)
    assert set(compact) == set(harness.COMPACT_ENV.values())
    assert compact["source"] == env["dora_tune_source_sha256"] and compact["torch"] == env["torch"]


def test_commit_override(harness, monkeypatch):
    monkeypatch.setenv(harness.COMMIT_ENV, "abc123")
    harness.git_commit.cache_clear()
    try:
        assert harness.git_commit() == "abc123"
    finally:
        harness.git_commit.cache_clear()


# ---------------------------------------------------------------- rows
def test_rows_round_trip(harness, rows_dir):
    rec = harness.Recorder("benchmarks/demo.py", note="first try")
    h100 = "NVIDIA H100 80GB HBM3"
    a = rec.record({"tokens": 256, "rank": 64}, {"median_ms": 1.5, "peak": None, "n": 3}, item="dora_tune", gpu=h100)
    rec.record({"tokens": 1024, "rank": 64}, {"median_ms": 4.0, "gap": float("inf")}, item="dora_tune", gpu=h100)
    rec.record({"tokens": 256, "rank": 64}, {"median_ms": 2.5}, item="peft_dora", gpu=h100)
    rec.record({"d": 64}, {"us": 12.0, "ok": True})  # the run's device: none, so the CPU
    assert sorted(p.name for p in rows_dir.iterdir()) == ["cpu.jsonl", "nvidia-h100-80gb-hbm3.jsonl"]
    assert rec.written == {rows_dir / "nvidia-h100-80gb-hbm3.jsonl": 3, rows_dir / "cpu.jsonl": 1}
    # the schema
    assert set(a) == {"script", "item", "shape", "figures", "gpu", "commit", "date", "env", "command", "note"}
    assert (a["script"], a["gpu"], a["note"]) == ("demo", "nvidia-h100-80gb-hbm3", "first try")
    assert a["figures"] == {"median_ms": 1.5, "n": 3}  # None dropped
    assert a["env"] == harness.compact_env(rec.env) and a["commit"] == harness.git_commit()
    # read back: every row, in order, as written
    lines = (rows_dir / "nvidia-h100-80gb-hbm3.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0]) == a
    everything = harness.rows(rows_dir)
    assert len(everything) == 4
    assert harness.rows(rows_dir / "cpu.jsonl")[0]["figures"] == {"us": 12.0, "ok": True}
    # queries
    h = harness.rows(rows_dir, script="demo", gpu="nvidia-h100-80gb-hbm3")
    assert [r["item"] for r in h] == ["dora_tune", "dora_tune", "peft_dora"]
    assert harness.rows(rows_dir, gpu=h100) == h and harness.rows(rows_dir, gpu="h100") == h
    assert [r["shape"]["tokens"] for r in harness.rows(rows_dir, item="dora_tune")] == [256, 1024]
    assert len(harness.rows(rows_dir, tokens=256)) == 2 and len(harness.rows(rows_dir, tokens="256")) == 2
    assert len(harness.rows(rows_dir, rank="64.0", item="peft_dora")) == 1
    assert harness.rows(rows_dir, item="dora_tune", tokens=1024)[0]["figures"]["gap"] is None  # inf: not a number
    assert len(harness.rows(rows_dir, median_ms=lambda v: v > 2)) == 2  # a figure, by a predicate
    assert len(harness.rows(rows_dir, ok="true")) == 1
    assert harness.rows(rows_dir, gpu="cpu", tokens=256) == []  # no such key: no match
    assert len(harness.rows(rows_dir, commit=(a["commit"] or "")[:7])) == 4
    assert len(harness.rows(rows_dir, since=a["date"][:10])) == 4 and harness.rows(rows_dir, since="2999") == []
    assert harness.rows(rows_dir, script="other") == []
    assert harness.rows(rows_dir / "absent") == []


def test_results_dir_and_no_record(harness, tmp_path, monkeypatch):
    monkeypatch.delenv("DORA_TUNE_BENCH_RESULTS", raising=False)
    monkeypatch.delenv("OUT", raising=False)
    assert harness.results_dir() == harness.REPO / "benchmarks" / "results"
    monkeypatch.setenv("OUT", str(tmp_path / "out"))  # the device machine returns $OUT only
    assert harness.results_dir() == tmp_path / "out" / "results"
    monkeypatch.setenv("DORA_TUNE_BENCH_RESULTS", str(tmp_path / "mine"))
    assert harness.results_dir() == tmp_path / "mine"
    rec = harness.Recorder("x.py", record=False)
    row = rec.record({"a": 1}, {"b": 2.0})
    assert row["figures"] == {"b": 2.0} and not (tmp_path / "mine").exists() and "--no-record" in rec.summary()


def test_non_numbers_are_not_recorded(harness, rows_dir, capsys):
    rec = harness.Recorder("x.py")
    row = rec.record({}, {"ms": 1.0, "error": "oom", "count": torch.tensor(3.0)})
    assert row["figures"] == {"ms": 1.0, "count": 3.0} and "error" in capsys.readouterr().err


def test_query_and_merge_command_line(harness, rows_dir, tmp_path, capsys):
    rec = harness.Recorder("train_loop.py")
    for tokens, ms in ((256, 10.0), (1024, 30.0)):
        rec.record({"tokens": tokens, "rank": 64}, {"median_ms": ms}, item="lora", gpu="NVIDIA H100 80GB HBM3")
    capsys.readouterr()
    assert harness.main(["query", "--script", "train_loop", "--gpu", "nvidia-h100-80gb-hbm3"]) == 0
    out = capsys.readouterr().out
    assert "median_ms" in out and "1024" in out and "rank=64" in out  # the shape keys that do not vary: caption
    assert harness.main(["query", "--script", "train_loop", "--where", "tokens=1024", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["figures"] == {"median_ms": 30.0}
    assert harness.main(["query", "--script", "e2e"]) == 1
    with pytest.raises(SystemExit):
        harness.main(["query", "--where", "tokens"])
    # rows returned by the device machine ($OUT/results, where git may be missing) merge in once, commit filled
    returned = tmp_path / "returned"
    returned.mkdir()
    row = harness.Recorder("race_cost.py", record=False).row({"op": "norm"}, {"first_call_ms": 900.0}, gpu="H200")
    (returned / "nvidia-h200.jsonl").write_text(json.dumps({**row, "commit": None}) + "\n")
    assert harness.main(["merge", str(returned), "--commit", "c0ffee"]) == 0
    (merged,) = harness.rows(rows_dir, gpu="h200")
    assert merged == {**row, "commit": "c0ffee"}
    assert harness.merge([returned], commit="c0ffee") == 0  # already there


# ---------------------------------------------------------------- timing
def test_host_timers_on_the_cpu(harness):
    calls = []
    us = harness.wall_us(lambda: calls.append(1), "cpu", calls=5, rounds=2)
    assert len(calls) == 10 and 0 < us < 1e5
    (times,) = harness.call_times_us([lambda: None], "cpu", reps=7, rounds=2, warmup_ms=0.1)
    assert len(times) == 7 and all(t >= 0 for t in times)
    assert harness.quantiles([4.0, 1.0, 3.0, 2.0], (0.5, 0.0, 1.0)) == [2.5, 1.0, 4.0]
    assert harness.quantiles([1.0, 2.0, 3.0, 4.0, 5.0], (0.2,))[0] == pytest.approx(
        torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).quantile(0.2).item()
    )


# ---------------------------------------------------------------- the scripts
@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    """``--help`` of every script, run concurrently (each imports torch)."""
    env = script_env(tmp_path_factory.mktemp("help-rows"))

    def run(name: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(BENCH / f"{name}.py"), "--help"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    with cf.ThreadPoolExecutor(4) as ex:
        return dict(zip(SCRIPTS, ex.map(run, SCRIPTS), strict=True))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_its_help(helps, name):
    proc = helps[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    if name != "harness":  # every benchmark script takes the shared flags
        for flag in ("--out", "--note", "--no-record"):
            assert flag in proc.stdout, flag


def test_no_script_puts_a_path_on_sys_path():
    for p in BENCH.glob("*.py"):
        assert "sys.path.insert" not in p.read_text(), p.name


def test_peft_layer_host_cpu_smoke(tmp_path):
    pytest.importorskip("peft")
    out, rows = tmp_path / "host.json", tmp_path / "rows"
    run_script("peft_layer_host_cpu", "--calls", "5", "--out", str(out), "--note", "smoke", results=rows)
    res = json.loads(out.read_text())
    assert len(res["items_us"]) == 12 and all(v > 0 for v in res["items_us"].values()) and res["torch"]
    recorded = [json.loads(line) for line in (rows / "cpu.jsonl").read_text().splitlines()]
    assert len(recorded) == 12 and {r["script"] for r in recorded} == {"peft_layer_host_cpu"}
    assert {r["item"] for r in recorded} == {
        f"{m}_{w}" for m in ("peft", "enable", "enable_lora_only") for w in ("fwd", "fwd_bwd")
    }
    assert {r["note"] for r in recorded} == {"smoke"} and {r["shape"]["dropout"] for r in recorded} == {0.0, 0.05}
    assert all(r["figures"]["calls"] == 5 and r["figures"]["us"] > 0 for r in recorded)


def test_retest_rows_go_to_the_databases_gpu(tmp_path):
    from dora_tune.autotune_db import EnvInfo, TrialResult, TuningDB
    from dora_tune.dispatch.registry import registry

    env = EnvInfo("cuda", "NVIDIA H200", "9.0", 132, 141 << 30, "1", "13.0", torch.__version__, "3.6", "0.1.0")
    impl = next(i for i in registry()["compose"] if i.name == "triton")
    for name, slower in (("a", 1.0), ("b", 1.5)):  # B: the configs A found fastest are slower there
        with TuningDB.open(str(tmp_path / f"{name}.sqlite")) as db:
            for rows in (64, 128):
                shape = {"rows": rows, "cols": 4096}
                for k, cfg in enumerate(impl.configs(shape)[:4]):
                    us = (10.0 + k) * (slower if k == 0 else 1.0)
                    db.record_trial(
                        env, "compose", impl.name, impl.version, shape, "bf16", cfg, TrialResult("ok", us, us, us, 9)
                    )
    rows, out = tmp_path / "rows", tmp_path / "retest.json"
    run_script("retest", str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite"), "--out", str(out), results=rows)
    assert json.loads(out.read_text())["ops"]["compose"]["all"] == {
        "n_shapes": 2,
        "regret_geomean": pytest.approx(15 / 11, abs=1e-4),
        "regret_max": pytest.approx(15 / 11, abs=1e-4),
    }
    assert [p.name for p in rows.iterdir()] == ["nvidia-h200.jsonl"]  # the GPU that measured, not this machine
    recorded = [json.loads(line) for line in (rows / "nvidia-h200.jsonl").read_text().splitlines()]
    assert len(recorded) == 9 and {r["script"] for r in recorded} == {"retest"}
    (row,) = [r for r in recorded if r["shape"]["op"] == "compose" and r["shape"]["subset"] == "all"]
    assert row["shape"]["a"] == "a.sqlite" and row["figures"]["regret_geomean"] == pytest.approx(15 / 11, abs=1e-4)
    assert row["env"]["device"].startswith("cpu") and math.isfinite(row["figures"]["regret_max"])
