"""Offline tuning: what measures the kernels and fits what the run-time dispatcher (:mod:`dora_tune.dispatch`) reads.

- :mod:`~dora_tune.tuning.profiler` (trials into the tuning DB; :mod:`~dora_tune.tuning.warm` compiles the Triton
  configs first in worker processes), :mod:`~dora_tune.tuning.trials` (a trial's inputs, sweep stages, bytes and
  FLOPs), :mod:`~dora_tune.tuning.shapes` (the shape sets), :mod:`~dora_tune.tuning.env` (the environment and its
  GPU);
- the cost model: :mod:`~dora_tune.tuning.features`, :mod:`~dora_tune.tuning.data` (the trials fitted on),
  :mod:`~dora_tune.tuning.estimators` (regressors and fitted models), :mod:`~dora_tune.tuning.evaluation`
  (cross-validation and regret against the fixed crossover), :mod:`~dora_tune.tuning.fitting` (decision tables, a
  DB fitted end to end) and :mod:`~dora_tune.tuning.crossgpu` (one model over several GPUs, leave one GPU out).

Imports point down only: these modules read :mod:`dora_tune.dispatch`, :mod:`dora_tune.kernels` and
:mod:`dora_tune.autotune_db`; nothing at run time imports them. Importing this package imports none of them.
"""
