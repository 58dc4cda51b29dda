"""The tuning DB on a real PostgreSQL server: the store API, migration, export/merge with SQLite, the profiler CLI
and the dispatcher reading plans from a PostgreSQL URL. Each test gets a fresh database (``pg_url``)."""

import dataclasses
import time
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from dora_tune.autotune_db import SCHEMA_VERSION, EnvInfo, GpuFeatures, SchemaError, TrialResult, TuningDB

from conftest import _pg_exec

pytestmark = pytest.mark.postgres

FEATS = GpuFeatures(62_914_560, 4915.2, 1980, 3201, 6144, "nvml")
H200 = EnvInfo(
    "cuda", "NVIDIA H200", "9.0", 132, 150_000_000_000, "570.1", "12.8", "2.11.0", "3.6.0", "0.1.0", features=FEATS
)
RTX = EnvInfo("cuda", "NVIDIA GeForce RTX 4090", "8.9", 128, 25_000_000_000, "570.1", "12.8", "2.11.0", "3.6", "0.1.0")
SHAPE = {"d_out": 4096, "d_in": 4096, "r": 16}


def ok(us):
    return TrialResult("ok", median_us=us, p20_us=us * 0.9, p80_us=us * 1.1, reps=50, peak_mem_bytes=1 << 20)


def timed(us, wall):
    return dataclasses.replace(ok(us), wall_us=wall)


def fill(db):
    for k, us in enumerate((5.0, 3.0, 4.0)):
        db.record_trial(H200, "norm", "triton", "v1", SHAPE, "bf16", {"block_m": 32 << k}, ok(us))
    db.record_trial(H200, "norm", "dense", "v1", SHAPE, "bf16", {}, ok(9.0))
    db.record_trial(H200, "norm", "triton", "v1", SHAPE, "bf16", {"block_m": 512}, TrialResult("oom", error="OOM"))
    db.record_trial(RTX, "norm", "triton", "v1", SHAPE, "bf16", {"block_m": 64}, ok(7.0))
    db.save_model(H200, "norm", "bf16", "linear_trees", {"op": "norm", "cells": [1]}, {"cv": {"ok": True}})


def test_the_store_api_on_postgres(pg_url, tmp_path):
    with TuningDB.open(pg_url) as db:
        fill(db)
        db.record_trial(H200, "norm", "triton", "v1", SHAPE, "bf16", {"block_m": 64}, ok(2.5))  # overwrite
        assert len(db.trials()) == 6
        assert len(db.trials(gpu="h200", status="ok")) == 4
        [best] = db.best(gpu="h200", op="norm")
        assert (best.impl, best.config, best.median_us) == ("triton", {"block_m": 64}, 2.5)
        assert db.measured_keys(H200, "norm", "triton", "v1", "bf16")
        [m] = db.models(gpu="h200")
        assert m.payload == {"op": "norm", "cells": [1]} and m.metrics == {"cv": {"ok": True}}
        envs = {e.gpu_name: e for e in db.environments()}
        assert envs["NVIDIA H200"].features == FEATS and envs["NVIDIA GeForce RTX 4090"].features is None
        fastest = db.fastest_per_impl("NVIDIA H200")
        assert sorted((r[1], r[6]) for r in fastest) == [("dense", 9.0), ("triton", 2.5)]
        # export to a SQLite file, and back
        out = tmp_path / "export.sqlite"
        assert db.export(str(out)) == 6
    with TuningDB.open(str(out), readonly=True) as lite:
        assert len(lite.trials()) == 6 and len(lite.models()) == 1
        assert {e.gpu_name: e.features for e in lite.environments()}["NVIDIA H200"] == FEATS
    with TuningDB.open(str(tmp_path / "local.sqlite")) as local:
        local.record_trial(RTX, "norm", "triton", "v1", SHAPE, "bf16", {"block_m": 128}, ok(6.0))
        st = local.merge(pg_url)  # PostgreSQL → SQLite
        assert (st.trials_added, st.models_added) == (6, 1)
    with TuningDB.open(pg_url) as db:
        st = db.merge(str(tmp_path / "local.sqlite"))  # SQLite → PostgreSQL: only what it lacks
        assert (st.envs_added, st.trials_added, st.trials_skipped) == (0, 1, 6)
        assert len(db.trials()) == 7
    with TuningDB.open(pg_url, readonly=True) as ro:
        assert len(ro.trials()) == 7


