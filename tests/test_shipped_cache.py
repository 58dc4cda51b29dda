from pathlib import Path

import pytest

import dora_tune
from dora_tune.autotune_db import TuningDB

CACHES = Path(dora_tune.__file__).parent / "caches"
SHIPPED = {"nvidia-h100-80gb-hbm3.sqlite": "NVIDIA H100 80GB HBM3", "nvidia-h200.sqlite": "NVIDIA H200"}
#: ops ("op") and implementations ("op/impl") a cache holds no trials of, and why: the dora_linear op (issue 20) was
#: added after the H200 file was measured and profiled on the H100 only; an H200 plans it by the H100's table
#: (transferred: tests/dispatch/test_plan.py)
NOT_PROFILED = {"nvidia-h200.sqlite": {"dora_linear"}}


def test_the_caches_shipped_are_those_documented():
    assert sorted(p.name for p in CACHES.iterdir() if "sqlite" in p.name) == sorted(SHIPPED)
    readme = (CACHES / "README.md").read_text()
    assert all(f"## {name}" in readme for name in SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_cache_is_shipped_small_and_readable_read_only(name):
    cache = CACHES / name
    assert cache.is_file() and cache.stat().st_size <= 10 * 2**20
    header = cache.read_bytes()[:100]
    assert header[:16] == b"SQLite format 3\x00" and header[18] == header[19] == 1  # rollback journal, not WAL
    with TuningDB.open(str(cache), readonly=True) as db:
        envs = db.environments()
        assert [e.gpu_name for e in envs] == [SHIPPED[name]] and envs[0].compute_capability == "9.0"
        assert envs[0].trials >= 1000
        best = db.best(op="norm", shape={"d_out": 4096, "d_in": 4096, "r": 384}, dtype="bf16")
        assert len(best) == 1 and best[0].impl == "triton" and best[0].median_us > 0
        ops = {"norm", "compose", "compose_train", "dora_linear"} - NOT_PROFILED.get(name, set())
        assert {m.op for m in db.models(gpu=SHIPPED[name])} == ops


def test_package_data_includes_caches():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"dora_tune.caches" = ["*.sqlite", "*.md"]' in text


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_cache_holds_the_current_implementation_versions(name):
    """Every implementation of the code has trials in the shipped cache under its current version: an edit to a
    kernel's versioned source (even a reformat) would make every shipped measurement of it stale."""
    import sqlite3

    from dora_tune.dispatch.registry import registry

    con = sqlite3.connect(f"file:{CACHES / name}?mode=ro", uri=True)
    try:
        stored = set(
            con.execute(
                "SELECT i.op, i.name, i.version FROM implementations i WHERE EXISTS "
                "(SELECT 1 FROM trials t WHERE t.impl_id = i.id AND t.status = 'ok')"
            )
        )
    finally:
        con.close()
    skip = NOT_PROFILED.get(name, set())
    current = {
        (op, impl.name, impl.version)
        for op, impls in registry().items()
        for impl in impls
        if op not in skip and f"{op}/{impl.name}" not in skip
    }
    assert current <= stored, sorted(current - stored)
    # a cache that gained the op or implementation is no longer listed
    assert not {op for op, _, _ in stored} & skip and not {f"{op}/{i}" for op, i, _ in stored} & skip
