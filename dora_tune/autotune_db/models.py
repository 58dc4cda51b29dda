"""ORM tables of the tuning database (SQLAlchemy 2.0 typed declarative mapping) and the canonical JSON encoding.

Six tables:

* ``meta``: key/value pairs; ``schema_version`` says which layout the file holds (:data:`SCHEMA_VERSION`).
* ``environments``: one row per measured machine set-up (GPU, driver, CUDA, torch, Triton and dora-tune versions).
* ``implementations``: one row per (op, implementation name, implementation version).
* ``trials``: one row per measurement: environment × implementation × shape × dtype × config. Its times are GPU
  time (``median_us``, ``p20_us``, ``p80_us``: the host kept out); since schema 4 a trial may also carry
  ``wall_us``, the wall time of one call when calls run back to back with the GPU not held ahead (host included:
  what a training step pays where launches cost more than the kernels). NULL where it was not measured: CPU trials
  (whose times are wall time already) and trials recorded before schema 4.
* ``fitted_models`` (schema 2): one row per (environment, op, dtype): the cost model's compiled decision table and
  its cross-validation metrics, both canonical JSON (never pickles).
* ``gpu_features`` (schema 3): at most one row per environment: what the device said about its GPU when it was
  recorded (L2 size, memory bandwidth, clocks, bus width; :class:`~dora_tune.autotune_db.common.GpuFeatures`).

Schema 4 added ``trials.wall_us`` as a nullable column (not a side table): it is an outcome of the trial like its
GPU times, replaced with them when a trial is re-timed and copied with them by export and merge. The ORM maps it
deferred (never in a plain ``select(Trial)``) so that a schema-3 file, which read-only opens serve without
migrating, reads as it is; the store selects the column explicitly where the file has it.

Shapes and configs are stored as canonical JSON text (:func:`canonical_json`) so that equal dicts always give
equal strings and the unique key on ``trials`` works on any SQL backend. This module imports no torch and creates
no engine. The schema version and the canonical JSON encoding live in :mod:`dora_tune.autotune_db.common`.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from dora_tune.autotune_db.common import SCHEMA_VERSION, canonical_json

__all__ = [
    "SCHEMA_VERSION",
    "Base",
    "Environment",
    "FittedModel",
    "GpuFeaturesRow",
    "Implementation",
    "Meta",
    "Trial",
    "canonical_json",
]


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC (portable to every backend) and read back as an aware UTC datetime."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to naive UTC; a naive one is taken to be UTC already."""
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach the UTC time zone to the stored naive value."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the tuning-database tables."""


class Meta(Base):
    """Key/value metadata of the database file (``schema_version``)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Environment(Base):
    """A measured machine set-up; trials from different set-ups are never mixed."""

    __tablename__ = "environments"
    __table_args__ = (
        UniqueConstraint(
            "kind",
            "gpu_name",
            "compute_capability",
            "sm_count",
            "memory_bytes",
            "driver",
            "cuda",
            "torch",
            "triton",
            "dora_tune",
            name="uq_environments_all",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    gpu_name: Mapped[str] = mapped_column(String(200))
    compute_capability: Mapped[str] = mapped_column(String(16))
    sm_count: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    driver: Mapped[str] = mapped_column(String(64))
    cuda: Mapped[str] = mapped_column(String(64))
    torch: Mapped[str] = mapped_column(String(64))
    triton: Mapped[str] = mapped_column(String(64))
    dora_tune: Mapped[str] = mapped_column(String(64))


class Implementation(Base):
    """One implementation of an op at one version (a kernel change bumps the version, so old timings stay apart)."""

    __tablename__ = "implementations"
    __table_args__ = (UniqueConstraint("op", "name", "version", name="uq_implementations_op_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    op: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(64))


class Trial(Base):
    """One measurement: environment × implementation × shape × dtype × config, with its outcome: GPU times
    (median, p20, p80) and, from schema 4, the host-inclusive wall time per call (``wall_us``, NULL when not
    measured)."""

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("env_id", "impl_id", "shape", "dtype", "config", name="uq_trials_key"),
        Index("ix_trials_env_dtype", "env_id", "dtype"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    env_id: Mapped[int] = mapped_column(ForeignKey("environments.id"))
    impl_id: Mapped[int] = mapped_column(ForeignKey("implementations.id"))
    shape: Mapped[str] = mapped_column(Text)
    dtype: Mapped[str] = mapped_column(String(32))
    config: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    median_us: Mapped[float | None] = mapped_column(Float, nullable=True)
    p20_us: Mapped[float | None] = mapped_column(Float, nullable=True)
    p80_us: Mapped[float | None] = mapped_column(Float, nullable=True)
    reps: Mapped[int] = mapped_column(Integer, default=0)
    peak_mem_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # schema 4; last, where ALTER TABLE ... ADD COLUMN puts it. Deferred with raiseload: a schema-3 file has no such
    # column, so it is never selected implicitly (the store selects it explicitly when the file has it)
    wall_us: Mapped[float | None] = mapped_column(Float, nullable=True, deferred=True, deferred_raiseload=True)


class FittedModel(Base):
    """The cost model fitted on one environment's trials of one (op, dtype): what run time needs, as JSON.

    ``payload`` is the canonical JSON of a decision table (``DecisionTable.to_json()``), ``metrics`` the JSON of its
    cross-validation metrics; ``estimator`` names the regressor that produced them.
    """

    __tablename__ = "fitted_models"
    __table_args__ = (UniqueConstraint("env_id", "op", "dtype", name="uq_fitted_models_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    env_id: Mapped[int] = mapped_column(ForeignKey("environments.id"))
    op: Mapped[str] = mapped_column(String(100))
    dtype: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    estimator: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    metrics: Mapped[str] = mapped_column(Text)


class GpuFeaturesRow(Base):
    """The device-read features of one environment's GPU (schema 3; see :class:`~dora_tune.autotune_db.common.
    GpuFeatures`: 0 means unknown). Environments recorded before schema 3, or on a CPU, have none."""

    __tablename__ = "gpu_features"

    env_id: Mapped[int] = mapped_column(ForeignKey("environments.id"), primary_key=True)
    l2_bytes: Mapped[int] = mapped_column(BigInteger)
    mem_bandwidth_gbs: Mapped[float] = mapped_column(Float)
    max_sm_clock_mhz: Mapped[int] = mapped_column(Integer)
    max_mem_clock_mhz: Mapped[int] = mapped_column(Integer)
    bus_width_bits: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))
