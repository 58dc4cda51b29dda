"""``dora-tune fit`` and ``dora-tune report``: fit the cost model into decision tables, and show how it does."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import click

from dora_tune.cli._common import db_option, open_db
from dora_tune.ops import OPS

_COLUMNS = (
    "op",
    "dtype",
    "gpu",
    "trials",
    "shapes",
    "estimator",
    "model top-1 (impl)",
    "model regret geo / max",
    "dispatch regret geo / max",
    "crossover top-1 (impl)",
    "crossover regret geo / max",
    "crossover excluded",
    "model on crossover's shapes",
    "used at run time",
)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _top1(m: dict[str, Any]) -> str:
    return f"{_pct(m['top1'])} ({_pct(m.get('impl_top1'))})"


def _regret(geo: float | None, mx: float | None) -> str:
    return "-" if geo is None or mx is None else f"{geo:.3f} / {mx:.3f}"


def _cv_row(op: str, dtype: str, gpu: str, n_trials: int, n_shapes: int, estimator: str, cv: dict[str, Any]) -> list:
    """One table row from a CV report's JSON (``CVReport.to_json()``: its ``model``, ``crossover``,
    ``model_paired`` and ``race`` parts). "dispatch" is what the dispatcher runs at a shape it has not measured: the
    race among the model's shortlist for the ops that race (``RACE_OPS``), the model's choice for the others."""
    from dora_tune.dispatch.decisions import beats_crossover

    m, x, p = cv["model"], cv["crossover"], cv["model_paired"]
    d = cv.get("race") or m
    return [
        op,
        dtype,
        gpu,
        str(n_trials),
        str(n_shapes),
        estimator,
        _top1(m),
        _regret(m["regret_geomean"], m["regret_max"]),
        _regret(d["regret_geomean"], d["regret_max"]) + (" (race)" if cv.get("race") else ""),
        _top1(x),
        _regret(x["regret_geomean"], x["regret_max"]),
        str(x["excluded"]),
        _regret(p["regret_geomean"], p["regret_max"]),
        "yes" if beats_crossover(cv) else "no (loses to the crossover)",
    ]


def _print_table(title: str, rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in _COLUMNS:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console(width=200).print(table)


@click.command()
@db_option
@click.option("--gpu", default=None, help="only this GPU (name, slug or part of a name, e.g. h200)")
@click.option(
    "--estimator",
    default="linear_trees",
    show_default=True,
    type=click.Choice(["linear_trees", "extra_trees", "hist_gb", "knn"]),
    help="the regressor (docs/cost-model.md compares them)",
)
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    type=click.Choice(["bf16", "fp16", "fp32"]),
    help="only these dtypes (repeatable; default: every dtype). E.g. --dtype bf16 after a --quick fp16 run: fp16 "
    "then keeps planning from the bf16 table its shortlists came from",
)
@click.option(
    "--op",
    "ops",
    multiple=True,
    type=click.Choice(list(OPS)),
    help="only these ops (repeatable; default: every op), e.g. an op newly profiled into a database whose other "
    "tables should stay as they are",
)
@click.option(
    "--cross-gpu",
    is_flag=True,
    help="also fit one model over every GPU's trials (with the GPU features) and report leave-one-GPU-out regret",
)
def fit(
    db_location: str | None,
    gpu: str | None,
    estimator: str,
    dtypes: tuple[str, ...],
    ops: tuple[str, ...],
    cross_gpu: bool,
) -> None:
    """Fit the cost model on the tuning DB's trials, cross-validate it against the fixed crossover, and store its
    decision tables in the DB (one per GPU environment, op and dtype with at least 3 measured shapes).

    --cross-gpu then asks what a GPU nobody profiled would get: for each GPU in turn, a model fitted on the other
    GPUs' trials (each with its GPU's features), the transfer rule (the nearest other GPU's own model) and the fixed
    crossover, scored on that GPU's measured shapes."""
    from dora_tune.tuning.fitting import MIN_SHAPES
    from dora_tune.tuning.fitting import fit as fit_models

    with open_db(db_location) as db:
        summaries = fit_models(db, gpu=gpu, estimator=estimator, dtypes=dtypes or None, ops=ops or None)
        location = db.location
        logo = _leave_one_gpu_out(db, estimator) if cross_gpu else None
    if not summaries:
        where = (f" for GPU {gpu!r}" if gpu else "") + (f" in {', '.join(dtypes)}" if dtypes else "")
        where += f" of {', '.join(ops)}" if ops else ""
        raise click.ClickException(
            f"nothing to fit{where}: no (GPU, op, dtype) has 'ok' trials at {MIN_SHAPES} or more distinct shapes; "
            "run `dora-tune profile` first"
        )
    rows = []
    for s in summaries:
        cv = {
            "model": s.model.to_json(),
            "crossover": s.crossover.to_json(),
            "model_paired": s.model_paired.to_json(),
            "race": None if s.race is None else s.race.to_json(),
        }
        rows.append(_cv_row(s.op, s.dtype, s.gpu_name, s.n_trials, s.n_shapes, s.estimator, cv))
    _print_table("leave-shapes-out cross-validation: cost model vs fixed crossover", rows)
    total = sum(s.fit_seconds for s in summaries)
    click.echo(f"stored {len(summaries)} decision table(s) in {location} ({total:.1f} s)")
    if logo is not None:
        _print_logo(logo)


def _leave_one_gpu_out(db: Any, estimator: str) -> list[tuple[str, str, Any]] | str:
    """Leave-one-GPU-out reports per (op, dtype) with trials of two or more GPUs, or why there are none."""
    from dora_tune.ops import OP_SHAPE_KEYS
    from dora_tune.tuning.crossgpu import GpuTrials, leave_one_gpu_out
    from dora_tune.tuning.features import DTYPE_NAMES

    envs = {e.id: e.info for e in db.environments() if e.kind == "cuda"}
    by_env: dict[int, list] = {i: [] for i in envs}
    for t in db.trials(status="ok"):
        if t.env_id in by_env:
            by_env[t.env_id].append(t)
    groups = [GpuTrials(envs[i], rows) for i, rows in by_env.items() if rows]
    if len({g.env.gpu_name for g in groups}) < 2:
        return "leave-one-GPU-out: the database holds trials of fewer than 2 GPUs; nothing to report"
    out = []
    for op in OP_SHAPE_KEYS:
        for dtype in DTYPE_NAMES:
            try:
                out += [(op, dtype, h) for h in leave_one_gpu_out(groups, op, dtype, estimator=estimator)]
            except ValueError:  # fewer than two GPUs measured this op/dtype
                continue
    return out or "leave-one-GPU-out: no op and dtype was measured on 2 or more GPUs"


def _print_logo(logo: list[tuple[str, str, Any]] | str) -> None:
    if isinstance(logo, str):
        click.echo(logo)
        return
    from rich.console import Console
    from rich.table import Table

    def reg(m: Any, race: Any = None) -> str:
        m = race or m
        return _regret(m.regret_geomean, m.regret_max) + (" (race)" if race else "")

    table = Table(title="leave-one-GPU-out: planning a GPU from the others' trials (regret geomean / max)")
    for col in (
        "op",
        "dtype",
        "held-out GPU",
        "shapes",
        "cross-GPU model (fitted on)",
        "transfer rule (from)",
        "fixed crossover",
    ):
        table.add_column(col, overflow="fold")
    for op, dtype, h in logo:
        model = f"{reg(h.model, h.model_race)} ({', '.join(h.trained_on)})"
        transfer = f"{reg(h.transfer, h.transfer_race)} ({h.transfer_from})"
        table.add_row(op, dtype, h.gpu_name, str(h.n_shapes), model, transfer, reg(h.crossover))
    Console(width=200).print(table)


@click.command()
@db_option
@click.option("--gpu", default=None, help="only this GPU (name, slug or part of a name, e.g. h200)")
@click.option(
    "--out",
    default="crossover.png",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="where to write the plot (PNG; needs matplotlib: pip install 'dora-tune[plot]')",
)
@click.option("--no-plot", is_flag=True, help="print the figures only (no matplotlib needed)")
def report(db_location: str | None, gpu: str | None, out: str, no_plot: bool) -> None:
    """Show the stored cross-validation figures (no refit) and plot each decision table's choice over the shape
    plane, with the measured shapes marked by their fastest implementation."""
    from dora_tune.dispatch.decisions import DecisionTable

    if not no_plot and importlib.util.find_spec("matplotlib") is None:
        raise click.ClickException(
            "dora-tune report draws its plot with matplotlib, which is not installed: "
            "pip install 'dora-tune[plot]' (or pass --no-plot to print the figures only)"
        )

    with open_db(db_location, readonly=True) as db:
        models = db.models(gpu=gpu)
        if not models:
            raise click.ClickException("no fitted models in the tuning DB; run `dora-tune fit` first")
        panels = []
        for m in models:
            try:
                table = DecisionTable.from_json(m.payload)
            except ValueError as e:
                raise click.ClickException(
                    f"stored decision table of {m.gpu_name} {m.op} {m.dtype} is broken: {e}"
                ) from e
            best = [b for b in db.best(gpu=m.gpu_name, op=m.op, dtype=m.dtype) if b.env_id == m.env_id]
            panels.append((m, table, best))
    rows = []
    for m, _, _ in panels:
        met = m.metrics
        rows.append(_cv_row(m.op, m.dtype, m.gpu_name, met["n_trials"], met["n_shapes"], m.estimator, met["cv"]))
    _print_table("stored leave-shapes-out cross-validation: cost model vs fixed crossover", rows)
    if not no_plot:
        _plot(panels, out)
        click.echo(f"wrote {out}")


_COLOURS = {
    "eager": "#1f77b4",
    "triton": "#ff7f0e",
    "dense": "#2ca02c",
    "factored_torch": "#d62728",
    "composed": "#9467bd",
    "fused": "#8c564b",
}


#: each op's plotted plane: (x label, y label); the compose ops plot (rows, cols)
_PLANE_LABELS = {"norm": ("log2(d_out·d_in)", "log2 r"), "dora_linear": ("log2 rows", "log2(d_out·d_in)")}


def _plane(op: str, shape: dict[str, int]) -> tuple[float, float]:
    """A shape's point in the plotted plane: (log2 rows, log2 cols); for the norm (log2 d_out·d_in, log2 r); for the
    DoRA linear (log2 rows, log2 d_out·d_in), its ranks drawn over each other."""
    if op == "norm":
        return math.log2(shape["d_out"] * shape["d_in"]), math.log2(shape["r"])
    if op == "dora_linear":
        return math.log2(shape["rows"]), math.log2(shape["d_out"] * shape["d_in"])
    return math.log2(shape["rows"]), math.log2(shape["cols"])


def _plot(panels: list, out: str) -> None:
    """One panel per decision table: grid points coloured by the chosen implementation, measured shapes on top."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from dora_tune.ops import OP_SHAPE_KEYS

    impls = sorted({c[0] for _, t, _ in panels for c in t.cells} | {b.impl for _, _, best in panels for b in best})
    spare = iter(c for c in plt.get_cmap("tab10").colors if c not in _COLOURS.values())
    colour = {i: _COLOURS.get(i) or next(spare, "grey") for i in impls}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (m, table, best) in zip(axes[0], panels, strict=True):
        keys = OP_SHAPE_KEYS[table.op]
        grid = [dict(zip(keys, p, strict=True)) for p in itertools.product(*(table.axes[k] for k in keys))]
        xy = [_plane(table.op, g) for g in grid]
        ax.scatter(
            [p[0] for p in xy],
            [p[1] for p in xy],
            c=[colour[impl] for impl, _ in table.cells],
            marker="s",
            s=28,
            alpha=0.35 if table.op in _PLANE_LABELS else 0.6,  # points drawn over each other: lighter
            linewidths=0,
        )
        if best:
            bxy = [_plane(table.op, b.shape) for b in best]
            ax.scatter(
                [p[0] for p in bxy],
                [p[1] for p in bxy],
                c=[colour[b.impl] for b in best],
                marker="o",
                s=70,
                edgecolors="black",
                linewidths=1.2,
                zorder=3,
            )
        ax.set_title(f"{m.op} {m.dtype} — {m.gpu_name}", fontsize=10)
        xlabel, ylabel = _PLANE_LABELS.get(table.op, ("log2 rows", "log2 cols"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    handles = [Line2D([], [], marker="s", linestyle="", color=colour[i], label=i) for i in impls]
    handles.append(
        Line2D([], [], marker="o", linestyle="", color="white", markeredgecolor="black", label="measured (fastest)")
    )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
