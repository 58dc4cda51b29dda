"""The impl="auto" front door: dora_tune.kernels' planned ops are its functions, the kernels plan only with the
planner they are handed, and importing the kernels imports neither the front door nor the dispatcher."""

import subprocess
import sys

import pytest
import torch

import dora_tune.auto as front
import dora_tune.kernels as kernels
from dora_tune.kernels import compose as compose_module_name  # the function, as it always was
from dora_tune.kernels.norm import factored_norm as kernel_factored_norm


def test_the_public_planned_ops_are_the_front_doors():
    for name in ("factored_norm", "compose", "compose_train", "dora_compose_train", "dora_layer"):
        assert getattr(kernels, name) is getattr(front, name)
    assert compose_module_name is front.compose


def test_a_kernel_function_plans_only_with_a_planner():
    W, A, B = torch.randn(8, 12), torch.randn(2, 12), torch.randn(8, 2)
    with pytest.raises(ValueError, match="impl='auto' needs a planner"):
        kernel_factored_norm(W, A, B, 0.5)
    assert torch.equal(kernel_factored_norm(W, A, B, 0.5, impl="factored_torch"), front.factored_norm(W, A, B, 0.5))

    class Planner:  # any object with the hooks plans: here always the dense reference
        def __init__(self):
            self.asked = []

        def auto(self, op, dims, dtype, device, race=None):
            self.asked.append((op, dims))
            return type("Plan", (), {"impl": "dense", "config": None})()

    planner = Planner()
    kernel_factored_norm(W, A, B, 0.5, planner=planner)
    assert planner.asked == [("norm", (8, 12, 2))]


def test_importing_the_kernels_imports_neither_the_front_door_nor_the_dispatcher():
    code = (
        "import sys, dora_tune.kernels; "
        "print([m for m in ('dora_tune.auto', 'dora_tune.dispatch', 'dora_tune.tuning', 'dora_tune.nn') "
        "if m in sys.modules])"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
