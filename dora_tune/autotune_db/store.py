"""The tuning database: record measured trials, query them, export one GPU's share and merge databases.

A :class:`TuningDB` wraps one SQLAlchemy engine. Every write method runs in its own transaction and commits before it
returns, so a killed profiler loses at most the trial it was measuring and never leaves a half-written row. SQLite
files run in WAL mode with a 5 s busy timeout, and writes take the write lock up front (``BEGIN IMMEDIATE``), so
several profiler processes can share one file.

Nothing here runs at import time: no engine, no connection, no file; the default location is read from the
environment when :func:`default_db_location` is called. This module never imports torch.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    inspect,
    null,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from dora_tune.autotune_db.common import (
    FASTEST_SQL,
    SCHEMA_VERSION,
    DatabaseError,
    GpuFeatures,
    MissingDatabaseError,
    SchemaError,
    check_readable,
    default_db_location,
    gpu_slug,
    stored_schema_version,
)
from dora_tune.autotune_db.models import (
    Base,
    Environment,
    FittedModel,
    GpuFeaturesRow,
    Implementation,
    Meta,
    Trial,
    canonical_json,
)

STATUSES = ("ok", "failed", "oom", "invalid")
"""Allowed values of :attr:`TrialResult.status`."""


class _Conflict(DatabaseError):
    """A unique key was taken by a concurrent writer between our check and our insert (retried once)."""


# --------------------------------------------------------------------------------------------------- locations


def to_url(path_or_url: str) -> str:
    """A SQLAlchemy URL for ``path_or_url``: a string holding ``://`` is returned as is, else an absolute sqlite URL.

    ``~`` is expanded and relative paths are made absolute (``"db.sqlite"`` → ``"sqlite:////cwd/db.sqlite"``).
    """
    if "://" in path_or_url:
        return path_or_url
    return "sqlite:///" + os.path.abspath(os.path.expanduser(path_or_url))


@dataclass(frozen=True)
class _Target:
    """A resolved location: the engine URL, the SQLite file path (None for other backends and in-memory SQLite),
    and the name to show in messages (passwords hidden)."""

    url: URL
    path: str | None
    display: str


def _resolve(location: str, readonly: bool) -> _Target:
    """Turn a path or URL into the URL to open (read-only SQLite files via a ``mode=ro`` URI) and its file path."""
    if "://" not in location:
        path = os.path.abspath(os.path.expanduser(location))
        url = URL.create("sqlite", database=path)
    else:
        try:
            url = make_url(location)
        except Exception as e:  # sqlalchemy raises ArgumentError for malformed URLs
            raise DatabaseError(f"{location!r} is not a valid database URL: {e}") from e
        path = None
        if url.get_backend_name() == "sqlite":
            db = url.database or ""
            is_uri = str(url.query.get("uri", "")).lower() in ("true", "1")
            if is_uri:
                raw = unquote(db[len("file:") :] if db.startswith("file:") else db)
                if raw and ":memory:" not in raw and url.query.get("mode") != "memory":
                    path = os.path.abspath(raw)
            elif db and db != ":memory:":
                path = os.path.abspath(db)
    display = path if path is not None else url.render_as_string(hide_password=True)
    if readonly and path is not None:
        query = {k: v for k, v in url.query.items() if k not in ("mode", "uri")}
        query.update(mode="ro", uri="true")
        url = URL.create(url.drivername, database="file:" + quote(path, safe="/"), query=query)
    return _Target(url=url, path=path, display=display)


# ----------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class EnvInfo:
    """The machine set-up a trial was measured on. ``kind`` is "cuda" or "cpu"; versions are free-form strings.

    ``features``: what the device said about its GPU (:class:`GpuFeatures`; None on a CPU, or for an environment
    recorded before schema 3). It describes the GPU, it does not tell environments apart: equality, hashing and the
    stored environment's identity use the other fields only, and a stored environment keeps the first features
    recorded with it."""

    kind: str
    gpu_name: str
    compute_capability: str
    sm_count: int
    memory_bytes: int
    driver: str
    cuda: str
    torch: str
    triton: str
    dora_tune: str
    features: GpuFeatures | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        """Reject an unknown ``kind`` or ``features`` of another type."""
        if self.kind not in ("cuda", "cpu"):
            raise ValueError(f"EnvInfo.kind must be 'cuda' or 'cpu', got {self.kind!r}")
        if self.features is not None and not isinstance(self.features, GpuFeatures):
            raise TypeError(f"EnvInfo.features must be a GpuFeatures or None, got {type(self.features).__name__}")

    @property
    def slug(self) -> str:
        """:func:`gpu_slug` of the GPU name."""
        return gpu_slug(self.gpu_name)


_ENV_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EnvInfo) if f.name != "features")
"""The fields that identify a stored environment (every field but ``features``)."""
_FEATURE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(GpuFeatures))


@dataclass(frozen=True)
class TrialResult:
    """The outcome of one measurement.

    ``status`` is one of "ok", "failed" (raised), "oom" (out of memory) or "invalid" (wrong results); an "ok"
    result needs a finite positive ``median_us``. Times are microseconds; ``reps`` is how many timed repetitions.
    ``median_us``, ``p20_us`` and ``p80_us`` are GPU time on CUDA (the host kept out), wall time on the CPU.
    ``wall_us`` (schema 4) is the wall time of one call when calls run back to back with the GPU not held ahead —
    host included, what a training step pays — or None where it was not measured (CPU trials, older rows).
    """

    status: str
    median_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    reps: int = 0
    peak_mem_bytes: int | None = None
    error: str | None = None
    wall_us: float | None = None

    def __post_init__(self) -> None:
        """Validate the status and the timings (ValueError)."""
        if self.status not in STATUSES:
            raise ValueError(f"TrialResult.status must be one of {STATUSES}, got {self.status!r}")
        for name in ("median_us", "p20_us", "p80_us", "wall_us"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"TrialResult.{name} must be a finite number or None, got {v!r}")
            object.__setattr__(self, name, float(v))  # numpy scalars become plain floats
        if self.wall_us is not None and self.wall_us <= 0:
            raise ValueError(f"TrialResult.wall_us must be positive or None, got {self.wall_us!r}")
        if self.status == "ok" and (self.median_us is None or self.median_us <= 0):
            raise ValueError(f"an 'ok' TrialResult needs a finite positive median_us, got {self.median_us!r}")
        for name in ("reps", "peak_mem_bytes"):
            v = getattr(self, name)
            if v is None and name == "peak_mem_bytes":
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"TrialResult.{name} must be a non-negative int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.error is not None and not isinstance(self.error, str):
            raise ValueError(f"TrialResult.error must be a str or None, got {type(self.error).__name__}")


@dataclass(frozen=True)
class TrialRow:
    """One stored trial as queries return it (shape and config decoded back to dicts, created_at in UTC).

    ``wall_us``: the host-inclusive wall time per call (see :class:`TrialResult`); None where it was not measured,
    and for every trial of a schema-3 (or older) database read as it is."""

    env_id: int
    gpu_name: str
    op: str
    impl: str
    impl_version: str
    shape: dict[str, Any]
    dtype: str
    config: dict[str, Any]
    status: str
    median_us: float | None
    p20_us: float | None
    p80_us: float | None
    reps: int
    peak_mem_bytes: int | None
    error: str | None
    created_at: datetime
    wall_us: float | None = None


@dataclass(frozen=True, kw_only=True)
class EnvRow(EnvInfo):
    """One stored environment (every :class:`EnvInfo` field, its features included) with its row id and the number
    of trials on it."""

    id: int
    trials: int

    @property
    def info(self) -> EnvInfo:
        """The environment as a plain :class:`EnvInfo`."""
        return EnvInfo(**{f: getattr(self, f) for f in _ENV_FIELDS}, features=self.features)


@dataclass(frozen=True)
class ModelRow:
    """One stored fitted model (see :meth:`TuningDB.save_model`), its JSON decoded back to dicts."""

    env_id: int
    gpu_name: str
    op: str
    dtype: str
    estimator: str
    payload: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class MergeStats:
    """What :meth:`TuningDB.merge` did: new environments, new trials, replaced (older) trials, skipped trials, and
    the same for fitted models."""

    envs_added: int
    trials_added: int
    trials_updated: int
    trials_skipped: int
    models_added: int = 0
    models_updated: int = 0
    models_skipped: int = 0


# ------------------------------------------------------------------------------------------------- migrations


def _migrate_1_to_2(conn: Connection) -> None:
    """Schema 1 → 2: add the ``fitted_models`` table and record schema 2.

    The table is spelled out here as schema 2 defines it (not taken from the ORM class), so that this step stays
    right when a later schema changes the class and adds its own migration.
    """
    md = MetaData()
    Table("environments", md, Column("id", Integer, primary_key=True))  # the foreign key's target; not created
    Table(
        "fitted_models",
        md,
        Column("id", Integer, primary_key=True),
        Column("env_id", Integer, ForeignKey("environments.id"), nullable=False),
        Column("op", String(100), nullable=False),
        Column("dtype", String(32), nullable=False),
        Column("created_at", DateTime, nullable=False),
        Column("estimator", Text, nullable=False),
        Column("payload", Text, nullable=False),
        Column("metrics", Text, nullable=False),
        UniqueConstraint("env_id", "op", "dtype", name="uq_fitted_models_key"),
    ).create(conn)
    conn.execute(update(Meta).where(Meta.key == "schema_version").values(value="2"))


def _migrate_2_to_3(conn: Connection) -> None:
    """Schema 2 → 3: add the ``gpu_features`` table (spelled out as schema 3 defines it) and record schema 3. The
    environments stored so far get no features row: they read as unknown features (the published-figure table
    serves them)."""
    md = MetaData()
    Table("environments", md, Column("id", Integer, primary_key=True))  # the foreign key's target; not created
    Table(
        "gpu_features",
        md,
        Column("env_id", Integer, ForeignKey("environments.id"), primary_key=True),
        Column("l2_bytes", BigInteger, nullable=False),
        Column("mem_bandwidth_gbs", Float, nullable=False),
        Column("max_sm_clock_mhz", Integer, nullable=False),
        Column("max_mem_clock_mhz", Integer, nullable=False),
        Column("bus_width_bits", Integer, nullable=False),
        Column("source", String(16), nullable=False),
    ).create(conn)
    conn.execute(update(Meta).where(Meta.key == "schema_version").values(value="3"))


def _migrate_3_to_4(conn: Connection) -> None:
    """Schema 3 → 4: add the ``trials.wall_us`` column (spelled out as schema 4 defines it: a FLOAT, NULL allowed,
    no default; ``ALTER TABLE ... ADD COLUMN`` rewrites no row on SQLite or PostgreSQL) and record schema 4. The
    trials stored so far read as not measured (NULL)."""
    column_type = Float().compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE trials ADD COLUMN wall_us {column_type}"))
    conn.execute(update(Meta).where(Meta.key == "schema_version").values(value="4"))


_MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4}

_SCHEMA_LOCK_KEY = 0x646F72612D74756E  # "dora-tun": the PostgreSQL advisory lock key of schema creation/migration
"""``_MIGRATIONS[v]`` upgrades a schema-``v`` database to ``v + 1`` (tables and the stored ``schema_version``)
inside the open write transaction."""


# --------------------------------------------------------------------------------------------------- helpers


def _env_fields(env: EnvInfo) -> dict[str, Any]:
    """The identifying fields of ``env`` (:data:`_ENV_FIELDS`) as a dict."""
    return {f: getattr(env, f) for f in _ENV_FIELDS}


def _json_dict(value: Any, what: str) -> str:
    """Canonical JSON of a shape or config dict (TypeError when it is not a dict or not JSON-able)."""
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    return canonical_json(_plain(value))


def _plain(obj: Any) -> Any:
    """Integral scalars (numpy ints ...) as plain ints, recursively through dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, numbers.Integral) and not isinstance(obj, (bool, int)):
        return int(obj)
    return obj


