import functools
import gc
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import dora_tune.dispatch.runtime as plan_mod
from dora_tune.autotune_db import EnvInfo, TrialResult, TuningDB
from dora_tune.dispatch import Dispatcher, force
from dora_tune.dispatch.registry import registry
from dora_tune.kernels import DEFAULT_COMPOSE_CONFIG, ComposeConfig

GPU = "Fake GPU X1"
ENV = EnvInfo("cuda", GPU, "9.0", 100, 80 << 30, "1", "13.0", "2.11", "3.6", "0.1.0")
OTHER = EnvInfo("cuda", "Other GPU", "8.0", 50, 40 << 30, "1", "13.0", "2.11", "3.6", "0.1.0")
SHAPE = {"rows": 2048, "cols": 4096}
FAST = {"block_r": 4, "block_c": 512, "num_warps": 4}


def version(op, impl):
    return next(i.version for i in registry()[op] if i.name == impl)


def add(db_path, env, op, impl, shape, config, us, *, ver=None):
    with TuningDB.open(db_path) as db:
        db.record_trial(
            env, op, impl, ver or version(op, impl), shape, "bf16", config, TrialResult("ok", us, us, us, 5)
        )


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    path = tmp_path / "shipped.sqlite"
    monkeypatch.setattr(plan_mod, "shipped_cache_path", lambda gpu: path)
    return str(path)


def test_measured_user_db_wins(tmp_path, shipped):
    user = str(tmp_path / "user.sqlite")
    add(user, ENV, "compose", "triton", SHAPE, FAST, 10.0)
    add(user, ENV, "compose", "eager", SHAPE, {}, 50.0)
    add(shipped, ENV, "compose", "eager", SHAPE, {}, 1.0)  # the user's own measurement comes first
    p = Dispatcher(user, force_env="").plan_for_gpu(GPU, "compose", SHAPE, "bf16")
    assert (p.impl, p.config, p.source) == ("triton", ComposeConfig(**FAST), "measured")
    assert "user DB" in p.detail


def test_shipped_cache_then_heuristic(tmp_path, shipped):
    user = str(tmp_path / "missing.sqlite")
    add(shipped, ENV, "compose_train", "eager", SHAPE, {}, 5.0)
    add(
        shipped,
        ENV,
        "compose_train",
        "triton",
        SHAPE,
        {"fwd": FAST, "bwd": {"block_r": 8, "block_c": 512, "row_iters": 8, "num_warps": 4}},
        9.0,
    )
    d = Dispatcher(user, force_env="")
    p = d.plan_for_gpu(GPU, "compose_train", SHAPE, "bf16")
    assert (p.impl, p.source) == ("eager", "measured") and "shipped DB" in p.detail
    # an unmeasured shape: the fixed crossover (compose_train: fused iff cols ≥ 2048 and rows·cols ≥ 2048·6144)
    big = d.plan_for_gpu(GPU, "compose_train", {"rows": 8192, "cols": 8192}, "bf16")
    small = d.plan_for_gpu(GPU, "compose_train", {"rows": 512, "cols": 4096}, "bf16")
    assert (big.impl, big.source) == ("triton", "heuristic") and (small.impl, small.source) == ("eager", "heuristic")
    assert any("does not exist" in n for n in d.explain(GPU))


def test_other_gpus_and_stale_versions_are_not_used(tmp_path, shipped):
    user = str(tmp_path / "user.sqlite")
    add(user, OTHER, "compose", "eager", SHAPE, {}, 1.0)
    add(user, ENV, "compose", "eager", SHAPE, {}, 1.0, ver="000000000000")
    with pytest.warns(RuntimeWarning, match="other kernel versions"):
        p = Dispatcher(user, force_env="").plan_for_gpu(GPU, "compose", SHAPE, "bf16")
    assert (p.impl, p.source, p.config) == ("triton", "heuristic", DEFAULT_COMPOSE_CONFIG)


def test_invalid_stored_config_is_skipped_with_one_warning(tmp_path, shipped):
    user = str(tmp_path / "user.sqlite")
    add(user, ENV, "compose", "triton", SHAPE, {"block_r": 3, "block_c": 512, "num_warps": 4}, 1.0)  # not pow2
    add(user, ENV, "compose", "eager", SHAPE, {}, 20.0)
    d = Dispatcher(user, force_env="")
    with pytest.warns(RuntimeWarning, match="invalid compose/triton config"):
        p = d.plan_for_gpu(GPU, "compose", SHAPE, "bf16")
    assert (p.impl, p.source) == ("eager", "measured")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d.plan_for_gpu(GPU, "compose", SHAPE, "bf16")  # warned once, not again


@pytest.mark.parametrize("content", [b"garbage" * 100, b"SQLite format 3\x00" + b"\x00" * 50])
def test_corrupt_or_truncated_db_falls_back(tmp_path, shipped, content):
    user = tmp_path / "user.sqlite"
    user.write_bytes(content)
    d = Dispatcher(str(user), force_env="")
    with pytest.warns(RuntimeWarning, match="user DB"):
        p = d.plan_for_gpu(GPU, "compose", SHAPE, "bf16")
    assert p.source == "heuristic"
    assert any("user DB" in n and "unusable" in n for n in d.explain(GPU))


