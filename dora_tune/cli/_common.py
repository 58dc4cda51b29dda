"""Shared CLI pieces: the ``--db`` option and library errors turned into one clear line."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import click

db_option: Callable[[Callable[..., Any]], Callable[..., Any]] = click.option(
    "--db",
    "db_location",
    default=None,
    metavar="PATH_OR_URL",
    help="tuning database: a SQLite file path or any SQLAlchemy URL "
    "(default: $DORA_TUNE_DB, else tuning.sqlite in the user cache directory)",
)


@contextlib.contextmanager
def open_db(location: str | None, *, readonly: bool = False) -> Iterator[Any]:
    """Open the tuning DB for a command; its errors become a ``ClickException`` (one line, exit code 1)."""
    from dora_tune.autotune_db import DatabaseError, TuningDB

    try:
        db = TuningDB.open(location, readonly=readonly)
    except DatabaseError as e:
        raise click.ClickException(str(e)) from e
    try:
        yield db
    except DatabaseError as e:
        raise click.ClickException(str(e)) from e
    finally:
        db.close()


def parse_shape(text: str | None) -> dict[str, int] | None:
    """``"d_out=4096,d_in=4096,r=16"`` → dict of ints."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        if not sep or not val.strip().isdigit():
            raise click.BadParameter(f"expected key=int pairs separated by commas, got {text!r}", param_hint="--shape")
        out[key.strip()] = int(val)
    return out
