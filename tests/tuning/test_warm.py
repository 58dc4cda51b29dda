import json

import torch

from dora_tune.dispatch.registry import registry
from dora_tune.tuning import warm
from dora_tune.tuning.profiler import _Task
from dora_tune.tuning.warm import default_jobs, proxy_shape, warm_compile, warm_items


def test_proxy_keeps_what_triton_specialises_on():
    p = proxy_shape("norm", {"d_out": 28672, "d_in": 8192 + 48, "r": 384})
    assert p["r"] == 384 and p["d_out"] % 16 == 0 and p["d_out"] <= 272
    assert p["d_in"] % 256 == (8192 + 48) % 256 and p["d_in"] < 2304
    assert proxy_shape("norm", {"d_out": 1, "d_in": 1, "r": 1}) == {"d_out": 1, "d_in": 1, "r": 1}
    c = proxy_shape("compose", {"rows": 32768, "cols": 4099})
    assert c == {"rows": 64, "cols": 2048 + 4099 % 16}
    assert proxy_shape("compose_train", {"rows": 1, "cols": 8})["rows"] == 1
    lin = proxy_shape("dora_linear", {"rows": 8192 + 3, "d_out": 14336, "d_in": 4096 + 40, "r": 384})
    assert lin == {"rows": 64 + 3, "d_out": 128, "d_in": 128 + 8, "r": 384}


def _tasks():
    reg = {(op, i.name): i for op, v in registry().items() for i in v}
    norm_shape = {"d_out": 40, "d_in": 70, "r": 5}
    comp_shape = {"rows": 3, "cols": 40}
    norm_cfgs = tuple(json.dumps(c, sort_keys=True) for c in reg[("norm", "triton")].configs(norm_shape)[:2])
    comp_cfgs = tuple(json.dumps(c, sort_keys=True) for c in reg[("compose", "triton")].configs(comp_shape)[:2])
    return [
        _Task("norm", reg[("norm", "triton")], "fp32", norm_shape, norm_cfgs),
        _Task("compose", reg[("compose", "triton")], "fp32", comp_shape, comp_cfgs),
        _Task("compose", reg[("compose", "eager")], "fp32", comp_shape, ("{}",)),  # not Triton: not warmed
    ]


def test_warm_items_dedupe_and_skip_torch_impls():
    items = warm_items(_tasks() + _tasks())
    assert len(items) == 4 and {i[1] for i in items} == {"triton"}


def test_warm_items_take_every_triton_implementation_of_an_op():
    """dora_linear has two Triton implementations (fused, folded): both are compiled ahead, composed is not."""
    reg = {(op, i.name): i for op, v in registry().items() for i in v}
    shape = {"rows": 70, "d_out": 40, "d_in": 48, "r": 4}
    tasks = [
        _Task("dora_linear", reg[("dora_linear", name)], "bf16", shape,
              tuple(json.dumps(c, sort_keys=True) for c in reg[("dora_linear", name)].configs(shape)[:2]))
        for name in ("composed", "fused", "folded")
    ]  # fmt: skip
    items = warm_items(tasks)
    assert [i[1] for i in items].count("fused") == 2 and [i[1] for i in items].count("folded") == 2
    assert "composed" not in {i[1] for i in items}


def test_warm_compile_runs_in_processes(triton_device):
    # Under the CPU interpreter nothing compiles, but the same path runs: items are launched in 2 worker processes.
    n, _ = warm_compile(_tasks(), torch.device(triton_device), jobs=2)
    assert n == 4


def test_default_jobs_is_the_usable_cpus_capped(monkeypatch):
    monkeypatch.setattr(warm.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_jobs() == warm.MAX_DEFAULT_JOBS == 16
    monkeypatch.setattr(warm.os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)
    assert default_jobs() == 2

    def no_affinity(pid):
        raise OSError("not supported")

    monkeypatch.setattr(warm.os, "sched_getaffinity", no_affinity, raising=False)
    monkeypatch.setattr(warm.os, "cpu_count", lambda: None)
    assert default_jobs() == 1
