"""``dora-tune lookup``: the plan the dispatcher makes for one op and shape, and why."""

from __future__ import annotations

import click

from dora_tune.cli._common import db_option


@click.command()
@click.option("--op", required=True, type=click.Choice(["norm", "compose", "compose_train"]))
@click.option("--rows", required=True, type=click.IntRange(min=1), help="norm: d_out; compose ops: tokens")
@click.option("--cols", required=True, type=click.IntRange(min=1), help="norm: d_in; compose ops: d_out")
@click.option("--rank", type=click.IntRange(min=1), help="LoRA rank (norm only)")
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "fp16", "fp32"]))
@click.option("--gpu", default=None, help="plan for this GPU model (default: the local CUDA GPU)")
@db_option
@click.option("--shipped/--no-shipped", default=True, help="consult the shipped cache for the GPU")
def lookup(
    op: str, rows: int, cols: int, rank: int | None, dtype: str, gpu: str | None, db_location: str | None,
    shipped: bool,
) -> None:  # fmt: skip
    """Print the plan (implementation, config, source) for one op and shape, with the reasons."""
    import warnings

    import torch

    from dora_tune.dispatch.runtime import Dispatcher

    if op == "norm":
        if rank is None:
            raise click.UsageError("--rank is required for --op norm")
        shape = {"d_out": rows, "d_in": cols, "r": rank}
    else:
        if rank is not None:
            raise click.UsageError("--rank applies to --op norm only")
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
    if gpu_name is None:
        click.echo("(no CUDA GPU here: pass --gpu NAME to see what a GPU model would run)")
    else:
        for note in dispatcher.explain(gpu_name):
            click.echo(f"  {note}")
    for w in caught:
        click.echo(f"  warning: {w.message}")
