"""Concurrency and faults, on SQLite and on a real PostgreSQL server: several profilers writing one database at
once, a profiler killed with SIGKILL, a server stopped under a running profiler. Each prints its figures (run with
``-s`` to see them); each asserts that nothing was lost, duplicated or half-written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dora_tune.autotune_db import TuningDB

from conftest import start_pg_server, stop_pg_server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PG_SH = os.path.join(REPO, ".ci", "pg.sh")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def location(request, tmp_path):
    """A fresh database on each backend: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "t.sqlite")
    return request.getfixturevalue("pg_url")


def shapes_file(path, norms, comps):
    path.write_text(
        json.dumps(
            {
                "norm": [{"d_out": d, "d_in": 48, "r": 4} for d in norms],
                "compose": [{"rows": r, "cols": 40} for r in comps],
            }
        )
    )
    return str(path)


def profile_cmd(location, shapes, rep="1"):
    return [
        sys.executable,
        "-m",
        "dora_tune",
        "profile",
        "--gpu",
        "cpu",
        "--db",
        location,
        "--shapes",
        shapes,
        "--rep",
        rep,
        "--warmup",
        "0",
        "--no-progress",
        "--confirm-top",
        "0",
    ]


def trial_keys(location):
    with TuningDB.open(location, readonly=True) as db:
        trials = db.trials()
    keys = [
        (t.env_id, t.op, t.impl, json.dumps(t.shape, sort_keys=True), t.dtype, json.dumps(t.config)) for t in trials
    ]
    return trials, keys


def backend(location):
    return "PostgreSQL" if "://" in location else "SQLite"


def expected(norms, comps):
    """Trials a CPU profile records: norm × (dense, factored_torch), compose × eager, compose_train × eager."""
    return 2 * len(set(norms)) + 2 * len(set(comps))


def test_four_profilers_writing_one_database_at_once(location, tmp_path):
    """4 processes, each with its own shapes and the same shared ones (both write those keys): all succeed, and
    the database holds each trial exactly once."""
    shared_n, shared_c = [32, 40], [4]
    sets = [([*shared_n, 100 + 8 * i], [*shared_c, 10 + i]) for i in range(4)]
    procs = []
    t0 = time.time()
    for i, (norms, comps) in enumerate(sets):
        cmd = profile_cmd(location, shapes_file(tmp_path / f"s{i}.json", norms, comps))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    seconds = time.time() - t0
    assert [p.returncode for p in procs] == [0] * 4, outs
    trials, keys = trial_keys(location)
    all_n = {n for norms, _ in sets for n in norms}
    all_c = {c for _, comps in sets for c in comps}
    want = expected(all_n, all_c)
    assert len(trials) == want and len(set(keys)) == want  # none lost, none twice
    assert all(t.status == "ok" and t.median_us and t.median_us > 0 for t in trials)
    print(f"\n4 concurrent profilers on {backend(location)}: {len(trials)} trials, 0 errors, {seconds:.1f} s")