def test_a_db_sqlite_cannot_open_falls_back_with_one_warning(tmp_path, shipped, monkeypatch):
    """What a WAL file in a read-only folder without its -shm, or a file without read permission, gives (the
    suite may run as root, which permissions do not stop, so SQLite's refusal is simulated)."""
    import sqlite3

    from dora_tune.autotune_db import snapshot

    user = str(tmp_path / "user.sqlite")
    add(user, ENV, "compose", "eager", SHAPE, {}, 1.0)

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(snapshot.sqlite3, "connect", refuse)
    d = Dispatcher(user, force_env="")
    with pytest.warns(RuntimeWarning, match="user DB unusable.*unable to open database file"):
        p = d.plan_for_gpu(GPU, "compose", SHAPE, "bf16")
    assert p.source == "heuristic"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert d.plan_for_gpu(GPU, "compose", {"rows": 7, "cols": 4096}, "bf16").source == "heuristic"


def test_newer_schema_db_falls_back(tmp_path, shipped):
    import sqlite3

    user = str(tmp_path / "user.sqlite")
    add(user, ENV, "compose", "eager", SHAPE, {}, 1.0)
    con = sqlite3.connect(user)
    con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.warns(RuntimeWarning, match="newer"):
        p = Dispatcher(user, force_env="").plan_for_gpu(GPU, "compose", SHAPE, "bf16")
    assert p.source == "heuristic"


def test_overrides(tmp_path, shipped):
    user = str(tmp_path / "user.sqlite")
    add(user, ENV, "compose", "triton", SHAPE, FAST, 1.0)
    d = Dispatcher(user, force_env="")
    with force("eager"):
        p = d.plan_for_gpu(GPU, "compose", SHAPE, "bf16")
        assert p.impl == "eager"
        with force(None):
            assert d.plan_for_gpu(GPU, "compose", SHAPE, "bf16").impl == "triton"
    assert d.plan_for_gpu(GPU, "compose", SHAPE, "bf16").impl == "triton"
    env_forced = Dispatcher(user, force_env="eager")
    assert env_forced.plan_for_gpu(GPU, "compose", SHAPE, "bf16").impl == "eager"
    # forcing triton where eager was measured faster: the triton plan uses the default config
    add(user, ENV, "compose_train", "eager", SHAPE, {}, 1.0)
    p = Dispatcher(user, force_env="triton").plan_for_gpu(GPU, "compose_train", SHAPE, "bf16")
    assert p.impl == "triton" and p.source == "heuristic"
    with pytest.warns(RuntimeWarning, match="not 'eager' or 'triton'"):
        Dispatcher(user, force_env="fast")
    with pytest.raises(ValueError):
        with force("cuda"):
            pass


def test_memoised_and_thread_safe(tmp_path, shipped, monkeypatch):
    user = str(tmp_path / "user.sqlite")
    add(user, ENV, "compose", "triton", SHAPE, FAST, 1.0)
    d = Dispatcher(user, force_env="")
    loads = []
    real = d._read
    monkeypatch.setattr(d, "_read", lambda *a: (loads.append(a[0]), real(*a))[1])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(plan_mod, "_triton_ok", lambda: True)
    dev = torch.device("cuda", 0)  # never touched: the plan is pure bookkeeping
    results = []

    def work():
        for _ in range(200):
            results.append(d.plan_key("compose", (2048, 4096), "bf16", dev))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in results}) == 1 and results[0].source == "measured"
    assert loads == ["user"]  # loaded once (there is no shipped cache for this GPU)
    d.clear()
    d.plan_key("compose", (2048, 4096), "bf16", dev)
    assert loads == ["user", "user"]


def test_cpu_plans_fall_back_to_torch():
    d = Dispatcher("/nonexistent/x.sqlite", force_env="")
    for op, shape, impl in (
        ("norm", {"d_out": 8, "d_in": 8, "r": 2}, "factored_torch"),
        ("compose", SHAPE, "eager"),
        ("compose_train", SHAPE, "eager"),
    ):
        p = d.plan(op, shape, torch.bfloat16, "cpu")
        assert (p.impl, p.config, p.source) == (impl, None, "fallback")


def test_kernels_auto_goes_through_the_dispatcher(monkeypatch):
    from dora_tune.dispatch.runtime import Plan
    from dora_tune.kernels import compose

    seen = []

    def fake_auto(op, dims, dtype, device, race=None):
        seen.append((op, dims, dtype, device.type))
        return Plan("eager", None, "fallback", "test")

    monkeypatch.setattr(plan_mod, "auto", fake_auto)
    x = torch.randn(2, 3, 8)
    compose(x, x, torch.ones(8), 0.5)
    assert seen == [("compose", (6, 8), torch.float32, "cpu")]


def test_loading_a_db_pauses_garbage_collection_and_restores_it(tmp_path, shipped, monkeypatch):
    from dora_tune.autotune_db import snapshot

    user = str(tmp_path / "user.sqlite")
    add(user, ENV, "compose", "eager", SHAPE, {}, 1.0)
    add(shipped, ENV, "compose", "eager", SHAPE, {}, 2.0)
    real, collecting = snapshot.read_snapshot, []

    def spy(location, gpu_name):
        collecting.append(gc.isenabled())
        return real(location, gpu_name)

    monkeypatch.setattr(snapshot, "read_snapshot", spy)
    assert gc.isenabled()
    tables = Dispatcher(user, force_env="")._load(GPU)
    assert collecting == [False, False] and gc.isenabled() and len(tables.measured) == 2  # both DBs read, paused
    gc.disable()
    try:
        Dispatcher(user, force_env="")._load(GPU)
        assert not gc.isenabled()  # left off as it was found
    finally:
        gc.enable()


