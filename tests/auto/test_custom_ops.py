import subprocess
import sys

import pytest
import torch

from dora_tune.auto import custom_ops as co
from dora_tune.kernels import (
    DEFAULT_COMPOSE_TRAIN_CONFIG,
    ComposeBwdConfig,
    ComposeConfig,
    ComposeTrainConfig,
    NormConfig,
    compose,
    compose_reference,
    compose_train,
    dora_scale,
    factored_norm,
    norm_reference,
)

from conftest import relerr

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 37), (3, 4, 30), (9, 130)]
# as in test_compose_train: eager works in the dtype, triton in float32 rounded once
TOL = {
    "triton": {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3},
    "eager": {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3},
}
SMALL_TRAIN_CFG = ComposeTrainConfig(
    ComposeConfig(block_r=2, block_c=128, num_warps=4),
    ComposeBwdConfig(block_r=2, block_c=128, row_iters=4, num_warps=4),
)


def make(shape, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    lora, base, dout = (torch.randn(*shape, generator=gen).to(dtype).to(device) for _ in range(3))
    g = (1 + 0.05 * torch.randn(shape[-1], generator=gen)).to(dtype).to(device)
    return lora, base, g, dout


@pytest.fixture(scope="module", autouse=True)
def registered():
    co.ensure_registered()


def test_ops_are_registered_lazily_and_compile_on_first_use():
    """A fresh process: importing dora_tune.kernels registers nothing; the first use may happen while
    torch.compile traces (fullgraph), and the compiled function matches eager."""
    code = """
import torch, dora_tune.kernels as k
print(hasattr(torch.ops.dora_tune, "compose_train_fwd"))
def f(lora, base, g):
    return k.compose_train(lora, base, g, 0.5)
args = [torch.randn(3, 5, 8, requires_grad=True), torch.randn(3, 5, 8, requires_grad=True),
        torch.randn(8, requires_grad=True)]
out = torch.compile(f, backend="eager", fullgraph=True)(*args)
print(hasattr(torch.ops.dora_tune, "compose_train_fwd"))
print(torch.allclose(out, f(*args)))
from dora_tune.auto import custom_ops
print(custom_ops.ensure_registered() and custom_ops.ensure_registered())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "True", "True", "True"]


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_opcheck(impl, dev_for):
    dev = dev_for(impl)
    lora, base, g, dout = make((3, 4, 30), torch.float32, dev)
    norm_impl = "factored_torch" if impl == "eager" else "triton"
    gen = torch.Generator().manual_seed(4)
    W, A, B = (torch.randn(*s, generator=gen).to(dev) for s in ((33, 70), (5, 70), (33, 5)))
    lg = [t.clone().requires_grad_() for t in (lora, base, g)]
    cases = [
        (torch.ops.dora_tune.factored_norm.default, (W, A, B, 0.7, norm_impl, "")),
        (torch.ops.dora_tune.compose.default, (lora, base, g, 0.6, impl, "")),
        (torch.ops.dora_tune.compose_train_fwd.default, (*lg, 0.6, True, impl, "")),
        (torch.ops.dora_tune.compose_train_fwd.default, (lg[0], lg[1], g, 0.6, False, impl, "")),
        (torch.ops.dora_tune.compose_train_bwd.default, (dout, base, g, 0.6, True, False, True, impl, "")),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_compose_train_op_matches_float64(impl, dtype, shape, dev_for):
    """The op with its autograd formula, called directly (as compiled code runs it), against float64."""
    lora, base, g, dout = make(shape, dtype, dev_for(impl), seed=shape[-1])
    for needs in [(True, True, True), (True, False, False), (False, True, True)]:
        ins = [t.clone().requires_grad_(n) for t, n in zip((lora, base, g), needs, strict=True)]
        out = co.compose_train_op(*ins, 0.6, impl)
        wanted = [t for t in ins if t.requires_grad]
        got = torch.autograd.grad(out, wanted, dout)
        g_ref = g.to(lora.dtype).to(g.dtype) if impl == "eager" else g
        refs = [t.double().requires_grad_(n) for t, n in zip((lora, base, g_ref), needs, strict=True)]
        ref = compose_reference(*refs, 0.6).reshape(base.shape)
        want = torch.autograd.grad(ref, [t for t in refs if t.requires_grad], dout.double())
        assert out.shape == base.shape and out.dtype == dtype
        for a, t in zip(got, wanted, strict=True):
            assert a.shape == t.shape and a.dtype == t.dtype
        errs = [relerr(out, ref)] + [relerr(a, b) for a, b in zip(got, want, strict=True)]
        assert max(errs) <= TOL[impl][dtype], (needs, errs)


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compose_and_norm_ops_match_float64(impl, dtype, dev_for):
    dev = dev_for(impl)
    lora, base, g, _ = make((3, 4, 30), dtype, dev, seed=3)
    out = co.compose_op(lora, base, g, 0.6, impl)
    g_ref = g.to(lora.dtype).to(g.dtype) if impl == "eager" else g
    assert out.dtype == dtype
    assert relerr(out, compose_reference(lora, base, g_ref, 0.6).reshape(base.shape)) <= TOL[impl][dtype]
    gen = torch.Generator().manual_seed(4)
    W, A, B = (torch.randn(*s, generator=gen).to(dtype).to(dev) for s in ((33, 70), (5, 70), (33, 5)))
    norm_impl = "factored_torch" if impl == "eager" else "triton"
    n = co.factored_norm_op(W, A, B, 0.7, norm_impl)
    assert n.dtype == torch.float32 and relerr(n, norm_reference(W, A, B, 0.7)) <= 1e-5


def test_explicit_configs_travel_as_json(triton_device):
    cfg = NormConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2, split_k=2)
    assert co.config_json(None) == ""
    assert co._parse("norm", co.config_json(cfg)) == cfg
    assert co._parse("compose_train", co.config_json(DEFAULT_COMPOSE_TRAIN_CONFIG)) == DEFAULT_COMPOSE_TRAIN_CONFIG
    lora, base, g, dout = make((20, 130), torch.float32, triton_device, seed=9)
    ins = [t.clone().requires_grad_() for t in (lora, base, g)]
    out = co.compose_train_op(*ins, 0.6, "triton", SMALL_TRAIN_CFG)
    got = torch.autograd.grad(out, ins, dout)
    want_out = compose_train(lora, base, g, 0.6, impl="triton", config=SMALL_TRAIN_CFG)
    assert torch.equal(out, want_out)
    refs = [t.double().requires_grad_() for t in (lora, base, g)]
    want = torch.autograd.grad(compose_reference(*refs, 0.6), refs, dout.double())
    assert max(relerr(a, b) for a, b in zip(got, want, strict=True)) <= 1e-6


def test_bad_impl_is_refused():
    lora, base, g, _ = make((2, 8), torch.float32)
    with pytest.raises(ValueError, match="impl must be"):
        co.compose_op(lora, base, g, 0.5, "cuda_magic")
    with pytest.raises(ValueError, match="impl must be"):
        co.factored_norm_op(base, lora[:1], lora[:, :1], 0.5, "eager")


def test_eager_calls_keep_their_fast_paths(triton_device):
    lora, base, g, _ = make((4, 40), torch.float32, triton_device)
    ins = [t.clone().requires_grad_() for t in (lora, base, g)]
    out = compose_train(*ins, 0.5, impl="triton")
    assert type(out.grad_fn).__name__ == "_ComposeTrainFnBackward"
    out = compose_train(*ins, 0.5, impl="eager")
    assert "dora_tune" not in type(out.grad_fn).__name__.lower()


def test_compiled_functions_match_eager(triton_device):
    """fullgraph compile (no graph break) of the three public ops with dynamic shapes and the Triton kernels (the
    dispatcher's "auto" is compiled in tests/dispatch/test_layer.py); matches eager."""
    dev, impl, norm_impl = triton_device, "triton", "triton"

    s = 0.5  # a constant, as in a layer

    def f(x, W, A, B, m):
        g = dora_scale(m, factored_norm(W, A, B, s, impl=norm_impl))
        base = x @ W.T
        lora = (x @ A.T) @ B.T
        return base + compose_train(lora, base, g, s, impl=impl)

    def f_eval(x, W, A, B, m):
        g = dora_scale(m, factored_norm(W, A, B, s, impl=norm_impl))
        base = x @ W.T
        return base + compose(x @ A.T @ B.T, base, g, s, impl=impl)

    gen = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(*s, generator=gen).to(dev) for s in ((33, 70), (5, 70), (33, 5)))
    A.requires_grad_(), B.requires_grad_()
    m = torch.rand(33, generator=gen).to(dev).requires_grad_()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    ce = torch.compile(f_eval, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (1, 7, 19):
        x = torch.randn(rows, 70, generator=gen).to(dev)
        want = f(x, W, A, B, m)
        gw = torch.autograd.grad(want.square().sum(), [A, B, m])
        got = cf(x, W, A, B, m)
        gg = torch.autograd.grad(got.square().sum(), [A, B, m])
        assert relerr(got, want) <= 1e-6
        assert max(relerr(a, b) for a, b in zip(gg, gw, strict=True)) <= 1e-5
        with torch.no_grad():
            assert relerr(ce(x, W, A, B, m), want) <= 1e-6


def test_norm_op_plans_like_the_eager_call(triton_device, monkeypatch):
    """dora_tune::factored_norm plans on the compute dtype (fp32 adapters on a bf16 W: fp32), as the eager call."""
    from dora_tune.dispatch import runtime

    gen = torch.Generator().manual_seed(1)
    W = torch.randn(24, 40, generator=gen).to(torch.bfloat16).to(triton_device)
    A, B = (torch.randn(*s, generator=gen).to(triton_device) for s in ((5, 40), (24, 5)))
    cfg = NormConfig(block_m=64, block_n=32, block_k=64, num_warps=4, num_stages=3, split_k=2)
    d = runtime.Dispatcher(None, use_shipped=False, force_env="")
    d._memo[("norm", (24, 40, 5), "fp32", W.device, None)] = runtime.Plan("triton", cfg, "model", "test")
    monkeypatch.setattr(runtime, "_DEFAULT", d)
    seen = []
    monkeypatch.setattr(
        runtime.Dispatcher,
        "_resolve",
        lambda *a, **k: seen.append(a) or runtime.Plan("factored_torch", None, "fallback", "test"),
    )
    got = co.factored_norm_op(W, A, B, 0.5, "auto", None)
    assert seen == []  # the memoised fp32 plan was used, no other key was resolved
    assert relerr(got, norm_reference(W, A, B, 0.5)) <= 1e-5


def test_cached_norm_op_is_kept_out_of_cuda_graphs():
    """The stateful norm op carries the cudagraph_unsafe tag (Inductor runs it between captured partitions), so a
    CUDA-graph replay never reuses a stale norm and no cached norm is allocated in a graph's memory pool."""
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("this torch has no cudagraph_unsafe tag")
    from dora_tune.auto.custom_ops import ensure_registered

    ensure_registered()
    assert torch.Tag.cudagraph_unsafe in torch.ops.dora_tune.cached_norm.default.tags
    assert torch.Tag.cudagraph_unsafe not in torch.ops.dora_tune.factored_norm.default.tags
