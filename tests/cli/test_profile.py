import json

import pytest
from click.testing import CliRunner

from dora_tune.autotune_db import TuningDB
from dora_tune.cli import cli
from dora_tune.tuning.profiler import CONFIRM_REPS

from conftest import cpu_profile_args


def shapes_file(tmp_path, n_norm=2, n_comp=2):
    p = tmp_path / "shapes.json"
    p.write_text(
        json.dumps(
            {
                "norm": [{"d_out": 32 + 8 * i, "d_in": 48, "r": 4} for i in range(n_norm)],
                "compose": [{"rows": 4 + i, "cols": 40} for i in range(n_comp)],
            }
        )
    )
    return str(p)


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cpu_profile_end_to_end_and_idempotent(tmp_path):
    db_path = str(tmp_path / "t.sqlite")
    args = cpu_profile_args(db_path, "--shapes", shapes_file(tmp_path), rep="2", warmup="1")
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert "No CUDA GPU selected" in res.output
    with TuningDB.open(db_path, readonly=True) as db:
        trials = db.trials()
        envs = db.environments()
    # norm: dense + factored_torch; compose: eager; compose_train: eager — 2 shapes each
    assert len(trials) == 2 * 2 + 2 + 2
    assert {(t.op, t.impl) for t in trials} == {
        ("norm", "dense"),
        ("norm", "factored_torch"),
        ("compose", "eager"),
        ("compose_train", "eager"),
    }
    assert all(t.status == "ok" and t.median_us > 0 and t.p20_us <= t.median_us <= t.p80_us for t in trials)
    assert len(envs) == 1 and envs[0].kind == "cpu" and envs[0].gpu_name.startswith("CPU")
    res = run(*args)
    assert res.exit_code == 0 and "measured 0 trials" in res.output and "8 were already" in res.output
    with TuningDB.open(db_path, readonly=True) as db:
        assert len(db.trials()) == 8


def test_profile_filters_and_model_preset(tmp_path):
    db_path = str(tmp_path / "t.sqlite")
    res = run(
        "profile",
        "--gpu",
        "cpu",
        "--db",
        db_path,
        "--model",
        "llama-3-8b",
        "--rank",
        "4",
        "--tokens",
        "2",
        "--op",
        "compose",
        "--rep",
        "1",
        "--warmup",
        "0",
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    with TuningDB.open(db_path, readonly=True) as db:
        cols = sorted(t.shape["cols"] for t in db.trials())
    assert cols == [1024, 4096, 14336]  # k/v, q/o/down, gate/up


def test_dora_linear_is_profiled_when_named_or_listed(tmp_path):
    """The default profile leaves dora_linear out (its trials cost a layer's GEMMs); ``--op dora_linear`` or a shapes
    file listing its shapes measures it (on a CPU: the composed implementation)."""
    common = ["profile", "--gpu", "cpu", "--rank", "4", "--tokens", "3", "--rep", "1", "--warmup", "0"]
    common += ["--no-progress", "--confirm-top", "0"]
    db_path = str(tmp_path / "a.sqlite")
    assert run(*common, "--db", db_path).exit_code == 0
    with TuningDB.open(db_path, readonly=True) as db:
        assert "dora_linear" not in {t.op for t in db.trials()} and db.trials()
    res = run(*common, "--db", db_path, "--op", "dora_linear")
    assert res.exit_code == 0, res.output
    with TuningDB.open(db_path, readonly=True) as db:
        linear = [t for t in db.trials() if t.op == "dora_linear"]
    assert {(t.impl, t.shape["rows"], t.shape["r"]) for t in linear} == {("composed", 3, 4)} and len(linear) == 2
    listed = tmp_path / "linear.json"
    listed.write_text(json.dumps({"dora_linear": [{"rows": 5, "d_out": 24, "d_in": 40, "r": 2}]}))
    b_path = str(tmp_path / "b.sqlite")
    res = run("profile", "--gpu", "cpu", "--db", b_path, "--shapes", str(listed), "--rep", "1", "--no-progress")
    assert res.exit_code == 0, res.output
    with TuningDB.open(b_path, readonly=True) as db:
        assert [(t.op, t.shape["d_in"]) for t in db.trials()] == [("dora_linear", 40)]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--model", "gpt-9"], "unknown model 'gpt-9'"),
        (["--shapes", "missing.json"], "cannot read shapes file"),
        (["--gpu", "7"], "--gpu 7"),
        (["--gpu", "tpu"], "--gpu must be"),
    ],
)
def test_profile_bad_input_is_one_clear_line(tmp_path, extra, match):
    res = CliRunner().invoke(cli, ["profile", "--db", str(tmp_path / "t.sqlite"), "--no-progress", *extra])
    assert res.exit_code == 1
    assert match in res.output and "Traceback" not in res.output


