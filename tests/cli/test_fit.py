"""``dora-tune fit`` and ``dora-tune report`` through click's CliRunner; state checked through the library."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from dora_tune.autotune_db import TrialResult, TuningDB
from dora_tune.cli import cli
from dora_tune.dispatch.decisions import DecisionTable
from dora_tune.dispatch.registry import registry

from conftest import H200, fill_known_crossover


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def known_db(tmp_path):
    path = str(tmp_path / "known.sqlite")
    with TuningDB.open(path) as db:
        fill_known_crossover(db)
    return path


def test_fit_stores_decision_tables_and_prints_the_cv_table(known_db):
    res = run("fit", "--db", known_db)
    assert res.exit_code == 0, res.output
    assert "compose_train" in res.output and "linear_trees" in res.output and "stored 1 decision table" in res.output
    with TuningDB.open(known_db, readonly=True) as db:
        [m] = db.models()
    assert (m.gpu_name, m.op, m.dtype) == ("NVIDIA H200", "compose_train", "bf16")
    table = DecisionTable.from_json(m.payload)
    assert table.lookup({"rows": 64, "cols": 512})[0] == "eager"
    assert table.lookup({"rows": 4096, "cols": 8192})[0] == "triton"
    assert m.metrics["cv"]["model"]["regret_geomean"] <= 1.02
    res = run("fit", "--db", known_db, "--gpu", "h200")  # refitting replaces the table
    assert res.exit_code == 0, res.output
    with TuningDB.open(known_db, readonly=True) as db:
        assert len(db.models()) == 1


def test_fit_only_the_dtypes_asked_for(known_db):
    """--dtype limits the fit: the bf16 trials are not fitted under --dtype fp16 (and nothing else is touched)."""
    res = CliRunner().invoke(cli, ["fit", "--db", known_db, "--dtype", "fp16"])
    assert res.exit_code == 1 and "nothing to fit in fp16" in res.output
    with TuningDB.open(known_db, readonly=True) as db:
        assert db.models() == []
    res = run("fit", "--db", known_db, "--dtype", "bf16", "--dtype", "fp16")
    assert res.exit_code == 0 and "stored 1 decision table" in res.output, res.output


def test_fit_only_the_ops_asked_for(known_db):
    """--op limits the fit to those ops: the compose_train trials are not fitted under --op dora_linear."""
    res = CliRunner().invoke(cli, ["fit", "--db", known_db, "--op", "dora_linear"])
    assert res.exit_code == 1 and "nothing to fit of dora_linear" in res.output
    with TuningDB.open(known_db, readonly=True) as db:
        assert db.models() == []
    res = run("fit", "--db", known_db, "--op", "compose_train", "--op", "norm")
    assert res.exit_code == 0 and "stored 1 decision table" in res.output, res.output


def test_fit_with_nothing_to_fit_fails_clearly(tmp_path, known_db):
    res = CliRunner().invoke(cli, ["fit", "--db", known_db, "--gpu", "a100"])
    assert res.exit_code == 1 and "nothing to fit for GPU 'a100'" in res.output
    path = str(tmp_path / "two.sqlite")
    with TuningDB.open(path) as db:  # two shapes: fewer than the 3 a fit needs
        v = {i.name: i.version for i in registry()["compose"]}
        for cols in (512, 1024):
            db.record_trial(
                H200,
                "compose",
                "eager",
                v["eager"],
                {"rows": 8, "cols": cols},
                "bf16",
                {},
                TrialResult("ok", median_us=10.0),
            )
    res = CliRunner().invoke(cli, ["fit", "--db", path])
    assert res.exit_code == 1 and "nothing to fit" in res.output and "dora-tune profile" in res.output
    with TuningDB.open(path, readonly=True) as db:
        assert db.models() == []


def test_report_prints_stored_metrics_and_plots(tmp_path, known_db):
    pytest.importorskip("matplotlib")
    assert run("fit", "--db", known_db).exit_code == 0
    out = tmp_path / "plots" / "crossover.png"
    out.parent.mkdir()
    res = run("report", "--db", known_db, "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "compose_train" in res.output and str(out) in res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with TuningDB.open(known_db, readonly=True) as db:  # report reads, never refits
        [m] = db.models()
    res = run("report", "--db", known_db, "--out", str(out))
    with TuningDB.open(known_db, readonly=True) as db:
        assert db.models()[0].created_at == m.created_at


def test_report_plots_every_op_of_the_shipped_h100_cache(tmp_path):
    """The shipped H100 file holds tables of all four ops, dora_linear's over four shape keys: one panel each."""
    pytest.importorskip("matplotlib")
    import shutil

    import dora_tune

    db = tmp_path / "h100.sqlite"
    shutil.copy(Path(dora_tune.__file__).parent / "caches" / "nvidia-h100-80gb-hbm3.sqlite", db)
    out = tmp_path / "h100.png"
    res = run("report", "--db", str(db), "--gpu", "h100", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert all(op in res.output for op in ("norm", "compose_train", "dora_linear"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_report_without_models_fails_clearly(tmp_path, known_db):
    res = CliRunner().invoke(cli, ["report", "--db", known_db, "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 1 and "dora-tune fit" in res.output
    assert not (tmp_path / "x.png").exists()


def test_estimator_option_lists_the_library_estimators():
    from dora_tune.cli.fit import fit
    from dora_tune.tuning.estimators import DEFAULT_ESTIMATOR, ESTIMATORS

    option = next(p for p in fit.params if p.name == "estimator")
    assert sorted(option.type.choices) == sorted(ESTIMATORS) and option.default == DEFAULT_ESTIMATOR


def test_report_without_matplotlib_says_which_extra_to_install(tmp_path, known_db, monkeypatch):
    import importlib.util

    assert run("fit", "--db", known_db).exit_code == 0
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "x.png"
    res = CliRunner().invoke(cli, ["report", "--db", known_db, "--out", str(out)])
    assert res.exit_code == 1 and "pip install 'dora-tune[plot]'" in res.output and "--no-plot" in res.output
    res = CliRunner().invoke(cli, ["report", "--db", known_db, "--no-plot"])  # the figures need no matplotlib
    assert res.exit_code == 0 and "compose_train" in res.output and "wrote" not in res.output
    assert not out.exists()


def test_fit_cross_gpu_reports_leave_one_gpu_out(tmp_path, known_db):
    import dataclasses

    from dora_tune.autotune_db import GpuFeatures

    from conftest import fill_known_crossover

    res = run("fit", "--db", known_db, "--cross-gpu")  # one GPU: said, not failed
    assert res.exit_code == 0 and "fewer than 2 GPUs" in res.output
    h100 = dataclasses.replace(
        H200, gpu_name="NVIDIA H100 80GB HBM3", features=GpuFeatures(50 * 2**20, 3352.0, 1980, 2619, 5120, "nvml")
    )
    with TuningDB.open(known_db) as db:
        fill_known_crossover(db, env=h100)
    res = run("fit", "--db", known_db, "--cross-gpu")
    assert res.exit_code == 0, res.output
    assert "leave-one-GPU-out" in res.output and "stored 2 decision table" in res.output
    assert "NVIDIA H100 80GB HBM3" in res.output and "(NVIDIA H200)" in res.output and "(race)" in res.output
