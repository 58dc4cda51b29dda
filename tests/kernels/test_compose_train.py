import pytest
import torch

from dora_tune.kernels import (
    ComposeTrainConfig,
    compose_bwd_config_space,
    compose_config_space,
    compose_reference,
    compose_train,
    dora_compose_train,
    dora_scale,
)

from conftest import racing_dispatcher, relerr

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 37), (5, 37), (3, 4, 300), (70, 130)]
# Gradients: Triton computes in fp32 and rounds once (d_g accumulates in fp32 over inner rounded to the dtype).
TOL = {
    "triton": {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3},
    "eager": {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3},
}


def make(shape, dtype, device="cpu", seed=0, g_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    lora = torch.randn(*shape, generator=gen).to(dtype).to(device)
    base = torch.randn(*shape, generator=gen).to(dtype).to(device)
    g = (1 + 0.05 * torch.randn(shape[-1], generator=gen)).to(g_dtype or dtype).to(device)
    dout = torch.randn(*shape, generator=gen).to(dtype).to(device)
    return lora, base, g, dout


def grads_vs_reference(impl, lora, base, g, dout, scale, config=None, needs=(True, True, True)):
    """Run compose_train and the float64 reference with the same requires_grad pattern; return errors."""
    ins = [t.clone().requires_grad_(n) for t, n in zip((lora, base, g), needs, strict=True)]
    out = compose_train(*ins, scale, impl=impl, config=config)
    wanted = [t for t in ins if t.requires_grad]
    got = torch.autograd.grad(out, wanted, dout) if wanted else []
    # Eager works in the input dtype, g included: its reference uses g rounded to that dtype.
    g_ref = g.to(lora.dtype).to(g.dtype) if impl == "eager" else g
    refs = [t.double().requires_grad_(n) for t, n in zip((lora, base, g_ref), needs, strict=True)]
    ref_out = compose_reference(*refs, scale).reshape(base.shape)
    ref_grads = torch.autograd.grad(ref_out, [t for t in refs if t.requires_grad], dout.double()) if wanted else []
    for gr, t in zip(got, wanted, strict=True):
        assert gr.shape == t.shape and gr.dtype == t.dtype
    return [relerr(out, ref_out)] + [relerr(a, b) for a, b in zip(got, ref_grads, strict=True)]


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_compose_train_grads(impl, dtype, shape, dev_for):
    lora, base, g, dout = make(shape, dtype, dev_for(impl), seed=shape[-1] + len(shape))
    errs = grads_vs_reference(impl, lora, base, g, dout, 0.6)
    assert max(errs) <= TOL[impl][dtype], errs


@pytest.mark.parametrize(
    "needs", [(True, True, False), (True, False, False), (False, False, True), (False, True, True)]
)
def test_compose_train_partial_grads(needs, triton_device):
    lora, base, g, dout = make((9, 50), torch.float32, triton_device, seed=11, g_dtype=torch.float32)
    errs = grads_vs_reference("triton", lora, base, g, dout, 0.6, needs=needs)
    assert len(errs) == 1 + sum(needs) and max(errs) <= 1e-6


def test_inner_saved_only_when_g_needs_grad(triton_device):
    lora, base, g, _ = make((8, 32), torch.float32, triton_device)
    lr = lora.clone().requires_grad_()
    out = compose_train(lr, base, g, 0.5, impl="triton")
    inner, _ = out.grad_fn.saved_tensors
    assert inner is None
    out = compose_train(lr, base, g.clone().requires_grad_(), 0.5, impl="triton")
    inner, _ = out.grad_fn.saved_tensors
    assert inner is not None and inner.shape == (8, 32)


def test_fp32_g_with_bf16_activations(triton_device):
    lora, base, g, dout = make((6, 40), torch.bfloat16, triton_device, seed=3, g_dtype=torch.float32)
    errs = grads_vs_reference("triton", lora, base, g, dout, 0.5)
    assert max(errs) <= TOL["triton"][torch.bfloat16]


def test_every_fwd_and_bwd_config_is_correct(triton_device):
    lora, base, g, dout = make((37, 300), torch.float32, triton_device, seed=5)
    fwd, bwd = compose_config_space(), compose_bwd_config_space()
    bad = []
    for i in range(max(len(fwd), len(bwd))):
        cfg = ComposeTrainConfig(fwd[i % len(fwd)], bwd[i % len(bwd)])
        if max(grads_vs_reference("triton", lora, base, g, dout, 0.5, config=cfg)) > 1e-6:
            bad.append(cfg)
    assert bad == []


def test_dg_is_deterministic(triton_device):
    lora, base, g, dout = make((300, 64), torch.float32, triton_device, seed=8)
    results = []
    for _ in range(2):
        gg = g.clone().requires_grad_()
        compose_train(lora, base, gg, 0.5, impl="triton").backward(dout)
        results.append(gg.grad)
    assert torch.equal(results[0], results[1])


def test_no_grad_anywhere_still_works(triton_device):
    lora, base, g, _ = make((4, 16), torch.float32, triton_device)
    out = compose_train(lora, base, g, 0.5, impl="triton")
    assert not out.requires_grad
    assert relerr(out, compose_reference(lora, base, g, 0.5)) <= 1e-6


def test_compose_train_empty(triton_device):
    lora, base, g, dout = make((0, 16), torch.float32, triton_device)
    gg = g.clone().requires_grad_()
    lr = lora.clone().requires_grad_()
    out = compose_train(lr, base, gg, 0.5, impl="triton")
    dl, dg = torch.autograd.grad(out, (lr, gg), dout)
    assert dl.shape == (0, 16) and torch.equal(dg, torch.zeros_like(g))


def test_compose_train_bad_input():
    lora, base, g, _ = make((4, 8), torch.float32)
    with pytest.raises(ValueError, match="must have one shape"):
        compose_train(lora, base[:2], g, 1.0)
    with pytest.raises(TypeError, match="ComposeTrainConfig"):
        compose_train(lora, base, g, 1.0, impl="triton", config=object())
    with pytest.raises(ValueError, match="impl must be one of"):
        compose_train(lora, base, g, 1.0, impl="nope")


# ---------------------------------------------------------------- dora_compose_train: g = dora_scale(m, n) inside


def make_mn(cols, device, seed, m_dtype, zero_rows=()):
    gen = torch.Generator().manual_seed(seed)
    norm = (0.5 + torch.rand(cols, generator=gen)).float()
    norm[list(zero_rows)] = 0.0
    mag = (norm * (1 + 0.05 * torch.randn(cols, generator=gen))).to(m_dtype)
    return mag.to(device), norm.to(device)


def dora_ref_grads(lora, base, mag, norm, dout, scale):
    """float64 reference: out and the gradients of lora, base and the magnitude (g = m/n, 1 where n = 0)."""
    refs = [t.double().requires_grad_() for t in (lora, base, mag)]
    n = norm.double()
    g = torch.where(n > 0, refs[2] / torch.where(n > 0, n, 1.0), 1.0)
    out = compose_reference(refs[0], refs[1], g, scale).reshape(base.shape)
    return out, torch.autograd.grad(out, refs, dout.double())


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dora_compose_train_grads(impl, dtype, shape, dev_for):
    dev = dev_for(impl)
    lora, base, _, dout = make(shape, dtype, dev, seed=shape[-1] + 7)
    zero = (0,) if shape[-1] > 1 else ()
    mag, norm = make_mn(shape[-1], dev, seed=len(shape), m_dtype=dtype, zero_rows=zero)
    ins = [t.clone().requires_grad_() for t in (lora, base, mag)]
    out = dora_compose_train(*ins, norm, 0.6, impl=impl)
    got = torch.autograd.grad(out, ins, dout)
    ref_out, ref_grads = dora_ref_grads(lora, base, mag, norm, dout, 0.6)
    for gr, t in zip(got, ins, strict=True):
        assert gr.shape == t.shape and gr.dtype == t.dtype
    # eager rounds g to the activation dtype; the magnitude's gradient sums over rows in that dtype
    tol = TOL[impl][dtype] * (3 if impl == "eager" and dtype != torch.float32 else 1)
    errs = [relerr(out, ref_out)] + [relerr(a, b) for a, b in zip(got, ref_grads, strict=True)]
    assert max(errs) <= tol, errs
    if zero:  # g = 1 on a zero-norm row does not depend on m
        assert got[2][0].item() == 0.0


@pytest.mark.parametrize(
    "where", ["triton_device", pytest.param("cuda", marks=pytest.mark.gpu)], ids=["interpreter-or-cuda", "gpu"]
)
def test_dora_compose_train_matches_the_composition_bitwise(where, request):
    """Same kernels, same g: values and every gradient equal compose_train(·, dora_scale(m, n)) exactly."""
    dev = request.getfixturevalue("triton_device") if where == "triton_device" else "cuda"
    cols = 300 if where == "triton_device" else 4100
    lora, base, _, dout = make((2, 33, cols), torch.bfloat16, dev, seed=21)
    mag, norm = make_mn(cols, dev, seed=2, m_dtype=torch.bfloat16, zero_rows=(5, 17))
    a = [t.clone().requires_grad_() for t in (lora, base, mag)]
    b = [t.clone().requires_grad_() for t in (lora, base, mag)]
    out_a = dora_compose_train(*a, norm, 0.75, impl="triton")
    out_b = compose_train(b[0], b[1], dora_scale(b[2], norm), 0.75, impl="triton")
    assert torch.equal(out_a, out_b)
    ga, gb = torch.autograd.grad(out_a, a, dout), torch.autograd.grad(out_b, b, dout)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


@pytest.mark.parametrize("m_dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 1023, 1025, 4099])
@pytest.mark.parametrize(
    "where", ["triton_device", pytest.param("cuda", marks=pytest.mark.gpu)], ids=["interpreter-or-cuda", "gpu"]
)
def test_scale_kernels_are_the_torch_formulas(where, cols, m_dtype, request):
    """The fused node's g and d_m launches: bitwise the torch formulas (_dora_scale, dora_scale_backward rounded
    to m's dtype), and the float64 definition within rounding; zero and NaN norms follow the zero-norm policy."""
    from dora_tune.kernels._scale_triton import dora_scale_bwd_triton, dora_scale_fwd_triton
    from dora_tune.kernels.compose import _dora_scale, dora_scale_backward

    dev = request.getfixturevalue("triton_device") if where == "triton_device" else "cuda"
    zero = (0, cols // 2) if cols > 1 else (0,)
    mag, norm = make_mn(cols, dev, seed=cols, m_dtype=m_dtype, zero_rows=zero)
    if cols > 2:
        norm[1] = float("nan")
    dg = torch.randn(cols, generator=torch.Generator().manual_seed(cols + 1)).to(dev)
    g, dm = dora_scale_fwd_triton(mag, norm), dora_scale_bwd_triton(dg, norm, m_dtype)
    assert g.dtype == torch.float32 and dm.dtype == m_dtype and g.shape == dm.shape == (cols,)
    assert torch.equal(g, _dora_scale(mag, norm))
    assert torch.equal(dm, dora_scale_backward(dg, norm).to(m_dtype))
    n = norm.double()
    ok = n > 0
    g_ref = torch.where(ok, mag.double() / torch.where(ok, n, 1.0), 1.0)
    dm_ref = torch.where(ok, dg.double() / torch.where(ok, n, 1.0), 0.0)
    assert relerr(g, g_ref) <= 1e-7 and relerr(dm, dm_ref) <= TOL["triton"][m_dtype]
    assert (g[list(zero)] == 1).all() and (dm[list(zero)] == 0).all()


def test_dora_compose_train_partial_and_no_grad(triton_device):
    lora, base, _, dout = make((9, 50), torch.float32, triton_device, seed=4)
    mag, norm = make_mn(50, triton_device, seed=4, m_dtype=torch.float32)
    out = dora_compose_train(lora, base, mag, norm, 0.5, impl="triton")  # nothing requires grad
    assert not out.requires_grad
    m = mag.clone().requires_grad_()
    out = dora_compose_train(lora, base, m, norm, 0.5, impl="triton")
    (dm,) = torch.autograd.grad(out, (m,), dout)
    _, ref = dora_ref_grads(lora, base, mag, norm, dout, 0.5)
    assert relerr(dm, ref[2]) <= 1e-6
    lr = lora.clone().requires_grad_()
    out = dora_compose_train(lr, base, mag, norm, 0.5, impl="triton")
    assert out.grad_fn.saved_tensors[0] is None  # inner is written only when the magnitude needs a gradient


def test_dora_compose_train_bad_input():
    lora, base, _, _ = make((4, 8), torch.float32)
    mag, norm = make_mn(8, "cpu", seed=0, m_dtype=torch.float32)
    with pytest.raises(ValueError, match="must have one shape"):
        dora_compose_train(lora, base, mag, norm[:4], 1.0)
    with pytest.raises(ValueError, match="cols"):
        dora_compose_train(lora, base, mag[:4], norm[:4], 1.0)
    with pytest.raises(ValueError, match="1-D"):
        dora_compose_train(lora, base, mag[None], norm, 1.0)
    with pytest.raises(TypeError, match="ComposeTrainConfig"):
        dora_compose_train(lora, base, mag, norm, 1.0, impl="triton", config=object())
    with pytest.raises(ValueError, match="impl must be one of"):
        dora_compose_train(lora, base, mag, norm, 1.0, impl="nope")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 4096), (2, 999, 4099), (1, 8192), (512, 4096)])
