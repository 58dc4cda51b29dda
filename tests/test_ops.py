"""Each op's facts are written once (dora_tune.ops, torch-free) and every table of them is a read of them."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dora_tune import ops


def test_ops_module_imports_nothing():
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)}
    code = "import sys, dora_tune.ops; print([m for m in ('torch', 'numpy', 'sqlalchemy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_every_table_reads_the_facts():
    from dora_tune.auto import custom_ops as co
    from dora_tune.dispatch.decisions import RACE_OPS, RACE_PER_CELL
    from dora_tune.kernels import DTYPES, OP_SPECS
    from dora_tune.tuning.shapes import OP_SHAPE_KEYS, OPS

    # the modules (the package's attributes of these names are the op functions)
    compose_mod, train_mod, norm_mod, linear_mod = (
        importlib.import_module(f"dora_tune.kernels.{m}") for m in ("compose", "compose_train", "norm", "dora_linear")
    )

    assert list(OP_SPECS) == list(ops.OPS) == list(OP_SHAPE_KEYS) == list(OPS)
    assert {op: f.shape_keys for op, f in ops.OPS.items()} == OP_SHAPE_KEYS
    assert RACE_OPS == {"norm": 3, "compose_train": 3, "dora_linear": 3}
    assert RACE_PER_CELL == {"compose_train", "dora_linear"}
    assert norm_mod.IMPLS == co._NORM_IMPLS == ops.NORM.impls and compose_mod.IMPLS == ops.COMPOSE.impls
    assert train_mod.IMPLS == co._TRAIN_IMPLS == ops.COMPOSE_TRAIN.impls and linear_mod.IMPLS == ops.DORA_LINEAR.impls
    assert tuple(DTYPES) == ops.DTYPE_NAMES
    for name, spec in OP_SPECS.items():
        assert spec.facts is ops.OPS[name] and isinstance(spec.default_config, spec.config_class)
        assert spec.facts.torch_impl in spec.facts.impls and spec.facts.triton_impl in spec.facts.impls
        assert spec.facts.torch_impl != spec.facts.triton_impl
        assert tuple(i.name for i in spec.impls) == spec.facts.impls  # one implementation spec for each name
        for impl in spec.impls:  # a self-check bound at every dtype
            assert all(0 < impl.tolerance(d) < 0.1 for d in ops.DTYPE_NAMES)
        with pytest.raises(ValueError, match="no implementation"):
            spec.impl("cuda")


@pytest.mark.parametrize(
    ("op", "shape", "impl"),
    [
        ("norm", {"d_out": 8, "d_in": 8, "r": 1}, "triton"),
        ("compose", {"rows": 1, "cols": 1}, "triton"),
        ("compose_train", {"rows": 6144, "cols": 2048}, "triton"),
        ("compose_train", {"rows": 6143, "cols": 2048}, "eager"),
        ("compose_train", {"rows": 10**6, "cols": 2047}, "eager"),
        ("dora_linear", {"rows": 8192, "d_out": 4096, "d_in": 4096, "r": 64}, "composed"),
    ],
)
def test_the_fixed_crossover_is_one_rule(op, shape, impl):
    """The planner's fixed rule, the cost model's crossover chooser and the spec agree (the paper's thresholds)."""
    from dora_tune.dispatch.runtime import Dispatcher, crossover_impl
    from dora_tune.kernels import OP_SPECS
    from dora_tune.tuning.evaluation import crossover_choice

    spec = OP_SPECS[op]
    chosen, config = crossover_choice(op, shape)
    assert crossover_impl(op, shape) == chosen == impl
    assert config == (spec.default_config.as_dict() if impl == "triton" else {})
    plan = Dispatcher("/nonexistent/tuning.sqlite", use_shipped=False, force_env="").plan_for_gpu(
        "Some Future GPU", op, shape, "bf16"
    )
    assert plan.source == "heuristic" and plan.impl == impl and plan.detail.startswith(spec.facts.crossover_text)
