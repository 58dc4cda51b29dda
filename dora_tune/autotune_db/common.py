"""What the SQLAlchemy store and the dispatcher's snapshot reader share: the schema version and its tables, the
errors, the default location and the canonical JSON encoding.

Standard library (and platformdirs) only, so that the run-time dispatcher can read a SQLite cache without importing
SQLAlchemy. Nothing here runs at import time.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 4
"""Layout version written to ``meta.schema_version``; bump it (and add a migration) when the tables change.

1: meta, environments, implementations, trials. 2: + fitted_models. 3: + gpu_features. 4: + ``trials.wall_us``
(a nullable column: each trial's host-inclusive wall time per call)."""

_TABLES_V1 = frozenset({"meta", "environments", "implementations", "trials"})
TABLES: dict[int, frozenset[str]] = {
    1: _TABLES_V1,
    2: _TABLES_V1 | {"fitted_models"},
    3: _TABLES_V1 | {"fitted_models", "gpu_features"},
    4: _TABLES_V1 | {"fitted_models", "gpu_features"},
}
"""The tables each schema version has (a database of that version missing one is not a dora-tune database)."""

OLDEST_READABLE = 1
"""The oldest schema a read-only open serves as it is, without migrating: everything added since (the
``fitted_models`` of schema 2, the ``gpu_features`` of schema 3, the ``trials.wall_us`` column of schema 4) is
optional and reads as absent."""

FEATURE_SOURCES: tuple[str, ...] = ("nvml", "torch")
"""Where :class:`GpuFeatures` came from: ``"nvml"`` (torch's device properties and NVML's clocks and bus width) or
``"torch"`` (NVML could not answer: the device properties only, clocks and bandwidth unknown)."""


@dataclass(frozen=True)
class GpuFeatures:
    """What the device itself says about a GPU, beyond its name: L2 size (bytes, from torch's device properties),
    memory bandwidth (GB/s, NVML: max memory clock × 2 transfers per clock × bus width), max SM and memory clocks
    (MHz) and the memory bus width (bits). 0 means unknown."""

    l2_bytes: int
    mem_bandwidth_gbs: float
    max_sm_clock_mhz: int
    max_mem_clock_mhz: int
    bus_width_bits: int
    source: str

    def __post_init__(self) -> None:
        """Reject negative or non-finite figures and an unknown ``source`` (ValueError)."""
        if self.source not in FEATURE_SOURCES:
            raise ValueError(f"GpuFeatures.source must be one of {FEATURE_SOURCES}, got {self.source!r}")
        for name in ("l2_bytes", "max_sm_clock_mhz", "max_mem_clock_mhz", "bus_width_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"GpuFeatures.{name} must be an int ≥ 0, got {v!r}")
        bw = self.mem_bandwidth_gbs
        if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not math.isfinite(bw) or bw < 0:
            raise ValueError(f"GpuFeatures.mem_bandwidth_gbs must be a finite number ≥ 0, got {bw!r}")
        object.__setattr__(self, "mem_bandwidth_gbs", float(bw))


def bandwidth_gbs(max_mem_clock_mhz: int, bus_width_bits: int) -> float:
    """Peak memory bandwidth in GB/s from NVML's max memory clock and bus width: two transfers per clock (HBM and
    GDDR as NVML reports their clocks; H100 SXM: 2619 MHz × 2 × 5120 bit / 8 = 3352 GB/s, the published 3.35 TB/s)."""
    return max_mem_clock_mhz * 1e6 * 2 * bus_width_bits / 8 / 1e9


ENV_VAR = "DORA_TUNE_DB"
"""Environment variable naming the default database (a file path or a SQLAlchemy URL)."""


class DatabaseError(Exception):
    """The tuning database cannot be opened, read or written (missing file, not SQLite, read-only, corrupt ...)."""


class MissingDatabaseError(DatabaseError):
    """A read-only open found no database file at the location (nothing has been profiled into it yet)."""


class SchemaError(DatabaseError):
    """The database holds a layout this dora-tune cannot use (newer, too old, or not a dora-tune database)."""


def gpu_slug(name: str) -> str:
    """A GPU name as a lowercase slug: runs of non-alphanumerics become ``-`` ("NVIDIA H200" → "nvidia-h200")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_db_location() -> str:
    """Where the tuning database lives unless told otherwise.

    ``$DORA_TUNE_DB`` (a file path or a SQLAlchemy URL) when set and non-empty, else ``tuning.sqlite`` in the
    user cache directory of dora-tune (``platformdirs.user_cache_dir("dora-tune")``). The variable is read at
    each call.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env
    import platformdirs

    return os.path.join(platformdirs.user_cache_dir("dora-tune"), "tuning.sqlite")


def stored_schema_version(tables: set[str], raw: str | None, display: str) -> int | None:
    """The schema version of a database with these ``tables`` whose ``meta.schema_version`` reads ``raw`` (None
    when absent); None for a database with no tables at all.

    Raises:
        SchemaError: tables but no ``meta`` table, no readable version, or a table of that version missing.
    """
    if not tables:
        return None
    if "meta" not in tables:
        shown = ", ".join(sorted(tables)[:5])
        raise SchemaError(f"{display} is not a dora-tune database (tables {shown}; no meta table)")
    try:
        version = int(raw) if raw is not None else None
    except ValueError:
        version = None
    if version is None:
        raise SchemaError(f"{display} is not a dora-tune database (no schema_version in its meta table)")
    missing = TABLES.get(version, frozenset()) - tables
    if missing:
        raise SchemaError(f"{display} is not a dora-tune database (missing tables {', '.join(sorted(missing))})")
    return version


def check_readable(version: int, display: str) -> None:
    """SchemaError unless a schema-``version`` database can be read as it is (not newer, not older than
    :data:`OLDEST_READABLE`)."""
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{display} was written by a newer dora-tune (schema {version} > {SCHEMA_VERSION}); "
            "upgrade dora-tune to read it"
        )
    if version < OLDEST_READABLE:
        raise SchemaError(f"{display} has schema {version}, too old for this dora-tune to read (< {OLDEST_READABLE})")


def _check_jsonable(obj: Any, where: str) -> Any:
    """Return ``obj`` with tuples turned into lists; raise TypeError/ValueError for what JSON cannot hold exactly."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{where}: non-finite float {obj!r} has no JSON form")
        return obj
    if isinstance(obj, (list, tuple)):
        return [_check_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict key {k!r} is a {type(k).__name__}, JSON keys must be str")
            out[k] = _check_jsonable(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where}: {type(obj).__name__} value {obj!r} is not JSON-serialisable")


def canonical_json(obj: Any) -> str:
    """Encode ``obj`` as canonical JSON: keys sorted, no spaces (``{"K":4096,"N":128}``).

    Equal dicts give equal strings whatever their key order, so the text can serve as part of a unique key.
    Accepts None, bool, int, float, str, lists/tuples and dicts with str keys (nested freely).

    Raises:
        TypeError: a value JSON cannot represent (a set, an object, a non-str dict key ...).
        ValueError: a NaN or infinite float.
    """
    return json.dumps(_check_jsonable(obj, "value"), sort_keys=True, separators=(",", ":"), allow_nan=False)


FASTEST_SQL = """
SELECT i.op, i.name, i.version, b.shape, b.dtype, b.config, b.median_us
FROM (
    SELECT t.impl_id, t.shape, t.dtype, t.config, MIN(t.median_us) AS median_us
    FROM trials AS t
    WHERE t.env_id IN (SELECT id FROM environments WHERE gpu_name = ?)
        AND t.status = 'ok' AND t.median_us IS NOT NULL
    GROUP BY t.env_id, t.impl_id, t.shape, t.dtype
) AS b
JOIN implementations AS i ON b.impl_id = i.id
"""
"""SQLite: the fastest "ok" trial of each (environment, implementation, shape, dtype) of one GPU model, as
``(op, impl, impl_version, shape JSON, dtype, config JSON, median_us)``. Grouped in the order of the trials' unique
key, so SQLite walks that index instead of sorting (the shipped cache: 13 ms against 57 ms on a slow host); the bare
``config`` column comes from the row holding the ``MIN`` (SQLite's documented rule for a lone min/max aggregate)."""
