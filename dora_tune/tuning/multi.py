"""Profiling several GPUs at once: ``dora-tune profile --gpu all`` (or ``--gpu 0,1,…``).

One worker process per GPU (``spawn``: CUDA cannot be forked), all writing to the one tuning database (SQLite in WAL
mode, or a PostgreSQL URL; every trial is its own transaction, so concurrent writers neither block for long nor
lose a row). The shape set is cut into *units* — a dtype and the shapes one worker measures whole: each norm shape
alone, and ``compose`` with ``compose_train`` of the same ``rows × cols`` together, in that order, since
compose_train's first sweep stage reads that shape's compose trials — so that a split run times exactly the trials
of a one-process run. Units are queued most expensive first by predicted cost (the trials still missing × the
per-trial time, the warm-up and repetitions plus each trial's floor from its bytes and FLOPs) and every worker
takes the next one when it is free: the longest-first split, with work stealing at the end for free. GPUs of
different models record different environments, so each model gets every unit, shared by its GPUs. Each unit is
:func:`~dora_tune.tuning.profiler.profile` on that worker's GPU — its sweep, then its confirmation — so a run is
resumable (a second run measures only what is missing) and Ctrl-C keeps every trial measured so far (the workers
finish the trial in hand and stop).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time
from collections.abc import Sequence
from typing import Any

import torch

from dora_tune.ops import OP_SHAPE_KEYS, OPS

#: per-trial host and GPU time besides the kernel (the warm-up and timed repetitions are added per run), seconds
_TRIAL_OVERHEAD_S = 0.005
#: the rates the floor of a trial's kernel is predicted at (bytes/s, FLOP/s): a Hopper's, a ranking only
_BANDWIDTH, _FLOP_RATE = 3.0e12, 5.0e14
_ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one worker measures whole: ``shapes`` (op → shapes, in :data:`dora_tune.ops.OPS` order) in ``dtype``,
    and its predicted cost in seconds."""

    dtype: str
    shapes: dict[str, list[dict[str, int]]]
    cost: float


def _family(op: str, shape: dict[str, int]) -> tuple:
    """Ops sharing shape keys and values (compose, compose_train) measure together."""
    return (OP_SHAPE_KEYS[op], tuple(shape[k] for k in OP_SHAPE_KEYS[op]))


def trial_seconds(op: str, shape: dict[str, int], dtype: str, warmup_ms: float, rep_ms: float) -> float:
    """Predicted seconds of one trial: the warm-up and repetitions, a fixed overhead, and the kernel's floor (its
    bytes at ``_BANDWIDTH``, its FLOPs at ``_FLOP_RATE``) — what orders the units, not a promise."""
    facts = OPS[op]
    floor = max(facts.bytes(shape, _ELEM_BYTES[dtype]) / _BANDWIDTH, facts.flops(shape) / _FLOP_RATE)
    return (warmup_ms + rep_ms) / 1e3 + _TRIAL_OVERHEAD_S + floor


def work_units(
    shapes: dict[str, list[dict[str, int]]],
    dtypes: Sequence[str],
    remaining: dict[tuple[str, str, str], int] | None = None,
    *,
    warmup_ms: float = 5.0,
    rep_ms: float = 20.0,
) -> list[Unit]:
    """Every ``(dtype, op, shape)`` of the set in exactly one unit, most expensive first. ``remaining``:
    ``(op, dtype, canonical shape JSON)`` → trials still missing (:func:`~dora_tune.tuning.profiler.plan`); a shape
    it does not list counts one trial (its confirmation)."""
    from dora_tune.autotune_db import canonical_json

    families: dict[tuple, dict[str, list[dict[str, int]]]] = {}
    for op in OPS:
        for shape in shapes.get(op, []):
            families.setdefault(_family(op, shape), {}).setdefault(op, []).append(shape)
    units = []
    for dtype in dtypes:
        for group in families.values():
            cost = 0.0
            for op, op_shapes in group.items():
                for shape in op_shapes:
                    n = (remaining or {}).get((op, dtype, canonical_json(shape)), 0)
                    cost += max(n, 1) * trial_seconds(op, shape, dtype, warmup_ms, rep_ms)
            units.append(Unit(dtype, dict(group), cost))
    units.sort(key=lambda u: -u.cost)
    return units


def parse_gpus(spec: str) -> list[int] | None:
    """``--gpu`` → the GPU indices it names (``all``: every CUDA GPU; ``0,1``: those), or None for a one-device value
    (``auto``, ``cpu``, one index). ValueError for a GPU this machine lacks, or for ``all`` without CUDA."""
    g = spec.strip().lower()
    if g != "all" and "," not in g:
        return None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if g == "all":
        if n == 0:
            raise ValueError("--gpu all: this machine has no CUDA GPU (use --gpu auto to profile the CPU)")
        return list(range(n))
    try:
        ids = [int(p) for p in g.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--gpu must be 'auto', 'cpu', 'all', an index or indices like 0,1; got {spec!r}") from None
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"--gpu {spec}: name each GPU once")
    bad = [i for i in ids if i < 0 or i >= n]
    if bad:
        raise ValueError(f"--gpu {spec}: this machine has {n} CUDA GPU(s), no GPU {bad[0]}")
    return ids


