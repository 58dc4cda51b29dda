"""Run-time choice of implementation and config for each op, and the tools that feed it.

- :func:`plan` / :class:`Dispatcher`: measured trials (user DB, then the shipped cache for this GPU), then the fitted
  decision tables, then the paper's fixed crossover, then the torch implementation; memoised, thread-safe.
- :func:`force`: a context manager restricting plans to ``"eager"`` or ``"triton"`` (also ``DORA_TUNE_FORCE``).
- :mod:`~dora_tune.dispatch.profiler`, :mod:`~dora_tune.dispatch.shapes`, :mod:`~dora_tune.dispatch.registry`:
  measuring what the dispatcher reads.

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