def test_schema_version_and_migration_on_postgres(pg_url, pg_admin_url):
    with TuningDB.open(pg_url) as db:
        fill(db)
    _pg_sql(pg_url, "DROP TABLE gpu_features")  # what a schema-2 dora-tune left on the server
    _pg_sql(pg_url, "ALTER TABLE trials DROP COLUMN wall_us")
    _pg_sql(pg_url, "UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with TuningDB.open(pg_url, readonly=True) as ro:  # read as it is
        assert len(ro.trials()) == 6 and all(e.features is None for e in ro.environments())
    with TuningDB.open(pg_url) as db:  # migrated in place
        assert [e.features for e in db.environments()] == [None, None]
        db.record_trial(H200, "norm", "triton", "v1", SHAPE, "bf16", {"block_m": 1024}, ok(8.0))
        assert {e.gpu_name: e.features for e in db.environments()}["NVIDIA H200"] == FEATS
    assert _pg_sql(pg_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    _pg_sql(pg_url, f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
    with pytest.raises(SchemaError, match="newer"):
        TuningDB.open(pg_url)


def test_schema_3_is_served_and_migrated_to_4_on_postgres(pg_url):
    with TuningDB.open(pg_url) as db:
        fill(db)
    _pg_sql(pg_url, "ALTER TABLE trials DROP COLUMN wall_us")  # what a schema-3 dora-tune left on the server
    _pg_sql(pg_url, "UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    with TuningDB.open(pg_url, readonly=True) as ro:  # read as it is
        assert len(ro.trials()) == 6 and all(t.wall_us is None for t in ro.trials())
        assert {b.wall_us for b in ro.best()} == {None}
        assert sorted((r[1], r[6]) for r in ro.fastest_per_impl("NVIDIA H200")) == [("dense", 9.0), ("triton", 3.0)]
    assert _pg_sql(pg_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [("3",)]
    with TuningDB.open(pg_url) as db:  # migrated in place
        assert all(t.wall_us is None for t in db.trials())
        db.record_trial(H200, "norm", "triton", "v1", SHAPE, "bf16", {"block_m": 1024}, timed(8.0, 30.0))
        assert {t.config["block_m"]: t.wall_us for t in db.trials(gpu="h200", impl="triton", status="ok")} == {
            32: None,
            64: None,
            128: None,
            1024: 30.0,
        }
    assert _pg_sql(pg_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]
    [(data_type, nullable)] = _pg_sql(
        pg_url,
        "SELECT data_type, is_nullable FROM information_schema.columns "
        "WHERE table_name = 'trials' AND column_name = 'wall_us'",
    )
    assert (data_type, nullable) == ("double precision", "YES")  # as create_all makes it on a fresh server


def test_wall_time_round_trips_between_postgres_and_sqlite(pg_url, tmp_path):
    cfg = {"block_m": 64}
    with TuningDB.open(pg_url) as db:
        db.record_trial(H200, "norm", "triton", "v1", SHAPE, "bf16", cfg, timed(3.0, 12.0))
        db.record_trial(H200, "norm", "dense", "v1", SHAPE, "bf16", {}, ok(9.0))
        db.record_trial(H200, "norm", "triton", "v1", SHAPE, "bf16", cfg, timed(2.5, 11.0))  # overwrite
        assert {t.impl: t.wall_us for t in db.trials()} == {"triton": 11.0, "dense": None}
        db.export(str(tmp_path / "export.sqlite"))
    with TuningDB.open(str(tmp_path / "export.sqlite"), readonly=True) as lite:
        assert {t.impl: t.wall_us for t in lite.trials()} == {"triton": 11.0, "dense": None}
    with TuningDB.open(str(tmp_path / "local.sqlite")) as local:
        assert local.merge(pg_url).trials_added == 2  # PostgreSQL → SQLite
        assert {t.impl: t.wall_us for t in local.trials()} == {"triton": 11.0, "dense": None}
        local.record_trial(H200, "norm", "triton", "v1", SHAPE, "bf16", cfg, timed(2.0, 40.0))  # re-timed here
    with TuningDB.open(pg_url) as db:
        st = db.merge(str(tmp_path / "local.sqlite"))  # SQLite → PostgreSQL: the newer trial replaces
        assert (st.trials_added, st.trials_updated, st.trials_skipped) == (0, 1, 1)
        assert {t.impl: (t.median_us, t.wall_us) for t in db.trials()} == {"triton": (2.0, 40.0), "dense": (9.0, None)}


def test_profile_cli_on_postgres(pg_url, tmp_path):
    import json

    from dora_tune.cli import cli

    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"norm": [{"d_out": 32, "d_in": 48, "r": 4}], "compose": [{"rows": 4, "cols": 40}]}))
    args = [
        "profile",
        "--gpu",
        "cpu",
        "--db",
        pg_url,
        "--shapes",
        str(shapes),
        "--rep",
        "1",
        "--warmup",
        "0",
        "--no-progress",
    ]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "database: postgresql+psycopg://" in res.output
    with TuningDB.open(pg_url, readonly=True) as db:
        n = len(db.trials())
        assert n == 2 + 1 + 1  # norm: dense + factored_torch; compose and compose_train: eager
    res = CliRunner().invoke(cli, args, catch_exceptions=False)  # resumable: nothing left to measure
    assert res.exit_code == 0 and f"{n} were already in the database" in res.output
    res = CliRunner().invoke(cli, ["show", "--db", pg_url, "--op", "norm"], catch_exceptions=False)
    assert res.exit_code == 0 and "best per shape (1 rows)" in res.output


def test_dispatcher_plans_from_a_postgres_url(pg_url):
    """The dispatcher reads a URL through the store (SQLAlchemy); the plan is the measured fastest, and the first
    plan's cost (reading the server) is reported in the test output."""
    from dora_tune.dispatch.registry import registry
    from dora_tune.dispatch.runtime import Dispatcher

    triton = next(i for i in registry()["norm"] if i.name == "triton")
    cfg = triton.configs(SHAPE)[3]
    env = dataclasses.replace(H200, gpu_name="NVIDIA H200")
    with TuningDB.open(pg_url) as db:
        db.record_trial(env, "norm", "triton", triton.version, SHAPE, "bf16", cfg, ok(3.0))
        db.record_trial(env, "norm", "triton", triton.version, SHAPE, "bf16", triton.configs(SHAPE)[0], ok(4.0))
    d = Dispatcher(pg_url, use_shipped=False, force_env="")
    t0 = time.perf_counter()
    plan = d.plan_for_gpu("NVIDIA H200", "norm", SHAPE, "bf16")
    first_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    again = d.plan_for_gpu("NVIDIA H200", "norm", SHAPE, "bf16")
    hot_us = (time.perf_counter() - t0) * 1e6
    assert plan.source == "measured" and plan.config.as_dict() == cfg and again == plan
    print(f"\nfirst plan from PostgreSQL: {first_ms:.1f} ms; memoised: {hot_us:.1f} µs")
    assert first_ms < 5000


def test_timestamps_round_trip_in_utc(pg_url):
    with TuningDB.open(pg_url) as db:
        db.record_trial(RTX, "norm", "dense", "v1", SHAPE, "bf16", {}, ok(1.0))
        [t] = db.trials()
    assert t.created_at.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - t.created_at).total_seconds()) < 600


def _pg_sql(url, sql):
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def test_an_unreachable_server_is_one_clear_error(pg_admin_url):
    from dora_tune.autotune_db import DatabaseError

    bad = pg_admin_url.rsplit("/", 1)[0] + "/no_such_database_here"
    with pytest.raises(DatabaseError) as info:
        TuningDB.open(bad)
    assert "no_such_database_here" in str(info.value) and "\n" not in str(info.value).strip()
    _pg_exec(pg_admin_url, "SELECT 1")  # the server itself is fine
