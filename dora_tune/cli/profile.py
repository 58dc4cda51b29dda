"""``dora-tune profile``: measure every implementation and config over a shape set into the tuning DB."""

from __future__ import annotations

from collections.abc import Sequence

import click

from dora_tune.cli._common import db_option, open_db
from dora_tune.ops import DTYPE_NAMES, OPS


@click.command()
@click.option(
    "--gpu",
    default="auto",
    show_default=True,
    help="'auto' (first CUDA GPU, else CPU), 'cpu', an index, or several GPUs at once: 'all' or indices like 0,1",
)
@db_option
@click.option("--model", "models", multiple=True, help="model preset (repeatable): llama-3-8b, llama-3-70b, ...")
@click.option(
    "--rank",
    "ranks",
    multiple=True,
    type=click.IntRange(min=1),
    help="LoRA rank(s) for the norm and dora_linear shapes",
)
@click.option(
    "--tokens",
    multiple=True,
    type=click.IntRange(min=1),
    help="token counts (rows) for the compose and dora_linear shapes",
)
@click.option("--shapes", "shapes_file", type=click.Path(dir_okay=False), help="shapes file (.json or .csv)")
@click.option(
    "--op",
    "ops",
    multiple=True,
    type=click.Choice(list(OPS)),
    help="only these (default: "
    + ", ".join(op for op, f in OPS.items() if f.profiled_by_default)
    + "; the others when named or listed in --shapes)",
)
@click.option("--impl", "impls", multiple=True, help="only these implementations (e.g. triton)")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(DTYPE_NAMES), help="default bf16")
@click.option("--warmup", "warmup_ms", default=5.0, show_default=True, help="warm-up per trial, ms")
@click.option("--rep", "rep_ms", default=20.0, show_default=True, help="timed repetitions per trial, ms")
@click.option(
    "--confirm-top",
    default=8,
    show_default=True,
    type=click.IntRange(min=0),
    help="re-time each shape's N fastest trials together at the end (0: not at all)",
)
@click.option(
    "--confirm-reps",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="timed calls each confirmed trial holds",
)
@click.option(
    "--confirm-only",
    is_flag=True,
    help="no sweep: only confirm (default shapes: every shape this machine has in the database)",
)
@click.option(
    "--quick",
    is_flag=True,
    help="a new GPU in minutes: time only the configs the dispatcher would consider here (its plans' shortlists from "
    "this GPU's or a same-architecture GPU's decision tables, plus the defaults), then refit",
)
@click.option("--progress/--no-progress", default=True, help="progress bar with ETA")
@click.option(
    "--jobs",
    type=click.IntRange(min=0),
    default=None,
    help="processes compiling Triton kernels before timing (0: none)  [default: the CPUs, at most 16]",
)
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
    confirm_top: int,
    confirm_reps: int,
    confirm_only: bool,
    quick: bool,
    progress: bool,
    jobs: int | None,
) -> None:
    """Time every op × implementation × config × shape × dtype and record each trial (failures too).

    Then each shape's fastest trials are re-timed together with more calls (--confirm-top, --confirm-reps), so the
    best of near-equal configs is not a matter of luck. Resumable: a second run measures only what is missing (and
    confirms what is not yet confirmed); Ctrl-C keeps everything measured so far. Without a CUDA
    GPU, '--gpu auto' profiles the CPU implementations over a small set and records the environment as CPU.

    --quick times only the configs the dispatcher would consider on this GPU (the shortlists of the decision tables
    it has, or transfers from a profiled GPU of the same architecture, plus each default config; the whole space
    where no table serves the GPU) and confirms each shape's 2 fastest; then it refits this GPU's cost model for each
    dtype where that model has more than shortlists to learn from (this GPU had its own tables of the dtype, or the
    whole space was timed) — an fp16 quick run on a GPU with bf16 tables keeps planning fp16 by them. Measured
    shapes are then served from their trials, the rest by the tables.
    """
    import torch

    from dora_tune.tuning.env import environment, resolve_device
    from dora_tune.tuning.multi import parse_gpus
    from dora_tune.tuning.profiler import profile as run_profile
    from dora_tune.tuning.shapes import ShapeError, build_shape_set, load_shapes_file
    from dora_tune.tuning.warm import default_jobs

    try:
        gpus = parse_gpus(gpu)
        if gpus is not None and len(gpus) == 1:  # one GPU: the one-process run
            gpu, gpus = str(gpus[0]), None
        device = resolve_device(gpu) if gpus is None else torch.device("cuda", gpus[0])
        cpu = device.type == "cpu"
        shapes = build_shape_set(models=models, ranks=ranks, tokens=tokens, shapes_file=shapes_file, cpu=cpu)
    except (ValueError, ShapeError) as e:
        raise click.ClickException(str(e)) from e
    if ops:
        shapes = {op: s for op, s in shapes.items() if op in ops}
    else:  # the ops measured by default, and those a shapes file lists
        listed = set(load_shapes_file(shapes_file)) if shapes_file else set()
        shapes = {op: s for op, s in shapes.items() if OPS[op].profiled_by_default or op in listed}
    env = environment(device)
    if cpu:
        click.echo(
            f"No CUDA GPU selected: profiling the CPU implementations; trials are recorded under '{env.gpu_name}'."
        )
    if jobs is None:
        jobs = default_jobs()
    if quick and confirm_only:
        raise click.UsageError("--quick and --confirm-only exclude each other")
    given = bool(models or ranks or tokens or shapes_file)
    if gpus is not None:
        if confirm_only and not given:
            raise click.UsageError("--confirm-only on several GPUs needs the shapes (--model, --shapes, ...)")
        timing = {"warmup_ms": warmup_ms, "rep_ms": rep_ms, "confirm_top": confirm_top, "confirm_reps": confirm_reps}
        _profile_gpus(db_location, gpus, shapes, dtypes or ("bf16",), impls, quick, confirm_only, progress, timing)
        return
    fitted = None
    with open_db(db_location) as db:
        click.echo(f"database: {db.location}")
        # the dtypes this GPU has decision tables of: a quick run extends their full sweeps (others: shortlists only)
        own_dtypes = {m.dtype for m in db.models(gpu=env.gpu_name)} if quick and not cpu else set()
        if confirm_only and not given:
            from dora_tune.tuning.profiler import measured_shapes

            shapes, measured_dtypes = measured_shapes(db, env)
            shapes = {op: s for op, s in shapes.items() if not ops or op in ops}
            dtypes = dtypes or measured_dtypes
            click.echo(
                "confirming the measured shapes: " + (", ".join(f"{op} {len(s)}" for op, s in shapes.items()) or "none")
            )
        summary = run_profile(
            db,
            device,
            env,
            shapes,
            dtypes=dtypes or ("bf16",),
            impls=impls or None,
            warmup_ms=warmup_ms,
            rep_ms=rep_ms,
            progress=progress,
            jobs=jobs,
            confirm_top=confirm_top,
            confirm_reps=confirm_reps,
            confirm_only=confirm_only,
            quick=quick and not cpu,
        )
        if quick and not cpu and not summary.interrupted:
            fitted = _after_quick(
                db, env.gpu_name, dtypes=dtypes or ("bf16",), own_dtypes=own_dtypes, narrowed=summary.narrowed
            )
    if summary.warm_launches or summary.warm_error:
        click.echo(
            f"compiled ahead: {summary.warm_launches} launches in {summary.warm_seconds:.0f} s"
            + (f" (warming failed: {summary.warm_error})" if summary.warm_error else "")
        )
    if not confirm_only:
        click.echo(
            f"{env.gpu_name}: measured {summary.measured} trials ({summary.failed} failed or invalid) in "
            f"{summary.seconds:.0f} s; {summary.skipped} were already in the database."
        )
    if summary.confirmed or summary.confirm_failed or confirm_only:
        click.echo(
            f"confirmed: re-timed {summary.confirmed} of the fastest trials ({confirm_reps} calls each)"
            + (f" in {summary.seconds:.0f} s" if confirm_only else "")
            + (
                f"; {summary.confirm_failed} shapes failed, first: {summary.confirm_error}"
                if summary.confirm_failed
                else ""
            )
        )
    if quick and cpu:
        click.echo("--quick applies to GPUs (the CPU set is small): profiled in full.")
    if fitted is not None:
        click.echo(fitted)
    if summary.interrupted:
        click.echo("interrupted: every trial measured so far is kept; run the same command again to resume.")
        raise SystemExit(130)


