"""Tuning database (SQLAlchemy 2.0): every measured trial, per GPU environment, implementation version, shape,
dtype and config.

Open one with :meth:`TuningDB.open` (default location: ``$DORA_TUNE_DB`` or ``tuning.sqlite`` in the user cache
folder), record trials with :meth:`TuningDB.record_trial`, query them with :meth:`TuningDB.trials` and
:meth:`TuningDB.best`, store fitted cost models with :meth:`TuningDB.save_model` and read them with
:meth:`TuningDB.models`, and move all of it between machines with :meth:`TuningDB.export` and :meth:`TuningDB.merge`.

Importing this package opens nothing and imports no torch.
"""

from dora_tune.autotune_db.models import SCHEMA_VERSION, canonical_json
from dora_tune.autotune_db.store import (
    DatabaseError,
    EnvInfo,
    EnvRow,
    MergeStats,
    ModelRow,
    SchemaError,
    TrialResult,
    TrialRow,
    TuningDB,
    default_db_location,
    gpu_slug,
    to_url,
)

__all__ = [
    "SCHEMA_VERSION",
    "DatabaseError",
    "EnvInfo",
    "EnvRow",
    "MergeStats",
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
