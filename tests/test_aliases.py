"""The old paths of moved modules — the offline tools (now :mod:`dora_tune.tuning`), the training layer (now
:mod:`dora_tune.nn`), the custom ops (now :mod:`dora_tune.auto`) — still give the same objects for one release, each
with a DeprecationWarning naming the new path."""

import importlib
import re
import subprocess
import sys

import pytest

# (old module, a name it had, the module that defines it now, its name there): one row per alias
ALIASES = [
    ("dora_tune.dispatch.profiler", "profile", "dora_tune.tuning.profiler", "profile"),
    ("dora_tune.dispatch.warm", "warm_compile", "dora_tune.tuning.warm", "warm_compile"),
    ("dora_tune.dispatch.shapes", "build_shape_set", "dora_tune.tuning.shapes", "build_shape_set"),
    ("dora_tune.dispatch.env", "environment", "dora_tune.tuning.env", "environment"),
    ("dora_tune.dispatch.features", "FeatureSpec", "dora_tune.tuning.features", "FeatureSpec"),
    ("dora_tune.dispatch.crossgpu", "leave_one_gpu_out", "dora_tune.tuning.crossgpu", "leave_one_gpu_out"),
    ("dora_tune.dispatch.costmodel", "fit", "dora_tune.tuning.fitting", "fit"),
    ("dora_tune.dispatch.costmodel", "cross_validate", "dora_tune.tuning.evaluation", "cross_validate"),
    ("dora_tune.dispatch.costmodel", "ESTIMATORS", "dora_tune.tuning.estimators", "ESTIMATORS"),
    ("dora_tune.dispatch.costmodel", "_prepare", "dora_tune.tuning.data", "prepare_trials"),
    ("dora_tune.dispatch.registry", "make_inputs", "dora_tune.tuning.trials", "make_inputs"),
    ("dora_tune.dispatch.layer", "NormCache", "dora_tune.nn.layer", "NormCache"),
    ("dora_tune.kernels.custom_ops", "cached_norm_op", "dora_tune.auto.custom_ops", "cached_norm_op"),
]


@pytest.mark.parametrize(("old", "name", "new", "new_name"), ALIASES, ids=[f"{a[0]}.{a[1]}" for a in ALIASES])
def test_old_path_warns_and_forwards(old, name, new, new_name):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old}.{name} moved to {new}.{new_name}")):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), new_name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_registry_keeps_what_run_time_needs_without_a_warning():
    from dora_tune.dispatch import registry

    with pytest.warns(DeprecationWarning, match=r"moved to dora_tune\.tuning\.trials\.train_bwd_stage"):
        registry.train_bwd_stage  # noqa: B018
    code = (
        "import warnings; warnings.simplefilter('error'); "
        "from dora_tune.dispatch.registry import SAME_KERNELS_AS, Impl, registry, source_version"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