@dataclasses.dataclass
class MultiSummary:
    """What a several-GPU run did, over all workers: per GPU model (``gpus``: its devices), the trials measured,
    failed and skipped, the confirmed, the units done, and whether it was interrupted."""

    gpus: dict[str, list[str]]
    measured: int = 0
    failed: int = 0
    skipped: int = 0
    confirmed: int = 0
    units: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    narrowed: bool = False  # a quick run timed shortlists somewhere (as ProfileSummary.narrowed)
    errors: list[str] = dataclasses.field(default_factory=list)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _worker(device: str, db_location: str, units: Any, events: Any, options: dict[str, Any]) -> None:
    """One GPU's process: take units until the queue says stop; report each trial and each unit."""
    from dora_tune.autotune_db import TuningDB
    from dora_tune.tuning.env import environment
    from dora_tune.tuning.profiler import deferred_interrupts, profile

    dev = torch.device(device)
    # Ctrl-C reaches the parent, which forwards it once as SIGTERM: each worker then stops after the trial in hand
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)
    unreported = None  # a unit's summary not yet sent (an interrupt before the send still reports its counts)
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        env = environment(dev)
        with TuningDB.open(db_location) as db:
            while True:
                unit = units.get()
                if unit is None:
                    break
                s = unreported = profile(
                    db,
                    dev,
                    env,
                    unit.shapes,
                    dtypes=(unit.dtype,),
                    progress=False,
                    jobs=0,
                    on_trial=lambda: events.put(("trial", device)),
                    **options,
                )
                with deferred_interrupts():
                    events.put(
                        ("unit", device, s.measured, s.failed, s.skipped, s.confirmed, s.interrupted, s.narrowed)
                    )
                    unreported = None
                if s.interrupted:
                    break
    except KeyboardInterrupt:
        s = unreported
        counts = (0, 0, 0, 0) if s is None else (s.measured, s.failed, s.skipped, s.confirmed)
        events.put(("unit", device, *counts, True, False if s is None else s.narrowed))
    except Exception as e:  # reported by the parent; the other workers go on
        events.put(("error", device, f"{type(e).__name__}: {e}"))
    finally:
        events.put(("done", device))


def profile_devices(
    db_location: str,
    devices: Sequence[torch.device],
    shapes: dict[str, list[dict[str, int]]],
    *,
    dtypes: tuple[str, ...] = ("bf16",),
    impls: tuple[str, ...] | None = None,
    warmup_ms: float = 5.0,
    rep_ms: float = 20.0,
    progress: bool = True,
    confirm_top: int = 8,
    confirm_reps: int = 100,
    confirm_only: bool = False,
    quick: bool = False,
) -> MultiSummary:
    """Profile ``shapes`` on ``devices`` at once, one worker process each, into the database at ``db_location``
    (see the module docstring). Devices of one GPU model share its units; CPU devices (tests) count as one model."""
    from dora_tune.autotune_db import TuningDB, canonical_json
    from dora_tune.tuning.env import environment
    from dora_tune.tuning.profiler import plan, progress_bar, quick_configs

    t0 = time.time()
    models: dict[str, list[torch.device]] = {}
    for d in devices:
        name = torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"
        models.setdefault(name, []).append(d)
    summary = MultiSummary({name: [str(d) for d in devs] for name, devs in models.items()})
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    per_model, total = {}, 0
    with TuningDB.open(db_location) as db:
        for name, devs in models.items():
            remaining: dict[tuple[str, str, str], int] = {}
            if not confirm_only:
                env = environment(devs[0])
                chooser = quick_configs(env.gpu_name, db.location) if quick and devs[0].type == "cuda" else None
                tasks, todo, _ = plan(db, env, devs[0], shapes, dtypes=dtypes, impls=impls, quick=chooser)
                total += todo
                for t in tasks:
                    key = (t.op, t.dtype, canonical_json(t.shape))
                    remaining[key] = remaining.get(key, 0) + len(t.configs)
            per_model[name] = work_units(shapes, dtypes, remaining, warmup_ms=warmup_ms, rep_ms=rep_ms)
    options = {
        "impls": impls,
        "warmup_ms": warmup_ms,
        "rep_ms": rep_ms,
        "confirm_top": confirm_top,
        "confirm_reps": confirm_reps,
        "confirm_only": confirm_only,
        "quick": quick,
    }
    workers = []
    for name, devs in models.items():
        units = ctx.Queue()
        for u in per_model[name]:
            units.put(u)
        for _ in devs:
            units.put(None)
        for d in devs:
            p = ctx.Process(target=_worker, args=(str(d), db_location, units, events, options), daemon=True)
            p.start()
            workers.append(p)
    done = 0
    with progress_bar(progress) as bar:
        what = f"profiling on {len(devices)} devices ({', '.join(models)})"
        pid = bar.add_task(what, total=total or None, visible=not confirm_only)
        while done < len(workers):
            try:
                event = events.get(timeout=0.5)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in workers) and events.empty():
                    break  # a worker died without saying so (killed): the others have finished too
                continue
            except KeyboardInterrupt:
                summary.interrupted = True
                for p in workers:  # forward Ctrl-C: each finishes the trial in hand and stops
                    if p.is_alive() and p.pid is not None:
                        os.kill(p.pid, signal.SIGTERM)
                continue
            kind = event[0]
            if kind == "trial":
                bar.advance(pid)
            elif kind == "unit":
                _, _, measured, failed, skipped, confirmed, interrupted, narrowed = event
                summary.narrowed |= narrowed
                summary.measured += measured
                summary.failed += failed
                summary.skipped += skipped
                summary.confirmed += confirmed
                summary.units += not interrupted
                summary.interrupted |= interrupted
            elif kind == "error":
                summary.errors.append(f"{event[1]}: {event[2]}")
            elif kind == "done":
                done += 1
    for p in workers:
        p.join(timeout=60)
    summary.seconds = time.time() - t0
    return summary
