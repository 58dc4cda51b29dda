"""Moved: the cost model is :mod:`dora_tune.tuning.estimators` (regressors, fitted models),
:mod:`dora_tune.tuning.evaluation` (cross-validation, regret), :mod:`dora_tune.tuning.fitting` (compiling decision
tables, fitting a DB end to end) and :mod:`dora_tune.tuning.data` (the trials fitted on; ``_prepare`` is
``prepare_trials`` there). This alias is deprecated and will be removed in the next release."""

from dora_tune._moved import forwarder

__getattr__ = forwarder(
    __name__,
    ["dora_tune.tuning.data", "dora_tune.tuning.estimators", "dora_tune.tuning.evaluation", "dora_tune.tuning.fitting"],
    {"_prepare": "prepare_trials", "_Data": "TrialData", "_shape_key": "shape_key"},
)