def test_show_gpus_and_cache_commands(tmp_path, monkeypatch):
    db_path = str(tmp_path / "t.sqlite")
    assert run(*cpu_profile_args(db_path, "--shapes", shapes_file(tmp_path))).exit_code == 0
    res = run("show", "--db", db_path, "--op", "norm")
    assert res.exit_code == 0 and "best per shape (2 rows)" in res.output
    assert "p80/p20" in res.output and "calls" in res.output
    assert res.output.count(f"│ {CONFIRM_REPS} ") == 2  # each best trial confirmed: CONFIRM_REPS timed calls
    res = run("show", "--db", db_path, "--trials", "--shape", "d_out=32,d_in=48,r=4")
    assert res.exit_code == 0 and "trials (2 rows)" in res.output
    assert run("show", "--db", db_path, "--shape", "d_out32").exit_code == 2
    monkeypatch.setenv("DORA_TUNE_DB", db_path)
    res = run("cache", "path")
    assert res.exit_code == 0 and res.output.strip() == db_path
    res = run("cache", "list")
    assert res.exit_code == 0 and "1 environment(s)" in res.output and "8 trials" in res.output
    out = str(tmp_path / "export.sqlite")
    res = run("cache", "export", out, "--gpu", "cpu")
    assert res.exit_code == 0 and "exported 8 trials" in res.output
    assert run("cache", "export", out).exit_code == 1  # exists
    fresh = str(tmp_path / "fresh.sqlite")
    res = run("cache", "merge", "--db", fresh, out)
    assert res.exit_code == 0 and "8 trials added" in res.output
    with TuningDB.open(fresh, readonly=True) as db:
        assert len(db.trials()) == 8
    res = run("gpus", "--db", db_path)
    assert res.exit_code == 0


def test_newer_schema_is_refused_by_commands(tmp_path):
    import sqlite3

    db_path = str(tmp_path / "t.sqlite")
    TuningDB.open(db_path).close()
    con = sqlite3.connect(db_path)
    con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    res = CliRunner().invoke(cli, ["show", "--db", db_path])
    assert res.exit_code == 1 and "newer" in res.output and "Traceback" not in res.output


def test_profile_jobs_default_to_the_cpus_and_reject_negatives(tmp_path, monkeypatch):
    from dora_tune.tuning import profiler, warm

    seen = []

    def fake_profile(db, device, env, shapes, **kw):
        seen.append(kw["jobs"])
        return profiler.ProfileSummary(env)

    monkeypatch.setattr(profiler, "profile", fake_profile)
    monkeypatch.setattr(warm, "default_jobs", lambda: 5)
    base = ["profile", "--gpu", "cpu", "--db", str(tmp_path / "t.sqlite"), "--shapes", shapes_file(tmp_path)]
    assert run(*base).exit_code == 0
    assert run(*base, "--jobs", "0").exit_code == 0
    assert seen == [5, 0]
    res = CliRunner().invoke(cli, [*base, "--jobs", "-1"])
    assert res.exit_code == 2 and "-1" in res.output


def test_cache_list_on_a_fresh_machine_lists_the_shipped_caches(tmp_path, monkeypatch):
    from dora_tune.cli.cache import shipped_caches

    missing = tmp_path / "none" / "tuning.sqlite"
    monkeypatch.setenv("DORA_TUNE_DB", str(missing))
    res = run("cache", "list")
    assert res.exit_code == 0, res.output
    assert f"{missing}: no user database yet" in res.output
    shipped = shipped_caches()
    assert shipped and f"shipped caches: {len(shipped)}" in res.output
    for path in shipped:
        with TuningDB.open(path, readonly=True) as db:
            for e in db.environments():
                assert f"{e.gpu_name} (sm {e.compute_capability}" in res.output and f"{e.trials} trials" in res.output
    assert not missing.exists()  # listing creates nothing
    (tmp_path / "bad.sqlite").write_text("not a database")
    res = run("cache", "list", "--db", str(tmp_path / "bad.sqlite"))  # other errors still fail, in one line
    assert res.exit_code == 1 and "Error:" in res.output


