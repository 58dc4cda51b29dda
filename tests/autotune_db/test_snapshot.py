"""The dispatcher's snapshot reader: the standard-library SQLite path gives what the SQLAlchemy store gives, refuses
what the store refuses, and does not import SQLAlchemy."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dora_tune.autotune_db import SCHEMA_VERSION, DatabaseError, EnvInfo, SchemaError, TrialResult, TuningDB, to_url
from dora_tune.autotune_db.snapshot import read_snapshot

H200 = EnvInfo("cuda", "NVIDIA H200", "9.0", 132, 141 << 30, "1", "13.0", "2.11", "3.6", "0.1.0")
H200_TORCH = EnvInfo("cuda", "NVIDIA H200", "9.0", 132, 141 << 30, "1", "13.0", "2.12", "3.6", "0.1.0")
NVL = EnvInfo("cuda", "NVIDIA H200 NVL", "9.0", 132, 141 << 30, "1", "13.0", "2.11", "3.6", "0.1.0")


def ok(us: float) -> TrialResult:
    return TrialResult("ok", us, us, us, 5)


def build(path: str) -> None:
    """Two environments of one GPU model, a GPU whose name extends it, several configs and versions per shape,
    failed trials, and fitted models for each GPU."""
    shapes = [{"rows": r, "cols": c} for r in (1, 640, 4096) for c in (48, 4096)]
    with TuningDB.open(path) as db:
        for k, shape in enumerate(shapes):
            for env, scale in ((H200, 1.0), (H200_TORCH, 0.9), (NVL, 0.5)):
                for impl, version in (("eager", "v1"), ("triton", "v1"), ("triton", "v0")):
                    for j in range(3):
                        us = scale * (
                            10.0 + 7.0 * k + 3.0 * ((j + 1) % 3) + (5.0 if impl == "eager" else 0.0)
                        )  # j=2 fastest
                        db.record_trial(env, "compose", impl, version, shape, "bf16", {"block_c": 128 << j}, ok(us))
                db.record_trial(
                    env, "compose", "triton", "v1", shape, "bf16", {"block_c": 64}, TrialResult("failed", error="boom")
                )
                db.record_trial(env, "compose", "triton", "v1", shape, "fp16", {"block_c": 64}, ok(1.0))
        db.save_model(H200, "compose", "bf16", "tree", {"format": 1, "who": "h200"}, {"cv": {"n": 1}})
        db.save_model(H200_TORCH, "compose", "bf16", "tree", {"format": 1, "who": "h200b"}, {"cv": {}})
        db.save_model(NVL, "compose", "bf16", "tree", {"format": 1, "who": "nvl"}, {"cv": {}})


def oracle(path: str, gpu: str) -> list[tuple]:
    """The fastest ok trial of each (environment, op, impl, version, shape, dtype), from the store's plain query."""
    best: dict[tuple, tuple] = {}
    with TuningDB.open(path, readonly=True) as db:
        for t in db.trials(status="ok"):
            if t.gpu_name != gpu:
                continue
            key = (t.env_id, t.op, t.impl, t.impl_version, json.dumps(t.shape, sort_keys=True), t.dtype)
            row = (
                t.op,
                t.impl,
                t.impl_version,
                key[4].replace(" ", ""),
                t.dtype,
                json.dumps(t.config, sort_keys=True).replace(" ", ""),
                t.median_us,
            )
            if key not in best or row[6] < best[key][6]:
                best[key] = row
    return sorted(best.values())