def test_a_killed_profiler_leaves_whole_rows_and_a_rerun_completes(location, tmp_path):
    norms, comps = [32 + 8 * i for i in range(6)], [4 + i for i in range(6)]
    sf = shapes_file(tmp_path / "s.json", norms, comps)
    proc = subprocess.Popen(profile_cmd(location, sf, rep="150"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        n, deadline = 0, time.time() + 90
        while time.time() < deadline and n < 3:
            time.sleep(0.3)
            try:
                n = len(trial_keys(location)[0])
            except Exception:  # not created yet
                n = 0
        assert n >= 3, "the profiler recorded nothing in time"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial, _ = trial_keys(location)
    assert 3 <= len(partial) < expected(norms, comps) and all(t.status == "ok" and t.median_us for t in partial)
    res = subprocess.run(profile_cmd(location, sf), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    trials, keys = trial_keys(location)
    assert len(trials) == expected(norms, comps) == len(set(keys))
    print(f"\nSIGKILL on {backend(location)}: {len(partial)} whole rows kept, rerun completed to {len(trials)}")


@pytest.mark.postgres
def test_a_server_stopped_under_a_profiler(pg_admin_url, tmp_path):
    """The server goes down mid-profile (an immediate stop, as a crash): the profiler fails with one clear line, the
    rows written before are whole, and once the server is back a rerun completes without duplicates."""
    try:
        admin, data_dir = start_pg_server()  # a private server: the shared one must stay up
    except (RuntimeError, OSError) as e:
        pytest.skip(f"no private PostgreSQL server: {e}")
    try:
        url = admin.rsplit("/", 1)[0] + "/postgres"
        norms, comps = [32 + 8 * i for i in range(8)], [4 + i for i in range(8)]
        sf = shapes_file(tmp_path / "s.json", norms, comps)
        proc = subprocess.Popen(
            profile_cmd(url, sf, rep="150"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        n, deadline = 0, time.time() + 90
        while time.time() < deadline and n < 3:
            time.sleep(0.3)
            try:
                n = len(trial_keys(url)[0])
            except Exception:
                n = 0
        assert n >= 3, "the profiler recorded nothing in time"
        subprocess.run([PG_SH, "halt", data_dir], check=True, timeout=60)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 1, out
        errors = [line for line in out.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "Traceback" not in out, out
        subprocess.run([PG_SH, "resume", data_dir], check=True, timeout=60)
        partial, _ = trial_keys(url)
        assert len(partial) >= n and all(t.status == "ok" and t.median_us for t in partial)
        res = subprocess.run(profile_cmd(url, sf), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        trials, keys = trial_keys(url)
        assert len(trials) == expected(norms, comps) == len(set(keys))
        print(f"\nserver stopped mid-profile: {len(partial)} whole rows kept; error: {errors[0][:100]}")
    finally:
        stop_pg_server(data_dir)


OPEN_AND_RECORD = """
import sys, time
from dora_tune.autotune_db import EnvInfo, TrialResult, TuningDB
url, start, i = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
env = EnvInfo("cpu", "CPU (x86_64)", "", 0, 0, "", "", "2.11", "none", "0.1.0")
time.sleep(max(0.0, start - time.time()))  # every process opens the new database at the same moment
with TuningDB.open(url) as db:
    db.record_trial(env, "norm", "dense", "v1", {"d_out": 8 + i, "d_in": 8, "r": 2}, "fp32", {},
                    TrialResult("ok", median_us=1.0 + i, reps=1))
"""


def test_processes_creating_a_new_database_together(location):
    """8 processes open the same empty database at once (each creates the schema if it finds none) and record one
    trial: every one succeeds, the schema is created once, all 8 trials are there."""
    start = time.time() + 3.0
    cmds = [[sys.executable, "-c", OPEN_AND_RECORD, location, str(start), str(i)] for i in range(8)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    failed = "\n".join(o for p, o in zip(procs, outs, strict=True) if p.returncode)
    assert not failed, failed  # the whole output of each failed process
    trials, keys = trial_keys(location)
    assert len(trials) == 8 == len(set(keys))
    with TuningDB.open(location, readonly=True) as db:
        assert len(db.environments()) == 1


def test_the_wal_switch_waits_out_a_locked_new_file(monkeypatch):
    """SQLite can refuse ``journal_mode=WAL`` at once ("database is locked") while other processes create the same
    new file: the switch is retried; a file already in WAL mode is not switched again; other errors propagate."""
    import sqlite3

    from dora_tune.autotune_db import store

    monkeypatch.setattr(store.time, "sleep", lambda s: None)

    class Cursor:
        def __init__(self, mode, refusals, error="database is locked"):
            self.mode, self.refusals, self.error, self.switches = mode, refusals, error, 0

        def execute(self, sql):
            if sql == "PRAGMA journal_mode":
                return self
            self.switches += 1
            if self.refusals:
                self.refusals -= 1
                raise sqlite3.OperationalError(self.error)
            self.mode = "wal"
            return self

        def fetchone(self):
            return (self.mode,)

    c = Cursor("delete", refusals=3)
    store._set_wal(c)
    assert c.mode == "wal" and c.switches == 4
    c = Cursor("wal", refusals=0)
    store._set_wal(c)
    assert c.switches == 0
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store._set_wal(Cursor("delete", refusals=99), tries=5)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        store._set_wal(Cursor("delete", refusals=1, error="disk I/O error"))
