import pytest
import torch

from dora_tune.kernels import ComposeConfig, compose, compose_config_space, compose_reference, dora_scale

from conftest import relerr

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# rows = 1, cols = 1, cols not a multiple of any block, 3-D activations.
SHAPES = [(1, 1), (1, 37), (5, 37), (3, 4, 300), (64, 130)]
# Triton computes in fp32 and rounds once; eager computes in the input dtype (several roundings).
TOL = {
    "triton": {torch.float32: 1e-6, torch.bfloat16: 6e-3, torch.float16: 8e-4},
    "eager": {torch.float32: 1e-6, torch.bfloat16: 1.5e-2, torch.float16: 2e-3},
}


def make(shape, dtype, device="cpu", seed=0, g_dtype=None, g_2d=False):
    gen = torch.Generator().manual_seed(seed)
    lora = torch.randn(*shape, generator=gen).to(dtype).to(device)
    base = torch.randn(*shape, generator=gen).to(dtype).to(device)
    g = (1 + 0.05 * torch.randn(shape[-1], generator=gen)).to(g_dtype or dtype).to(device)
    return lora, base, (g[None, :] if g_2d else g)


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g_dtype, g_2d", [(None, False), (torch.float32, True)])
def test_compose_matches_float64(impl, dtype, shape, g_dtype, g_2d, dev_for):
    lora, base, g = make(shape, dtype, dev_for(impl), seed=len(shape) + shape[-1], g_dtype=g_dtype, g_2d=g_2d)
    out = compose(lora, base, g, 0.7, impl=impl)
    assert out.shape == base.shape and out.dtype == base.dtype
    # Eager works in the input dtype, g included: its reference is the formula on g rounded to that dtype.
    g_ref = g.to(dtype) if impl == "eager" else g
    assert relerr(out, compose_reference(lora, base, g_ref, 0.7).reshape(base.shape)) <= TOL[impl][dtype]


def test_every_compose_config_is_correct(triton_device):
    lora, base, g = make((37, 300), torch.float16, triton_device, seed=1)
    ref = compose_reference(lora, base, g, 0.5)
    bad = [
        c for c in compose_config_space() if relerr(compose(lora, base, g, 0.5, impl="triton", config=c), ref) > 8e-4
    ]
    assert bad == []


def test_stable_form_beats_naive_near_one(triton_device):
    # g = 1 + 1e-4 and a small LoRA branch (early training): the naive g·(s·lora + base) − base cancels.
    lora, base, _ = make((64, 256), torch.float32, triton_device, seed=2)
    lora = lora * 1e-3
    g = 1 + 1e-4 * torch.randn(256, device=triton_device)
    ref = compose_reference(lora, base, g, 0.5)
    naive = g * (0.5 * lora + base) - base
    stable = compose(lora, base, g, 0.5, impl="triton")
    err_naive, err_stable = relerr(naive, ref), relerr(stable, ref)
    assert err_stable <= err_naive
    assert err_stable < 1e-6 < err_naive


def test_non_contiguous_inputs(triton_device):
    lora, base, g = make((40, 64), torch.float32, triton_device, seed=4)
    lora_t, base_t = lora.T, base.T  # [64, 40], column stride ≠ 1
    g2 = g[:40].clone()
    ref = compose_reference(lora_t, base_t, g2, 0.3)
    for impl in ("eager", "triton"):
        assert relerr(compose(lora_t, base_t, g2, 0.3, impl=impl), ref) <= 1e-6
    # Row-strided (a slice of a wider buffer) runs without a copy.
    wide_l, wide_b, _ = make((40, 100), torch.float32, triton_device, seed=5)
    sl, sb = wide_l[:, :64], wide_b[:, :64]
    assert relerr(compose(sl, sb, g, 0.3, impl="triton"), compose_reference(sl, sb, g, 0.3)) <= 1e-6


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("shape", [(0, 16), (4, 0), (2, 0, 8)])
def test_compose_empty(impl, shape, dev_for):
    lora, base, g = make(shape, torch.float32, dev_for(impl))
    out = compose(lora, base, g, 1.0, impl=impl)
    assert out.shape == base.shape and out.numel() == 0


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (lambda l, b, g: (l[:, :-1], b, g), ValueError, "must have one shape"),
        (lambda l, b, g: (l, b.half(), g), TypeError, "lora and base must share a dtype"),
        (lambda l, b, g: (l.long(), b, g), TypeError, "lora must have dtype"),
        (lambda l, b, g: (l, b, g[:-1]), ValueError, "g must be"),
        (lambda l, b, g: (l, b, g.expand(2, -1)), ValueError, "g must be"),
        (lambda l, b, g: (l, b, torch.tensor(1.0)), ValueError, "g must have at least 1"),
        (lambda l, b, g: (l, b, g.to("meta")), ValueError, "g is on meta"),
        (lambda l, b, g: (l, b, [1.0] * 8), TypeError, "g must be a torch.Tensor"),
    ],
)
def test_compose_bad_input(args, exc, match):
    lora, base, g = make((4, 8), torch.float32)
    with pytest.raises(exc, match=match):
        compose(*args(lora, base, g), 1.0, impl="eager")


def test_compose_bad_scale_impl_config():
    lora, base, g = make((4, 8), torch.float32)
    with pytest.raises(TypeError, match="scale"):
        compose(lora, base, g, "1.0")
    with pytest.raises(ValueError, match="impl must be one of"):
        compose(lora, base, g, 1.0, impl="fused")
    with pytest.raises(TypeError, match="ComposeConfig"):
        compose(lora, base, g, 1.0, impl="triton", config=ComposeConfig(1, 128, 4).as_dict())


def test_dora_scale_zero_norm_policy():
    m = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    n = torch.tensor([2.0, 0.0, 4.0])
    g = dora_scale(m, n)
    assert torch.equal(g.detach(), torch.tensor([0.5, 1.0, 0.75]))
    g.sum().backward()
    assert torch.equal(m.grad, torch.tensor([0.5, 0.0, 0.25]))  # finite everywhere, zero where n = 0
    lora, base, _ = make((3, 3), torch.float32)
    assert torch.isfinite(compose(lora, base, g.detach(), 1.0)).all()
    with pytest.raises(ValueError, match="one shape"):
        dora_scale(m, n[:2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 4096), (2, 999, 4099), (1, 8192), (8192, 28672)])
def test_gpu_compose(dtype, shape):
    lora, base, g = make(shape, dtype, "cuda", seed=shape[-1])
    ref = compose_reference(lora, base, g, 0.5).reshape(base.shape)
    assert relerr(compose(lora, base, g, 0.5, impl="triton"), ref) <= TOL["triton"][dtype]
    assert relerr(compose(lora, base, g, 0.5), ref) <= TOL["triton"][dtype]  # auto → triton
    g_ref = compose_reference(lora, base, g.to(dtype), 0.5).reshape(base.shape)
    assert relerr(compose(lora, base, g, 0.5, impl="eager"), g_ref) <= TOL["eager"][dtype]


@pytest.mark.gpu
def test_gpu_every_compose_config():
    lora, base, g = make((1040, 3088), torch.bfloat16, "cuda", seed=7)
    ref = compose_reference(lora, base, g, 0.5)
    for c in compose_config_space():
        assert relerr(compose(lora, base, g, 0.5, impl="triton", config=c), ref) <= TOL["triton"][torch.bfloat16], c
