"""Compile the Triton kernels a profiling run will launch, in parallel worker processes, before timing starts.

Triton compiles a kernel once per (constexpr values, argument specialisation) and keeps the binary in its disk cache.
Compiling serially costs seconds per config (a full norm sweep: ~4 minutes on the H200 host); N processes that each
launch their share of configs once on *proxy* inputs fill the disk cache, and the profiler then only loads binaries.
A proxy shape is small but keeps what Triton specialises on: integers' divisibility by 16 (and being 1), ``d_in``
modulo the K block (``EVEN_K``), the rank (the r-tile count). A config whose proxy misses a specialisation is simply
compiled again by the profiler: warming only ever saves time, it never changes a result.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import time
from collections.abc import Iterable

import torch

from dora_tune.dispatch.registry import registry
from dora_tune.tuning.trials import make_inputs, train_bwd_stage


def proxy_shape(op: str, shape: dict[str, int]) -> dict[str, int]:
    """A small shape that compiles to the same Triton kernels as ``shape``."""

    def small(v: int, base: int, mod: int) -> int:
        return 1 if v == 1 else base + v % mod

    if op == "norm":
        return {"d_out": small(shape["d_out"], 256, 16), "d_in": small(shape["d_in"], 2048, 256), "r": shape["r"]}
    if op == "dora_linear":  # the rank sets the r loop's step; the rest only their divisibility by 16
        dims = {k: small(shape[k], 128, 16) for k in ("d_out", "d_in")}
        return {"rows": small(shape["rows"], 64, 16), **dims, "r": shape["r"]}
    return {"rows": small(shape["rows"], 64, 16), "cols": small(shape["cols"], 2048, 16)}


def warm_items(tasks: Iterable, *, stage_two: bool = True) -> list[tuple[str, str, str, str, str]]:
    """``(op, impl, dtype, proxy shape JSON, config JSON)`` for every Triton config of the profiler's tasks (and,
    with ``stage_two``, compose_train's second-stage configs)."""
    items: set[tuple[str, str, str, str, str]] = set()
    for t in tasks:
        if "cpu" in t.impl.devices or not t.configs:  # the torch implementations: nothing to compile
            continue
        proxy = json.dumps(proxy_shape(t.op, t.shape), sort_keys=True)
        configs = list(t.configs)
        if t.op == "compose_train" and stage_two:  # stage two's backward configs, paired with any forward
            configs += [json.dumps(c, sort_keys=True) for c in train_bwd_stage(json.loads(configs[0])["fwd"])]
        items.update((t.op, t.impl.name, t.dtype, proxy, c) for c in configs)
    return sorted(items)


def run_items(items: list[tuple[str, str, str, str, str]], device: str) -> int:
    """Launch each item once on ``device``; failures (e.g. out of shared memory) are the profiler's to record."""
    dev = torch.device(device)
    impls = {(op, i.name): i for op, v in registry().items() for i in v}
    done = 0
    inputs: dict[tuple[str, str, str], dict] = {}
    for op, name, dtype, proxy, config in items:
        key = (op, dtype, proxy)
        try:
            if key not in inputs:
                inputs[key] = make_inputs(op, json.loads(proxy), dtype, dev)
            impls[(op, name)].runner(inputs[key], json.loads(config))()
            done += 1
        except Exception:
            pass
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return done


MAX_DEFAULT_JOBS = 16
"""Compile processes used when none are asked for: one a CPU, at most this many (each holds a CUDA context)."""


def default_jobs() -> int:
    """Compile processes for ``dora-tune profile`` when ``--jobs`` is not given: the CPUs this process may use, at
    most :data:`MAX_DEFAULT_JOBS` (on the 16-core H200 machine the default set's kernels compiled in 27 s with 14
    processes and 51 s with 8: docs/profiling-and-cache.md)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_JOBS, cpus))


def warm_compile(tasks: Iterable, device: torch.device, jobs: int, *, stage_two: bool = True) -> tuple[int, float]:
    """Compile every Triton config of ``tasks`` (see :func:`warm_items`) in ``jobs`` processes; returns (launches,
    seconds)."""
    t0 = time.time()
    items = warm_items(tasks, stage_two=stage_two)
    if not items:
        return 0, 0.0
    dev = str(device)
    if jobs <= 1:
        return run_items(items, dev), time.time() - t0
    chunks = [items[i::jobs] for i in range(jobs)]
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        done = sum(ex.map(run_items, chunks, [dev] * len(chunks)))
    return done, time.time() - t0
