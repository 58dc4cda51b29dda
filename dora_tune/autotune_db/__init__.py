"""Tuning database (SQLAlchemy 2.0): every measured trial, per GPU environment, implementation version, shape,
dtype and config.

Open one with :meth:`TuningDB.open` (default location: ``$DORA_TUNE_DB`` or ``tuning.sqlite`` in the user cache
folder), record trials with :meth:`TuningDB.record_trial`, query them with :meth:`TuningDB.trials` and
:meth:`TuningDB.best`, store fitted cost models with :meth:`TuningDB.save_model` and read them with
:meth:`TuningDB.models`, and move all of it between machines with :meth:`TuningDB.export` and :meth:`TuningDB.merge`.

Importing this package opens nothing and imports neither torch nor SQLAlchemy: the store (and SQLAlchemy) load at
the first use of one of its names; :func:`~dora_tune.autotune_db.snapshot.read_snapshot` reads a SQLite file with
the standard library alone.
"""

from typing import TYPE_CHECKING, Any

from dora_tune.autotune_db.common import (
    SCHEMA_VERSION,
    DatabaseError,
    GpuFeatures,
    MissingDatabaseError,
    SchemaError,
    canonical_json,
    default_db_location,
    gpu_slug,
)

if TYPE_CHECKING:
    from dora_tune.autotune_db.store import (
        EnvInfo,
        EnvRow,
        MergeStats,
        ModelRow,
        TrialResult,
        TrialRow,
        TuningDB,
        to_url,
    )

_FROM_STORE = frozenset(
    {"EnvInfo", "EnvRow", "MergeStats", "ModelRow", "TrialResult", "TrialRow", "TuningDB", "to_url"}
)


def __getattr__(name: str) -> Any:
    """The SQLAlchemy store's names, imported on first use (the run-time dispatcher reads SQLite without it)."""
    if name in _FROM_STORE:
        from dora_tune.autotune_db import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazily imported ones included."""
    return sorted(__all__)


__all__ = [
    "SCHEMA_VERSION",
    "DatabaseError",
    "EnvInfo",
    "EnvRow",
    "GpuFeatures",
    "MergeStats",
    "MissingDatabaseError",
    "ModelRow",
    "SchemaError",
    "TrialResult",
    "TrialRow",
    "TuningDB",
    "canonical_json",
    "default_db_location",
    "gpu_slug",
    "to_url",
]
