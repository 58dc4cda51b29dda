"""``dora-tune profile``: measure every implementation and config over a shape set into the tuning DB."""

from __future__ import annotations

import click

from dora_tune.cli._common import db_option, open_db


@click.command()
@click.option("--gpu", default="auto", show_default=True, help="'auto' (first CUDA GPU, else CPU), 'cpu' or an index")
@db_option
@click.option("--model", "models", multiple=True, help="model preset (repeatable): llama-3-8b, llama-3-70b, ...")
@click.option("--rank", "ranks", multiple=True, type=click.IntRange(min=1), help="LoRA rank(s) for the norm shapes")
@click.option("--tokens", multiple=True, type=click.IntRange(min=1), help="token counts (rows) for compose shapes")
@click.option("--shapes", "shapes_file", type=click.Path(dir_okay=False), help="shapes file (.json or .csv)")
@click.option("--op", "ops", multiple=True, type=click.Choice(["norm", "compose", "compose_train"]), help="only these")
@click.option("--impl", "impls", multiple=True, help="only these implementations (e.g. triton)")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["bf16", "fp16", "fp32"]), help="default bf16")
@click.option("--warmup", "warmup_ms", default=5.0, show_default=True, help="warm-up per trial, ms")
@click.option("--rep", "rep_ms", default=20.0, show_default=True, help="timed repetitions per trial, ms")
@click.option("--progress/--no-progress", default=True, help="progress bar with ETA")
@click.option("--jobs", default=8, show_default=True, help="processes compiling Triton kernels before timing (0: none)")
def profile(
    gpu: str,
    db_location: str | None,
    models: tuple[str, ...],
    ranks: tuple[int, ...],
    tokens: tuple[int, ...],
    shapes_file: str | None,
    ops: tuple[str, ...],
    impls: tuple[str, ...],
    dtypes: tuple[str, ...],
    warmup_ms: float,
    rep_ms: float,
    progress: bool,
    jobs: int,
) -> None:
    """Time every op × implementation × config × shape × dtype and record each trial (failures too).

    Resumable: a second run measures only what is missing; Ctrl-C keeps everything measured so far. Without a CUDA
    GPU, '--gpu auto' profiles the CPU implementations over a small set and records the environment as CPU.
    """
    from dora_tune.dispatch.env import environment, resolve_device
    from dora_tune.dispatch.profiler import profile as run_profile
    from dora_tune.dispatch.shapes import ShapeError, build_shape_set

    try:
        device = resolve_device(gpu)
        cpu = device.type == "cpu"
        shapes = build_shape_set(models=models, ranks=ranks, tokens=tokens, shapes_file=shapes_file, cpu=cpu)
    except (ValueError, ShapeError) as e:
        raise click.ClickException(str(e)) from e
    if ops:
        shapes = {op: s for op, s in shapes.items() if op in ops}
    env = environment(device)
    if cpu:
        click.echo(f"No CUDA GPU selected: profiling the CPU implementations; trials are recorded under "
                   f"'{env.gpu_name}'.")  # fmt: skip
    with open_db(db_location) as db:
        click.echo(f"database: {db.location}")
        summary = run_profile(db, device, env, shapes, dtypes=dtypes or ("bf16",), impls=impls or None,
                              warmup_ms=warmup_ms, rep_ms=rep_ms, progress=progress, jobs=jobs)  # fmt: skip
    if summary.warm_launches or summary.warm_error:
        click.echo(f"compiled ahead: {summary.warm_launches} launches in {summary.warm_seconds:.0f} s"
                   + (f" (warming failed: {summary.warm_error})" if summary.warm_error else ""))  # fmt: skip
    click.echo(
        f"{env.gpu_name}: measured {summary.measured} trials ({summary.failed} failed or invalid) in "
        f"{summary.seconds:.0f} s; {summary.skipped} were already in the database."
    )
    if summary.interrupted:
        click.echo("interrupted: every trial measured so far is kept; run the same command again to resume.")
        raise SystemExit(130)
