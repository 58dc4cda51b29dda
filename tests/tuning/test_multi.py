"""Profiling several devices at once (``dora-tune profile --gpu all``): the work split, the device list, and two CPU
worker processes on one database measuring exactly what one process measures."""

import pytest
import torch
from click.testing import CliRunner

from dora_tune.autotune_db import TuningDB, canonical_json
from dora_tune.cli import cli
from dora_tune.tuning import multi
from dora_tune.tuning.env import environment
from dora_tune.tuning.profiler import profile

SHAPES = {
    "norm": [{"d_out": 32 + 8 * i, "d_in": 48, "r": 4} for i in range(3)],
    "compose": [{"rows": 4 + i, "cols": 40} for i in range(2)],
    "compose_train": [{"rows": 4 + i, "cols": 40} for i in range(2)] + [{"rows": 64, "cols": 256}],
}
TIMING = {"warmup_ms": 0.0, "rep_ms": 1.0, "confirm_top": 2, "confirm_reps": 3}


def flat(units):
    return sorted((u.dtype, op, canonical_json(s)) for u in units for op, shapes in u.shapes.items() for s in shapes)


def test_work_units_cover_every_shape_once_most_expensive_first():
    dtypes = ("bf16", "fp32")
    remaining = {("norm", "bf16", canonical_json(SHAPES["norm"][2])): 500}
    units = multi.work_units(SHAPES, dtypes, remaining)
    want = sorted((d, op, canonical_json(s)) for d in dtypes for op, shapes in SHAPES.items() for s in shapes)
    assert flat(units) == want  # every (dtype, op, shape) in exactly one unit
    assert [u.cost for u in units] == sorted((u.cost for u in units), reverse=True)
    assert units[0].dtype == "bf16" and units[0].shapes == {"norm": [SHAPES["norm"][2]]}  # 500 trials left
    # compose and compose_train of one rows × cols go together, compose first (stage one of compose_train reads
    # its compose trials); a compose_train shape without a compose shape is a unit of its own
    pairs = [u for u in units if "compose" in u.shapes]
    assert len(pairs) == 4 and all(list(u.shapes) == ["compose", "compose_train"] for u in pairs)
    assert sum(1 for u in units if list(u.shapes) == ["compose_train"]) == 2


def test_parse_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert multi.parse_gpus("all") == [0, 1] and multi.parse_gpus(" 1,0 ") == [1, 0]
    assert multi.parse_gpus("auto") is None and multi.parse_gpus("1") is None and multi.parse_gpus("cpu") is None
    for bad, why in (("0,0", "each GPU once"), ("0,2", "no GPU 2"), ("a,b", "indices like 0,1")):
        with pytest.raises(ValueError, match=why):
            multi.parse_gpus(bad)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        multi.parse_gpus("all")


def keys(path):
    with TuningDB.open(path, readonly=True) as db:
        rows = db.trials()
    return sorted((t.op, t.impl, t.impl_version, canonical_json(t.shape), t.dtype, canonical_json(t.config), t.status)
                  for t in rows)  # fmt: skip


def test_two_cpu_workers_measure_exactly_the_trials_of_one_process(tmp_path):
    one, two = str(tmp_path / "one.sqlite"), str(tmp_path / "two.sqlite")
    cpu = torch.device("cpu")
    with TuningDB.open(one) as db:
        single = profile(db, cpu, environment(cpu), SHAPES, progress=False, **TIMING)
    s = multi.profile_devices(two, [cpu, cpu], SHAPES, progress=False, **TIMING)
    assert not s.errors and not s.interrupted and s.gpus == {"cpu": ["cpu", "cpu"]}
    assert s.measured == single.measured > 0 and s.units == len(multi.work_units(SHAPES, ("bf16",)))
    assert keys(two) == keys(one)
    again = multi.profile_devices(two, [cpu, cpu], SHAPES, progress=False, **TIMING)  # resumable: nothing left
    assert again.measured == 0 and again.skipped == single.measured and keys(two) == keys(one)


def test_cli_several_gpus_on_a_machine_without_one(tmp_path):
    res = CliRunner().invoke(cli, ["profile", "--gpu", "all", "--db", str(tmp_path / "t.sqlite")])
    assert res.exit_code != 0 and "no CUDA GPU" in res.output
    res = CliRunner().invoke(cli, ["profile", "--gpu", "0,1", "--db", str(tmp_path / "t.sqlite")])
    assert res.exit_code != 0 and "0 CUDA GPU(s)" in res.output


SCRIPT = """
import sys, torch
from dora_tune.tuning import multi
shapes = {"norm": [{"d_out": 32 + 8 * i, "d_in": 48, "r": 4} for i in range(40)]}
s = multi.profile_devices(sys.argv[1], [torch.device("cpu")] * 2, shapes, progress=False, warmup_ms=0.0,
                          rep_ms=40.0, confirm_top=0)
print("interrupted" if s.interrupted else "finished", s.measured, flush=True)
"""


def measured_so_far(path):
    """The trials in ``path`` while a profile writes it: 0 while the file exists but its tables do not yet (the
    worker created it a moment ago) — polling must not race the schema's creation."""
    from dora_tune.autotune_db.common import SchemaError

    try:
        return len(keys(path))
    except SchemaError:
        return 0


def test_ctrl_c_stops_every_worker_and_keeps_what_was_measured(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    db = str(tmp_path / "i.sqlite")
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, db], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for the first trials
            time.sleep(0.5)
            if os.path.exists(db) and measured_so_far(db) >= 4:
                break
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    word, measured = out.split()
    assert word == "interrupted" and int(measured) == len(keys(db)) < 40 * 3  # kept, and stopped early


def test_deferred_interrupts_hold_ctrl_c_until_the_block_ends():
    """A trial's write and its count happen together: Ctrl-C inside the block is raised at its end, and the
    handlers are as they were afterwards (outside the block it interrupts at once)."""
    import os
    import signal

    from dora_tune.tuning.profiler import deferred_interrupts

    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")  # still inside: not interrupted
    assert done == ["after the signal"] and signal.getsignal(signal.SIGINT) is before
    with deferred_interrupts():  # no signal: nothing raised
        done.append("quiet")
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10**6):  # the handler runs between bytecodes
            pass
