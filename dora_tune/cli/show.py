"""``dora-tune show`` and ``dora-tune gpus``: read the tuning DB and the machine."""

from __future__ import annotations

import json

import click

from dora_tune.cli._common import db_option, open_db, parse_shape
from dora_tune.ops import DTYPE_NAMES, OPS


def _fmt_shape(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


@click.command()
@db_option
@click.option("--gpu", default=None, help="GPU name, slug or part of a name (e.g. h200)")
@click.option("--op", default=None, type=click.Choice(list(OPS)))
@click.option("--dtype", default=None, type=click.Choice(DTYPE_NAMES))
@click.option("--shape", default=None, help="e.g. d_out=4096,d_in=4096,r=16 or rows=2048,cols=4096")
@click.option("--trials", "show_trials", is_flag=True, help="every trial, not only the best per shape")
@click.option("--limit", default=200, show_default=True, help="at most this many rows")
def show(
    db_location: str | None,
    gpu: str | None,
    op: str | None,
    dtype: str | None,
    shape: str | None,
    show_trials: bool,
    limit: int,
) -> None:
    """Best implementation and config per (GPU, op, shape, dtype), or every trial with --trials.

    Each row shows the median time (GPU time on a GPU), the wall time per call of back-to-back calls with the host
    included ("-" where it was not recorded: CPU trials, trials profiled before schema 4), the spread of the timed
    calls (p80 / p20) and how many calls were timed (a confirmed trial holds at least ``profile --confirm-reps``,
    100 by default).
    """
    from rich.console import Console
    from rich.table import Table

    shape_d = parse_shape(shape)
    with open_db(db_location, readonly=True) as db:
        rows = (db.trials if show_trials else db.best)(gpu=gpu, op=op, dtype=dtype, shape=shape_d)
    title = "trials" if show_trials else "best per shape"
    table = Table(title=f"{title} ({len(rows)} rows{', first ' + str(limit) if len(rows) > limit else ''})")
    for col in ("gpu", "op", "shape", "dtype", "impl", "config", "median µs", "wall µs", "p80/p20", "calls", "status"):
        table.add_column(col, overflow="fold")
    for r in rows[:limit]:
        med = "-" if r.median_us is None else f"{r.median_us:.1f}"
        wall = "-" if r.wall_us is None else f"{r.wall_us:.1f}"
        spread = f"{r.p80_us / r.p20_us:.3f}" if r.p20_us and r.p80_us else "-"
        status = r.status if r.status == "ok" else f"{r.status}: {(r.error or '')[:60]}"
        table.add_row(
            r.gpu_name,
            r.op,
            _fmt_shape(r.shape),
            r.dtype,
            r.impl,
            json.dumps(r.config),
            med,
            wall,
            spread,
            str(r.reps),
            status,
        )
    Console(width=160).print(table)


@click.command()
@db_option
def gpus(db_location: str | None) -> None:
    """The GPUs this machine has, and whether the tuning DB holds measurements for each model."""
    from dora_tune.tuning.env import list_gpus

    found = list_gpus()
    if not found:
        click.echo("No CUDA GPU found (NVML and torch.cuda see none); `dora-tune profile` will profile the CPU.")
        return
    from dora_tune.autotune_db import DatabaseError, TuningDB

    try:
        with TuningDB.open(db_location, readonly=True) as db:
            known = {e.gpu_name for e in db.environments()}
    except DatabaseError:  # no database yet: nothing is measured
        known = set()
    for g in found:
        state = "measured" if g.name in known else "not profiled yet"
        click.echo(f"[{g.index}] {g.name}  {g.memory_bytes / 2**30:.0f} GiB  driver {g.driver}  ({state})")
