"""Tests of the tuning database (dora_tune.autotune_db): files, schema checks, queries, export and merge."""

import dataclasses
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from dora_tune.autotune_db import (
    SCHEMA_VERSION,
    DatabaseError,
    EnvInfo,
    GpuFeatures,
    MergeStats,
    ModelRow,
    SchemaError,
    TrialResult,
    TuningDB,
    canonical_json,
    default_db_location,
    gpu_slug,
    to_url,
)

H200 = EnvInfo("cuda", "NVIDIA H200", "9.0", 132, 150_000_000_000, "570.1", "12.8", "2.11.0", "3.6.0", "0.1.0")
FEATS = GpuFeatures(62_914_560, 4915.2, 1980, 3201, 6144, "nvml")
H200_F = dataclasses.replace(H200, features=FEATS)
RTX = EnvInfo("cuda", "NVIDIA GeForce RTX 4090", "8.9", 128, 25_000_000_000, "570.1", "12.8", "2.11.0", "3.6", "0.1.0")
SHAPE = {"M": 4096, "N": 128, "R": 16}


def ok(us: float) -> TrialResult:
    """An "ok" result of ``us`` microseconds."""
    return TrialResult("ok", median_us=us, p20_us=us * 0.9, p80_us=us * 1.1, reps=50, peak_mem_bytes=1 << 20)