@pytest.mark.parametrize("gpu", ["NVIDIA H200", "NVIDIA H200 NVL", "Other"])
def test_sqlite_and_sqlalchemy_paths_agree_with_the_store(tmp_path: Path, gpu: str) -> None:
    path = str(tmp_path / "t.sqlite")
    build(path)
    fast, via_url = read_snapshot(path, gpu), read_snapshot(to_url(path), gpu)
    expected = oracle(path, gpu)
    assert sorted(fast.fastest) == sorted(via_url.fastest) == expected
    assert len(expected) == {"NVIDIA H200": 48, "NVIDIA H200 NVL": 24, "Other": 0}[gpu]
    with TuningDB.open(path, readonly=True) as db:
        assert sorted(db.fastest_per_impl(gpu)) == expected
    tables = [(op, dt, json.loads(p)["who"], json.loads(m)) for op, dt, p, m in fast.tables]
    assert tables == [(op, dt, json.loads(p)["who"], json.loads(m)) for op, dt, p, m in via_url.tables]
    h200 = [("compose", "bf16", "h200", {"cv": {"n": 1}}), ("compose", "bf16", "h200b", {"cv": {}})]
    assert (
        tables == {"NVIDIA H200": h200, "NVIDIA H200 NVL": [("compose", "bf16", "nvl", {"cv": {}})], "Other": []}[gpu]
    )


def test_the_fastest_rows_are_per_environment_and_keep_their_config(tmp_path: Path) -> None:
    path = str(tmp_path / "t.sqlite")
    build(path)
    rows = read_snapshot(path, "NVIDIA H200").fastest
    # 6 shapes × (eager v1, triton v1, triton v0) × 2 environments in bf16, + triton v1 in fp16 × 6 × 2
    assert len(rows) == 6 * 3 * 2 + 6 * 2
    first = [r for r in rows if r[3] == '{"cols":48,"rows":1}' and r[1] == "eager" and r[4] == "bf16"]
    assert sorted((r[5], r[6]) for r in first) == [('{"block_c":512}', 13.5), ('{"block_c":512}', 15.0)]


def test_refuses_what_the_store_refuses(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no tuning database"):
        read_snapshot(str(tmp_path / "missing.sqlite"), "NVIDIA H200")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"garbage" * 100)
    with pytest.raises(DatabaseError, match="not a usable SQLite"):
        read_snapshot(str(garbage), "NVIDIA H200")
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(SchemaError, match="empty"):
        read_snapshot(str(empty), "NVIDIA H200")
    foreign = tmp_path / "foreign.sqlite"
    _sql(foreign, "CREATE TABLE users (id INTEGER PRIMARY KEY)")
    with pytest.raises(SchemaError, match="not a dora-tune database"):
        read_snapshot(str(foreign), "NVIDIA H200")
    newer = tmp_path / "newer.sqlite"
    build(str(newer))
    _sql(newer, f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
    for where in (str(newer), to_url(str(newer))):
        with pytest.raises(SchemaError, match="newer"):
            read_snapshot(where, "NVIDIA H200")


def test_a_schema_1_file_reads_without_tables(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    build(str(path))
    _sql(path, "DROP TABLE fitted_models")
    _sql(path, "UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    snap = read_snapshot(str(path), "NVIDIA H200")
    assert snap.tables == [] and len(snap.fastest) == 48


def test_reading_a_sqlite_file_imports_no_sqlalchemy(tmp_path: Path) -> None:
    from dora_tune.dispatch.registry import registry

    path = str(tmp_path / "t.sqlite")
    eager = next(i for i in registry()["compose"] if i.name == "eager")
    with TuningDB.open(path) as db:
        db.record_trial(H200, "compose", "eager", eager.version, {"rows": 640, "cols": 4096}, "bf16", {}, ok(3.0))
    code = (
        "import sys; from dora_tune.dispatch import Dispatcher; "
        f"d = Dispatcher({path!r}, use_shipped=True, force_env=''); "
        "p = d.plan_for_gpu('NVIDIA H200', 'compose', {'rows': 640, 'cols': 4096}, 'bf16'); "
        "import dora_tune.dispatch.timing; "  # what the first-use race imports
        "print(p.impl, p.source, [m for m in ('sqlalchemy', 'sklearn', 'triton') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["eager", "measured", "[]"]


def _sql(path: Path, query: str) -> None:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        conn.execute(query)
        conn.commit()
    finally:
        conn.close()
