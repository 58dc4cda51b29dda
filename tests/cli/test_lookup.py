import dataclasses
import re

import pytest
import torch
from click.testing import CliRunner

from dora_tune.autotune_db import EnvInfo, TrialResult, TuningDB
from dora_tune.cli import cli
from dora_tune.dispatch.registry import registry

GPU = "Fake GPU X1"
ENV = EnvInfo("cuda", GPU, "9.0", 100, 80 << 30, "1", "13.0", "2.11", "3.6", "0.1.0")


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_lookup_uses_the_shipped_h200_cache_for_a_measured_shape(tmp_path):
    res = run(
        "lookup",
        "--op",
        "norm",
        "--rows",
        "4096",
        "--cols",
        "4096",
        "--rank",
        "384",
        "--gpu",
        "NVIDIA H200",
        "--db",
        str(tmp_path / "none.sqlite"),
    )
    assert res.exit_code == 0, res.output
    assert "triton" in res.output and "source: measured — shipped DB" in res.output
    # the shipped cache predates wall times (read as it is): both figures shown, the wall one as not recorded
    assert "measured here: GPU " in res.output and "wall not recorded — shipped DB" in res.output
    assert "fastest measured dense {}: GPU " in res.output


def test_lookup_shows_the_norm_shortlist_raced_at_first_use(tmp_path):
    # an unmeasured norm shape on the shipped H200 cache: the model's decision and the configs raced at first use
    args = ["lookup", "--op", "norm", "--rows", "6000", "--cols", "3000", "--rank", "100", "--gpu", "NVIDIA H200"]
    args += ["--db", str(tmp_path / "none.sqlite")]
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert "source: model — shipped DB decision table" in res.output
    assert "raced at the first call (fastest kept), on the call's own inputs: 3 configs" in res.output
    assert "measured here" not in res.output  # nothing measured at this shape
    assert res.output.count("'split_k'") == 4  # the plan's config and the three raced
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DORA_TUNE_RACE", "0")
        off = run(*args)
    assert off.exit_code == 0 and "raced" not in off.output


def test_lookup_shows_the_compose_train_shortlist_raced_once_per_cell(tmp_path):
    res = run(
        "lookup",
        "--op",
        "compose_train",
        "--rows",
        "3000",
        "--cols",
        "14336",
        "--gpu",
        "NVIDIA H200",
        "--db",
        str(tmp_path / "none.sqlite"),
    )
    assert res.exit_code == 0, res.output
    assert "source: model — shipped DB decision table" in res.output
    assert "raced at the first call of this table cell (shared by its shapes) (fastest kept)" in res.output
    assert res.output.count("'row_iters'") == 4  # the plan's config and the three raced


def test_lookup_unmeasured_shape_and_no_shipped(tmp_path):
    res = run(
        "lookup",
        "--op",
        "compose_train",
        "--rows",
        "100",
        "--cols",
        "512",
        "--gpu",
        "NVIDIA H200",
        "--db",
        str(tmp_path / "none.sqlite"),
        "--no-shipped",
    )
    assert res.exit_code == 0 and "eager" in res.output and "source: heuristic" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for the local GPU there")
def test_lookup_on_cpu_says_why(tmp_path):
    res = run("lookup", "--op", "compose", "--rows", "8", "--cols", "8", "--db", str(tmp_path / "none.sqlite"))
    assert res.exit_code == 0 and "source: fallback" in res.output and "--gpu NAME" in res.output


def test_lookup_argument_errors():
    assert run("lookup", "--op", "norm", "--rows", "8", "--cols", "8").exit_code == 2  # --rank required
    assert run("lookup", "--op", "compose", "--rows", "8", "--cols", "8", "--rank", "4").exit_code == 2
    assert run("lookup", "--op", "compose", "--rows", "0", "--cols", "8").exit_code == 2
    linear = ["lookup", "--op", "dora_linear", "--rows", "8", "--cols", "8"]
    assert run(*linear, "--rank", "4").exit_code == 2  # --d-in required
    assert run(*linear, "--d-in", "16").exit_code == 2  # --rank required
    assert run("lookup", "--op", "norm", "--rows", "8", "--cols", "8", "--rank", "4", "--d-in", "16").exit_code == 2


def test_lookup_dora_linear_plans_the_layer_shape(tmp_path):
    args = ["--rows", "4096", "--cols", "1024", "--d-in", "4096", "--rank", "64", "--gpu", "Some Future GPU"]
    res = run("lookup", "--op", "dora_linear", *args, "--no-shipped", "--db", str(tmp_path / "none.sqlite"))
    assert res.exit_code == 0, res.output
    assert "dora_linear rows=4096,d_out=1024,d_in=4096,r=64 bf16: composed" in res.output
    assert "source: heuristic" in res.output