def test_importing_dispatch_is_light():
    import subprocess
    import sys

    code = "import sys, dora_tune.dispatch; print('sklearn' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_model_source_between_measured_and_crossover(tmp_path, shipped):
    from dora_tune.tuning.fitting import fit

    from conftest import H200, fill_known_crossover

    user = str(tmp_path / "user.sqlite")
    with TuningDB.open(user) as db:
        fill_known_crossover(db)
        (summary,) = fit(db, gpu="h200")
    assert summary.op == "compose_train"
    d = Dispatcher(user, force_env="")
    measured = d.plan_for_gpu(H200.gpu_name, "compose_train", {"rows": 256, "cols": 1024}, "bf16")
    assert measured.source == "measured" and measured.impl == "eager"
    # Unmeasured shapes: the model's table, which knows this synthetic law's crossover (n ≈ 4.7e5 elements) —
    # where the paper's rule (fused iff cols ≥ 2048 and n ≥ 1.26e7) would pick eager.
    big = d.plan_for_gpu(H200.gpu_name, "compose_train", {"rows": 3000, "cols": 3000}, "bf16")
    small = d.plan_for_gpu(H200.gpu_name, "compose_train", {"rows": 100, "cols": 700}, "bf16")
    assert (big.source, big.impl) == ("model", "triton") and (small.source, small.impl) == ("model", "eager")


def test_table_that_loses_to_the_crossover_is_not_used(tmp_path, shipped):
    from dora_tune.tuning.fitting import fit

    from conftest import H200, fill_known_crossover

    user = str(tmp_path / "user.sqlite")
    with TuningDB.open(user) as db:
        fill_known_crossover(db)
        fit(db, gpu="h200")
        (row,) = db.models()
        metrics = dict(row.metrics)
        metrics["cv"] = {**metrics["cv"], "model_paired": {**metrics["cv"]["crossover"], "regret_geomean": 9.0}}
        db.save_model(H200, row.op, row.dtype, row.estimator, row.payload, metrics)
    d = Dispatcher(user, force_env="")
    p = d.plan_for_gpu(H200.gpu_name, "compose_train", {"rows": 3000, "cols": 3000}, "bf16")
    assert p.source == "heuristic"
    assert any("loses to the fixed crossover" in n for n in d.explain(H200.gpu_name))


# ------------------------------------------------------------------------------------------ race (norm shortlist)
NORM_SHAPE = {"d_out": 1000, "d_in": 3000, "r": 48}
NORM_CFGS = [dict(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=4, split_k=k) for k in (3, 1, 4)]


def _norm_table_db(path, runners, dtype="bf16", decision=NORM_CFGS[0]):
    from dora_tune.dispatch.decisions import DecisionTable

    versions = {i.name: i.version for i in registry()["norm"]}
    axes = {"d_out": [512, 2048], "d_in": [4096], "r": [32, 64]}
    cells = [("triton", decision)] * 4
    table = DecisionTable("norm", dtype, GPU, versions, axes, cells, [tuple(("triton", c) for c in runners)] * 4)
    with TuningDB.open(path) as db:
        db.save_model(ENV, "norm", dtype, "linear_trees", table.to_json(), {"cv": {}})


def test_model_plan_carries_the_validated_shortlist(tmp_path, shipped):
    from dora_tune.kernels import NormConfig

    user = str(tmp_path / "user.sqlite")
    bad = dict(NORM_CFGS[1], block_m=100)  # not a power of two: dropped with a warning
    _norm_table_db(user, [NORM_CFGS[1], bad, NORM_CFGS[2]])
    with pytest.warns(RuntimeWarning, match="invalid norm/triton config"):
        p = Dispatcher(user, force_env="").plan_for_gpu(GPU, "norm", NORM_SHAPE, "bf16")
    assert (p.impl, p.source, p.config) == ("triton", "model", NormConfig(**NORM_CFGS[0]))
    assert p.race == (NormConfig(**NORM_CFGS[0]), NormConfig(**NORM_CFGS[1]), NormConfig(**NORM_CFGS[2]))
    assert Dispatcher(user, force_env="", race=False).plan_for_gpu(GPU, "norm", NORM_SHAPE, "bf16").race == ()
    _norm_table_db(user, [])  # no runners-up: nothing to race
    assert Dispatcher(user, force_env="").plan_for_gpu(GPU, "norm", NORM_SHAPE, "bf16").race == ()


def test_fp16_plans_from_the_bf16_table_where_it_has_none(tmp_path, shipped):
    """fp16 and bf16 run the kernels at the same size and rate: a GPU's bf16 table plans fp16 (shortlist included,
    said in the plan's detail) until an fp16 table of its own exists; fp32 never borrows one."""
    from dora_tune.kernels import NormConfig

    user = str(tmp_path / "user.sqlite")
    _norm_table_db(user, [NORM_CFGS[1]])
    d = Dispatcher(user, force_env="")
    p = d.plan_for_gpu(GPU, "norm", NORM_SHAPE, "fp16")
    assert (p.impl, p.source, p.config) == ("triton", "model", NormConfig(**NORM_CFGS[0]))
    assert p.race == (NormConfig(**NORM_CFGS[0]), NormConfig(**NORM_CFGS[1]))
    assert "for bf16 (no fp16 table" in p.detail
    assert d.plan_for_gpu(GPU, "norm", NORM_SHAPE, "fp32").source == "heuristic"
    _norm_table_db(user, [], dtype="fp16", decision=NORM_CFGS[2])
    p = Dispatcher(user, force_env="").plan_for_gpu(GPU, "norm", NORM_SHAPE, "fp16")
    assert (p.source, p.config) == ("model", NormConfig(**NORM_CFGS[2])) and "for bf16" not in p.detail