def _profile_gpus(
    db_location: str | None,
    gpus: list[int],
    shapes: dict[str, list[dict[str, int]]],
    dtypes: tuple[str, ...],
    impls: tuple[str, ...],
    quick: bool,
    confirm_only: bool,
    progress: bool,
    timing: dict[str, float],
) -> None:
    """``--gpu all`` / ``--gpu 0,1``: one worker per GPU on the one database (:mod:`dora_tune.tuning.multi`);
    ``timing``: the trial and confirmation settings (warmup_ms, rep_ms, confirm_top, confirm_reps)."""
    import torch

    from dora_tune.tuning.multi import profile_devices

    with open_db(db_location) as db:  # created and migrated here, before the workers open it together
        location = db.location
        own = {g: {m.dtype for m in db.models(gpu=g)} for g in {torch.cuda.get_device_name(i) for i in gpus}}
    click.echo(f"database: {location}")
    s = profile_devices(
        location,
        [torch.device("cuda", i) for i in gpus],
        shapes,
        dtypes=dtypes,
        impls=impls or None,
        progress=progress,
        confirm_only=confirm_only,
        quick=quick,
        **timing,  # type: ignore[arg-type]
    )
    for model, devs in s.gpus.items():
        click.echo(f"{model}: {', '.join(devs)}")
    click.echo(
        f"measured {s.measured} trials ({s.failed} failed or invalid) on {len(gpus)} GPUs in {s.seconds:.0f} s; "
        f"{s.skipped} were already in the database; confirmed {s.confirmed}; {s.units} units done"
    )
    for e in s.errors:
        click.echo(f"worker failed: {e}", err=True)
    if quick and not s.interrupted:
        with open_db(location) as db:
            for model in s.gpus:
                click.echo(_after_quick(db, model, dtypes=dtypes, own_dtypes=own[model], narrowed=s.narrowed))
    if s.interrupted:
        click.echo("interrupted: every trial measured so far is kept; run the same command again to resume.")
        raise SystemExit(130)
    if s.errors:
        raise SystemExit(1)