def _record(db, impl, config, us, wall):
    version = next(i.version for i in registry()["compose"] if i.name == impl)
    res = TrialResult("ok", median_us=us, p20_us=us, p80_us=us, reps=100, wall_us=wall)
    db.record_trial(ENV, "compose", impl, version, {"rows": 2048, "cols": 4096}, "bf16", config, res)


def test_lookup_shows_the_measured_gpu_and_wall_figures(tmp_path):
    triton = next(i for i in registry()["compose"] if i.name == "triton")
    fast, slow = triton.configs({"rows": 2048, "cols": 4096})[:2]
    path = str(tmp_path / "user.sqlite")
    with TuningDB.open(path) as db:
        _record(db, "triton", fast, 12.3, 45.6)  # host-bound: launches cost more than the kernel
        _record(db, "triton", slow, 20.0, 21.0)  # the plan's implementation, not its config: not listed
        _record(db, "eager", {}, 30.0, None)  # profiled without a wall time
    args = ["lookup", "--op", "compose", "--rows", "2048", "--cols", "4096", "--gpu", GPU, "--db", path]
    res = run(*args, "--no-shipped")
    assert res.exit_code == 0, res.output
    assert "source: measured — user DB" in res.output
    assert "measured here: GPU 12.3 µs, wall 45.6 µs (host included, back-to-back calls) — user DB" in res.output
    assert "  host-bound: wall 3.7× the GPU time (launch cost dominates)" in res.output
    assert "  fastest measured eager {}: GPU 30.0 µs, wall not recorded\n" in res.output
    assert "GPU 20.0" not in res.output and res.output.count("host-bound") == 1
    with TuningDB.open(path) as db:  # re-timed without a wall time, and the eager trial with a GPU-bound one
        _record(db, "triton", fast, 12.3, None)
        _record(db, "eager", {}, 30.0, 31.0)
    res = run(*args, "--no-shipped")
    assert res.exit_code == 0, res.output
    assert "measured here: GPU 12.3 µs, wall not recorded — user DB" in res.output
    assert "fastest measured eager {}: GPU 30.0 µs, wall 31.0 µs (host included, back-to-back calls)" in res.output
    assert "host-bound" not in res.output  # within 10 % of the GPU time


def test_lookup_counts_only_this_gpus_trials_at_current_versions(tmp_path):
    eager = next(i for i in registry()["compose"] if i.name == "eager")
    shape = {"rows": 2048, "cols": 4096}
    fast = TrialResult("ok", median_us=5.0, p20_us=5.0, p80_us=5.0, reps=100, wall_us=8.0)
    path = str(tmp_path / "user.sqlite")
    with TuningDB.open(path) as db:
        db.record_trial(ENV, "compose", "triton", "old", shape, "bf16", {}, fast)  # a stale triton version
        _record(db, "eager", {}, 30.0, 31.0)
        other = dataclasses.replace(ENV, gpu_name="Fake GPU X1 Max")  # a GPU whose name contains this one's
        db.record_trial(other, "compose", "eager", eager.version, shape, "bf16", {}, fast)
    args = ["lookup", "--op", "compose", "--rows", "2048", "--cols", "4096", "--gpu", GPU, "--db", path]
    res = run(*args, "--no-shipped")
    assert res.exit_code == 0, res.output
    assert "source: measured — user DB" in res.output and ": eager -" in res.output.splitlines()[0]
    assert "measured here: GPU 30.0 µs, wall 31.0 µs (host included, back-to-back calls)" in res.output
    assert "fastest measured" not in res.output  # stale versions and other GPUs are not this GPU's measurements


def test_show_has_a_wall_column(tmp_path):
    triton = next(i for i in registry()["compose"] if i.name == "triton")
    path = str(tmp_path / "user.sqlite")
    with TuningDB.open(path) as db:
        _record(db, "triton", triton.configs({"rows": 2048, "cols": 4096})[0], 12.3, 45.6)
        _record(db, "eager", {}, 30.0, None)
    res = run("show", "--db", path, "--trials")
    assert res.exit_code == 0, res.output
    assert "wall µs" in res.output
    assert re.search(r"│ 12\.3 +│ 45\.6 +│", res.output) and re.search(r"│ 30\.0 +│ - +│", res.output)
