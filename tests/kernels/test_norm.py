import pytest
import torch

from dora_tune.kernels import NormConfig, factored_norm, norm_config_space, norm_reference

from conftest import racing_dispatcher, relerr

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (d_out, d_in, r): rows = 1, r = 1, sizes that are not multiples of any block, r > every block_n.
SHAPES = [(1, 17, 1), (33, 70, 5), (130, 200, 40), (64, 96, 300)]
# float32 compute everywhere; the Triton bf16 path carries G as two bf16 terms (relative error ≤ 2^-18).
TOL = {"dense": 1e-6, "factored_torch": 1e-6, "triton": 1e-5}


def make(d_out, d_in, r, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g).to(dtype).to(device)
    A = torch.randn(r, d_in, generator=g).to(dtype).to(device)
    B = torch.randn(d_out, r, generator=g).to(dtype).to(device)
    return W, A, B


@pytest.mark.parametrize("impl", ["dense", "factored_torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_norm_matches_float64(impl, dtype, shape, dev_for):
    W, A, B = make(*shape, dtype, dev_for(impl), seed=sum(shape))
    out = factored_norm(W, A, B, 0.7, impl=impl)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    assert relerr(out, norm_reference(W, A, B, 0.7)) <= TOL[impl]


def test_factored_torch_chunks_agree():
    from dora_tune.kernels.norm import norm_factored_torch

    W, A, B = make(40, 300, 7, torch.float32)
    ref = norm_reference(W, A, B, 1.5)
    for chunk in (1, 64, 299, 300, 10_000):
        assert relerr(norm_factored_torch(W, A, B, 1.5, chunk=chunk), ref) <= 1e-6


def test_every_norm_config_is_correct(triton_device):
    W, A, B = make(70, 150, 40, torch.bfloat16, triton_device, seed=3)
    ref = norm_reference(W, A, B, 0.5)
    bad = [c for c in norm_config_space() if relerr(factored_norm(W, A, B, 0.5, impl="triton", config=c), ref) > 1e-5]
    assert bad == []


def test_norm_config_space_respects_rank():
    assert all(c.block_n <= 32 for c in norm_config_space(16))
    assert {c.block_n for c in norm_config_space(384)} == {32, 64, 128, 256}


@pytest.mark.parametrize("impl", ["factored_torch", "triton", "dense"])
def test_zero_rows_give_zero_not_nan(impl, dev_for):
    W, A, B = make(8, 40, 4, torch.float32, dev_for(impl))
    W[3] = 0
    B[3] = 0
    # A row that cancels exactly in exact arithmetic: W_5 = -s·(B·A)_5.
    W[5] = -(0.5 * (B[5:6].double() @ A.double())).float()[0]
    out = factored_norm(W, A, B, 0.5, impl=impl)
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert out[3].item() == 0.0
    assert out[5].item() < 1e-3 * out.max().item()


@pytest.mark.parametrize("impl", ["factored_torch", "triton"])
def test_empty_and_degenerate(impl, dev_for):
    dev = dev_for(impl)
    W, A, B = make(0, 16, 4, torch.float32, dev)
    assert factored_norm(W, A, B, 1.0, impl=impl).shape == (0,)
    W, A, B = make(5, 0, 4, torch.float32, dev)  # d_in = 0: every row of W + sBA is empty
    assert torch.equal(factored_norm(W, A, B, 1.0, impl=impl).cpu(), torch.zeros(5))
    W, A, B = make(5, 16, 0, torch.float32, dev)  # r = 0: the norm of W
    assert relerr(factored_norm(W, A, B, 1.0, impl=impl), W.double().norm(dim=1)) <= 1e-6


def test_norm_is_detached():
    W, A, B = make(6, 10, 2, torch.float32)
    A.requires_grad_()
    B.requires_grad_()
    for impl in ("dense", "factored_torch"):
        assert not factored_norm(W, A, B, 1.0, impl=impl).requires_grad


def test_mixed_weight_and_adapter_dtypes(dev_for):
    # bf16 frozen weight with fp32 adapters (mixed-precision training) is supported: computed in fp32.
    W, _, _ = make(33, 70, 5, torch.bfloat16)
    _, A, B = make(33, 70, 5, torch.float32)
    for impl in ("factored_torch", "triton"):
        dev = dev_for(impl)
        args = (W.to(dev), A.to(dev), B.to(dev))
        assert relerr(factored_norm(*args, 0.3, impl=impl), norm_reference(*args, 0.3)) <= 1e-5


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda W, A, B: (W[0], A, B), ValueError, "weight must be 2-D"),
        (lambda W, A, B: (W, A[:, :-1], B), ValueError, "lora_A must be"),
        (lambda W, A, B: (W, A, B[:-1]), ValueError, "lora_B must be"),
        (lambda W, A, B: (W, A, B.T), ValueError, "lora_B must be"),
        (lambda W, A, B: (W.int(), A, B), TypeError, "weight must have dtype"),
        (lambda W, A, B: (W, A.double(), B), TypeError, "lora_A must have dtype"),
        (lambda W, A, B: (W, A, B.half()), TypeError, "lora_A and lora_B must share a dtype"),
        (lambda W, A, B: (W, A.to("meta"), B), ValueError, "lora_A is on meta"),
        (lambda W, A, B: (torch.tensor(1.0), A, B), ValueError, "weight must be 2-D"),
        (lambda W, A, B: (W.numpy(), A, B), TypeError, "weight must be a torch.Tensor"),
    ],
)
def test_norm_bad_input(mutate, exc, match):
    W, A, B = make(6, 10, 2, torch.float32)
    with pytest.raises(exc, match=match):
        factored_norm(*mutate(W, A, B), 1.0, impl="factored_torch")