_NO_REFIT = (
    "no refit for {dtypes}: this GPU's trials of it are shortlists of other decision tables (this GPU's of the "
    "sibling dtype, or another GPU's), and a model fitted on shortlists alone plans unseen shapes worse than the "
    "tables it came from (on an H100, norm regret 1.22 against the transfer's 1.006; docs/cross-gpu.md). The "
    "dispatcher keeps planning by those tables and serves the measured shapes from these trials; a full `dora-tune "
    "profile` and `dora-tune fit` give this GPU its own."
)


def _after_quick(db: object, gpu_name: str, *, dtypes: Sequence[str], own_dtypes: set[str], narrowed: bool) -> str:
    """Refit this GPU's cost model after a quick run, for each profiled dtype it learns more than shortlists of:
    every dtype when the run timed the whole space (nothing narrowed), else those this GPU had tables of."""
    refit = list(dtypes) if not narrowed else [d for d in dtypes if d in own_dtypes]
    kept = [d for d in dtypes if d not in refit]
    lines = [_refit(db, gpu_name, refit)] if refit else []
    if kept:
        lines.append(_NO_REFIT.format(dtypes=", ".join(kept)))
    return "\n".join(lines)


def _refit(db: object, gpu_name: str, dtypes: Sequence[str] | None = None) -> str:
    """Fit this GPU's cost model (``dtypes``: only these; None: every dtype) after a quick run; one line per
    decision table (or why none was stored)."""
    from dora_tune.tuning.fitting import MIN_SHAPES, fit

    summaries = fit(db, gpu=gpu_name, dtypes=dtypes)  # type: ignore[arg-type]
    if not summaries:
        return f"refit: nothing to fit (each (op, dtype) needs {MIN_SHAPES} or more measured shapes)"
    lines = [f"refit for {gpu_name}: {len(summaries)} decision table(s) stored"]
    for s in summaries:
        m = s.race or s.model

        def fig(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        lines.append(
            f"  {s.op} {s.dtype}: {s.n_shapes} shapes, CV regret {fig(m.regret_geomean)} geomean / "
            f"{fig(m.regret_max)} max (the crossover's {fig(s.crossover.regret_geomean)})"
        )
    return "\n".join(lines)
