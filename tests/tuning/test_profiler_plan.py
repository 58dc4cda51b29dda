"""The profiler's plan: compose_train's stage one takes its forward configs from the same shape's compose trials."""

import json

import torch

from dora_tune.autotune_db import EnvInfo, TrialResult, TuningDB, canonical_json
from dora_tune.dispatch.registry import registry
from dora_tune.kernels import DEFAULT_COMPOSE_CONFIG, compose_bwd_config_space
from dora_tune.tuning import profiler

GPU = EnvInfo("cuda", "Test GPU", "9.0", 132, 150_000_000_000, "570.1", "12.8", "2.11.0", "3.6.0", "0.1.0")
SHAPE = {"rows": 64, "cols": 4096}


def impl(op, name):
    return next(i for i in registry()[op] if i.name == name)


def fwd_of(task_configs):
    return {canonical_json(json.loads(c)["fwd"]) for c in task_configs}


def train_task(db):
    tasks, todo, _ = profiler.plan(db, GPU, torch.device("cuda"), {"compose_train": [SHAPE]}, dtypes=("bf16",))
    (task,) = [t for t in tasks if t.impl.name == "triton"]
    return task, todo


def test_stage_one_sweeps_every_forward_config_without_compose_trials(tmp_path):
    with TuningDB.open(str(tmp_path / "t.sqlite")) as db:
        task, todo = train_task(db)
    assert todo == 1 + len(task.configs) + len(compose_bwd_config_space())
    space = impl("compose_train", "triton").configs(SHAPE)
    assert len(task.configs) == len(space) > profiler.TRAIN_FWD_SHORTLIST


def test_stage_one_takes_the_fastest_compose_configs_of_the_shape(tmp_path):
    comp = impl("compose", "triton")
    cfgs = comp.configs(SHAPE)
    with TuningDB.open(str(tmp_path / "t.sqlite")) as db:
        for k, cfg in enumerate(cfgs):  # config k takes 100 + 7k mod 61 µs: the fastest are not the first ones
            us = 100.0 + (7 * k) % 61
            res = TrialResult("ok", us, us, us, 9)
            db.record_trial(GPU, "compose", "triton", comp.version, SHAPE, "bf16", cfg, res)
        other = {"rows": 8, "cols": 4096}  # another shape's fast configs do not count
        db.record_trial(GPU, "compose", "triton", comp.version, other, "bf16", cfgs[0], TrialResult("ok", 1, 1, 1, 9))
        task, todo = train_task(db)
    ranked = sorted(range(len(cfgs)), key=lambda k: (100.0 + (7 * k) % 61, k))
    want = {canonical_json(cfgs[k]) for k in ranked[: profiler.TRAIN_FWD_SHORTLIST]}
    want.add(canonical_json(DEFAULT_COMPOSE_CONFIG.as_dict()))  # the crossover's pick, to compare against
    assert len(want) == profiler.TRAIN_FWD_SHORTLIST + 1  # the default is not among the fastest here
    assert fwd_of(task.configs) == want and len(task.configs) == len(want)
    assert todo == 1 + len(want) + len(compose_bwd_config_space())  # eager, stage one, stage two


def test_stage_one_trials_outside_the_shortlist_do_not_count_as_stage_two(tmp_path):
    comp, train = impl("compose", "triton"), impl("compose_train", "triton")
    cfgs = comp.configs(SHAPE)
    with TuningDB.open(str(tmp_path / "t.sqlite")) as db:
        for k, cfg in enumerate(cfgs):
            us = 100.0 + k
            res = TrialResult("ok", us, us, us, 9)
            db.record_trial(GPU, "compose", "triton", comp.version, SHAPE, "bf16", cfg, res)
        _, before = train_task(db)
        stale = train.configs(SHAPE)[-1]  # an earlier full sweep measured this forward: not in the shortlist now
        res = TrialResult("ok", 1.0, 1.0, 1.0, 9)
        db.record_trial(GPU, "compose_train", "triton", train.version, SHAPE, "bf16", stale, res)
        task, after = train_task(db)
    assert canonical_json(stale) not in task.configs
    assert after == before  # stage two is still wholly ahead


H100 = EnvInfo("cuda", "NVIDIA H100 80GB HBM3", "9.0", 132, 80 * 2**30, "580", "13.0", "2.11.0", "3.6.0", "0.1.0")
QUICK_SHAPES = {
    "norm": [{"d_out": 4096, "d_in": 4096, "r": 64}],
    "compose": [{"rows": 4096, "cols": 4096}],
    "compose_train": [{"rows": 4096, "cols": 4096}],
}


def test_quick_plan_times_the_transferred_shortlists_and_the_defaults(tmp_path):
    """An H100 with no table of its own: the H200's shipped tables are transferred (same architecture), so a quick
    run times each Triton shape at its plan's config, race shortlist and default config only — no compose_train
    stages — and every torch implementation as always."""
    from dora_tune.kernels import DEFAULT_COMPOSE_TRAIN_CONFIG, DEFAULT_NORM_CONFIG

    path = str(tmp_path / "t.sqlite")
    defaults = {"norm": DEFAULT_NORM_CONFIG, "compose": DEFAULT_COMPOSE_CONFIG}
    defaults["compose_train"] = DEFAULT_COMPOSE_TRAIN_CONFIG
    with TuningDB.open(path) as db:
        summary = profiler.ProfileSummary(H100)
        chooser = profiler.quick_configs(H100.gpu_name, path, summary)
        assert not summary.narrowed
        quick, q_todo, _ = profiler.plan(db, H100, torch.device("cuda"), QUICK_SHAPES, dtypes=("bf16",), quick=chooser)
        assert summary.narrowed  # shortlists of the transferred tables: no refit on them alone
        full, f_todo, _ = profiler.plan(db, H100, torch.device("cuda"), QUICK_SHAPES, dtypes=("bf16",))
    for t in quick:
        if t.impl.name != "triton":
            assert len(t.configs) == 1 and not t.staged
            continue
        assert not t.staged and 2 <= len(t.configs) <= 5  # the shortlist (≤ 4) plus the default
        assert canonical_json(defaults[t.op].as_dict()) in t.configs
        full_task = next(f for f in full if (f.op, f.impl.name) == (t.op, "triton"))
        assert len(full_task.configs) > 3 * len(t.configs)
    assert f_todo > 5 * q_todo


def test_quick_plan_sweeps_in_full_where_no_table_serves_the_gpu(tmp_path):
    path = str(tmp_path / "t.sqlite")
    unknown = EnvInfo("cuda", "Future GPU", "", 100, 2**36, "", "", "", "", "")
    with TuningDB.open(path) as db:
        summary = profiler.ProfileSummary(unknown)
        chooser = profiler.quick_configs(unknown.gpu_name, path, summary)
        assert chooser("norm", impl("norm", "triton"), "bf16", QUICK_SHAPES["norm"][0]) is None
        assert not summary.narrowed
        quick, q_todo, _ = profiler.plan(
            db, unknown, torch.device("cuda"), QUICK_SHAPES, dtypes=("bf16",), quick=chooser
        )
        _, f_todo, _ = profiler.plan(db, unknown, torch.device("cuda"), QUICK_SHAPES, dtypes=("bf16",))
    assert q_todo == f_todo and any(t.staged for t in quick)
