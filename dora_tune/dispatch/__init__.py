"""Run-time choice of implementation and config for each op (the run-time path only).

- :func:`plan` / :class:`Dispatcher`: measured trials (user DB, then the shipped cache for this GPU), then the fitted
  decision tables, then the paper's fixed crossover, then the torch implementation; memoised, thread-safe.
- :func:`force`: a context manager restricting plans to ``"eager"`` or ``"triton"`` (also ``DORA_TUNE_FORCE``).
- :mod:`~dora_tune.dispatch.decisions` (the compiled decision tables), :mod:`~dora_tune.dispatch.timing` (the
  first-use race's timing), :mod:`~dora_tune.dispatch.registry` (implementations and their versions).

What feeds it — the profiler, shape sets, environment, features and the cost model — is offline:
:mod:`dora_tune.tuning`. The old paths of those modules here are deprecated aliases for one release.

Importing this package imports neither scikit-learn nor Triton and opens no database.
"""

from dora_tune.dispatch.runtime import (
    SOURCES,
    Dispatcher,
    Plan,
    default_dispatcher,
    force,
    plan,
    reset_default_dispatcher,
)

__all__ = ["SOURCES", "Dispatcher", "Plan", "default_dispatcher", "force", "plan", "reset_default_dispatcher"]