def test_race_switch_from_the_environment(monkeypatch):
    monkeypatch.setenv("DORA_TUNE_RACE", "0")
    assert Dispatcher(force_env="").race is False
    monkeypatch.setenv("DORA_TUNE_RACE", "1")
    assert Dispatcher(force_env="").race is True
    monkeypatch.setenv("DORA_TUNE_RACE", "maybe")
    with pytest.warns(RuntimeWarning, match="DORA_TUNE_RACE"):
        assert Dispatcher(force_env="").race is True


def _race_setup(d, device="cpu"):
    """A memoised model plan with a 3-config shortlist for NORM_SHAPE, and a runner whose time depends on the
    config (split_k 1 the fastest), counting its calls."""
    from dora_tune.dispatch.runtime import Plan
    from dora_tune.kernels import NormConfig

    cfgs = tuple(NormConfig(**c) for c in NORM_CFGS)
    plan = Plan("triton", cfgs[0], "model", "test table", cfgs)
    dims, dev = tuple(NORM_SHAPE.values()), torch.device(device)
    d._memo[("norm", dims, "bf16", dev, None)] = plan
    calls = []

    def run(cfg):
        calls.append(cfg.split_k)
        t_end = time.perf_counter() + {1: 0.0, 3: 0.002, 4: 0.001}[cfg.split_k]
        while time.perf_counter() < t_end:
            pass

    return plan, dims, dev, run, calls


def test_settle_keeps_the_fastest_and_memoises_it():
    d = Dispatcher(force_env="")
    plan, dims, dev, run, calls = _race_setup(d)
    settled = d.settle("norm", dims, "bf16", dev, plan, run)
    assert settled.config.split_k == 1 and settled.race == () and settled.source == "model"
    assert "raced at first use" in settled.detail and "µs" in settled.detail
    assert d.plan_key("norm", dims, "bf16", dev) is settled  # the hot path now returns the winner
    n = len(calls)
    assert n >= 3 * 30
    assert d.settle("norm", dims, "bf16", dev, plan, run) is settled and len(calls) == n  # raced once


def test_settle_drops_configs_that_cannot_launch_and_falls_back_when_none_can():
    from triton.runtime.errors import OutOfResources

    d = Dispatcher(force_env="")
    plan, dims, dev, run, _calls = _race_setup(d)

    def fails_on_split_1(cfg):
        if cfg.split_k == 1:
            raise OutOfResources(300000, 232448, "shared memory")
        run(cfg)

    settled = d.settle("norm", dims, "bf16", dev, plan, fails_on_split_1)
    assert settled.config.split_k == 4  # the fastest of those that launch

    d = Dispatcher(force_env="")
    plan, dims, dev, run, _calls = _race_setup(d)

    def never(cfg):
        raise OutOfResources(300000, 232448, "shared memory")

    with pytest.warns(RuntimeWarning, match="failed to launch"):
        settled = d.settle("norm", dims, "bf16", dev, plan, never)
    assert settled.source == "heuristic" and settled.race == ()  # the default config (reject), memoised
    assert d.plan_key("norm", dims, "bf16", dev) is settled