def test_gpu_compose_train(dtype, shape):
    lora, base, g, dout = make(shape, dtype, "cuda", seed=shape[-1])
    for impl in ("triton", "eager"):
        errs = grads_vs_reference(impl, lora, base, g, dout, 0.5)
        assert max(errs) <= TOL[impl][dtype], (impl, errs)


@pytest.mark.gpu
def test_gpu_every_train_config():
    lora, base, g, dout = make((1040, 3088), torch.bfloat16, "cuda", seed=7)
    fwd, bwd = compose_config_space(), compose_bwd_config_space()
    for i in range(max(len(fwd), len(bwd))):
        cfg = ComposeTrainConfig(fwd[i % len(fwd)], bwd[i % len(bwd)])
        errs = grads_vs_reference("triton", lora, base, g, dout, 0.5, config=cfg)
        assert max(errs) <= TOL["triton"][torch.bfloat16], (cfg, errs)


@pytest.mark.gpu
def test_gpu_auto_races_the_models_shortlist_once_per_cell(tmp_path):
    # Unmeasured shapes whose model cell holds a 3-config shortlist: the first auto call (compose_train, then
    # dora_compose_train at another shape of the same cell) times the three on its own inputs and memoises the
    # fastest for the cell; values and gradients are the reference's either way.
    cfgs = [
        {
            "fwd": {"block_r": 4, "block_c": 512, "num_warps": 4},
            "bwd": {"block_r": br, "block_c": bc, "row_iters": it, "num_warps": 4},
        }
        for br, bc, it in ((8, 512, 8), (1, 2048, 1), (4, 1024, 16))
    ]
    with racing_dispatcher(tmp_path, "compose_train", {"rows": [3000], "cols": [3000]}, cfgs) as d:
        lora, base, g, dout = make((2, 1001, 3003), torch.bfloat16, "cuda", seed=5)
        dims, dev = (2002, 3003), base.device
        assert len(d.plan_key("compose_train", dims, "bf16", dev).race) == 3
        errs = grads_vs_reference("auto", lora, base, g, dout, 0.5)
        assert max(errs) <= TOL["triton"][torch.bfloat16], errs
        plan = d.plan_key("compose_train", dims, "bf16", dev)
        assert plan.source == "model" and plan.race == () and "raced at first use" in plan.detail
        assert plan.config.as_dict() in cfgs
        # another shape of the cell, through dora_compose_train: the cell's winner, without a race
        lora, base, _g, dout = make((1500, 4000), torch.bfloat16, "cuda", seed=6)
        mag = (1 + 0.1 * torch.rand(4000, device="cuda")).requires_grad_()
        norm = 1 + torch.rand(4000, device="cuda")
        out = dora_compose_train(lora, base, mag, norm, 0.5)
        assert d.plan_key("compose_train", (1500, 4000), "bf16", dev) is plan
        ref = compose_reference(lora.double(), base.double(), mag.detach().double() / norm.double(), 0.5)
        assert relerr(out, ref.reshape(out.shape)) <= TOL["triton"][torch.bfloat16]