def _nonempty(value: Any, what: str) -> str:
    """``value`` when it is a non-empty str, else TypeError/ValueError."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    return value


def _model_row(m: FittedModel, gpu_name: str) -> ModelRow:
    """A :class:`ModelRow` from the ORM object of one query row."""
    return ModelRow(
        env_id=m.env_id,
        gpu_name=gpu_name,
        op=m.op,
        dtype=m.dtype,
        estimator=m.estimator,
        payload=json.loads(m.payload),
        metrics=json.loads(m.metrics),
        created_at=m.created_at,
    )


def _row(t: Trial, gpu_name: str, impl: Implementation, wall_us: float | None) -> TrialRow:
    """A :class:`TrialRow` from the ORM objects of one query row and its ``wall_us`` (selected explicitly: the ORM
    defers the column, which a schema-3 file lacks)."""
    return TrialRow(
        env_id=t.env_id,
        gpu_name=gpu_name,
        op=impl.op,
        impl=impl.name,
        impl_version=impl.version,
        shape=json.loads(t.shape),
        dtype=t.dtype,
        config=json.loads(t.config),
        status=t.status,
        median_us=t.median_us,
        p20_us=t.p20_us,
        p80_us=t.p80_us,
        reps=t.reps,
        peak_mem_bytes=t.peak_mem_bytes,
        error=t.error,
        created_at=t.created_at,
        wall_us=wall_us,
    )


def _gpu_matches(query: str, name: str) -> bool:
    """Whether ``query`` names GPU ``name``: case-insensitively its exact name, its slug, or a part of either."""
    q = query.strip().lower()
    if not q:
        return True
    n = name.lower()
    if q == n or q in n:
        return True
    qs, ns = gpu_slug(query), gpu_slug(name)
    return bool(qs) and qs in ns


_TRIAL_VALUE_COLS = ("status", "median_us", "p20_us", "p80_us", "reps", "peak_mem_bytes", "error", "created_at")
"""The outcome columns of a trial that every schema has (schema 4's ``wall_us`` is read apart, see
:meth:`TuningDB._wall`)."""


# ---------------------------------------------------------------------------------------------------- the store


def _filter_trials(
    q: Any,
    env_ids: Sequence[int] | None,
    *,
    op: str | None = None,
    impl: str | None = None,
    dtype: str | None = None,
    shape: dict[str, Any] | None = None,
    status: str | None = None,
) -> Any:
    """``q`` (a select over trials joined with their implementation) narrowed by every filter that is given."""
    conds = []
    if env_ids is not None:
        conds.append(Trial.env_id.in_(env_ids))
    if op is not None:
        conds.append(Implementation.op == op)
    if impl is not None:
        conds.append(Implementation.name == impl)
    if dtype is not None:
        conds.append(Trial.dtype == dtype)
    if shape is not None:
        conds.append(Trial.shape == _json_dict(shape, "shape"))
    if status is not None:
        conds.append(Trial.status == status)
    return q.where(*conds) if conds else q


class TuningDB:
    """A tuning database. Create it with :meth:`open`; close it with :meth:`close` or use it as a context manager.

    Attributes:
        location: the path or URL it was opened from.
        url: the SQLAlchemy URL in use (for read-only SQLite, a ``file:...?mode=ro&uri=true`` URI).
        readonly: whether writes are refused.
    """

    def __init__(self, engine: Engine, location: str, target: _Target, readonly: bool) -> None:
        """Wrap an engine; use :meth:`open` rather than calling this."""
        self._engine = engine
        self._target = target
        self._sqlite = engine.dialect.name == "sqlite"
        self._closed = False
        self._schema = SCHEMA_VERSION  # the schema of the open file (older only when opened read-only)
        self.location = location
        url = target.url.render_as_string(hide_password=False)
        # SQLAlchemy escapes the ":" of a "file:" URI database; both spellings parse the same, show the plain one
        self.url = re.sub(r"^([\w+]+:///)file%3A", r"\1file:", url)
        self.readonly = readonly

    # -------------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, location: str | None = None, *, readonly: bool = False) -> TuningDB:
        """Open (creating it when writable and empty) the tuning database at ``location``.

        Args:
            location: a file path or SQLAlchemy URL; None means :func:`default_db_location`.
            readonly: open without write access; a SQLite file must then exist already.

        Raises:
            DatabaseError: the file is missing (read-only), is not SQLite, is corrupt, or cannot be created.
            SchemaError: the database is newer than this dora-tune, too old to migrate, or not a dora-tune database.
        """
        location = default_db_location() if location is None else location
        target = _resolve(location, readonly)
        if target.path is not None:
            if readonly:
                if not os.path.isfile(target.path):
                    raise MissingDatabaseError(f"no tuning database at {target.path}")
            else:
                try:
                    os.makedirs(os.path.dirname(target.path), exist_ok=True)
                except OSError as e:
                    raise DatabaseError(f"cannot create the folder of {target.path}: {e}") from e
        try:
            engine = create_engine(target.url)
        except Exception as e:  # unknown dialect, missing driver, bad arguments
            raise DatabaseError(f"cannot open {target.display}: {e}") from e
        if engine.dialect.name == "sqlite":
            _install_sqlite_pragmas(engine, readonly)
        db = cls(engine, location, target, readonly)
        try:
            db._prepare()
        except BaseException:
            engine.dispose()
            raise
        return db

    def _prepare(self) -> None:
        """Check the schema version; create the tables in an empty writable database; run pending migrations."""
        display = self._target.display
        try:
            with self._engine.connect() as conn:
                version = self._read_version(conn)
            if version is not None:
                self._check_version(version)
            if version == SCHEMA_VERSION or (self.readonly and version is not None):
                self._schema = version  # read-only: an older readable schema is served as it is
                return
            if self.readonly:
                raise SchemaError(f"{display} is empty: not a dora-tune database")
            with self._engine.connect() as conn:
                # one process at a time creates or migrates: SQLite's write lock, PostgreSQL's advisory lock (held
                # to the end of this transaction); without it, processes opening a new server database together
                # all create the tables and all but one fail
                if self._sqlite:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                elif conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                version = self._read_version(conn)  # another process may have created it meanwhile
                if version is None:
                    Base.metadata.create_all(conn)
                    conn.execute(insert(Meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
                elif version < SCHEMA_VERSION:
                    self._check_version(version)
                    for v in range(version, SCHEMA_VERSION):
                        _MIGRATIONS[v](conn)  # each step records its version
                conn.commit()
            self._schema = SCHEMA_VERSION
        except (SQLAlchemyError, sqlite3.Error) as e:
            raise DatabaseError(f"{display} is not a usable SQLite/SQL database: {_reason(e)}") from e

    def _read_version(self, conn: Connection) -> int | None:
        """The stored schema version; None for a database with no tables; SchemaError for a foreign database."""
        names = set(inspect(conn).get_table_names())
        raw = None
        if "meta" in names:
            raw = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar_one_or_none()
        return stored_schema_version(names, raw, self._target.display)

    def _check_version(self, version: int) -> None:
        """SchemaError unless ``version`` is current, can be read as it is (read-only) or migrated (writable)."""
        display = self._target.display
        if self.readonly or version > SCHEMA_VERSION:
            check_readable(version, display)
        elif version < SCHEMA_VERSION and not all(v in _MIGRATIONS for v in range(version, SCHEMA_VERSION)):
            raise SchemaError(
                f"{display} has schema {version}, too old for this dora-tune (schema {SCHEMA_VERSION}) and it "
                "cannot be migrated; delete it (or point DORA_TUNE_DB elsewhere) and re-profile"
            )

    def close(self) -> None:
        """Close every connection. Further calls on this object raise DatabaseError."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()

    def __enter__(self) -> TuningDB:
        """Return self."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the database."""
        self.close()

    def __repr__(self) -> str:
        """``TuningDB('/path/tuning.sqlite', readonly=False)``."""
        return f"TuningDB({self._target.display!r}, readonly={self.readonly})"

    # ----------------------------------------------------------------------------------------- sessions

    def _require_writable(self, what: str) -> None:
        """DatabaseError when this database was opened read-only."""
        if self.readonly:
            raise DatabaseError(f"{self._target.display} is open read-only; cannot {what}")

    @contextmanager
    def _session(self, write: bool) -> Iterator[Session]:
        """A session in one transaction, committed at the end when ``write``; SQL errors become DatabaseError."""
        if self._closed:
            raise DatabaseError(f"{self._target.display} is closed")
        if write:
            self._require_writable("write")
        with Session(self._engine, expire_on_commit=False, autoflush=False) as s:
            try:
                if write and self._sqlite:
                    s.connection().exec_driver_sql("BEGIN IMMEDIATE")
                yield s
                if write:
                    s.commit()
            except IntegrityError as e:
                s.rollback()
                raise _Conflict(f"{self._target.display}: {_reason(e)}") from e
            except (SQLAlchemyError, sqlite3.Error) as e:
                s.rollback()
                raise DatabaseError(f"{self._target.display}: {_reason(e)}") from e

    def _env_id(
        self, s: Session, env: dict[str, Any], *, create: bool, features: GpuFeatures | None = None
    ) -> tuple[int | None, bool]:
        """The id of the environment with these descriptive fields (created if asked), and whether it was new. With
        ``create``, ``features`` are stored for it unless it has some already (the first recorded stay)."""
        cond = [getattr(Environment, f) == env[f] for f in _ENV_FIELDS]
        eid = s.scalar(select(Environment.id).where(*cond))
        created = False
        if eid is None:
            if not create:
                return None, False
            row = Environment(**{f: env[f] for f in _ENV_FIELDS})
            s.add(row)
            s.flush()
            eid, created = row.id, True
        if features is not None and (created or s.get(GpuFeaturesRow, eid) is None):
            s.add(GpuFeaturesRow(env_id=eid, **{f: getattr(features, f) for f in _FEATURE_FIELDS}))
            s.flush()
        return eid, created

    def _impl_id(self, s: Session, op: str, name: str, version: str, *, create: bool) -> int | None:
        """The id of implementation (op, name, version), created if asked."""
        iid = s.scalar(
            select(Implementation.id).where(
                Implementation.op == op, Implementation.name == name, Implementation.version == version
            )
        )
        if iid is not None or not create:
            return iid
        row = Implementation(op=op, name=name, version=version)
        s.add(row)
        s.flush()
        return row.id

    def _env_ids_for(self, s: Session, gpu: str | None) -> list[int] | None:
        """Ids of the environments whose GPU matches ``gpu`` (see :meth:`trials`); None when ``gpu`` is None."""
        if gpu is None:
            return None
        rows = s.execute(select(Environment.id, Environment.gpu_name)).all()
        return [eid for eid, name in rows if _gpu_matches(gpu, name)]

    # -------------------------------------------------------------------------------------------- writing

    def record_trial(
        self,
        env: EnvInfo,
        op: str,
        impl: str,
        impl_version: str,
        shape: dict[str, Any],
        dtype: str,
        config: dict[str, Any],
        result: TrialResult,
        *,
        overwrite: bool = True,
    ) -> None:
        """Store one measurement, in its own committed transaction.

        The environment and implementation rows are created on first use. The trial's key is (environment,
        implementation + version, shape, dtype, config); when that key is already stored, ``overwrite=True``
        replaces its outcome (and timestamp) in place and ``overwrite=False`` leaves the stored row as it is.

        Args:
            env: the machine set-up.
            op: the op measured (e.g. "row_norm").
            impl: the implementation name; impl_version: its version (bump it when the kernel changes).
            shape: problem sizes, a dict of str → int.
            dtype: the dtype name (e.g. "bfloat16").
            config: the kernel config, a dict of str → int (may nest one level); ``{}`` for config-less impls.
            result: the outcome.
            overwrite: replace an existing trial with the same key.

        Raises:
            DatabaseError: opened read-only, or the database cannot be written.
            TypeError / ValueError: bad arguments (shape or config not a JSON-able dict, empty names ...).
        """
        self._require_writable("record a trial")
        if not isinstance(env, EnvInfo):
            raise TypeError(f"env must be an EnvInfo, got {type(env).__name__}")
        if not isinstance(result, TrialResult):
            raise TypeError(f"result must be a TrialResult, got {type(result).__name__}")
        op, impl, impl_version, dtype = (
            _nonempty(op, "op"),
            _nonempty(impl, "impl"),
            _nonempty(impl_version, "impl_version"),
            _nonempty(dtype, "dtype"),
        )
        shape_j, config_j = _json_dict(shape, "shape"), _json_dict(config, "config")
        values = {
            "status": result.status,
            "median_us": result.median_us,
            "p20_us": result.p20_us,
            "p80_us": result.p80_us,
            "reps": result.reps,
            "peak_mem_bytes": result.peak_mem_bytes,
            "error": result.error,
            "created_at": datetime.now(timezone.utc),
            "wall_us": result.wall_us,  # writable databases are at the current schema: the column is there
        }
        for attempt in range(2):  # a concurrent writer on a non-SQLite backend may win the insert: retry once
            try:
                with self._session(write=True) as s:
                    env_id, _ = self._env_id(s, _env_fields(env), create=True, features=env.features)
                    impl_id = self._impl_id(s, op, impl, impl_version, create=True)
                    existing = s.scalar(
                        select(Trial).where(
                            Trial.env_id == env_id,
                            Trial.impl_id == impl_id,
                            Trial.shape == shape_j,
                            Trial.dtype == dtype,
                            Trial.config == config_j,
                        )
                    )
                    if existing is None:
                        s.add(
                            Trial(env_id=env_id, impl_id=impl_id, shape=shape_j, dtype=dtype, config=config_j, **values)
                        )
                    elif overwrite:
                        for k, v in values.items():
                            setattr(existing, k, v)
                return
            except _Conflict:
                if attempt:
                    raise

    # -------------------------------------------------------------------------------------------- reading

    def measured_keys(self, env: EnvInfo, op: str, impl: str, impl_version: str, dtype: str) -> set[tuple[str, str]]:
        """The (canonical shape JSON, canonical config JSON) pairs stored for this env/impl/dtype, any status.

        A resuming profiler skips these; compare with ``canonical_json(shape)`` / ``canonical_json(config)``.
        """
        with self._session(write=False) as s:
            env_id, _ = self._env_id(s, _env_fields(env), create=False)
            impl_id = self._impl_id(s, op, impl, impl_version, create=False)
            if env_id is None or impl_id is None:
                return set()
            rows = s.execute(
                select(Trial.shape, Trial.config).where(
                    Trial.env_id == env_id, Trial.impl_id == impl_id, Trial.dtype == dtype
                )
            ).all()
            return {(sh, cf) for sh, cf in rows}

    def trials(
        self,
        *,
        gpu: str | None = None,
        op: str | None = None,
        impl: str | None = None,
        dtype: str | None = None,
        shape: dict[str, Any] | None = None,
        status: str | None = None,
    ) -> list[TrialRow]:
        """Stored trials matching every given filter.

        ``gpu`` matches case-insensitively the exact GPU name, its slug (:func:`gpu_slug`), or a part of the name
        (or of its slug: "rtx-4090"). ``impl`` is the implementation name (any version). Ordered by GPU name, op,
        shape JSON, dtype, then median time (missing times last).
        """
        with self._session(write=False) as s:
            env_ids = self._env_ids_for(s, gpu)
            if env_ids is not None and not env_ids:
                return []
            q = (
                select(Trial, Environment.gpu_name, Implementation, self._wall())
                .join(Environment, Trial.env_id == Environment.id)
                .join(Implementation, Trial.impl_id == Implementation.id)
            )
            q = _filter_trials(q, env_ids, op=op, impl=impl, dtype=dtype, shape=shape, status=status)
            q = q.order_by(
                Environment.gpu_name,
                Implementation.op,
                Trial.shape,
                Trial.dtype,
                Trial.median_us.is_(None),
                Trial.median_us,
                Trial.id,
            )
            return [_row(t, g, i, w) for t, g, i, w in s.execute(q).all()]

    def fastest_per_impl(self, gpu_name: str) -> list[tuple[str, str, str, str, str, str, float]]:
        """For one GPU model (exact name), the fastest "ok" trial of each (environment, op, implementation, version,
        shape, dtype): plain tuples ``(op, impl, impl_version, shape JSON, dtype, config JSON, median_us)``, in no
        set order.

        On SQLite the reduction runs in SQL (:data:`~dora_tune.autotune_db.common.FASTEST_SQL`, shared with the
        dispatcher's snapshot reader); elsewhere one plain scan (no ORM objects, no window sort) reduced in Python.
        """
        with self._session(write=False) as s:
            q = (
                select(
                    Implementation.op,
                    Implementation.name,
                    Implementation.version,
                    Trial.shape,
                    Trial.dtype,
                    Trial.config,
                    Trial.median_us,
                    Trial.env_id,
                )
                .join(Environment, Trial.env_id == Environment.id)
                .join(Implementation, Trial.impl_id == Implementation.id)
                .where(Environment.gpu_name == gpu_name, Trial.status == "ok", Trial.median_us.is_not(None))
            )
            conn = s.connection()
            if conn.dialect.name == "sqlite":  # reduced in SQL, as the dispatcher's snapshot reader does
                cursor = conn.connection.driver_connection.cursor()
                return [tuple(r) for r in cursor.execute(FASTEST_SQL, (gpu_name,)).fetchall()]
            best: dict[tuple[Any, ...], tuple[str, str, str, str, str, str, float]] = {}
            for row in s.execute(q).all():
                key = (row[7], *row[:5])
                old = best.get(key)
                if old is None or row[6] < old[6]:
                    best[key] = tuple(row[:7])
            return list(best.values())

    def best(
        self,
        *,
        gpu: str | None = None,
        op: str | None = None,
        dtype: str | None = None,
        shape: dict[str, Any] | None = None,
    ) -> list[TrialRow]:
        """For each (environment, op, shape, dtype) the fastest "ok" trial over all implementations and configs.

        Ties go to the lowest trial id (the one recorded first). Filters as in :meth:`trials`; same ordering.
        """
        with self._session(write=False) as s:
            env_ids = self._env_ids_for(s, gpu)
            if env_ids is not None and not env_ids:
                return []
            rank = (
                func.row_number()
                .over(
                    partition_by=(Trial.env_id, Implementation.op, Trial.shape, Trial.dtype),
                    order_by=(Trial.median_us, Trial.id),
                )
                .label("rank")
            )
            inner = (
                select(Trial.id.label("tid"), rank)
                .join(Implementation, Trial.impl_id == Implementation.id)
                .where(Trial.status == "ok", Trial.median_us.is_not(None))
            )
            inner = _filter_trials(inner, env_ids, op=op, dtype=dtype, shape=shape)
            ranked = inner.subquery()
            q = (
                select(Trial, Environment.gpu_name, Implementation, self._wall())
                .join(ranked, ranked.c.tid == Trial.id)
                .join(Environment, Trial.env_id == Environment.id)
                .join(Implementation, Trial.impl_id == Implementation.id)
                .where(ranked.c.rank == 1)
                .order_by(Environment.gpu_name, Implementation.op, Trial.shape, Trial.dtype, Trial.id)
            )
            return [_row(t, g, i, w) for t, g, i, w in s.execute(q).all()]

    def environments(self, *, gpu: str | None = None) -> list[EnvRow]:
        """Every stored environment (or those matching ``gpu``, as in :meth:`trials`) with its trial count."""
        with self._session(write=False) as s:
            env_ids = self._env_ids_for(s, gpu)
            count = func.count(Trial.id)
            q = (
                select(Environment, count)
                .outerjoin(Trial, Trial.env_id == Environment.id)
                .group_by(Environment.id)
                .order_by(Environment.gpu_name, Environment.id)
            )
            if env_ids is not None:
                q = q.where(Environment.id.in_(env_ids))
            rows = s.execute(q).all()
            feats = self._features(s, [e.id for e, _ in rows])
            return [
                EnvRow(id=e.id, **{f: getattr(e, f) for f in _ENV_FIELDS}, features=feats.get(e.id), trials=n)
                for e, n in rows
            ]

    def _wall(self) -> Any:
        """The column expression of a trial's ``wall_us`` in a select: the column from schema 4, a NULL before (a
        schema-3 file read as it is has no such column)."""
        return Trial.wall_us if self._schema >= 4 else null().label("wall_us")

    def _features(self, s: Session, env_ids: Sequence[int]) -> dict[int, GpuFeatures]:
        """The stored :class:`GpuFeatures` of these environments (none before schema 3)."""
        if self._schema < 3 or not env_ids:
            return {}
        q = select(GpuFeaturesRow).where(GpuFeaturesRow.env_id.in_(list(env_ids)))
        return {r.env_id: GpuFeatures(**{f: getattr(r, f) for f in _FEATURE_FIELDS}) for r in s.scalars(q).all()}

    # ------------------------------------------------------------------------------------- fitted models

    def save_model(
        self, env: EnvInfo, op: str, dtype: str, estimator: str, payload: dict[str, Any], metrics: dict[str, Any]
    ) -> None:
        """Store the fitted cost model of (``env``, ``op``, ``dtype``), replacing the one stored (upsert), in its own
        committed transaction; the environment row is created on first use. Both dicts are stored as canonical JSON
        (plain JSON types only: no pickles, no objects).

        Args:
            env: the machine set-up the model was fitted for.
            op: the op (e.g. "compose_train"); dtype: the dtype name (e.g. "bf16").
            estimator: the regressor's name (e.g. "extra_trees").
            payload: what run time needs (``DecisionTable.to_json()``).
            metrics: the cross-validation metrics (JSON-able; finite floats).

        Raises:
            DatabaseError: opened read-only, or the database cannot be written.
            TypeError / ValueError: bad arguments (not an EnvInfo, empty names, dicts JSON cannot hold ...).
        """
        self._require_writable("save a model")
        if not isinstance(env, EnvInfo):
            raise TypeError(f"env must be an EnvInfo, got {type(env).__name__}")
        op, dtype, estimator = _nonempty(op, "op"), _nonempty(dtype, "dtype"), _nonempty(estimator, "estimator")
        values = {
            "estimator": estimator,
            "payload": _json_dict(payload, "payload"),
            "metrics": _json_dict(metrics, "metrics"),
            "created_at": datetime.now(timezone.utc),
        }
        for attempt in range(2):  # a concurrent writer on a non-SQLite backend may win the insert: retry once
            try:
                with self._session(write=True) as s:
                    env_id, _ = self._env_id(s, _env_fields(env), create=True, features=env.features)
                    existing = s.scalar(
                        select(FittedModel).where(
                            FittedModel.env_id == env_id, FittedModel.op == op, FittedModel.dtype == dtype
                        )
                    )
                    if existing is None:
                        s.add(FittedModel(env_id=env_id, op=op, dtype=dtype, **values))
                    else:
                        for k, v in values.items():
                            setattr(existing, k, v)
                return
            except _Conflict:
                if attempt:
                    raise

    def models(self, *, gpu: str | None = None, op: str | None = None, dtype: str | None = None) -> list[ModelRow]:
        """Stored fitted models matching every given filter (``gpu`` as in :meth:`trials`), ordered by GPU name,
        op, dtype and environment. A schema-1 database opened read-only has none."""
        if self._schema < 2:
            if self._closed:
                raise DatabaseError(f"{self._target.display} is closed")
            return []
        with self._session(write=False) as s:
            env_ids = self._env_ids_for(s, gpu)
            if env_ids is not None and not env_ids:
                return []
            q = select(FittedModel, Environment.gpu_name).join(Environment, FittedModel.env_id == Environment.id)
            if env_ids is not None:
                q = q.where(FittedModel.env_id.in_(env_ids))
            if op is not None:
                q = q.where(FittedModel.op == op)
            if dtype is not None:
                q = q.where(FittedModel.dtype == dtype)
            q = q.order_by(Environment.gpu_name, FittedModel.op, FittedModel.dtype, FittedModel.env_id)
            return [_model_row(m, g) for m, g in s.execute(q).all()]

    # ---------------------------------------------------------------------------------- export and merge

    def export(self, dest: str, *, gpu: str | None = None, overwrite: bool = False) -> int:
        """Write a new SQLite file at ``dest`` holding the environments matching ``gpu`` (all when None) with their
        GPU features, the implementations their trials use, those trials (with their wall times) and fitted models
        (timestamps kept) and the meta row. The file is at the current schema whatever this database's schema: the
        trials of a schema-3 source have no wall time (NULL).

        The file is built next to ``dest`` and moved into place when complete, in rollback-journal mode (one
        self-contained file, fit to copy or ship). Returns the number of trials exported.

        Raises:
            DatabaseError: ``dest`` exists and not ``overwrite``; ``dest`` is this database; ``gpu`` matches no
                environment; ``dest`` is not a file path (or sqlite URL); the file cannot be written.
        """
        target = _resolve(dest, False)
        if target.path is None:
            raise DatabaseError(f"export needs a file path or sqlite file URL, got {target.display}")
        path = target.path
        if self._target.path is not None and _same_file(path, self._target.path):
            raise DatabaseError(f"cannot export {self._target.display} onto itself")
        if os.path.exists(path) and not overwrite:
            raise DatabaseError(f"{path} already exists; pass overwrite=True to replace it")
        with self._session(write=False) as s:
            env_ids = self._env_ids_for(s, gpu)
        if env_ids is not None and not env_ids:
            raise DatabaseError(f"no environment in {self._target.display} matches GPU {gpu!r}")
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
            os.close(fd)
        except OSError as e:
            raise DatabaseError(f"cannot write {path}: {e}") from e
        try:
            with TuningDB.open(tmp) as out:
                stats = out._copy_from(self, env_ids)
            _to_rollback_journal(tmp)
            for side in ("-wal", "-shm", "-journal"):  # stale side files of an old dest would corrupt the new one
                if os.path.exists(path + side):
                    os.remove(path + side)
            os.replace(tmp, path)
        except OSError as e:
            raise DatabaseError(f"cannot write {path}: {e}") from e
        finally:
            for p in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
                if os.path.exists(p):
                    os.remove(p)
        return stats.trials_added

    def merge(self, other: str) -> MergeStats:
        """Copy every environment (with its GPU features), implementation, trial and fitted model of ``other`` (a
        path or URL, opened read-only) into this database, in one transaction.

        Rows are matched by their natural keys, never by ids: environments by all their descriptive fields,
        implementations by (op, name, version), trials by (environment, implementation + version, shape, dtype,
        config), fitted models by (environment, op, dtype); an environment's GPU features are added where it has
        none. Dedupe rule: an incoming trial or model whose key is not stored yet is added; one whose key is stored
        replaces the stored row only if its ``created_at`` is strictly newer, and is skipped otherwise (so merging
        in either order, or twice, ends with the newest row of each key). Timestamps are kept. A trial's outcome
        travels whole — GPU times and wall time alike: a replacing trial from a schema-3 source, which has no wall
        time, leaves none.

        Raises:
            DatabaseError: this database is read-only, ``other`` is this database, or ``other`` cannot be read.
            SchemaError: ``other`` is not a dora-tune database of a readable schema.
        """
        self._require_writable("merge")
        src_target = _resolve(other, False)
        if self._is_same_db(src_target):
            raise DatabaseError(f"cannot merge {self._target.display} into itself")
        with TuningDB.open(other, readonly=True) as src:
            return self._copy_from(src, None)

    def _is_same_db(self, other: _Target) -> bool:
        """Whether ``other`` (resolved for writing) names this database."""
        if self._target.path is not None or other.path is not None:
            return (
                self._target.path is not None and other.path is not None and _same_file(self._target.path, other.path)
            )
        mine = _resolve(self.location, False).url.render_as_string(hide_password=False)
        return mine == other.url.render_as_string(hide_password=False)

    def _copy_from(self, src: TuningDB, env_ids: Sequence[int] | None) -> MergeStats:
        """Copy ``src``'s environments (those in ``env_ids``, or all), implementations and trials into this
        database in one transaction, by natural keys; see :meth:`merge` for the dedupe rule."""
        envs_added = trials_added = trials_updated = trials_skipped = 0
        with src._session(write=False) as rs, self._session(write=True) as ws:
            q_env = select(Environment)
            if env_ids is not None:
                q_env = q_env.where(Environment.id.in_(env_ids))
            env_map: dict[int, int] = {}
            src_envs = rs.scalars(q_env).all()
            feats = src._features(rs, [e.id for e in src_envs])
            for e in src_envs:
                new_id, created = self._env_id(
                    ws, {f: getattr(e, f) for f in _ENV_FIELDS}, create=True, features=feats.get(e.id)
                )
                assert new_id is not None
                env_map[e.id] = new_id
                envs_added += created
            q_impl = select(Implementation)
            if env_ids is not None:
                used = select(Trial.impl_id).where(Trial.env_id.in_(list(env_map)))
                q_impl = q_impl.where(Implementation.id.in_(used))
            impl_map: dict[int, int] = {}
            for i in rs.scalars(q_impl).all():
                new_iid = self._impl_id(ws, i.op, i.name, i.version, create=True)
                assert new_iid is not None
                impl_map[i.id] = new_iid
            if not env_map:
                return MergeStats(envs_added, 0, 0, 0)
            stored: dict[tuple[int, int, str, str, str], tuple[int, datetime]] = {
                (r.env_id, r.impl_id, r.shape, r.dtype, r.config): (r.id, r.created_at)
                for r in ws.execute(
                    select(
                        Trial.id, Trial.env_id, Trial.impl_id, Trial.shape, Trial.dtype, Trial.config, Trial.created_at
                    ).where(Trial.env_id.in_(list(env_map.values())))
                ).all()
            }
            inserts: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            q_trials = select(Trial, src._wall()).where(Trial.env_id.in_(list(env_map))).order_by(Trial.id)
            for t, wall_us in rs.execute(q_trials).all():
                key = (env_map[t.env_id], impl_map[t.impl_id], t.shape, t.dtype, t.config)
                values = {**{c: getattr(t, c) for c in _TRIAL_VALUE_COLS}, "wall_us": wall_us}
                hit = stored.get(key)
                if hit is None:
                    inserts.append(
                        dict(env_id=key[0], impl_id=key[1], shape=t.shape, dtype=t.dtype, config=t.config, **values)
                    )
                    trials_added += 1
                elif t.created_at > hit[1]:
                    updates.append({"id": hit[0], **values})
                    trials_updated += 1
                else:
                    trials_skipped += 1
            if inserts:
                ws.execute(insert(Trial), inserts)
            if updates:
                ws.execute(update(Trial), updates)
            models = self._copy_models(rs, ws, env_map) if src._schema >= 2 else (0, 0, 0)
        return MergeStats(envs_added, trials_added, trials_updated, trials_skipped, *models)

    @staticmethod
    def _copy_models(rs: Session, ws: Session, env_map: dict[int, int]) -> tuple[int, int, int]:
        """Copy the fitted models of the environments in ``env_map`` (source id → this database's id) from session
        ``rs`` into ``ws``, newer ``created_at`` winning; returns (added, updated, skipped)."""
        added = updated = skipped = 0
        stored = {
            (m.env_id, m.op, m.dtype): m
            for m in ws.scalars(select(FittedModel).where(FittedModel.env_id.in_(list(env_map.values())))).all()
        }
        q = select(FittedModel).where(FittedModel.env_id.in_(list(env_map))).order_by(FittedModel.id)
        for m in rs.scalars(q).all():
            values = {c: getattr(m, c) for c in ("estimator", "payload", "metrics", "created_at")}
            hit = stored.get((env_map[m.env_id], m.op, m.dtype))
            if hit is None:
                ws.add(FittedModel(env_id=env_map[m.env_id], op=m.op, dtype=m.dtype, **values))
                added += 1
            elif m.created_at > hit.created_at:
                for k, v in values.items():
                    setattr(hit, k, v)
                updated += 1
            else:
                skipped += 1
        return added, updated, skipped