def test_norm_bad_scale_impl_config():
    W, A, B = make(6, 10, 2, torch.float32)
    with pytest.raises(TypeError, match="scale"):
        factored_norm(W, A, B, torch.tensor(1.0))
    with pytest.raises(ValueError, match="scale must be finite"):
        factored_norm(W, A, B, float("nan"))
    with pytest.raises(ValueError, match="impl must be one of"):
        factored_norm(W, A, B, 1.0, impl="cuda")
    with pytest.raises(TypeError, match="NormConfig"):
        factored_norm(W, A, B, 1.0, impl="triton", config={"block_m": 64})


def test_auto_picks_torch_on_cpu():
    W, A, B = make(6, 10, 2, torch.float32)
    assert torch.equal(factored_norm(W, A, B, 1.0), factored_norm(W, A, B, 1.0, impl="factored_torch"))


def test_planned_config_that_cannot_launch_falls_back(triton_device, monkeypatch):
    """A config from the dispatcher that fails to launch (out of shared memory for these operand dtypes) costs one
    warning: the memoised plan becomes the default config (then the torch path), and the result is right."""
    from triton.runtime.errors import OutOfResources

    from dora_tune.dispatch import runtime
    from dora_tune.kernels import DEFAULT_NORM_CONFIG, _norm_triton

    W, A, B = make(40, 70, 6, torch.bfloat16, triton_device, seed=4)
    A32, B32 = A.float(), B.float()  # fp32 adapters on a bf16 W: PEFT's default autocast_adapter_dtype
    big = NormConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4, split_k=1)
    d = runtime.Dispatcher(None, use_shipped=False, force_env="")
    key = ("norm", (40, 70, 6), "fp32", W.device, None)  # keyed on the compute dtype, not W's
    d._memo[key] = runtime.Plan("triton", big, "model", "test")
    monkeypatch.setattr(runtime, "_DEFAULT", d)
    real, launched = _norm_triton.factored_norm_triton, []

    def launch(weight, lora_A, lora_B, scale, config):
        launched.append(config)
        if config != DEFAULT_NORM_CONFIG:
            raise OutOfResources(376832, 232448, "shared memory")
        return real(weight, lora_A, lora_B, scale, config)

    monkeypatch.setattr(_norm_triton, "factored_norm_triton", launch)
    ref = norm_reference(W, A32, B32, 0.7)
    with pytest.warns(RuntimeWarning, match="failed to launch"):
        got = factored_norm(W, A32, B32, 0.7)
    assert relerr(got, ref) <= TOL["triton"] and launched == [big, DEFAULT_NORM_CONFIG]
    assert d._memo[key].config == DEFAULT_NORM_CONFIG and d._memo[key].source == "heuristic"
    factored_norm(W, A32, B32, 0.7)  # the new plan is memoised: no second failure
    assert launched == [big, DEFAULT_NORM_CONFIG, DEFAULT_NORM_CONFIG]
    # the default failing too → the torch implementation
    d._memo[key] = runtime.Plan("triton", DEFAULT_NORM_CONFIG, "heuristic", "test")

    def no_smem(*args):
        raise OutOfResources(1, 0, "shared memory")

    monkeypatch.setattr(_norm_triton, "factored_norm_triton", no_smem)
    with pytest.warns(RuntimeWarning, match="failed to launch"):
        got = factored_norm(W, A32, B32, 0.7)
    assert relerr(got, ref) <= TOL["factored_torch"] and d._memo[key].impl == "factored_torch"
    # an explicit config's launch error reaches the caller
    with pytest.raises(OutOfResources):
        factored_norm(W, A32, B32, 0.7, impl="triton", config=big)


