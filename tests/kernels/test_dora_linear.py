"""The DoRA linear (dora_linear): values and every gradient against a float64 reference, every implementation
(composed, fused, folded), each dtype, odd shapes, every config of the fused space at a small shape, and its
bad-input errors."""

import importlib

import pytest
import torch

import dora_tune.dispatch.runtime as planner
from dora_tune.kernels.dora_linear import (
    DEFAULT_DORA_LINEAR_CONFIG,
    DEFAULT_FOLDED_CONFIG,
    FOLDED_LINEAR_ENV,
    FUSED_LINEAR_ENV,
    DoraLinearConfig,
    FoldedConfig,
    dora_linear,
    dora_linear_reference,
    dora_linear_tuning_space,
    folded_layer_route,
    folded_tuning_space,
    fused_layer_route,
)

from conftest import dora_inputs, relerr

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (lead dims, d_in, d_out, r): rows = 1 and r = 1, a 3-D input, every size off every block (16, 32, 64)
SHAPES = [((1,), 33, 17, 1), ((2, 5), 24, 37, 3), ((70,), 50, 130, 9), ((3,), 20, 24, 80)]  # r 80: two K steps
# outputs and gradients rounded to the dtype once (fp32 accumulation)
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
SMALL = DoraLinearConfig(16, 16, 16, 2, 4, 2)  # many programs and loop trips at the test sizes
FOLD_SMALL = FoldedConfig(16, 16, 2, 1)  # many programs, d_m partials and a finish at the test sizes
TRITON_IMPLS = ["fused", "folded"]  # the implementations that need Triton (and one dtype)
CFG_DEFAULT = importlib.import_module("dora_tune.kernels.compose_train").DEFAULT_COMPOSE_TRAIN_CONFIG


def cfg(impl):
    """The config a test runs ``impl`` with: small tiles for the fused and folded linears, none for composed."""
    return {"fused": SMALL, "folded": FOLD_SMALL}.get(impl)


def make(lead, d_in, d_out, r, dtype, device, seed=0, zero_rows=()):
    """The layer's tensors by name (as dora_linear takes them), the norm, the scale and an output gradient."""
    x, W, A, B, m, n, bias, s, dout = dora_inputs(lead, d_in, d_out, r, dtype, device, seed, zero_rows)
    return {"x": x, "W": W, "bias": bias, "A": A, "B": B, "m": m}, n, s, dout


def run(impl, ins, n, s, dout, grads=("x", "bias", "A", "B", "m"), config=None):
    """(value, {name: gradient}) of dora_linear and of the float64 reference on the same inputs (``ins["bias"]``
    may be None)."""
    outs = []
    for ref in (False, True):
        leaves = {
            k: None if v is None else (v.detach().double() if ref else v.detach().clone()).requires_grad_(k in grads)
            for k, v in ins.items()
        }
        args = (leaves["x"], leaves["W"], leaves["bias"], leaves["A"], leaves["B"], leaves["m"], n, s)
        if ref:
            y = dora_linear_reference(*args)
        else:
            y = dora_linear(*args, impl=impl, config=config, planner=planner)
        g = torch.autograd.grad(y, [leaves[k] for k in grads], dout.to(y.dtype))
        outs.append((y, dict(zip(grads, g, strict=True))))
    return outs


