"""The one-node DoRA layer (dora_layer): values and every gradient against a float64 reference."""

import importlib

import pytest
import torch

from dora_tune.kernels import ComposeBwdConfig, ComposeConfig, ComposeTrainConfig, dora_layer, dora_layer_reference

from conftest import dora_inputs, relerr

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (lead dims, d_in, d_out, r): rows = 1, a 3-D input, d_out not a multiple of any block
SHAPES = [((1,), 24, 40, 4), ((2, 5), 24, 37, 3), ((70,), 48, 130, 8)]
# outputs and gradients are rounded to the dtype; GEMMs in the dtype (fp32 accumulation)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
MODES = [("delta", True, True), ("delta", False, False), ("full", False, True), ("full", False, False)]


make = dora_inputs


def run(impl, x, W, A, B, m, n, bias, s, dout, output, with_base_result, with_bias, needs_m=True, config=None):
    """Values and gradients of dora_layer and of the float64 reference, same inputs; returns both."""
    b = bias if with_bias else None
    leaves = {"x": x, "A": A, "B": B}
    if needs_m:
        leaves["m"] = m
    if with_base_result:
        leaves["base_result"] = torch.nn.functional.linear(x, W, b)
    got_in = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    ref_in = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    outs = []
    for ins, fn, kw in ((got_in, dora_layer, {"impl": impl, "config": config}), (ref_in, dora_layer_reference, {})):
        mm = ins.get("m", m if fn is dora_layer else m.double())
        out = fn(
            ins["x"], W, ins["A"], ins["B"], mm, n, s, bias=b, base_result=ins.get("base_result"), output=output, **kw
        )
        grads = torch.autograd.grad(out, list(ins.values()), dout.to(out.dtype))
        outs.append((out, dict(zip(ins, grads, strict=True))))
    return outs


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_dora_layer_values_and_grads(impl, dtype, shape, mode, dev_for):
    output, with_base_result, with_bias = mode
    t = make(*shape, dtype, dev_for(impl), seed=shape[1] + len(shape[0]))
    (out, grads), (ref, ref_grads) = run(impl, *t, output, with_base_result, with_bias)
    assert out.shape == ref.shape and out.dtype == dtype
    errs = {"out": relerr(out, ref), **{k: relerr(grads[k], ref_grads[k]) for k in grads}}
    assert max(errs.values()) <= TOL[dtype], errs
    for k, gr in grads.items():  # gradients in each input's dtype
        assert gr.dtype == dtype, k


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_zero_norm_rows_stay_finite(impl, dev_for):
    x, W, A, B, m, n, bias, s, dout = make((9,), 16, 24, 4, torch.float32, dev_for(impl), zero_rows=(0, 5))
    assert n[0] == 0 and n[5] == 0
    (out, grads), (ref, ref_grads) = run(impl, x, W, A, B, m, n, bias, s, dout, "full", False, True)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert grads["m"][0] == 0 and grads["m"][5] == 0  # g = 1 there does not depend on m
    assert relerr(out, ref) <= 1e-5 and relerr(grads["m"], ref_grads["m"]) <= 1e-5


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_no_grad_matches_grad_and_magnitude_without_grad(impl, dev_for):
    x, W, A, B, m, n, bias, s, dout = make((2, 7), 24, 40, 4, torch.float32, dev_for(impl), seed=3)
    with_grad = dora_layer(x.requires_grad_(), W, A, B, m, n, s, bias=bias, output="full", impl=impl)
    with torch.no_grad():
        without = dora_layer(x, W, A, B, m, n, s, bias=bias, output="full", impl=impl)
    assert torch.equal(with_grad.detach(), without)
    (_out, grads), (_ref, ref_grads) = run(impl, x, W, A, B, m, n, bias, s, dout, "delta", True, True, needs_m=False)
    assert "m" not in grads and relerr(grads["A"], ref_grads["A"]) <= 2e-5