# ---------------------------------------------------------------- GPU (realistic shapes, real compiler)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 4096, 384), (3000, 5000, 100), (1, 4096, 16), (2048, 1000, 768)])
def test_gpu_norm(dtype, shape):
    d_out, d_in, r = shape
    g = torch.Generator(device="cuda").manual_seed(d_out + r)
    W = (torch.randn(d_out, d_in, device="cuda", generator=g) * 0.02).to(dtype)
    A = (torch.randn(r, d_in, device="cuda", generator=g) / d_in**0.5).to(dtype)
    B = (torch.randn(d_out, r, device="cuda", generator=g) * 0.02).to(dtype)
    ref = norm_reference(W, A, B, 2.0)
    for impl in ("triton", "factored_torch", "dense"):
        assert relerr(factored_norm(W, A, B, 2.0, impl=impl), ref) <= TOL[impl], impl
    assert relerr(factored_norm(W, A, B, 2.0), ref) <= 1e-5  # auto → triton


@pytest.mark.gpu
def test_gpu_norm_configs():
    # The whole space is checked under the interpreter (test_every_norm_config_is_correct); on the GPU, the
    # block_k = 64, 8-warp part that benchmarks/kernel_bench.py sweeps (each config compiles for tens of seconds).
    W, A, B = make(1000, 1024, 200, torch.bfloat16, "cuda", seed=5)
    ref = norm_reference(W, A, B, 0.5)
    for c in [c for c in norm_config_space(200) if c.block_k == 64 and c.num_warps == 8]:
        assert relerr(factored_norm(W, A, B, 0.5, impl="triton", config=c), ref) <= 1e-5, c


@pytest.mark.gpu
def test_gpu_norm_large_magnitudes_bf16():
    # B·A dominating W: the G split (hi + lo bf16 terms) must still hold 1e-5.
    W, A, B = make(512, 2048, 64, torch.bfloat16, "cuda", seed=9)
    ref = norm_reference(W, A * 10, B * 10, 4.0)
    assert relerr(factored_norm(W, A * 10, B * 10, 4.0, impl="triton"), ref) <= 1e-5


@pytest.mark.gpu
def test_gpu_norm_config_type_is_checked():
    W, A, B = make(64, 64, 8, torch.bfloat16, "cuda")
    out = factored_norm(W, A, B, 1.0, impl="triton", config=NormConfig(64, 32, 32, 4, 2, 3))
    assert relerr(out, norm_reference(W, A, B, 1.0)) <= 1e-5


@pytest.mark.gpu
def test_gpu_auto_races_the_models_shortlist(tmp_path):
    # An unmeasured shape whose model cell holds a 3-config shortlist: the first auto call times the three on its own
    # inputs and memoises the fastest; the result is the reference's either way.
    cfgs = [
        dict(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=s, split_k=k)
        for s, k in ((4, 3), (3, 1), (4, 4))
    ]
    with racing_dispatcher(tmp_path, "norm", {"d_out": [1024], "d_in": [1024], "r": [256]}, cfgs) as d:
        W, A, B = make(1000, 1024, 200, torch.bfloat16, "cuda", seed=11)
        dims, dev = (1000, 1024, 200), W.device  # the kernels key their plans by the tensors' device
        assert len(d.plan_key("norm", dims, "bf16", dev).race) == 3
        assert relerr(factored_norm(W, A, B, 0.5), norm_reference(W, A, B, 0.5)) <= 1e-5
        plan = d.plan_key("norm", dims, "bf16", dev)
        assert plan.source == "model" and plan.race == () and "raced at first use" in plan.detail
        assert plan.config.as_dict() in cfgs
        assert relerr(factored_norm(W, A, B, 0.5), norm_reference(W, A, B, 0.5)) <= 1e-5