def test_cache_list_shows_what_the_device_said(tmp_path):
    from dora_tune.autotune_db import EnvInfo, GpuFeatures, TrialResult

    db_path = str(tmp_path / "t.sqlite")
    feats = GpuFeatures(50 * 2**20, 3352.32, 1980, 2619, 5120, "nvml")
    env = EnvInfo(
        "cuda", "NVIDIA H100 80GB HBM3", "9.0", 132, 80 * 2**30, "580", "13.0", "2.11", "3.6", "0.1.0", features=feats
    )
    old = EnvInfo("cuda", "NVIDIA H200", "9.0", 132, 141 * 2**30, "570", "12.8", "2.11", "3.6", "0.1.0")
    with TuningDB.open(db_path) as db:
        for e in (env, old):
            db.record_trial(
                e,
                "norm",
                "dense",
                "1",
                {"d_out": 8, "d_in": 8, "r": 2},
                "bf16",
                {},
                TrialResult("ok", median_us=1.0, reps=3),
            )
    res = run("cache", "list", "--db", db_path)
    assert res.exit_code == 0, res.output
    ours = res.output.split("shipped caches:")[0]  # this database's section (the shipped caches follow)
    assert "device: L2 50 MB, 3.35 TB/s, SM 1980 MHz (from nvml)" in ours
    assert ours.count("device:") == 1  # the H200 row was recorded without features: nothing invented


def test_quick_flag_on_the_cpu_and_with_confirm_only(tmp_path):
    base = cpu_profile_args(str(tmp_path / "t.sqlite"), "--shapes", shapes_file(tmp_path), "--confirm-top", "0")
    res = CliRunner().invoke(cli, [*base, "--quick", "--confirm-only"])
    assert res.exit_code == 2 and "exclude each other" in res.output
    res = run(*base, "--quick")
    assert res.exit_code == 0, res.output
    assert "profiled in full" in res.output and "refit" not in res.output


def test_refit_after_a_quick_run_reports_each_table(tmp_path):
    from dora_tune.cli.profile import _refit

    from conftest import fill_known_crossover

    path = str(tmp_path / "k.sqlite")
    with TuningDB.open(path) as db:
        fill_known_crossover(db)
        text = _refit(db, "NVIDIA H200")
        assert len(db.models(gpu="h200")) == 1
        assert "nothing to fit" in _refit(db, "NVIDIA A100")
    assert text.startswith("refit for NVIDIA H200: 1 decision table(s) stored")
    assert "compose_train bf16:" in text and "CV regret" in text and "the crossover's" in text


def test_no_refit_on_transferred_shortlists_alone(tmp_path):
    """After a quick run that timed only shortlists of other tables (another GPU's, or this GPU's bf16 ones for an
    fp16 run), no table of that dtype is fitted (those tables keep serving it); with this GPU's own tables of the
    dtype, or the whole space timed, it refits that dtype alone."""
    from dora_tune.cli.profile import _NO_REFIT, _after_quick

    from conftest import fill_known_crossover

    path = str(tmp_path / "k.sqlite")
    with TuningDB.open(path) as db:
        fill_known_crossover(db)
        quick = {"dtypes": ("bf16",), "narrowed": True}
        assert _after_quick(db, "NVIDIA H200", own_dtypes=set(), **quick) == _NO_REFIT.format(dtypes="bf16")
        assert db.models(gpu="h200") == []
        # fp16 shortlists of this GPU's bf16 tables: bf16 is not refitted by an fp16 run, fp16 not fitted at all
        text = _after_quick(db, "NVIDIA H200", dtypes=("fp16",), own_dtypes={"bf16"}, narrowed=True)
        assert text == _NO_REFIT.format(dtypes="fp16") and db.models(gpu="h200") == []
        full = _after_quick(db, "NVIDIA H200", dtypes=("bf16",), own_dtypes=set(), narrowed=False)
        assert full.startswith("refit for") and len(db.models(gpu="h200")) == 1
        assert _after_quick(db, "NVIDIA H200", own_dtypes={"bf16"}, **quick).startswith("refit for")
        both = _after_quick(db, "NVIDIA H200", dtypes=("bf16", "fp16"), own_dtypes={"bf16"}, narrowed=True)
        assert both.startswith("refit for") and both.endswith(_NO_REFIT.format(dtypes="fp16"))
