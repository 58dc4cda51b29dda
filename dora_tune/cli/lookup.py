"""``dora-tune lookup``: the plan the dispatcher makes for one op and shape, and why.

Where the user DB (else the shipped cache) holds measured trials of exactly this op, shape and dtype on this GPU
model (at the current implementation versions, as the dispatcher counts them), it also prints their two figures:
the GPU time the profiler measured (host kept out) and the wall time of back-to-back calls (host included; "not
recorded" for trials profiled before schema 4) — for the plan's (implementation, config) and for the fastest
measured alternative of each other implementation — and flags a host-bound one, whose wall figure exceeds its GPU
figure: there the host's launch cost, not the kernels, sets what a training step pays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from dora_tune.cli._common import db_option
from dora_tune.ops import DTYPE_NAMES, OPS

if TYPE_CHECKING:
    from dora_tune.autotune_db import TrialRow

HOST_BOUND_RATIO = 1.1
"""A measured trial is shown as host-bound when its wall time exceeds its GPU time by more than this factor (the
back-to-back wall time of a GPU-bound call sits at or a little above its GPU time)."""


def _figures(t: TrialRow) -> str:
    """``GPU 12.3 µs, wall 45.6 µs (host included, back-to-back calls)``, or ``wall not recorded``."""
    wall = "not recorded" if t.wall_us is None else f"{t.wall_us:.1f} µs (host included, back-to-back calls)"
    return f"GPU {t.median_us:.1f} µs, wall {wall}"


def _host_bound(t: TrialRow) -> str | None:
    """A note when ``t``'s wall time exceeds its GPU time (host-bound), else None."""
    if t.wall_us is None or t.median_us is None or t.wall_us <= HOST_BOUND_RATIO * t.median_us:
        return None
    return f"host-bound: wall {t.wall_us / t.median_us:.1f}× the GPU time (launch cost dominates)"


def measured_trials(
    db_location: str | None, shipped: bool, gpu_name: str, op: str, shape: dict[str, int], dtype: str
) -> tuple[str, list[TrialRow]]:
    """The "ok" trials of exactly (``op``, ``shape``, ``dtype``) on GPU model ``gpu_name`` (exact name) at the
    current implementation versions, fastest first, from the first source that has any — the user DB at
    ``db_location``, then (``shipped``) the shipped cache of the GPU — with that source's name ("user DB" or
    "shipped DB"); ``("", [])`` when none has. One indexed query per source; a source that is missing or cannot be
    read is passed over (the dispatcher's notes say why)."""
    import os

    from dora_tune.autotune_db import DatabaseError, TuningDB, default_db_location
    from dora_tune.dispatch.registry import registry
    from dora_tune.dispatch.runtime import shipped_cache_path

    versions = {i.name: i.version for i in registry()[op]}
    sources = [("user DB", db_location or default_db_location())]
    if shipped:
        sources.append(("shipped DB", str(shipped_cache_path(gpu_name))))
    for origin, where in sources:
        if "://" not in where and not os.path.isfile(os.path.expanduser(where)):
            continue
        try:
            with TuningDB.open(where, readonly=True) as db:
                rows = db.trials(gpu=gpu_name, op=op, dtype=dtype, shape=shape, status="ok")
        except DatabaseError:
            continue
        rows = [
            t
            for t in rows
            if t.gpu_name == gpu_name and versions.get(t.impl) == t.impl_version and t.median_us is not None
        ]
        if rows:
            return origin, sorted(rows, key=lambda t: t.median_us)
    return "", []