# ------------------------------------------------------------------------------------------------ SQLite bits


def _install_sqlite_pragmas(engine: Engine, readonly: bool) -> None:
    """On every new SQLite connection: a 5 s busy timeout, foreign keys on, and WAL mode when writable."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        cur = dbapi_connection.cursor()
        try:
            cur.execute("PRAGMA busy_timeout=5000")
            cur.execute("PRAGMA foreign_keys=ON")
            if not readonly:
                _set_wal(cur)
        finally:
            cur.close()


def _set_wal(cur: Any, tries: int = 50) -> None:
    """Put the file in WAL mode (persistent: a file already in it is left alone). Switching needs the file to
    itself, and SQLite can answer "database is locked" at once, without its busy handler, while other processes are
    creating or switching the same new file (seen with 8 processes opening one new file together): retried for up
    to ~5 s."""
    if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    for attempt in range(tries):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == tries - 1:
                raise
            time.sleep(0.1)


def _to_rollback_journal(path: str) -> None:
    """Switch a closed SQLite file out of WAL mode so that it is one self-contained file."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file (by inode when both exist, else by resolved path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _reason(e: BaseException) -> str:
    """The driver's message of a SQLAlchemy error (without SQLAlchemy's SQL echo and link), else str(e)."""
    orig = getattr(e, "orig", None)
    return str(orig) if orig is not None else str(e)