def test_settle_does_not_race_under_deterministic_algorithms_or_graph_capture(monkeypatch):
    d = Dispatcher(force_env="")
    plan, dims, dev, run, calls = _race_setup(d)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        settled = d.settle("norm", dims, "bf16", dev, plan, run)
    finally:
        torch.use_deterministic_algorithms(old)
    assert settled.config == plan.config and calls == [] and "deterministic" in settled.detail
    assert d.plan_key("norm", dims, "bf16", dev) is settled

    d = Dispatcher(force_env="")
    plan, dims, cuda, run, calls = _race_setup(d, "cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    settled = d.settle("norm", dims, "bf16", cuda, plan, run)
    assert settled.config == plan.config and settled.race == () and calls == []
    assert d._memo[("norm", dims, "bf16", cuda, None)] is plan  # not settled: a later eager call races


def test_settle_keeps_the_decision_when_the_timer_runs_out_of_memory(monkeypatch):
    import dora_tune.dispatch.timing as timing

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 256 MiB")

    monkeypatch.setattr(timing, "interleaved_times", oom)
    d = Dispatcher(force_env="")
    plan, dims, dev, run, _calls = _race_setup(d)
    with pytest.warns(RuntimeWarning, match="not raced, out of memory"):
        settled = d.settle("norm", dims, "bf16", dev, plan, run)
    assert settled.config == plan.config and settled.race == ()


TRAIN_CFGS = [
    {"fwd": FAST, "bwd": {"block_r": 4, "block_c": c, "row_iters": 4, "num_warps": 4}} for c in (512, 1024, 2048)
]


def _train_table_db(path):
    """A compose_train table of two cells (rows 1024 and 8192, cols 4096), each with the 3-config shortlist."""
    from dora_tune.dispatch.decisions import DecisionTable

    versions = {i.name: i.version for i in registry()["compose_train"]}
    runners = [(("triton", TRAIN_CFGS[1]), ("triton", TRAIN_CFGS[2]))] * 2
    table = DecisionTable(
        "compose_train",
        "bf16",
        GPU,
        versions,
        {"rows": [1024, 8192], "cols": [4096]},
        [("triton", TRAIN_CFGS[0])] * 2,
        runners,
    )
    with TuningDB.open(path) as db:
        db.save_model(ENV, "compose_train", "bf16", "linear_trees", table.to_json(), {"cv": {}})


def test_compose_train_races_once_per_table_cell(tmp_path, shipped, monkeypatch):
    # compose_train's shapes follow the token count: the first shape of a cell is raced, the cell's other shapes take
    # its winner untimed; another cell races on its own; a race that could not run leaves its cell open
    import dora_tune.dispatch.timing as timing
    from dora_tune.kernels import ComposeTrainConfig

    user = str(tmp_path / "user.sqlite")
    _train_table_db(user)
    d, dev = Dispatcher(user, force_env=""), torch.device("cpu")
    plans = {
        rows: d.plan_for_gpu(GPU, "compose_train", {"rows": rows, "cols": 4096}, "bf16")
        for rows in (2000, 2100, 2500, 6000)
    }
    cfgs = tuple(ComposeTrainConfig.from_dict(c) for c in TRAIN_CFGS)
    assert all(p.source == "model" and p.race == cfgs for p in plans.values())
    assert plans[2000].race_cell == plans[2100].race_cell == plans[2500].race_cell != plans[6000].race_cell
    calls = []

    def run(cfg):  # block_c 1024 the fastest
        calls.append(cfg.bwd.block_c)
        t_end = time.perf_counter() + {512: 0.002, 1024: 0.0, 2048: 0.001}[cfg.bwd.block_c]
        while time.perf_counter() < t_end:
            pass

    def settle(rows):
        return d.settle("compose_train", (rows, 4096), "bf16", dev, plans[rows], run)

    real = timing.interleaved_times

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(timing, "interleaved_times", oom)
    with pytest.warns(RuntimeWarning, match="not raced, out of memory"):
        assert settle(2500).config == cfgs[0]  # the decision kept, for this shape only
    monkeypatch.setattr(timing, "interleaved_times", real)
    first = settle(2000)
    assert first.config == cfgs[1] and "raced at first use" in first.detail and "(2000, 4096)" in first.detail
    n = len(calls)
    assert n >= 3 * 30
    second = settle(2100)
    assert second is first and len(calls) == n  # same cell: the winner, untimed
    assert d._memo[("compose_train", (2100, 4096), "bf16", dev, None)] is first  # the hot path has it now
    assert d._memo[("compose_train", (2500, 4096), "bf16", dev, None)].config == cfgs[0]  # memoised before
    other = settle(6000)
    assert other.config == cfgs[1] and other is not first and len(calls) > n  # another cell: its own race
    # the norm races per exact shape: no cell
    _norm_table_db(user, NORM_CFGS[1:])
    assert Dispatcher(user, force_env="").plan_for_gpu(GPU, "norm", NORM_SHAPE, "bf16").race_cell == ()
    d.clear()
    assert d._cell_wins == {}


def test_the_kernels_ask_for_the_race_runner_only_when_a_race_is_due(monkeypatch):
    from dora_tune.dispatch import runtime
    from dora_tune.kernels import compose_train, dora_compose_train, factored_norm
    from dora_tune.kernels.compose import compose_formula
    from dora_tune.kernels.norm import norm_reference

    cfg = ComposeConfig(**FAST)
    shortlist = runtime.Plan("triton", cfg, "model", "t", (cfg, cfg))
    seen = []

    class Fake:  # the process-wide dispatcher: every plan has a shortlist; settling records the runner
        plan = shortlist

        def plan_key(self, op, dims, dtype, device):
            return self.plan

        def settle(self, op, dims, dtype, device, plan, run):
            seen.append((op, dims, run))
            return runtime.Plan("factored_torch" if op == "norm" else "eager", None, "model", "t; raced")

    fake = Fake()
    monkeypatch.setattr(runtime, "default_dispatcher", lambda: fake)
    g = torch.Generator().manual_seed(3)
    lora, base = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    m, n = torch.rand(16, generator=g) + 0.5, torch.rand(16, generator=g) + 0.5
    out = compose_train(lora, base, m / n, 0.5)
    torch.testing.assert_close(out, compose_formula(lora, base, m / n, 0.5))
    out = dora_compose_train(lora, base, m, n, 0.5)
    torch.testing.assert_close(out, compose_formula(lora, base, m / n, 0.5))
    W, A, B = torch.randn(16, 24, generator=g), torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g)
    torch.testing.assert_close(factored_norm(W, A, B, 0.5), norm_reference(W, A, B, 0.5, dtype=torch.float32))
    assert [(op, dims) for op, dims, _ in seen] == [("compose_train", (15, 16))] * 2 + [("norm", (16, 24, 4))]
    assert all(callable(run) for _, _, run in seen)
    seen.clear()
    fake.plan = runtime.Plan("eager", None, "model", "t")  # no shortlist: no race
    compose_train(lora, base, m / n, 0.5)
    dora_compose_train(lora, base, m, n, 0.5)
    assert seen == []