def _measured_lines(origin: str, rows: list[TrialRow], impl: str, config: dict[str, Any]) -> list[str]:
    """What ``lookup`` prints of the measured trials ``rows`` (fastest first): the plan's (``impl``, ``config``)
    and the fastest of each other implementation, both figures each, host-bound ones flagged."""
    out = []
    chosen = next((t for t in rows if t.impl == impl and t.config == config), None)
    if chosen is None:
        out.append(f"measured here: no trial of the plan's {impl} config at this shape ({origin})")
    else:
        out.append(f"measured here: {_figures(chosen)} — {origin}, {chosen.reps} timed calls")
        note = _host_bound(chosen)
        if note:
            out.append(f"  {note}")
    fastest: dict[str, TrialRow] = {}
    for t in rows:
        if t is not chosen:
            fastest.setdefault(t.impl, t)
    for name, t in fastest.items():
        if name == impl and chosen is not None:
            continue  # the plan's own implementation: its chosen config is shown above
        out.append(f"  fastest measured {name} {t.config}: {_figures(t)}")
        note = _host_bound(t)
        if note:
            out.append(f"    {note}")
    return out


@click.command()
@click.option("--op", required=True, type=click.Choice(list(OPS)))
@click.option("--rows", required=True, type=click.IntRange(min=1), help="norm: d_out; the other ops: tokens")
@click.option("--cols", required=True, type=click.IntRange(min=1), help="norm: d_in; the other ops: d_out")
@click.option("--d-in", "d_in", type=click.IntRange(min=1), help="the projection's d_in (dora_linear only)")
@click.option("--rank", type=click.IntRange(min=1), help="LoRA rank (norm and dora_linear)")
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(DTYPE_NAMES))
@click.option("--gpu", default=None, help="plan for this GPU model (default: the local CUDA GPU)")
@db_option
@click.option("--shipped/--no-shipped", default=True, help="consult the shipped cache for the GPU")
def lookup(
    op: str,
    rows: int,
    cols: int,
    d_in: int | None,
    rank: int | None,
    dtype: str,
    gpu: str | None,
    db_location: str | None,
    shipped: bool,
) -> None:
    """Print the plan (implementation, config, source) for one op and shape, with the reasons."""
    import warnings

    import torch

    from dora_tune.dispatch.runtime import Dispatcher

    if op in ("norm", "dora_linear") and rank is None:
        raise click.UsageError(f"--rank is required for --op {op}")
    if op not in ("norm", "dora_linear") and rank is not None:
        raise click.UsageError("--rank applies to --op norm and --op dora_linear only")
    if (op == "dora_linear") != (d_in is not None):
        raise click.UsageError("--d-in is required for --op dora_linear and applies to it only")
    if op == "norm":
        shape = {"d_out": rows, "d_in": cols, "r": rank}
    elif op == "dora_linear":
        shape = {"rows": rows, "d_out": cols, "d_in": d_in, "r": rank}
    else:
        shape = {"rows": rows, "cols": cols}
    dispatcher = Dispatcher(db_location, use_shipped=shipped)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if gpu is not None:
            plan = dispatcher.plan_for_gpu(gpu, op, shape, dtype)
            gpu_name = gpu
        elif torch.cuda.is_available():
            plan = dispatcher.plan(op, shape, dtype, "cuda")
            gpu_name = torch.cuda.get_device_name(0)
        else:
            plan = dispatcher.plan(op, shape, dtype, "cpu")
            gpu_name = None
    config = "-" if plan.config is None else plan.config.as_dict()
    click.echo(f"{op} {','.join(f'{k}={v}' for k, v in shape.items())} {dtype}: {plan.impl} {config}")
    click.echo(f"source: {plan.source} — {plan.detail}")
    if plan.race:
        where = "of this table cell (shared by its shapes) " if plan.race_cell else ""
        click.echo(f"raced at the first call {where}(fastest kept), on the call's own inputs: {len(plan.race)} configs")
        for c in plan.race:
            click.echo(f"  {c.as_dict()}")
    if gpu_name is not None:
        origin, measured = measured_trials(db_location, shipped, gpu_name, op, shape, dtype)
        chosen = {} if plan.config is None else plan.config.as_dict()
        for line in _measured_lines(origin, measured, plan.impl, chosen) if measured else []:
            click.echo(line)
    if gpu_name is None:
        click.echo("(no CUDA GPU here: pass --gpu NAME to see what a GPU model would run)")
    else:
        for note in dispatcher.explain(gpu_name):
            click.echo(f"  {note}")
    for w in caught:
        click.echo(f"  warning: {w.message}")