def test_triton_configs_and_row_programs(triton_device):
    # one row program (d_m written by the backward kernel itself) and several (the fixed-order finish kernel)
    x, W, A, B, m, n, bias, s, dout = make((70,), 24, 130, 4, torch.float32, triton_device, seed=5)
    for bwd in (ComposeBwdConfig(16, 256, 16, 4), ComposeBwdConfig(1, 1024, 1, 4)):
        cfg = ComposeTrainConfig(ComposeConfig(2, 512, 4), bwd)
        (out, grads), (ref, ref_grads) = run("triton", x, W, A, B, m, n, bias, s, dout, "delta", True, True, config=cfg)
        errs = [relerr(out, ref)] + [relerr(grads[k], ref_grads[k]) for k in grads]
        assert max(errs) <= 2e-5, (bwd, errs)


def test_mixed_dtypes_adapters_fp32_on_a_bf16_base(dev_for):
    # PEFT's default keeps fp32 adapters on a bf16 model: the branches compose in fp32
    x, W, A, B, m, n, bias, s, _dout = make((6,), 16, 24, 4, torch.bfloat16, "cpu", seed=7)
    A32, B32, m32 = A.float(), B.float(), m.float()
    base_result = torch.nn.functional.linear(x, W, bias)
    out = dora_layer(x, W, A32, B32, m32, n, s, bias=bias, base_result=base_result, impl="eager")
    ref = dora_layer_reference(x, W, A32, B32, m32, n, s, bias=bias, base_result=base_result)
    assert out.dtype == torch.float32 and relerr(out, ref) <= 1e-5


def test_bad_input_names_the_argument():
    x, W, A, B, m, n, _bias, s, _ = make((3,), 8, 12, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="x must be"):
        dora_layer(x[:, :5], W, A, B, m, n, s)
    with pytest.raises(ValueError, match="lora_A must be"):
        dora_layer(x, W, A[:, :4], B, m, n, s)
    with pytest.raises(ValueError, match="base_result must be"):
        dora_layer(x, W, A, B, m, n, s, base_result=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="output must be"):
        dora_layer(x, W, A, B, m, n, s, output="all")
    with pytest.raises(TypeError, match="scale"):
        dora_layer(x, W, A, B, m, n, torch.tensor(1.0))
    with pytest.raises(ValueError, match="impl must be"):
        dora_layer(x, W, A, B, m, n, s, impl="cuda")


def test_scale_terms_are_computed_once_per_norm_and_follow_in_place_changes(monkeypatch):
    x, W, A, B, m, n, _bias, s, _ = make((4,), 8, 12, 2, torch.float32, "cpu")
    calls = []
    real = torch.where
    monkeypatch.setattr(torch, "where", lambda *a: calls.append(1) or real(*a))
    first = dora_layer(x, W, A, B, m, n, s, impl="eager")
    n_first = len(calls)
    assert n_first > 0 and torch.equal(dora_layer(x, W, A, B, m, n, s, impl="eager"), first)
    assert len(calls) == n_first  # the second call reused the terms memoised on the norm
    with torch.no_grad():
        n.mul_(2)  # an in-place change: recomputed, and the result follows it
    again = dora_layer(x, W, A, B, m, n, s, impl="eager")
    assert len(calls) > n_first and relerr(again, dora_layer_reference(x, W, A, B, m, n, s)) <= 2e-5


def test_scale_terms_give_dora_scale_including_zero_and_non_finite_norms():
    """g = c + m·inv is dora_scale's g = m / n with g = 1 where n is not > 0 (0, -0.0, NaN) and 0 at n = inf."""
    from dora_tune.kernels import dora_scale
    from dora_tune.kernels.dora_layer import _scale_terms

    n = torch.tensor([0.0, -0.0, float("nan"), float("inf"), 1e-30, 3.0, 7.123456, 1e30])
    m = torch.linspace(0.5, 2.0, n.numel())
    inv, c = _scale_terms(n.clone())
    assert inv.dtype == c.dtype == torch.float32
    assert torch.equal(c, torch.tensor([1.0, 1.0, 1.0, 0, 0, 0, 0, 0]))
    assert torch.equal(inv[:4], torch.zeros(4))
    torch.testing.assert_close(inv[4:], 1.0 / n[4:], rtol=1e-6, atol=0)
    g = c + m * inv
    assert torch.allclose(g[:2], torch.ones(2)) and g[3] == 0
    assert torch.allclose(g[4:], dora_scale(m[4:], n[4:]), rtol=1e-6, atol=0)