def test_plan_keys_cuda_by_the_current_index(monkeypatch):
    # plan(..., "cuda") and the kernels (tensor.device = cuda:N) share one memo entry, hence one race
    seen = []
    d = Dispatcher(force_env="")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(d, "plan_key", lambda op, dims, dtype, device: seen.append(device))
    d.plan("compose", SHAPE, torch.bfloat16, "cuda")
    d.plan("compose", SHAPE, torch.bfloat16, "cuda:0")
    d.plan("compose", SHAPE, torch.bfloat16, "cpu")
    assert seen == [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cpu")]


def test_shipped_cache_plans_the_same_through_sqlite_and_sqlalchemy():
    """The dispatcher reads SQLite files with the standard library; the same file through its SQLAlchemy URL (the
    store's reading) must give the same plan for every shape — measured ones, the model's (fp16 from the bf16
    tables) and the crossover's (fp32)."""
    from pathlib import Path

    import dora_tune
    from dora_tune.autotune_db import to_url

    cache = str(Path(dora_tune.__file__).parent / "caches" / "nvidia-h200.sqlite")
    direct = Dispatcher(cache, use_shipped=False, force_env="")
    via_url = Dispatcher(to_url(cache), use_shipped=False, force_env="")
    gpu, sources = "NVIDIA H200", set()
    sizes = (1, 100, 777, 2048, 4096, 5000, 8192, 11008, 16384, 32768)
    shapes = [("norm", {"d_out": o, "d_in": i, "r": r}) for o in sizes[3:] for i in sizes[3:] for r in (8, 16, 64)]
    shapes += [(op, {"rows": n, "cols": c}) for op in ("compose", "compose_train") for n in sizes for c in sizes[3:]]
    for op, shape in shapes:
        for dtype in ("bf16", "fp16", "fp32"):
            a, b = direct.plan_for_gpu(gpu, op, shape, dtype), via_url.plan_for_gpu(gpu, op, shape, dtype)
            assert (a.impl, a.config, a.source, a.race, a.race_cell) == (
                b.impl,
                b.config,
                b.source,
                b.race,
                b.race_cell,
            ), (op, shape, dtype)
            sources.add(a.source)
    assert sources == {"measured", "model", "heuristic"}
    assert direct.explain(gpu) == [n.replace(to_url(cache), cache) for n in via_url.explain(gpu)]


def test_public_plan_takes_a_dict_or_a_sequence_and_says_what_to_pass():
    d = Dispatcher("/nonexistent/x.sqlite", force_env="")
    by_dict = d.plan("compose_train", {"rows": 4096, "cols": 8192}, torch.bfloat16, "cpu")
    assert d.plan("compose_train", (4096, 8192), torch.bfloat16, "cpu") is by_dict  # one memo entry
    assert d.plan("compose_train", [4096, 8192], "bf16", torch.device("cpu")) is by_dict
    norm = d.plan("norm", (4096, 1024, 16), "bf16", "cpu")
    assert d.plan("norm", {"r": 16, "d_in": 1024, "d_out": 4096, "extra": 1}, "bf16", "cpu") is norm
    assert d.plan("norm", (4096, 16, 1024), "bf16", "cpu") is not norm  # a sequence is read in OP_SHAPE_KEYS order
    with pytest.raises(ValueError, match=r"lacks \['cols'\].*keys \['rows', 'cols'\]"):
        d.plan("compose_train", {"rows": 4096}, "bf16", "cpu")
    with pytest.raises(ValueError, match=r"has 1 dimensions; expected .* sequence of 2 ints"):
        d.plan("compose_train", (4096,), "bf16", "cpu")
    with pytest.raises(TypeError, match="must be a dict with keys"):
        d.plan("compose_train", 4096, "bf16", "cpu")
    with pytest.raises(TypeError, match="cols must be a positive int"):
        d.plan("compose_train", (4096, 81.5), "bf16", "cpu")
    with pytest.raises(ValueError, match="rows must be a positive int, got 0"):
        d.plan("compose_train", {"rows": 0, "cols": 8}, "bf16", "cpu")
    with pytest.raises(ValueError, match="unknown op 'nrom'"):
        d.plan("nrom", (1, 2, 3), "bf16", "cpu")


def test_public_plan_on_cuda_without_cuda_falls_back_to_torch():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only case")
    p = Dispatcher("/nonexistent/x.sqlite", force_env="").plan("compose_train", (4096, 8192), "bf16", "cuda")
    assert (p.impl, p.source) == ("eager", "fallback") and "CUDA is not available" in p.detail


def test_race_is_host_aware_the_lower_wall_time_wins_where_gpu_time_disagrees(monkeypatch):
    from dora_tune.dispatch import timing

    d = Dispatcher(force_env="")
    plan, dims, dev, _run, _calls = _race_setup(d)
    # GPU time says split_k 1 is fastest; but each of its calls keeps the host 1 ms (a launch-heavy path), so
    # back-to-back it costs the step far more than the others' 5–6 µs of GPU time
    gpu_us = {1: 2.0, 3: 6.0, 4: 5.0}
    monkeypatch.setattr(
        timing, "interleaved_times", lambda fns, *a, **k: [[gpu_us[f.args[0].split_k]] * 3 for f in fns]
    )

    def run(cfg):
        t_end = time.perf_counter() + (0.001 if cfg.split_k == 1 else 0.0)
        while time.perf_counter() < t_end:
            pass

    settled = d.settle("norm", dims, "bf16", dev, plan, run)
    assert settled.config.split_k == 4, settled.detail
    assert "gpu 2.0 / wall" in settled.detail  # both figures are reported
    walls = timing.wall_times([functools.partial(run, c) for c in plan.race], dev, calls=5)
    by_split = {c.split_k: w for c, w in zip(plan.race, walls, strict=True)}
    assert by_split[1] > 900 and max(by_split[3], by_split[4]) < 500  # µs: the host-bound one shows its host time


def test_pick_path_races_whole_paths_by_wall_time_once_per_key(monkeypatch):
    d = Dispatcher(force_env="")
    dev = torch.device("cpu")
    calls = {"slow": 0, "fast": 0}

    def spin(name, seconds):
        def run():
            calls[name] += 1
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                pass

        return run

    made = []

    def runners():
        made.append(1)
        return {"slow": spin("slow", 0.001), "fast": spin("fast", 0.0)}

    assert d.pick_path(("k", 1), dev, runners, default="slow") == "fast"
    n = dict(calls)
    assert n["slow"] >= 2 and n["fast"] >= 2  # warmed and timed
    assert d.pick_path(("k", 1), dev, runners, default="slow") == "fast" and calls == n and made == [1]  # memoised
    assert "fast (raced at first use" in d.path_notes()[("k", 1)]
    with force("eager"):  # forced: no timing
        assert d.pick_path(("k", 2), dev, runners, default="slow") == "eager" and made == [1]
    assert Dispatcher(force_env="", race=False).pick_path(("k", 1), dev, runners, default="slow") == "slow"
    torch.use_deterministic_algorithms(True)
    try:
        assert d.pick_path(("k", 3), dev, runners, default="slow") == "slow" and made == [1]
    finally:
        torch.use_deterministic_algorithms(False)
    d.clear()
    assert d.path_notes() == {}


def test_pick_path_leaves_out_a_path_that_fails(recwarn):
    """A path that raises at its first use (a kernel that cannot compile or launch here) is left out of the race
    with one warning, never breaking the caller's step; when every path fails, the default stays."""
    d = Dispatcher(force_env="")

    def broken():
        raise RuntimeError("out of resources: shared memory")

    def runners():
        return {"fused": broken, "eager": lambda: None}

    assert d.pick_path(("k",), torch.device("cpu"), runners, default="fused") == "eager"
    note = d.path_notes()[("k",)]
    assert note.startswith("eager (raced") and "fused failed" in note
    warned = [str(w.message) for w in recwarn if "left out of the race" in str(w.message)]
    assert len(warned) == 1 and "'fused'" in warned[0] and "shared memory" in warned[0]
    assert d.pick_path(("k2",), torch.device("cpu"), lambda: {"a": broken}, default="a") == "a"
    assert "every path failed" in d.path_notes()[("k2",)]


def test_pick_path_does_not_race_under_saved_tensors_hooks():
    d = Dispatcher(force_env="")
    made = []

    def runners():
        made.append(1)
        return {"a": lambda: None, "b": lambda: None}

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # as activation checkpointing sets
        assert d.pick_path(("k",), torch.device("cpu"), runners, default="b") == "b" and made == []
    assert d.pick_path(("k",), torch.device("cpu"), runners, default="b") in ("a", "b") and made == [1]


def test_an_unprofiled_gpu_of_a_profiled_architecture_plans_from_its_tables(tmp_path):
    """A GPU with no cache borrows the decision tables of the nearest shipped GPU of its architecture (the same
    compute capability, then SMs, bandwidth and L2), shortlist and first-use race included, and lookup's notes say
    where they came from; another architecture gets none. The H100 and the H200 plan from their own caches."""
    d = Dispatcher(str(tmp_path / "none.sqlite"), force_env="")
    shape = {"d_out": 5376, "d_in": 21504, "r": 64}
    for gpu, nearest in (("NVIDIA H200 NVL", "NVIDIA H200"), ("NVIDIA H800", "NVIDIA H100 80GB HBM3")):
        p = d.plan_for_gpu(gpu, "norm", shape, "bf16")
        assert p.source == "model" and f"transferred from {nearest}" in p.detail and len(p.race) == 3, gpu
        own = d.plan_for_gpu(nearest, "norm", shape, "bf16")  # the same table, on its own GPU
        assert own.source == "model" and "transferred" not in own.detail
        assert (own.impl, own.config, own.race) == (p.impl, p.config, p.race)
        # its own tables; only an op its cache lacks (dora_linear on the H200) is transferred
        assert all("(of dora_linear: none of this GPU's)" in n for n in d.explain(nearest) if "transferred" in n)
        p16 = d.plan_for_gpu(gpu, "norm", shape, "fp16")  # no fp16 table anywhere: the bf16 one
        assert (p16.impl, p16.config, p16.race) == (p.impl, p.config, p.race) and "for bf16" in p16.detail
        note = next(n for n in d.explain(gpu) if n.startswith("transferred from"))
        assert nearest in note and "9.0" in note and "nearest by SMs, bandwidth and L2" in note
    for other in ("NVIDIA A100-SXM4-80GB", "Some Unknown GPU"):  # sm 8.0: nothing shipped; unknown: no capability
        q = d.plan_for_gpu(other, "norm", shape, "bf16")
        assert q.source == "heuristic" and any(n.startswith("transfer: ") for n in d.explain(other)), other
    assert plan_mod._capability("NVIDIA A100-SXM4-80GB", None) == "8.0"
    assert plan_mod._capability("NVIDIA GH200 480GB", None) == "9.0" and plan_mod._capability("GPU X", None) is None
    # transfer draws on the shipped caches: without them, the crossover
    no_shipped = Dispatcher(str(tmp_path / "none.sqlite"), force_env="", use_shipped=False)
    assert no_shipped.plan_for_gpu("NVIDIA H800", "norm", shape, "bf16").source == "heuristic"


def test_an_op_missing_from_a_gpus_cache_is_planned_by_the_nearest_gpu_with_its_table(tmp_path):
    """The H200's cache predates dora_linear: the H200 plans that op by the H100's table (and its other ops by its
    own); the H100 plans it by its own. The borrowing waits until the op is planned (no cache read before)."""
    d = Dispatcher(str(tmp_path / "none.sqlite"), force_env="")
    d.plan_for_gpu("NVIDIA H200", "norm", {"d_out": 4096, "d_in": 4096, "r": 64}, "bf16")
    assert not any("transferred" in n for n in d.explain("NVIDIA H200"))
    shape = {"rows": 2048, "d_out": 4096, "d_in": 4096, "r": 64}
    p = d.plan_for_gpu("NVIDIA H200", "dora_linear", shape, "bf16")
    assert p.source == "model" and "transferred from NVIDIA H100 80GB HBM3" in p.detail
    note = next(n for n in d.explain("NVIDIA H200") if n.startswith("transferred from"))
    assert "of dora_linear: none of this GPU's" in note
    own = d.plan_for_gpu("NVIDIA H200", "norm", {"d_out": 4096, "d_in": 4096, "r": 64}, "bf16")
    assert own.source in ("model", "measured") and "transferred" not in own.detail
    h100 = d.plan_for_gpu("NVIDIA H100 80GB HBM3", "dora_linear", shape, "bf16")
    assert h100.source in ("model", "measured") and "transferred" not in h100.detail
    assert p.impl == h100.impl == "folded"  # the H100's table: the folded linear at this shape (stop 28)


def test_transfer_reads_each_shipped_gpu_with_its_recorded_features():
    """The H100 cache recorded what the device said (L2, bandwidth from NVML); the H200 cache predates that
    (schema 2 rows): its figures come from the published table."""
    from dora_tune.autotune_db.gpus import KNOWN_GPUS

    caches = Path(plan_mod.__file__).parents[1] / "caches"
    (h100,) = plan_mod._cache_gpus(caches / "nvidia-h100-80gb-hbm3.sqlite")
    (h200,) = plan_mod._cache_gpus(caches / "nvidia-h200.sqlite")
    assert (h100.name, h100.capability, h100.sm_count, h100.l2_mb) == ("NVIDIA H100 80GB HBM3", "9.0", 132, 50.0)
    assert h100.bandwidth_tbs == pytest.approx(3.352, abs=1e-3)  # NVML: max memory clock × bus width
    assert (h200.bandwidth_tbs, h200.l2_mb) == (KNOWN_GPUS["h200"].bandwidth_tbs, KNOWN_GPUS["h200"].l2_mb)
    assert plan_mod._cache_gpus(Path("/nonexistent/cache.sqlite")) == []


def test_broken_caches_fall_back_with_one_warning_and_stay_untouched(tmp_path, shipped):
    """Every way a cache can be unusable — corrupt, truncated, a newer schema, another GPU's rows only, an
    unreachable server — plans by the crossover with at most one warning per database, and the file is left
    exactly as it was (nothing repaired, nothing lost)."""
    import sqlite3

    good = str(tmp_path / "good.sqlite")
    add(good, OTHER, "compose", "triton", SHAPE, FAST, 1.0)  # another GPU's measurement only
    newer = str(tmp_path / "newer.sqlite")
    add(newer, ENV, "compose", "triton", SHAPE, FAST, 1.0)
    con = sqlite3.connect(newer)
    con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    cases = {
        "corrupt": b"garbage" * 100,
        "truncated": Path(newer).read_bytes()[:200],
        "newer": None,
        "foreign GPU": None,
    }
    for name, content in cases.items():
        path = {"newer": newer, "foreign GPU": good}.get(name) or str(tmp_path / f"{name}.sqlite")
        if content is not None:
            Path(path).write_bytes(content)
        before = Path(path).read_bytes()
        d = Dispatcher(path, force_env="")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            plans = [d.plan_for_gpu(GPU, "compose", {"rows": r, "cols": 4096}, "bf16") for r in (8, 2048, 4096)]
        assert all(p.source == "heuristic" for p in plans), (name, plans)
        assert len([w for w in seen if "dora-tune" in str(w.message)]) <= 1, (name, [str(w.message) for w in seen])
        assert Path(path).read_bytes() == before, name


def test_an_unreachable_server_url_falls_back_with_one_warning(shipped):
    d = Dispatcher("postgresql+psycopg://nobody@127.0.0.1:1/none", force_env="")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        p1 = d.plan_for_gpu(GPU, "compose", SHAPE, "bf16")
        p2 = d.plan_for_gpu(GPU, "norm", {"d_out": 4096, "d_in": 4096, "r": 16}, "bf16")
    assert p1.source == p2.source == "heuristic"
    msgs = [str(w.message) for w in seen if "dora-tune" in str(w.message)]
    assert len(msgs) == 1 and "user DB" in msgs[0], msgs
