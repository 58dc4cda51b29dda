"""``dora-tune selfcheck``: every kernel against its float64 reference on this machine's device."""

from __future__ import annotations

import click


@click.command()
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu)")
@click.option("--small/--full", default=None, help="small shapes (default on CPU) or realistic ones (default on GPU)")
def selfcheck(device: str | None, small: bool | None) -> None:
    """Run every implementation of every op against a float64 reference and print a table.

    Exits non-zero if any check fails. Without a GPU the Triton kernels run under Triton's CPU interpreter
    (TRITON_INTERPRET=1 is set for this process unless already set).
    """
    import os

    import torch
    from rich.console import Console
    from rich.table import Table

    from dora_tune.selfcheck import run_selfcheck

    if not torch.cuda.is_available() and (device or "cpu") == "cpu":
        # No GPU: run the Triton kernels too, under Triton's CPU interpreter (set before they are first imported).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        results = run_selfcheck(device, small=small)
    except (RuntimeError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else "CPU"
    table = Table(title=f"dora-tune self-check on {name} (torch {torch.__version__})")
    for col in ("op", "impl", "dtype", "shape", "rel. error", "tolerance", "time ms", "status"):
        table.add_column(col, justify="right" if col in ("rel. error", "tolerance", "time ms") else "left")
    for r in results:
        style = "red" if r.status.startswith("FAIL") else ("dim" if r.status.startswith("skipped") else None)
        table.add_row(
            r.op,
            r.impl,
            r.dtype,
            r.shape,
            "-" if r.relerr is None else f"{r.relerr:.2e}",
            f"{r.tolerance:.0e}",
            "-" if r.ms is None else f"{r.ms:.3f}",
            r.status,
            style=style,
        )
    Console(width=140).print(table)
    failed = [r for r in results if r.status.startswith("FAIL")]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} checks failed")
    click.echo(
        f"all {sum(r.status == 'ok' for r in results)} checks passed "
        f"({sum(r.status.startswith('skipped') for r in results)} skipped)"
    )