@pytest.mark.parametrize("impl", ["composed", *TRITON_IMPLS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_values_and_gradients(impl, dtype, shape, dev_for):
    dev = dev_for("triton" if impl in TRITON_IMPLS or dtype != torch.float32 else "eager")
    ins, n, s, dout = make(*shape, dtype, dev)
    (y, g), (ry, rg) = run(impl, ins, n, s, dout, config=cfg(impl))
    assert y.dtype == dtype and y.shape == (*shape[0], shape[2])
    assert relerr(y, ry) < TOL[dtype]
    for k in g:
        assert g[k].dtype == ins[k].dtype and relerr(g[k], rg[k]) < TOL[dtype], k


@pytest.mark.parametrize("impl", TRITON_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_error_is_at_most_the_composed_paths(impl, dtype, triton_device):
    """The fused op rounds the output once and has no (g − 1)·base term; the folded one accumulates the LoRA tail
    onto the base output in fp32 and rounds the pre-activation once more: the error of each against float64 is no
    worse than the composed path's (1.5× for rounding luck on one small shape)."""
    ins, n, s, dout = make((64,), 80, 96, 8, dtype, triton_device, seed=3)
    (fy, fg), (ry, rg) = run(impl, ins, n, s, dout, config=cfg(impl))
    (cy, cg), _ = run("composed", ins, n, s, dout)
    assert relerr(fy, ry) <= 1.5 * relerr(cy, ry) + 1e-7
    for k in fg:
        assert relerr(fg[k], rg[k]) <= 1.5 * relerr(cg[k], rg[k]) + 1e-7, k


@pytest.mark.parametrize("impl", ["composed", *TRITON_IMPLS])
def test_weight_gradient_and_no_bias(impl, triton_device):
    """A weight that requires a gradient (d_W = eᵀ·x) and a layer without bias."""
    ins, n, s, dout = make((9,), 40, 24, 4, torch.float32, triton_device)
    ins["bias"] = None
    (y, g), (ry, rg) = run(impl, ins, n, s, dout, grads=("x", "W", "A", "B", "m"), config=cfg(impl))
    assert relerr(y, ry) < TOL[torch.float32]
    for k in g:
        assert relerr(g[k], rg[k]) < TOL[torch.float32], k


def test_every_config_of_the_space(triton_device):
    """Every config the profiler would sweep at this shape launches and is right (bf16: the dots upcast under the
    interpreter, as for the norm)."""
    shape = ((20,), 72, 40, 5)
    space = dora_linear_tuning_space({"rows": 20, "d_out": 40, "d_in": 72, "r": 5})
    assert space and all(DoraLinearConfig.from_dict(c) for c in space)
    ins, n, s, dout = make(*shape, torch.bfloat16, triton_device)
    for c in space:
        (y, g), (ry, rg) = run("fused", ins, n, s, dout, config=DoraLinearConfig.from_dict(c))
        assert relerr(y, ry) < TOL[torch.bfloat16], c
        assert all(relerr(g[k], rg[k]) < TOL[torch.bfloat16] for k in g), c


def test_every_config_of_the_folded_space(triton_device):
    """Every folded config the profiler would sweep launches and is right, at a shape off every tile (rows 70,
    d_out 130, r 9), bf16; the default config and the space validate."""
    space = folded_tuning_space({"rows": 70, "d_out": 130, "d_in": 48, "r": 9})
    assert space and DEFAULT_FOLDED_CONFIG.as_dict() in space
    ins, n, s, dout = make((70,), 48, 130, 9, torch.bfloat16, triton_device, seed=2)
    for c in space:
        (y, g), (ry, rg) = run("folded", ins, n, s, dout, config=FoldedConfig.from_dict(c))
        assert relerr(y, ry) < TOL[torch.bfloat16], c
        assert all(relerr(g[k], rg[k]) < TOL[torch.bfloat16] for k in g), c


def test_every_tile_of_the_space_is_right_where_all_apply(triton_device):
    """At a shape the space keeps every tile of (rows 130 ≥ 256 / 2, widths off every block), each config launches
    and is right: the large tiles too, whose programs cover rows and columns past the tensor's end."""
    from dora_tune.kernels.dora_linear import _TILES

    space = dora_linear_tuning_space({"rows": 130, "d_out": 140, "d_in": 150, "r": 5})
    assert len(space) == len(_TILES)
    ins, n, s, dout = make((130,), 150, 140, 5, torch.bfloat16, triton_device, seed=1)
    for c in space:
        (y, g), (ry, rg) = run("fused", ins, n, s, dout, config=DoraLinearConfig.from_dict(c))
        assert relerr(y, ry) < TOL[torch.bfloat16], c
        assert all(relerr(g[k], rg[k]) < TOL[torch.bfloat16] for k in g), c


@pytest.mark.parametrize("impl", TRITON_IMPLS)
def test_zero_norm_rows_keep_the_base_output_and_get_no_magnitude_gradient(impl, triton_device):
    ins, n, s, dout = make((8,), 32, 24, 4, torch.float32, triton_device, zero_rows=(3, 7))
    assert (n[[3, 7]] == 0).all()
    (y, g), (ry, rg) = run(impl, ins, n, s, dout, config=cfg(impl))
    assert torch.isfinite(y).all() and relerr(y, ry) < 2e-5
    assert (g["m"][[3, 7]] == 0).all() and relerr(g["m"], rg["m"]) < 2e-5


@pytest.mark.parametrize("impl", TRITON_IMPLS)
def test_y_pre_is_kept_only_when_the_magnitude_needs_a_gradient(impl, triton_device):
    """The forward writes and saves y_pre [rows, d_out] for d_m only: without a magnitude gradient the node keeps
    no tensor of the output's size."""
    ins, n, s, _ = make((30,), 24, 40, 4, torch.float32, triton_device)

    def saved_shapes(grads):
        shapes = []
        leaves = {k: v.detach().clone().requires_grad_(k in grads) for k, v in ins.items()}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            dora_linear(*leaves.values(), n, s, impl=impl, config=cfg(impl))
        return shapes

    assert (30, 40) in saved_shapes(("x", "A", "B", "m"))
    assert (30, 40) not in saved_shapes(("x", "A", "B"))


@pytest.mark.parametrize("impl", TRITON_IMPLS)
def test_magnitude_gradient_is_deterministic(impl, triton_device):
    ins, n, s, dout = make((70,), 48, 130, 8, torch.bfloat16, triton_device)
    first = run(impl, ins, n, s, dout, grads=("m",), config=cfg(impl))[0][1]["m"]
    again = run(impl, ins, n, s, dout, grads=("m",), config=cfg(impl))[0][1]["m"]
    assert torch.equal(first, again)


@pytest.mark.parametrize("impl", TRITON_IMPLS)
def test_no_grad_forward_and_empty_input(impl, triton_device):
    ins, n, s, _ = make((6,), 24, 20, 2, torch.float32, triton_device)
    with torch.no_grad():
        y = dora_linear(*ins.values(), n, s, impl=impl, config=cfg(impl))
    assert relerr(y, dora_linear_reference(*ins.values(), n, s)) < 2e-5
    empty = dora_linear(ins["x"][:0], *list(ins.values())[1:], n, s, impl=impl, config=cfg(impl))
    assert empty.shape == (0, 20)
    leaves = [v.detach().requires_grad_() for v in ins.values()]  # rows = 0 with gradients: zeros, no launch fails
    grads = torch.autograd.grad(dora_linear(leaves[0][:0], *leaves[1:], n, s, impl=impl).sum(), leaves)
    assert all(g.abs().sum() == 0 for g in grads)


def test_bad_input_is_refused_with_a_clear_error():
    ins, n, s, _ = make((4,), 16, 8, 2, torch.float32, "cpu")
    args = list(ins.values())
    with pytest.raises(ValueError, match="impl must be one of"):
        dora_linear(*args, n, s, impl="triton")
    with pytest.raises(ValueError, match="needs a planner"):  # the module's function; the front door plans
        dora_linear(*args, n, s)
    with pytest.raises(TypeError, match="DoraLinearConfig"):
        dora_linear(*args, n, s, impl="fused", config={"block_m": 16})
    with pytest.raises(TypeError, match="impl='folded' must be a FoldedConfig"):
        dora_linear(*args, n, s, impl="folded", config=SMALL)
    with pytest.raises(TypeError, match="impl='composed' takes no config"):
        dora_linear(*args, n, s, impl="composed", config=SMALL)
    with pytest.raises(ValueError, match="block_r"):
        FoldedConfig(8, 16, 1, 1)  # the rank tail's tl.dot needs 16 rows
    with pytest.raises(ValueError, match="d_in"):
        dora_linear(args[0][:, :15], *args[1:], n, s)
    mixed = [args[0], args[1], args[2], args[3].double().float().to(torch.bfloat16), *args[4:]]
    for impl in TRITON_IMPLS:
        with pytest.raises(TypeError, match=f"impl='{impl}' needs .* one dtype"):
            dora_linear(*mixed, n, s, impl=impl)
    with pytest.raises(ValueError, match="outside"):
        DoraLinearConfig(16, 16, 16, 2, 32, 2)
    assert DoraLinearConfig.from_dict(DEFAULT_DORA_LINEAR_CONFIG.as_dict()) == DEFAULT_DORA_LINEAR_CONFIG
    assert FoldedConfig.from_dict(DEFAULT_FOLDED_CONFIG.as_dict()) == DEFAULT_FOLDED_CONFIG


@pytest.mark.gpu
@pytest.mark.parametrize("impl", TRITON_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_realistic_shape_with_the_default_config(impl, dtype):
    """A Llama-3-8B q_proj at 1024 tokens, r 64, with the default config: values and gradients against float64
    (the folded one: cuBLAS's in-place accumulate (β = 1) and α on the GPU)."""
    ins, n, s, dout = make((2, 512), 4096, 4096, 64, dtype, "cuda")
    (y, g), (ry, rg) = run(impl, ins, n, s, dout)
    assert relerr(y, ry) < TOL[dtype]
    for k in g:
        assert relerr(g[k], rg[k]) < TOL[dtype], k


@pytest.mark.parametrize("impl", TRITON_IMPLS)
def test_dora_layer_runs_the_whole_linear_as_a_path(impl, triton_device):
    """``dora_layer_unchecked(..., impl="fused" | "folded")`` — what the path race's pick runs — is the layer's
    full output and its gradients."""
    dl = importlib.import_module("dora_tune.kernels.dora_layer")

    ins, n, s, dout = make((2, 7), 40, 24, 4, torch.bfloat16, triton_device)
    leaves = {k: v.detach().clone().requires_grad_(k in ("x", "A", "B", "m")) for k, v in ins.items()}
    x, W, b, A, B, m = leaves.values()
    y = dl.dora_layer_unchecked(x, W, A, B, m, n, s, b, None, False, True, impl, cfg(impl))
    got = torch.autograd.grad(y, [x, A, B, m], dout)
    ref = {k: v.detach().double().requires_grad_(k in ("x", "A", "B", "m")) for k, v in ins.items()}
    ry = dora_linear_reference(*ref.values(), n, s)
    want = torch.autograd.grad(ry, [ref[k] for k in ("x", "A", "B", "m")], dout.double())
    assert relerr(y, ry) < TOL[torch.bfloat16]
    assert all(relerr(a, r) < TOL[torch.bfloat16] for a, r in zip(got, want, strict=True))


def test_the_path_race_offers_the_whole_linears_where_they_apply_and_as_opted(monkeypatch, triton_device):
    """The fused linear only under DORA_TUNE_FUSED_LINEAR=1, the folded one unless DORA_TUNE_FOLDED_LINEAR=0; each
    only for the full output computed here (no base_result), one dtype."""
    dl = importlib.import_module("dora_tune.kernels.dora_layer")
    from dora_tune.kernels.compose_train import DEFAULT_COMPOSE_TRAIN_CONFIG as CFG

    ins, n, s, _ = make((6,), 24, 20, 2, torch.float32, triton_device)
    x, W, b, A, B, m = (v.detach().requires_grad_(k in ("x", "A", "B", "m")) for k, v in ins.items())

    def route(rule, **over):
        kw = {"base_result": None, "full": True, "A": A, **over}
        return rule(x, W, b, kw["A"], B, kw["base_result"], kw["full"])

    monkeypatch.delenv(FUSED_LINEAR_ENV, raising=False)
    monkeypatch.delenv(FOLDED_LINEAR_ENV, raising=False)
    assert not route(fused_layer_route) and route(folded_layer_route)  # the defaults
    monkeypatch.setenv(FUSED_LINEAR_ENV, "1")
    monkeypatch.setenv(FOLDED_LINEAR_ENV, "0")
    assert route(fused_layer_route) and not route(folded_layer_route)  # each variable rules its own path only
    monkeypatch.setenv(FOLDED_LINEAR_ENV, "1")
    for rule in (fused_layer_route, folded_layer_route):
        assert route(rule)
        assert not route(rule, full=False)  # PEFT's delta output
        assert not route(rule, base_result=torch.zeros(6, 20))  # PEFT hands its base output (dropout acting)
        assert not route(rule, A=A.detach().double().requires_grad_())  # mixed dtypes
    assert set(dl._path_runners(x, W, b, None, A, B, m, n, s, True, True, CFG)) == {"eager", "triton"}
    linear = {"fused": DoraLinearConfig(16, 16, 16, 1, 1, 1), "folded": FOLD_SMALL}
    runners = dl._path_runners(x, W, b, None, A, B, m, n, s, True, True, CFG, linear)
    assert set(runners) == {"eager", "triton", "fused", "folded"}
    for run in runners.values():  # each runs forward and backward on detached copies
        run()
    assert x.grad is None and A.grad is None and m.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_folded_from_a_base_output_matches_float64(dtype, triton_device):
    """``dropout_mode="lora_only"``'s form: the base output x·Wᵀ of the input as it came (computed outside, with
    autograd), the LoRA branch on another input (the dropped-out one) — values and the gradients of both inputs, A,
    B, m and the bias against float64; the base output is kept only when m trains."""
    from dora_tune.kernels.dora_linear import folded_from_base

    ins, n, s, dout = make((2, 9), 40, 70, 5, dtype, triton_device, seed=4)
    x_l = (ins["x"].float() * (torch.rand(ins["x"].shape, generator=torch.Generator().manual_seed(1)) > 0.3)).to(dtype)
    names = ("x", "x_l", "bias", "A", "B", "m")
    outs = []
    for ref in (False, True):
        t = {**ins, "x_l": x_l}
        leaves = {
            k: (v.detach().double() if ref else v.detach().clone()).requires_grad_(k in names) for k, v in t.items()
        }
        x, xl, W, b, A, B, m = (leaves[k] for k in ("x", "x_l", "W", "bias", "A", "B", "m"))
        if ref:
            g = torch.where(n > 0, m / torch.where(n > 0, n.double(), 1.0), 1.0)
            y = g * (x @ W.t() + s * (xl @ A.t()) @ B.t()) + b
        else:
            y = folded_from_base(xl, torch.nn.functional.linear(x, W), b, A, B, m, n, s, FOLD_SMALL)
        grads = torch.autograd.grad(y, [leaves[k] for k in names], dout.to(y.dtype))
        outs.append((y, dict(zip(names, grads, strict=True))))
    (y, g), (ry, rg) = outs
    assert y.dtype == dtype and relerr(y, ry) < TOL[dtype]
    for k in names:
        assert g[k].dtype == dtype and relerr(g[k], rg[k]) < TOL[dtype], k

    def saved_shapes(m_trains):
        shapes = []
        leaves = {
            k: v.detach().clone().requires_grad_(k in ("x", "A") or (k == "m" and m_trains)) for k, v in ins.items()
        }
        base = torch.nn.functional.linear(leaves["x"], leaves["W"]).detach()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            folded_from_base(leaves["x"], base, None, leaves["A"], leaves["B"], leaves["m"], n, s, FOLD_SMALL)
        return shapes

    assert (2, 9, 70) in saved_shapes(True) or (18, 70) in saved_shapes(True)
    assert (18, 70) not in saved_shapes(False) and (2, 9, 70) not in saved_shapes(False)


def test_the_lora_only_layer_call_runs_the_folded_pass_from_its_base(monkeypatch, triton_device):
    """``DoRALinear``'s ``dropout_mode="lora_only"`` call — the full output from a base output without the bias —
    is offered to the race as the folded linear (opted in; not PEFT's bias-including base, not a base of another
    dtype), and the folded pick is that call's output and gradients."""
    dl = importlib.import_module("dora_tune.kernels.dora_layer")

    ins, n, s, dout = make((12,), 24, 20, 3, torch.float32, triton_device)
    x, W, b, A, B, m = (v.detach().requires_grad_(k in ("x", "A", "B", "m")) for k, v in ins.items())
    base = torch.nn.functional.linear(x, W)
    monkeypatch.setenv(FOLDED_LINEAR_ENV, "1")
    assert folded_layer_route(x, W, b, A, B, base, True, False)
    assert not folded_layer_route(x, W, b, A, B, base, True, True)  # PEFT's base output includes the bias
    assert not folded_layer_route(x, W, b, A, B, base.double(), True, False)
    assert not folded_layer_route(x, W, b, A, B, base, False, False)  # the delta output
    want = dl.dora_layer_unchecked(x, W, A, B, m, n, s, b, base, False, True, "eager")
    got = dl.dora_layer_unchecked(x, W, A, B, m, n, s, b, base, False, True, "folded", FOLD_SMALL)
    assert relerr(got, want) < 2e-5
    leaves = [x, A, B, m]
    mine = torch.autograd.grad(got, leaves, dout, retain_graph=True)  # the base's graph serves both
    for a, r in zip(mine, torch.autograd.grad(want, leaves, dout), strict=True):
        assert relerr(a, r) < 2e-5
    runners = dl._path_runners(x, W, b, base, A, B, m, n, s, False, True, CFG_DEFAULT, {"folded": FOLD_SMALL})
    assert set(runners) == {"eager", "triton", "folded"}
    runners["folded"]()  # forward and backward on detached copies
    assert x.grad is None and A.grad is None


@pytest.mark.gpu
def test_gpu_the_path_race_times_the_fused_linear_when_opted_in(monkeypatch):
    from dora_tune import DoRALinear
    from dora_tune.dispatch import default_dispatcher

    monkeypatch.setenv(FUSED_LINEAR_ENV, "1")
    layer = DoRALinear(torch.nn.Linear(1536, 768, device="cuda", dtype=torch.bfloat16), r=16, alpha=32)
    x = torch.randn(4, 256, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    notes = [v for k, v in default_dispatcher().path_notes().items() if k[0] == "dora_layer" and k[2] == 768]
    assert notes and "fused" in notes[0] and "failed" not in notes[0], notes


@pytest.mark.gpu
def test_gpu_the_path_race_times_the_folded_linear_in_a_race_of_its_own(monkeypatch):
    """A race run with the folded linear kept out (DORA_TUNE_FOLDED_LINEAR=0) is not reused without it: the folded
    linear gets a race of its own (the race key holds the variables), and that race times it — for
    ``dropout_mode="lora_only"`` too."""
    from dora_tune import DoRALinear
    from dora_tune.dispatch import default_dispatcher

    def notes():
        return [v for k, v in default_dispatcher().path_notes().items() if k[0] == "dora_layer" and k[2] == 640]

    layer = DoRALinear(torch.nn.Linear(1536, 640, device="cuda", dtype=torch.bfloat16), r=16, alpha=32)
    x = torch.randn(4, 256, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    monkeypatch.setenv(FOLDED_LINEAR_ENV, "0")
    layer(x).sum().backward()
    assert len(notes()) == 1 and "folded" not in notes()[0]
    monkeypatch.delenv(FOLDED_LINEAR_ENV)
    layer(x).sum().backward()
    assert len(notes()) == 2 and any("folded" in n and "failed" not in n for n in notes()), notes()
    lora_only = DoRALinear(
        torch.nn.Linear(1536, 640, device="cuda", dtype=torch.bfloat16), r=16, dropout=0.1, dropout_mode="lora_only"
    )
    lora_only(x).sum().backward()  # the folded pass from the base output: a race of its own that times it
    assert len(notes()) == 3 and all("folded" in n and "failed" not in n for n in notes()[1:]), notes()


def test_compiled_layers_run_the_fused_linear_as_one_custom_op_when_opted_in(monkeypatch, triton_device):
    """Under torch.compile with DORA_TUNE_FUSED_LINEAR=1 a DoRALinear is ``dora_tune::dora_linear_fwd`` (and its
    backward op) — one opaque node, no graph break — with the eager layer's values and gradients; without the
    variable, the torch ops as before."""
    import warnings

    import dora_tune

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        dora_tune.DoRALinear(torch.nn.Linear(24, 40), r=4, alpha=8), dora_tune.DoRALinear(torch.nn.Linear(40, 16), r=4)
    ).to(triton_device)
    with torch.no_grad():
        for layer in model:
            layer.lora_B.normal_(0, 0.1)
    x = torch.randn(2, 5, 24, device=triton_device, requires_grad=True)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]

    def grads(fn):
        y = fn(x)
        return [y, *torch.autograd.grad(y.pow(2).sum(), params)]

    want = grads(model)
    for opted in (True, False):
        if opted:
            monkeypatch.setenv(FUSED_LINEAR_ENV, "1")
        else:
            monkeypatch.delenv(FUSED_LINEAR_ENV)
        graphs = []

        def backend(gm, example_inputs, graphs=graphs):
            graphs.append(gm)
            from torch._dynamo.backends.common import aot_autograd

            return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = grads(torch.compile(model, backend=backend, fullgraph=True))
        ops = {str(n.target) for gm in graphs for n in gm.graph.nodes if "dora_tune" in str(n.target)}
        assert ("dora_tune.dora_linear_fwd" in ops) is opted, ops
        assert all(relerr(a, b) < 2e-5 for a, b in zip(got, want, strict=True))
    torch._dynamo.reset()


class _Plan:
    def __init__(self, impl, config):
        self.impl, self.config = impl, config


class _StubPlanner:
    """A planner that answers every ``dora_linear`` plan with ``(impl, config)`` and records what it was asked; with
    ``race_with`` it runs the race factory's runner with that config (as the dispatcher's race would)."""

    def __init__(self, impl, config, race_with=None):
        self.plan, self.asked, self.race_with = _Plan(impl, config), [], race_with

    def auto(self, op, dims, dtype, device, race=None):
        self.asked.append((op, dims, dtype, race is not None))
        if race is not None and self.race_with is not None:
            race()(self.race_with)
        return self.plan


def test_auto_runs_the_planned_implementation_and_config(triton_device, monkeypatch):
    """``impl="auto"``: the planner is asked for op dora_linear at (rows, d_out, d_in, r) with a race factory (no
    own config); a fused plan runs the fused kernels with the plan's config, a composed plan the composed path —
    the same values either way; mixed dtypes never reach the planner."""
    dl_mod = importlib.import_module("dora_tune.kernels.dora_linear")
    ins, n, s, _ = make((3, 5), 24, 40, 4, torch.float32, triton_device)
    args = (*ins.values(), n, s)
    launched = []
    real = dl_mod._LinearFn.apply
    monkeypatch.setattr(dl_mod._LinearFn, "apply", lambda *a: launched.append(a[-1]) or real(*a))
    fused = _StubPlanner("fused", SMALL, race_with=SMALL)
    y_fused = dora_linear(*args, planner=fused)
    assert fused.asked == [("dora_linear", (15, 40, 24, 4), torch.float32, True)]
    assert launched == [SMALL, SMALL]  # the race's runner, then the call
    composed = _StubPlanner("composed", None)
    y_comp = dora_linear(*args, planner=composed)
    assert len(launched) == 2 and composed.asked
    assert relerr(y_fused, y_comp) < 1e-5
    own = DoraLinearConfig(32, 16, 16, 1, 2, 1)
    dora_linear(*args, config=own, planner=_StubPlanner("fused", SMALL, race_with=SMALL))  # own config: no race
    assert launched[-1] == own and len(launched) == 3
    folded = _StubPlanner("folded", FOLD_SMALL, race_with=FOLD_SMALL)  # a folded plan: its config, raced the same way
    y_folded = dora_linear(*args, planner=folded)
    assert launched[3:] == [FOLD_SMALL, FOLD_SMALL] and relerr(y_folded, y_comp) < 1e-5
    dora_linear(*args, config=own, planner=_StubPlanner("folded", FOLD_SMALL))  # a fused config: not the folded one's
    assert launched[-1] == FOLD_SMALL and len(launched) == 6
    mixed = [v if k in ("A", "B") else v.bfloat16() for k, v in ins.items()]  # float32 adapters, bf16 layer
    none = _StubPlanner("fused", SMALL)
    assert dora_linear(*mixed, n, s, planner=none).dtype == torch.bfloat16 and none.asked == []


def test_linear_config_is_the_plans_only_when_the_plan_is_that_implementation():
    from dora_tune.kernels.dora_linear import linear_config

    x, W, A = torch.randn(2, 7, 16), torch.randn(8, 16), torch.randn(3, 16)
    assert linear_config("fused", x, W, A, _StubPlanner("fused", SMALL)) == SMALL
    assert linear_config("fused", x, W, A, _StubPlanner("composed", None)) == DEFAULT_DORA_LINEAR_CONFIG
    assert linear_config("fused", x, W, A, _StubPlanner("folded", FOLD_SMALL)) == DEFAULT_DORA_LINEAR_CONFIG
    assert linear_config("folded", x, W, A, _StubPlanner("folded", FOLD_SMALL)) == FOLD_SMALL
    assert linear_config("folded", x, W, A, _StubPlanner("fused", SMALL)) == DEFAULT_FOLDED_CONFIG
    stub = _StubPlanner("fused", SMALL)
    linear_config("fused", x, W, A, stub)
    assert stub.asked == [("dora_linear", (14, 8, 16, 3), torch.float32, False)]


def test_the_front_door_plans_the_composed_path_off_cuda():
    """``dora_tune.kernels.dora_linear`` (the front door) on the CPU: the dispatcher plans the composed path."""
    import dora_tune.kernels as K

    ins, n, s, _ = make((4,), 16, 8, 2, torch.float32, "cpu")
    plan = planner.default_dispatcher().plan("dora_linear", {"rows": 4, "d_out": 8, "d_in": 16, "r": 2}, "fp32", "cpu")
    assert plan.impl == "composed"
    y = K.dora_linear(*ins.values(), n, s)
    ref = dora_linear_reference(*ins.values(), n, s)
    assert relerr(y, ref) < TOL[torch.float32]
