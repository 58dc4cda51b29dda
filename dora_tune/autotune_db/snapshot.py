"""What the run-time dispatcher reads from a tuning database, read without SQLAlchemy when it is a SQLite file.

Training code meets the database at its first dispatched kernel call. Importing SQLAlchemy there costs more than
reading the rows (0.1–0.3 s against a few ms), so a SQLite file — the default location and every shipped cache —
is read here through the standard library's ``sqlite3``, read-only, in one transaction; any other SQLAlchemy URL
goes through :class:`~dora_tune.autotune_db.TuningDB`. Both give the same :class:`Snapshot` and raise the same
errors (:class:`DatabaseError`, :class:`SchemaError`) for what :meth:`TuningDB.open` refuses.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from urllib.parse import quote

from dora_tune.autotune_db.common import (
    FASTEST_SQL,
    DatabaseError,
    MissingDatabaseError,
    SchemaError,
    check_readable,
    stored_schema_version,
)

_MODELS_SQL = """
SELECT m.op, m.dtype, m.payload, m.metrics
FROM fitted_models AS m
JOIN environments AS e ON m.env_id = e.id
WHERE e.gpu_name = ?
ORDER BY m.op, m.dtype, m.env_id
"""


@dataclass(frozen=True)
class Snapshot:
    """The dispatcher's share of one database for one GPU model (exact name).

    Attributes:
        fastest: ``(op, impl, impl_version, shape JSON, dtype, config JSON, median_us)`` for the fastest "ok" trial
            of each (environment, op, implementation, version, shape, dtype), in no set order (one row per
            environment when several share the GPU model: the caller keeps the fastest).
        tables: ``(op, dtype, payload JSON, metrics JSON)`` of each stored fitted model, by op, dtype and
            environment (a later environment's model after an earlier one's); none in a schema-1 database.
    """

    fastest: list[tuple[str, str, str, str, str, str, float]]
    tables: list[tuple[str, str, str, str]]


def read_snapshot(location: str, gpu_name: str) -> Snapshot:
    """Read what the dispatcher needs for ``gpu_name`` from the database at ``location`` (a path or a URL).

    Raises:
        DatabaseError: the file is missing, is not SQLite, is corrupt or cannot be read.
        SchemaError: not a dora-tune database, or a schema this dora-tune cannot read.
    """
    if "://" in location:
        return _via_sqlalchemy(location, gpu_name)
    path = os.path.abspath(os.path.expanduser(location))
    if not os.path.isfile(path):
        raise MissingDatabaseError(f"no tuning database at {path}")
    try:
        conn = sqlite3.connect(f"file:{quote(path, safe='/')}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as e:
        raise DatabaseError(f"{path} is not a usable SQLite/SQL database: {e}") from e
    try:
        conn.execute("BEGIN")  # one read transaction: a profiler writing meanwhile is seen wholly or not at all
        tables = {
            name
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not name.startswith("sqlite_")
        }
        raw = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            raw = row[0] if row is not None else None
        version = stored_schema_version(tables, raw, path)
        if version is None:
            raise SchemaError(f"{path} is empty: not a dora-tune database")
        check_readable(version, path)
        fastest = conn.execute(FASTEST_SQL, (gpu_name,)).fetchall()
        models = conn.execute(_MODELS_SQL, (gpu_name,)).fetchall() if "fitted_models" in tables else []
    except sqlite3.Error as e:
        raise DatabaseError(f"{path} is not a usable SQLite/SQL database: {e}") from e
    finally:
        conn.close()
    return Snapshot(fastest, models)


def _via_sqlalchemy(location: str, gpu_name: str) -> Snapshot:
    from dora_tune.autotune_db.store import TuningDB

    with TuningDB.open(location, readonly=True) as db:
        fastest = db.fastest_per_impl(gpu_name)
        models = [m for m in db.models(gpu=gpu_name) if m.gpu_name == gpu_name]
    return Snapshot(fastest, [(m.op, m.dtype, json.dumps(m.payload), json.dumps(m.metrics)) for m in models])