def test_bf16_full_output_on_the_torch_path_casts_nothing():
    """The host-bound path's op count is its cost: a bf16 layer's full output forms g in bf16 (no subtraction to
    cancel), so neither the forward nor the backward casts (each cast was a launch and an autograd node)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, W, A, B, m, n, bias, s, dout = make((2, 5), 24, 37, 3, torch.bfloat16, "cpu", seed=7)
    leaves = [t.detach().requires_grad_() for t in (x, A, B, m)]
    dora_layer(*leaves[:1], W, *leaves[1:], n, s, bias=bias, output="full", impl="eager")  # the memoised terms
    with Ops() as ops:
        out = dora_layer(leaves[0], W, *leaves[1:], n, s, bias=bias, output="full", impl="eager")
        out.backward(dout)
    assert out.dtype == torch.bfloat16 and not [o for o in ops.names if "_to_copy" in o], ops.names
    assert all(t.grad.dtype == torch.bfloat16 for t in leaves)


class _OnCuda:
    """A stand-in for a CUDA input in the path choice's eyes (shape, numel, dtype, device): the choice itself runs
    no kernel, so no GPU is needed to test what it asks the planner."""

    def __init__(self, rows, d_in):
        self.shape, self.dtype, self.device = (rows, d_in), torch.bfloat16, torch.device("cuda")

    def numel(self):
        return self.shape[0] * self.shape[1]


class _RecordingPlanner:
    """Plans the compose config and, for the whole-path race, records its key and default and builds its runners."""

    def __init__(self):
        self.asked = []

    def auto(self, op, dims, dtype, device, race=None):
        from types import SimpleNamespace

        return SimpleNamespace(impl="triton", config=None)

    def auto_path(self, key, device, make_runners, default):
        self.asked.append((key, default, sorted(make_runners())))
        return default


@pytest.mark.parametrize("sharded", [False, True])
def test_under_fsdp2_the_race_leaves_the_node_out(monkeypatch, sharded):
    """While FSDP2 shards a module of the process, the whole-path race does not offer the one-node path and its
    no-race default is the torch path (the node's FSDP2 parity gap on a GPU); otherwise the node is offered and the
    default. The FSDP2 state is part of the race key."""
    dl = importlib.import_module("dora_tune.kernels.dora_layer")
    monkeypatch.setattr(dl, "triton_available", lambda: True)
    monkeypatch.setattr(dl, "fsdp_in_use", lambda: sharded)
    monkeypatch.setattr(dl, "fused_layer_route", lambda *a: False)
    monkeypatch.setattr(dl, "folded_layer_route", lambda *a: False)
    monkeypatch.setattr(dl, "_path_runners", lambda *a: {"eager": None, "triton": None})
    W, A, B = torch.randn(8, 6), torch.randn(2, 6), torch.randn(8, 2)
    planner = _RecordingPlanner()
    path, _ = dl._choose(
        _OnCuda(4, 6), W, None, None, A, B, torch.ones(8), torch.ones(8), 1.0, True, True, True, planner
    )
    ((key, default, offered),) = planner.asked
    assert key[-1] is sharded
    if sharded:
        assert default == "eager" == path and offered == ["eager"]
    else:
        assert default == "triton" == path and offered == ["eager", "triton"]


def test_fsdp_in_use_sees_only_fsdp2_states(monkeypatch):
    """False without any composable state (FSDP2 never imported, or nothing sharded) and for states of other
    composable APIs; True for a state with FSDP2's parameter groups (either torch layout)."""
    import sys
    import types
    import weakref

    from dora_tune.kernels._sharded import fsdp_in_use

    class Other:  # e.g. the composable checkpoint's state
        pass

    class NewLayout:  # torch >= 2.12
        def __init__(self):
            self._fsdp_param_groups = []

    class OldLayout:  # torch 2.11
        _fsdp_param_group = None

    fake = types.ModuleType("torch.distributed._composable_state")
    monkeypatch.setitem(sys.modules, "torch.distributed._composable_state", fake)
    fake._module_state_mapping = {}
    assert not fsdp_in_use()
    keep = [Other(), NewLayout(), OldLayout()]
    fake._module_state_mapping = {1: weakref.ref(keep[0])}
    assert not fsdp_in_use()
    for state in keep[1:]:
        fake._module_state_mapping = {1: weakref.ref(keep[0]), 2: weakref.ref(state)}
        assert fsdp_in_use()