def sql(path: Path, query: str) -> list[tuple]:
    """Run raw SQL on a SQLite file and commit."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(query).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path: Path):
    with TuningDB.open(str(tmp_path / "db" / "tuning.sqlite")) as d:
        yield d


# ------------------------------------------------------------------------------------------------ opening


def test_open_creates_wal_file_with_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "tuning.sqlite"
    with TuningDB.open(str(path)) as d:
        assert d.location == str(path)
        assert d.url == "sqlite:///" + str(path)
        assert not d.readonly
    assert path.is_file()
    assert sql(path, "PRAGMA journal_mode") == [("wal",)]
    assert sql(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    tables = {r[0] for r in sql(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"meta", "environments", "implementations", "trials", "fitted_models"} <= tables
    with TuningDB.open(str(path)) as d:  # reopening an existing file works and keeps it
        assert d.trials() == []


def test_plain_path_and_sqlite_url_open_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    with TuningDB.open(str(path)) as d:
        d.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(3.0))
    with TuningDB.open(f"sqlite:///{path}") as d:
        assert len(d.trials()) == 1
    with TuningDB.open(to_url(str(path))) as d:
        assert len(d.trials()) == 1


def test_to_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert to_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert to_url("sqlite:////abs/x.sqlite") == "sqlite:////abs/x.sqlite"
    assert to_url("/abs/x.sqlite") == "sqlite:////abs/x.sqlite"
    monkeypatch.chdir(tmp_path)
    assert to_url("rel.sqlite") == f"sqlite:///{tmp_path}/rel.sqlite"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert to_url("~/t.sqlite") == f"sqlite:///{tmp_path}/t.sqlite"


def test_env_var_sets_default_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DORA_TUNE_DB", raising=False)
    default = default_db_location()
    assert default.endswith(os.path.join("dora-tune", "tuning.sqlite")) or default.endswith("tuning.sqlite")
    target = tmp_path / "from_env.sqlite"
    monkeypatch.setenv("DORA_TUNE_DB", str(target))
    assert default_db_location() == str(target)
    with TuningDB.open() as d:
        assert d.location == str(target)
    assert target.is_file()
    monkeypatch.setenv("DORA_TUNE_DB", f"sqlite:///{tmp_path}/url.sqlite")
    with TuningDB.open() as d:
        d.record_trial(H200, "norm", "eager", "1", SHAPE, "float32", {}, ok(9.0))
    assert (tmp_path / "url.sqlite").is_file()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    TuningDB.open(str(path)).close()
    sql(path, f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
    with pytest.raises(SchemaError, match="newer"):
        TuningDB.open(str(path))
    with pytest.raises(SchemaError, match="newer"):
        TuningDB.open(str(path), readonly=True)


def test_older_schema_without_migration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    TuningDB.open(str(path)).close()
    sql(path, "UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(SchemaError, match="too old"):
        TuningDB.open(str(path))


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    sql(path, "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(SchemaError, match="not a dora-tune database"):
        TuningDB.open(str(path))
    assert sql(path, "SELECT name FROM sqlite_master WHERE type = 'table'") == [("users",)]  # left untouched


def test_random_bytes_file_is_a_database_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite"
    path.write_bytes(os.urandom(4096))
    for readonly in (False, True):
        with pytest.raises(DatabaseError, match=r"junk\.sqlite"):
            TuningDB.open(str(path), readonly=readonly)


def test_truncated_file_is_a_database_error(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    with TuningDB.open(str(path)) as d:
        d.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(3.0))
    sql(path, "PRAGMA journal_mode=DELETE")
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatabaseError, match=r"cut\.sqlite"):
        TuningDB.open(str(cut), readonly=True)


def test_readonly(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    with TuningDB.open(str(path)) as d:
        d.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(3.0))
    with TuningDB.open(str(path), readonly=True) as ro:
        assert ro.readonly
        assert "mode=ro" in ro.url
        assert len(ro.trials()) == 1
        assert len(ro.best()) == 1
        assert ro.environments()[0].trials == 1
        with pytest.raises(DatabaseError, match="read-only"):
            ro.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 32}, ok(2.0))
        with pytest.raises(DatabaseError, match="read-only"):
            ro.merge(str(tmp_path / "whatever.sqlite"))
    with TuningDB.open(str(path)) as d:
        assert len(d.trials()) == 1
    missing = tmp_path / "nope" / "missing.sqlite"
    with pytest.raises(DatabaseError, match="no tuning database"):
        TuningDB.open(str(missing), readonly=True)
    assert not missing.parent.exists()


def test_closed_db_raises(tmp_path: Path) -> None:
    d = TuningDB.open(str(tmp_path / "t.sqlite"))
    d.close()
    d.close()  # idempotent
    with pytest.raises(DatabaseError, match="closed"):
        d.trials()


# ---------------------------------------------------------------------------------------- record and query


def test_record_and_query_round_trip(db: TuningDB) -> None:
    before = datetime.now(timezone.utc)
    config = {"fwd": {"BLOCK_M": 64, "num_warps": 4}, "bwd": {"BLOCK_M": 32, "num_warps": 8}}
    db.record_trial(H200, "compose", "triton", "2", SHAPE, "bfloat16", config, ok(12.5))
    [row] = db.trials()
    assert row.gpu_name == "NVIDIA H200"
    assert (row.op, row.impl, row.impl_version, row.dtype) == ("compose", "triton", "2", "bfloat16")
    assert row.shape == SHAPE
    assert row.config == config
    assert row.status == "ok"
    assert row.median_us == 12.5
    assert row.p20_us == pytest.approx(11.25)
    assert row.p80_us == pytest.approx(13.75)
    assert row.reps == 50
    assert row.peak_mem_bytes == 1 << 20
    assert row.error is None
    assert row.created_at.tzinfo is not None
    assert before <= row.created_at <= datetime.now(timezone.utc)
    [env] = db.environments()
    assert env.id == row.env_id
    assert env.trials == 1
    assert env.info == H200
    assert H200.slug == "nvidia-h200"


def test_rerecord_is_idempotent_and_overwrite_controls_replacement(db: TuningDB) -> None:
    cfg = {"BLOCK": 64}
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", cfg, ok(5.0))
    db.record_trial(H200, "norm", "triton", "1", dict(reversed(SHAPE.items())), "bfloat16", cfg, ok(4.0))
    [row] = db.trials()  # same key (shape key order does not matter): one row, replaced
    assert row.median_us == 4.0
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", cfg, ok(7.0), overwrite=False)
    [row] = db.trials()
    assert row.median_us == 4.0
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", cfg, ok(3.0), overwrite=True)
    [row] = db.trials()
    assert row.median_us == 3.0
    # a new impl version, dtype or env is a different key
    db.record_trial(H200, "norm", "triton", "2", SHAPE, "bfloat16", cfg, ok(3.0))
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "float16", cfg, ok(3.0))
    db.record_trial(RTX, "norm", "triton", "1", SHAPE, "bfloat16", cfg, ok(3.0))
    assert len(db.trials()) == 4
    assert len(db.environments()) == 2


def test_failed_and_oom_trials_are_kept_but_not_best(db: TuningDB) -> None:
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(8.0))
    db.record_trial(
        H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 128}, TrialResult("failed", error="compile error")
    )
    db.record_trial(
        H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 4096}, TrialResult("oom", error="CUDA OOM")
    )
    db.record_trial(H200, "norm", "eager", "1", SHAPE, "bfloat16", {}, TrialResult("invalid", median_us=0.5))
    assert len(db.trials()) == 4
    failed = db.trials(status="failed")
    assert [(t.config, t.error, t.median_us) for t in failed] == [({"BLOCK": 128}, "compile error", None)]
    assert [t.error for t in db.trials(status="oom")] == ["CUDA OOM"]
    [best] = db.best()
    assert best.status == "ok"
    assert best.median_us == 8.0
    # ordering: timed trials first by median, untimed ones last
    assert [t.median_us for t in db.trials()] == [0.5, 8.0, None, None]


def test_best_picks_fastest_across_impls_and_configs_per_shape(db: TuningDB) -> None:
    small, big = {"M": 128, "N": 64}, {"M": 8192, "N": 64}
    db.record_trial(H200, "norm", "triton", "1", small, "bfloat16", {"BLOCK": 64}, ok(4.0))
    db.record_trial(H200, "norm", "triton", "1", small, "bfloat16", {"BLOCK": 128}, ok(5.0))
    db.record_trial(H200, "norm", "eager", "1", small, "bfloat16", {}, ok(2.0))
    db.record_trial(H200, "norm", "triton", "1", big, "bfloat16", {"BLOCK": 64}, ok(30.0))
    db.record_trial(H200, "norm", "triton", "1", big, "bfloat16", {"BLOCK": 128}, ok(20.0))
    db.record_trial(H200, "norm", "eager", "1", big, "bfloat16", {}, ok(25.0))
    db.record_trial(H200, "norm", "eager", "1", big, "float32", {}, ok(40.0))
    db.record_trial(H200, "compose", "eager", "1", big, "bfloat16", {}, ok(99.0))
    db.record_trial(RTX, "norm", "triton", "1", small, "bfloat16", {"BLOCK": 64}, ok(6.0))
    db.record_trial(RTX, "norm", "eager", "1", small, "bfloat16", {"x": 1}, ok(6.0))  # tie: first recorded wins
    got = {(b.gpu_name, b.op, canonical_json(b.shape), b.dtype): (b.impl, b.config) for b in db.best()}
    assert got == {
        ("NVIDIA H200", "norm", canonical_json(small), "bfloat16"): ("eager", {}),
        ("NVIDIA H200", "norm", canonical_json(big), "bfloat16"): ("triton", {"BLOCK": 128}),
        ("NVIDIA H200", "norm", canonical_json(big), "float32"): ("eager", {}),
        ("NVIDIA H200", "compose", canonical_json(big), "bfloat16"): ("eager", {}),
        ("NVIDIA GeForce RTX 4090", "norm", canonical_json(small), "bfloat16"): ("triton", {"BLOCK": 64}),
    }
    [b] = db.best(gpu="h200", op="norm", dtype="bfloat16", shape=big)
    assert (b.impl, b.median_us) == ("triton", 20.0)
    assert db.best(gpu="a100") == []


def test_trials_filters(db: TuningDB) -> None:
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(3.0))
    db.record_trial(RTX, "norm", "eager", "1", SHAPE, "float32", {}, ok(5.0))
    db.record_trial(RTX, "compose", "eager", "1", {"M": 1}, "float32", {}, ok(5.0))
    for query in ("NVIDIA H200", "nvidia h200", "nvidia-h200", "H200", "h2"):
        assert {t.gpu_name for t in db.trials(gpu=query)} == {"NVIDIA H200"}, query
    assert len(db.trials(gpu="rtx-4090")) == 2
    assert len(db.trials(gpu="nvidia")) == 3
    assert db.trials(gpu="a100") == []
    assert len(db.trials(op="norm")) == 2
    assert len(db.trials(impl="eager")) == 2
    assert len(db.trials(dtype="float32")) == 2
    assert len(db.trials(shape={"R": 16, "N": 128, "M": 4096})) == 2
    assert len(db.trials(gpu="4090", op="norm", impl="eager", dtype="float32", shape=SHAPE, status="ok")) == 1
    assert [e.gpu_name for e in db.environments(gpu="4090")] == ["NVIDIA GeForce RTX 4090"]
    # ordered by gpu name first
    assert db.trials()[0].gpu_name == "NVIDIA GeForce RTX 4090"


def test_measured_keys(db: TuningDB) -> None:
    assert db.measured_keys(H200, "norm", "triton", "1", "bfloat16") == set()
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(3.0))
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 128}, TrialResult("oom"))
    db.record_trial(H200, "norm", "triton", "1", {"M": 1}, "bfloat16", {"BLOCK": 64}, ok(3.0))
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "float16", {"BLOCK": 32}, ok(3.0))  # other dtype
    db.record_trial(H200, "norm", "triton", "2", SHAPE, "bfloat16", {"BLOCK": 16}, ok(3.0))  # other version
    db.record_trial(RTX, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 8}, ok(3.0))  # other env
    assert db.measured_keys(H200, "norm", "triton", "1", "bfloat16") == {
        (canonical_json(SHAPE), canonical_json({"BLOCK": 64})),
        (canonical_json(SHAPE), canonical_json({"BLOCK": 128})),
        (canonical_json({"M": 1}), canonical_json({"BLOCK": 64})),
    }
    assert db.measured_keys(H200, "norm", "triton", "9", "bfloat16") == set()


def test_record_rejects_bad_arguments(db: TuningDB) -> None:
    with pytest.raises(TypeError):
        db.record_trial(H200, "norm", "triton", "1", {"M": {1, 2}}, "bfloat16", {}, ok(1.0))
    with pytest.raises(TypeError):
        db.record_trial(H200, "norm", "triton", "1", [1, 2], "bfloat16", {}, ok(1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        db.record_trial(H200, "", "triton", "1", SHAPE, "bfloat16", {}, ok(1.0))
    assert db.trials() == []


# ------------------------------------------------------------------------------------------ export and merge


def _fill(d: TuningDB) -> None:
    d.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(3.0))
    d.record_trial(H200, "norm", "eager", "1", SHAPE, "bfloat16", {}, ok(4.0))
    d.record_trial(RTX, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(6.0))
    d.record_trial(RTX, "compose", "torch", "3", SHAPE, "bfloat16", {}, ok(9.0))


def test_export_by_gpu(db: TuningDB, tmp_path: Path) -> None:
    _fill(db)
    dest = tmp_path / "out" / "h200.sqlite"
    assert db.export(str(dest), gpu="nvidia-h200") == 2
    assert sorted(p.name for p in dest.parent.iterdir()) == ["h200.sqlite"]  # no temp or WAL files left
    assert sql(dest, "PRAGMA journal_mode") == [("delete",)]
    with TuningDB.open(str(dest), readonly=True) as out:
        assert [e.gpu_name for e in out.environments()] == ["NVIDIA H200"]
        assert {t.impl for t in out.trials()} == {"triton", "eager"}
        assert {(t.impl, t.created_at) for t in out.trials()} == {(t.impl, t.created_at) for t in db.trials(gpu="h200")}
    assert sql(dest, "SELECT op, name, version FROM implementations ORDER BY name") == [
        ("norm", "eager", "1"),
        ("norm", "triton", "1"),
    ]
    assert sql(dest, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    with pytest.raises(DatabaseError, match="exists"):
        db.export(str(dest), gpu="h200")
    assert db.export(str(dest), gpu="4090", overwrite=True) == 2
    with TuningDB.open(str(dest), readonly=True) as out:
        assert [e.gpu_name for e in out.environments()] == ["NVIDIA GeForce RTX 4090"]
    with pytest.raises(DatabaseError, match="matches"):
        db.export(str(tmp_path / "none.sqlite"), gpu="a100")
    assert not (tmp_path / "none.sqlite").exists()
    assert db.export(str(tmp_path / "all.sqlite")) == 4
    with pytest.raises(DatabaseError, match="itself"):
        db.export(db.location, overwrite=True)


def test_merge_round_trip_and_dedupe(tmp_path: Path) -> None:
    with TuningDB.open(str(tmp_path / "src.sqlite")) as src:
        _fill(src)
        src.export(str(tmp_path / "a.sqlite"), gpu="h200")
        src.export(str(tmp_path / "b.sqlite"), gpu="4090")
        everything = {(t.gpu_name, t.impl, t.op, t.created_at) for t in src.trials()}
    with TuningDB.open(str(tmp_path / "fresh.sqlite")) as fresh:
        assert fresh.merge(str(tmp_path / "a.sqlite")) == MergeStats(1, 2, 0, 0)
        assert fresh.merge(f"sqlite:///{tmp_path}/b.sqlite") == MergeStats(1, 2, 0, 0)
        assert {(t.gpu_name, t.impl, t.op, t.created_at) for t in fresh.trials()} == everything
        assert fresh.merge(str(tmp_path / "a.sqlite")) == MergeStats(0, 0, 0, 2)  # again: no duplicates
        assert len(fresh.trials()) == 4
        assert len(fresh.environments()) == 2
        fresh.export(str(tmp_path / "old.sqlite"), gpu="h200")  # a copy of the current H200 trials

        # re-measure one H200 trial: the newer row must survive merging the older copy
        fresh.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(2.5))
        fresh.export(str(tmp_path / "new.sqlite"), gpu="h200")
        assert fresh.merge(str(tmp_path / "old.sqlite")) == MergeStats(0, 0, 0, 2)
        [row] = fresh.trials(gpu="h200", impl="triton")
        assert row.median_us == 2.5

    # the other way round: a DB holding the older copy takes the newer measurement
    with TuningDB.open(str(tmp_path / "old.sqlite")) as old:
        stats = old.merge(str(tmp_path / "new.sqlite"))
        assert stats == MergeStats(envs_added=0, trials_added=0, trials_updated=1, trials_skipped=1)
        [row] = old.trials(impl="triton")
        assert row.median_us == 2.5
        assert len(old.trials()) == 2


def test_merge_keeps_ids_apart(tmp_path: Path) -> None:
    # envs/impls get different ids in each file: merge must map them by natural key
    with TuningDB.open(str(tmp_path / "x.sqlite")) as x:
        x.record_trial(RTX, "compose", "torch", "3", SHAPE, "float32", {}, ok(1.0))
        x.record_trial(H200, "norm", "triton", "1", SHAPE, "float32", {"BLOCK": 8}, ok(2.0))
    with TuningDB.open(str(tmp_path / "y.sqlite")) as y:
        y.record_trial(H200, "norm", "triton", "1", SHAPE, "float32", {"BLOCK": 16}, ok(3.0))
        assert y.merge(str(tmp_path / "x.sqlite")) == MergeStats(1, 2, 0, 0)
        got = {(t.gpu_name, t.op, t.impl, canonical_json(t.config)) for t in y.trials()}
        assert got == {
            ("NVIDIA GeForce RTX 4090", "compose", "torch", "{}"),
            ("NVIDIA H200", "norm", "triton", '{"BLOCK":8}'),
            ("NVIDIA H200", "norm", "triton", '{"BLOCK":16}'),
        }
        assert {e.gpu_name: e.trials for e in y.environments()} == {"NVIDIA GeForce RTX 4090": 1, "NVIDIA H200": 2}


def test_merge_into_itself_is_refused(db: TuningDB) -> None:
    _fill(db)
    with pytest.raises(DatabaseError, match="itself"):
        db.merge(db.location)
    with pytest.raises(DatabaseError, match="itself"):
        db.merge(to_url(db.location))
    assert len(db.trials()) == 4


def test_merge_missing_or_foreign_file(db: TuningDB, tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no tuning database"):
        db.merge(str(tmp_path / "missing.sqlite"))
    foreign = tmp_path / "foreign.sqlite"
    sql(foreign, "CREATE TABLE t (x)")
    with pytest.raises(SchemaError, match="not a dora-tune database"):
        db.merge(str(foreign))


# ------------------------------------------------------------------------------------ wall time (schema 4)


def timed(us: float, wall: float | None) -> TrialResult:
    """An "ok" result of ``us`` microseconds of GPU time and ``wall`` of wall time (host included)."""
    return dataclasses.replace(ok(us), wall_us=wall)


def _make_v3(path: Path) -> None:
    """A schema-3 file as the previous dora-tune wrote it: no trials.wall_us column, schema_version 3."""
    with TuningDB.open(str(path)) as d:
        d.record_trial(H200_F, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(3.0))
        d.record_trial(H200_F, "norm", "eager", "1", SHAPE, "bfloat16", {}, ok(5.0))
        d.save_model(H200, "norm", "bf16", "knn", PAYLOAD, {"top1": 1.0})
    sql(path, "ALTER TABLE trials DROP COLUMN wall_us")
    sql(path, "UPDATE meta SET value = '3' WHERE key = 'schema_version'")


def test_schema_3_is_served_read_only_and_migrated_to_4(tmp_path: Path) -> None:
    """A schema-3 file keeps working: read-only as it is (every read, export and merge; no wall times), writable
    migrated in place (the old trials without wall time, the column as a fresh file has it)."""
    assert SCHEMA_VERSION == 4
    fresh = tmp_path / "fresh.sqlite"
    TuningDB.open(str(fresh)).close()
    old = tmp_path / "old.sqlite"
    _make_v3(old)
    with TuningDB.open(str(old), readonly=True) as ro:
        rows = ro.trials()
        assert len(rows) == 2 and all(t.wall_us is None for t in rows)
        [best] = ro.best(gpu="h200")
        assert (best.impl, best.median_us, best.wall_us) == ("triton", 3.0, None)
        assert sorted((r[1], r[6]) for r in ro.fastest_per_impl("NVIDIA H200")) == [("eager", 5.0), ("triton", 3.0)]
        assert [e.features for e in ro.environments()] == [FEATS] and len(ro.models()) == 1
        assert ro.export(str(tmp_path / "exported.sqlite")) == 2
        with TuningDB.open(str(tmp_path / "merged.sqlite")) as m:
            assert m.merge(str(old)) == MergeStats(1, 2, 0, 0, 1, 0, 0)
            assert [t.wall_us for t in m.trials()] == [None, None]
    assert sql(old, "SELECT value FROM meta WHERE key = 'schema_version'") == [("3",)]
    assert "wall_us" not in {c[1] for c in sql(old, "PRAGMA table_info(trials)")}
    with TuningDB.open(str(tmp_path / "exported.sqlite"), readonly=True) as out:  # written at schema 4
        assert [t.wall_us for t in out.trials()] == [None, None] and len(out.models()) == 1
    assert sql(tmp_path / "exported.sqlite", "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]
    with TuningDB.open(str(old)) as d:
        assert [t.wall_us for t in d.trials()] == [None, None]  # measured before: unknown, not invented
        d.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 32}, timed(4.0, 9.5))
        assert {canonical_json(t.config): t.wall_us for t in d.trials(impl="triton")} == {
            '{"BLOCK":64}': None,
            '{"BLOCK":32}': 9.5,
        }
    assert sql(old, "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]
    assert _columns(old, "trials") == _columns(fresh, "trials")
    assert sql(old, "SELECT COUNT(*) FROM trials") == [(3,)]


def test_wall_time_is_recorded_overwritten_exported_and_merged(tmp_path: Path, db: TuningDB) -> None:
    cfg = {"BLOCK": 64}
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", cfg, timed(3.0, 12.0))
    db.record_trial(H200, "norm", "eager", "1", SHAPE, "bfloat16", {}, ok(5.0))  # not measured: NULL
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 8}, TrialResult("oom", error="OOM"))
    got = {(t.impl, t.status): t.wall_us for t in db.trials()}
    assert got == {("triton", "ok"): 12.0, ("eager", "ok"): None, ("triton", "oom"): None}
    [best] = db.best()
    assert (best.median_us, best.wall_us) == (3.0, 12.0)
    # re-timed: the wall time is replaced like the GPU times, and a re-timing without one leaves none
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", cfg, timed(2.5, 11.0), overwrite=False)
    assert db.trials(impl="triton", status="ok")[0].wall_us == 12.0
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", cfg, timed(2.5, 11.0))
    [row] = db.trials(impl="triton", status="ok")
    assert (row.median_us, row.wall_us) == (2.5, 11.0)
    db.record_trial(H200, "norm", "eager", "1", SHAPE, "bfloat16", {}, timed(5.0, 6.0))
    db.record_trial(H200, "norm", "eager", "1", SHAPE, "bfloat16", {}, ok(5.5))
    assert db.trials(impl="eager")[0].wall_us is None
    db.record_trial(H200, "norm", "eager", "1", SHAPE, "bfloat16", {}, timed(5.0, 6.0))
    # export, and merge both ways: the newest row of each key wins, wall time included
    db.export(str(tmp_path / "old.sqlite"))
    with TuningDB.open(str(tmp_path / "old.sqlite"), readonly=True) as out:
        assert {(t.impl, t.status): t.wall_us for t in out.trials()} == {
            ("triton", "ok"): 11.0,
            ("eager", "ok"): 6.0,
            ("triton", "oom"): None,
        }
    db.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", cfg, timed(2.0, 20.0))
    with TuningDB.open(str(tmp_path / "fresh.sqlite")) as fresh:
        assert fresh.merge(db.location) == MergeStats(1, 3, 0, 0)
        assert fresh.trials(impl="triton", status="ok")[0].wall_us == 20.0
    with TuningDB.open(str(tmp_path / "old.sqlite")) as old:  # older copy takes the newer measurement
        assert old.merge(db.location) == MergeStats(0, 0, 1, 2)
        [row] = old.trials(impl="triton", status="ok")
        assert (row.median_us, row.wall_us) == (2.0, 20.0)
    assert db.merge(str(tmp_path / "old.sqlite")) == MergeStats(0, 0, 0, 3)  # nothing newer there
    assert db.trials(impl="triton", status="ok")[0].wall_us == 20.0


# --------------------------------------------------------------------------------------------- fitted models

PAYLOAD = {"op": "norm", "cells": [0, 1], "choices": [["triton", {"BLOCK": 64}], ["eager", {}]]}


def _columns(path: Path, table: str) -> list[tuple]:
    """(name, type, notnull, pk) of each column of ``table``, and its indexes' unique column lists."""
    cols = [(r[1], r[2], r[3], r[5]) for r in sql(path, f"PRAGMA table_info({table})")]
    uniques = sorted(
        tuple(c[2] for c in sql(path, f"PRAGMA index_info('{idx[1]}')"))
        for idx in sql(path, f"PRAGMA index_list({table})")
        if idx[2]
    )
    fks = sorted((r[2], r[3], r[4]) for r in sql(path, f"PRAGMA foreign_key_list({table})"))
    return [*cols, *uniques, *fks]


