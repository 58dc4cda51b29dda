"""``dora-tune cache``: where the tuning DB lives, what it holds, export and merge."""

from __future__ import annotations

from importlib import resources
from typing import Any

import click

from dora_tune.cli._common import db_option, open_db


def shipped_caches() -> list[str]:
    """Prebuilt cache files shipped in the package (``dora_tune/caches/*.sqlite``)."""
    root = resources.files("dora_tune.caches")
    return sorted(str(p) for p in root.iterdir() if p.name.endswith(".sqlite"))


@click.group()
def cache() -> None:
    """Manage the tuning database and the shipped caches."""


@cache.command("path")
@db_option
def cache_path(db_location: str | None) -> None:
    """Print the tuning database's location."""
    from dora_tune.autotune_db import default_db_location

    click.echo(db_location or default_db_location())


@cache.command("list")
@db_option
def cache_list(db_location: str | None) -> None:
    """Environments in the tuning DB (with trial counts), and the shipped caches (with theirs).

    A user database that does not exist yet is no error (a fresh machine): it says so and lists the shipped caches.
    """
    from dora_tune.autotune_db import MissingDatabaseError, default_db_location

    try:
        with open_db(db_location, readonly=True) as db:
            click.echo(f"{db.location}: {_describe(db)}")
    except click.ClickException as e:
        if not isinstance(e.__cause__, MissingDatabaseError):
            raise
        where = db_location or default_db_location()
        click.echo(f"{where}: no user database yet (`dora-tune profile` creates it)")
    files = shipped_caches()
    click.echo(f"shipped caches: {len(files) or 'none'}")
    for path in files:
        with open_db(path, readonly=True) as db:
            click.echo(f"{path}: {_describe(db)}")


def _describe(db: Any) -> str:
    """One line a database, then one line an environment, indented."""
    envs = db.environments()
    lines = [f"{len(envs)} environment(s)"]
    for e in envs:
        versions = f"torch {e.torch}, triton {e.triton}, dora-tune {e.dora_tune}"
        lines.append(f"  {e.gpu_name} (sm {e.compute_capability or '-'}, {versions}): {e.trials} trials")
        f = e.features
        if f is not None:
            bw = f"{f.mem_bandwidth_gbs / 1e3:.2f} TB/s" if f.mem_bandwidth_gbs else "bandwidth unknown"
            clocks = f", SM {f.max_sm_clock_mhz} MHz" if f.max_sm_clock_mhz else ""
            lines.append(f"    device: L2 {f.l2_bytes / 2**20:.0f} MB, {bw}{clocks} (from {f.source})")
    return "\n".join(lines)


@cache.command("export")
@db_option
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--gpu", default=None, help="only this GPU (name, slug or part of a name)")
@click.option("--overwrite", is_flag=True, help="replace DEST if it exists")
def cache_export(db_location: str | None, dest: str, gpu: str | None, overwrite: bool) -> None:
    """Copy the tuning DB (or one GPU's part of it) into a new SQLite file DEST."""
    with open_db(db_location, readonly=True) as db:
        n = db.export(dest, gpu=gpu, overwrite=overwrite)
    click.echo(f"exported {n} trials to {dest}")


@cache.command("merge")
@db_option
@click.argument("source")
def cache_merge(db_location: str | None, source: str) -> None:
    """Merge another tuning DB (a path or URL) into this one; a trial seen in both keeps the newer measurement."""
    with open_db(db_location) as db:
        st = db.merge(source)
    click.echo(
        f"merged {source}: {st.envs_added} environments and {st.trials_added} trials added, "
        f"{st.trials_updated} updated, {st.trials_skipped} already newer here; fitted models: "
        f"{st.models_added} added, {st.models_updated} updated, {st.models_skipped} kept"
    )