def _make_v1(path: Path) -> None:
    """A schema-1 file as an early dora-tune wrote it: no fitted_models or gpu_features table, schema_version 1."""
    with TuningDB.open(str(path)) as d:
        d.record_trial(H200, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(3.0))
    sql(path, "DROP TABLE fitted_models")
    sql(path, "DROP TABLE gpu_features")
    sql(path, "ALTER TABLE trials DROP COLUMN wall_us")
    sql(path, "UPDATE meta SET value = '1' WHERE key = 'schema_version'")


def _make_v2(path: Path) -> None:
    """A schema-2 file as the previous dora-tune wrote it: no gpu_features table, schema_version 2."""
    with TuningDB.open(str(path)) as d:
        d.record_trial(H200_F, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(3.0))
        d.save_model(H200, "norm", "bf16", "knn", PAYLOAD, {"top1": 1.0})
    sql(path, "DROP TABLE gpu_features")
    sql(path, "ALTER TABLE trials DROP COLUMN wall_us")
    sql(path, "UPDATE meta SET value = '2' WHERE key = 'schema_version'")


def test_schema_2_is_migrated_to_3(tmp_path: Path) -> None:
    """An old file keeps working: read-only as it is (no features), writable migrated in place (the old
    environment without features, a new one with them; the table as a fresh file has it)."""
    fresh = tmp_path / "fresh.sqlite"
    TuningDB.open(str(fresh)).close()
    old = tmp_path / "old.sqlite"
    _make_v2(old)
    with TuningDB.open(str(old), readonly=True) as ro:
        [env] = ro.environments()
        assert env.features is None and env.info == H200 and len(ro.trials()) == 1 and len(ro.models()) == 1
        ro.export(str(tmp_path / "exported.sqlite"))
        with TuningDB.open(str(tmp_path / "merged.sqlite")) as m:
            assert m.merge(str(old)).trials_added == 1
            assert [e.features for e in m.environments()] == [None]
    assert sql(old, "SELECT value FROM meta WHERE key = 'schema_version'") == [("2",)]
    with TuningDB.open(str(old)) as d:
        assert [e.features for e in d.environments()] == [None]  # recorded before: unknown, not invented
        d.record_trial(H200_F, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 32}, ok(4.0))
        assert [e.features for e in d.environments()] == [FEATS]  # the same environment gets them now
        d.record_trial(RTX, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 32}, ok(4.0))
    assert sql(old, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    assert _columns(old, "gpu_features") == _columns(fresh, "gpu_features")


def test_gpu_features_are_stored_read_exported_and_merged(tmp_path: Path, db: TuningDB) -> None:
    db.record_trial(H200_F, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(3.0))
    other = dataclasses.replace(FEATS, mem_bandwidth_gbs=1.0)
    db.record_trial(dataclasses.replace(H200, features=other), "norm", "triton", "1", SHAPE, "bf16", {}, ok(2.0))
    db.record_trial(RTX, "norm", "triton", "1", SHAPE, "bfloat16", {"BLOCK": 64}, ok(5.0))
    envs = {e.gpu_name: e for e in db.environments()}
    assert envs["NVIDIA H200"].features == FEATS  # the first recorded stay
    assert envs["NVIDIA H200"].info.features == FEATS and envs["NVIDIA H200"].info == H200
    assert envs["NVIDIA GeForce RTX 4090"].features is None
    out = tmp_path / "out.sqlite"
    db.export(str(out), gpu="h200")
    with TuningDB.open(str(out), readonly=True) as ro:
        assert [e.features for e in ro.environments()] == [FEATS]
    with TuningDB.open(str(tmp_path / "merged.sqlite")) as m:
        m.record_trial(H200, "compose", "eager", "1", {"rows": 1, "cols": 8}, "bf16", {}, ok(1.0))  # no features
        m.merge(db.location)
        got = {e.gpu_name: e.features for e in m.environments()}
    assert got == {"NVIDIA H200": FEATS, "NVIDIA GeForce RTX 4090": None}


def test_gpu_features_are_validated() -> None:
    with pytest.raises(ValueError, match="source"):
        dataclasses.replace(FEATS, source="table")
    with pytest.raises(ValueError, match="l2_bytes"):
        dataclasses.replace(FEATS, l2_bytes=-1)
    with pytest.raises(ValueError, match="mem_bandwidth_gbs"):
        dataclasses.replace(FEATS, mem_bandwidth_gbs=float("nan"))
    with pytest.raises(TypeError, match="features"):
        dataclasses.replace(H200, features={"l2_bytes": 1})
    assert dataclasses.replace(FEATS, mem_bandwidth_gbs=3).mem_bandwidth_gbs == 3.0


def test_schema_1_is_migrated_to_2(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.sqlite"
    TuningDB.open(str(fresh)).close()
    old = tmp_path / "old.sqlite"
    _make_v1(old)
    # read-only: served as it is, nothing written, no models
    with TuningDB.open(str(old), readonly=True) as ro:
        assert ro.models() == [] and ro.models(gpu="h200", op="norm") == []
        assert len(ro.trials()) == 1
        with pytest.raises(DatabaseError, match="read-only"):
            ro.save_model(H200, "norm", "bf16", "knn", PAYLOAD, {})
        ro.export(str(tmp_path / "exported.sqlite"))  # a schema-1 source exports its trials, no models
    assert sql(old, "SELECT value FROM meta WHERE key = 'schema_version'") == [("1",)]
    assert "fitted_models" not in {r[0] for r in sql(old, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    with TuningDB.open(str(tmp_path / "exported.sqlite"), readonly=True) as out:
        assert len(out.trials()) == 1 and out.models() == []
    # writable: migrated in place, trials kept, the table as a fresh schema-2 file has it
    with TuningDB.open(str(old)) as d:
        assert len(d.trials()) == 1
        d.save_model(H200, "norm", "bf16", "knn", PAYLOAD, {"top1": 1.0})
        assert [m.op for m in d.models()] == ["norm"]
    assert sql(old, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    assert _columns(old, "fitted_models") == _columns(fresh, "fitted_models")
    # a schema-2 file missing the table is not a dora-tune database
    sql(fresh, "DROP TABLE fitted_models")
    with pytest.raises(SchemaError, match="missing tables fitted_models"):
        TuningDB.open(str(fresh), readonly=True)


def test_save_model_upserts_and_models_filters(db: TuningDB) -> None:
    db.save_model(H200, "norm", "bf16", "knn", PAYLOAD, {"regret": 1.5})
    db.save_model(H200, "norm", "bf16", "extra_trees", {**PAYLOAD, "cells": [1, 1]}, {"regret": 1.1})  # replaces
    db.save_model(H200, "compose", "bf16", "knn", {"op": "compose"}, {})
    db.save_model(RTX, "norm", "fp16", "knn", {"op": "norm"}, {"n": [1, 2]})
    rows = db.models()
    assert [(m.gpu_name, m.op, m.dtype, m.estimator) for m in rows] == [
        ("NVIDIA GeForce RTX 4090", "norm", "fp16", "knn"),
        ("NVIDIA H200", "compose", "bf16", "knn"),
        ("NVIDIA H200", "norm", "bf16", "extra_trees"),
    ]
    m = rows[2]
    assert isinstance(m, ModelRow) and m.payload["cells"] == [1, 1] and m.metrics == {"regret": 1.1}
    assert m.created_at.tzinfo is not None
    assert [r.op for r in db.models(gpu="h200")] == ["compose", "norm"]
    assert [r.gpu_name for r in db.models(op="norm", dtype="fp16")] == ["NVIDIA GeForce RTX 4090"]
    assert db.models(gpu="a100") == [] and db.models(dtype="fp32") == []
    assert {e.gpu_name for e in db.environments()} == {"NVIDIA H200", "NVIDIA GeForce RTX 4090"}
    with pytest.raises(TypeError):
        db.save_model(H200, "norm", "bf16", "knn", [1, 2], {})
    with pytest.raises(ValueError):
        db.save_model(H200, "norm", "bf16", "knn", PAYLOAD, {"regret": float("nan")})
    with pytest.raises(ValueError):
        db.save_model(H200, "norm", "bf16", "", PAYLOAD, {})
    with pytest.raises(TypeError):
        db.save_model("h200", "norm", "bf16", "knn", PAYLOAD, {})
    assert len(db.models()) == 3


def test_export_and_merge_carry_models_newest_wins(tmp_path: Path) -> None:
    with TuningDB.open(str(tmp_path / "src.sqlite")) as src:
        _fill(src)
        src.save_model(H200, "norm", "bf16", "knn", PAYLOAD, {"v": "old"})
        src.save_model(RTX, "norm", "bf16", "knn", PAYLOAD, {"v": "rtx"})
        assert src.export(str(tmp_path / "h200.sqlite"), gpu="h200") == 2
        src.save_model(H200, "norm", "bf16", "knn", PAYLOAD, {"v": "new"})  # newer than the exported one
        src.export(str(tmp_path / "new.sqlite"), gpu="h200")
    with TuningDB.open(str(tmp_path / "h200.sqlite")) as out:
        assert [(m.gpu_name, m.metrics) for m in out.models()] == [("NVIDIA H200", {"v": "old"})]
        stats = out.merge(str(tmp_path / "new.sqlite"))
        assert (stats.models_added, stats.models_updated, stats.models_skipped) == (0, 1, 0)
        assert [m.metrics for m in out.models()] == [{"v": "new"}]
        out.export(str(tmp_path / "copy.sqlite"))
    # the older copy never overwrites the newer one
    with TuningDB.open(str(tmp_path / "new.sqlite")) as new:
        stats = new.merge(str(tmp_path / "h200.sqlite"))
        assert (stats.models_added, stats.models_updated, stats.models_skipped) == (0, 0, 1)
        assert [m.metrics for m in new.models()] == [{"v": "new"}]
    with TuningDB.open(str(tmp_path / "fresh.sqlite")) as fresh:
        assert fresh.merge(str(tmp_path / "src.sqlite")) == MergeStats(2, 4, 0, 0, 2, 0, 0)
        got = {(m.gpu_name, m.metrics["v"]) for m in fresh.models()}
        assert got == {("NVIDIA H200", "new"), ("NVIDIA GeForce RTX 4090", "rtx")}
        created = {m.gpu_name: m.created_at for m in fresh.models()}
    with TuningDB.open(str(tmp_path / "src.sqlite"), readonly=True) as src:
        assert {m.gpu_name: m.created_at for m in src.models()} == created  # timestamps kept


# -------------------------------------------------------------------------------------------- small helpers


def test_trial_result_validation() -> None:
    with pytest.raises(ValueError, match="status"):
        TrialResult("great", median_us=1.0)
    with pytest.raises(ValueError, match="median_us"):
        TrialResult("ok")
    with pytest.raises(ValueError, match="median_us"):
        TrialResult("ok", median_us=0.0)
    with pytest.raises(ValueError, match="median_us"):
        TrialResult("ok", median_us=float("nan"))
    with pytest.raises(ValueError, match="median_us"):
        TrialResult("ok", median_us=float("inf"))
    with pytest.raises(ValueError, match="reps"):
        TrialResult("ok", median_us=1.0, reps=-1)
    assert TrialResult("failed", error="boom").median_us is None
    assert TrialResult("ok", median_us=3).median_us == 3.0
    assert TrialResult("ok", median_us=3).wall_us is None
    assert TrialResult("ok", median_us=3, wall_us=7).wall_us == 7.0
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="wall_us"):
            TrialResult("ok", median_us=1.0, wall_us=bad)
    with pytest.raises(ValueError, match="kind"):
        EnvInfo("rocm", "x", "", 0, 0, "", "", "", "", "")


def test_canonical_json() -> None:
    assert canonical_json({"b": 1, "a": {"y": 2, "x": 3}}) == '{"a":{"x":3,"y":2},"b":1}'
    assert canonical_json({"N": 128, "M": 4096}) == canonical_json({"M": 4096, "N": 128})
    assert canonical_json({}) == "{}"
    with pytest.raises(TypeError):
        canonical_json({"a": object()})
    with pytest.raises(TypeError):
        canonical_json({"a": {1, 2}})
    with pytest.raises(TypeError):
        canonical_json({1: 2})
    with pytest.raises(ValueError):
        canonical_json({"a": float("nan")})


def test_gpu_slug() -> None:
    assert gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
    assert gpu_slug("  NVIDIA A100-SXM4-80GB ") == "nvidia-a100-sxm4-80gb"
    assert gpu_slug("cpu (x86_64)") == "cpu-x86-64"


def test_import_is_torch_free_and_side_effect_free(tmp_path: Path) -> None:
    code = (
        "import os, sys; import dora_tune.autotune_db; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert not os.path.exists(os.environ['DORA_TUNE_DB']), 'file created at import'"
    )
    env = {**os.environ, "DORA_TUNE_DB": str(tmp_path / "never.sqlite")}
    repo = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
