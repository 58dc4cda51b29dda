import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dora_tune
from dora_tune.nn import layer as layer_mod
from dora_tune.nn.layer import DoRALinear

from conftest import HAS_CUDA, relerr

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative error of outputs and gradients against float64 (torch matmuls in the dtype, float32 norm)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
# (d_in, d_out, r, input shape): rows = 1, 3-D input, d_out = 1, sizes that are not multiples of any block
CASES = [(37, 19, 4, (1, 37)), (37, 19, 4, (2, 3, 37)), (16, 1, 1, (5, 16)), (130, 70, 8, (4, 130))]


def make_layer(d_in, d_out, r, dtype, *, bias=True, dropout=0.0, seed=0, device="cpu", alpha=6.0, **kw):
    """A DoRALinear with random A, B (never zero) and a perturbed magnitude, so g ≠ 1 on every row."""
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias).to(device=device, dtype=dtype)
    layer = DoRALinear(base, r=r, alpha=alpha, dropout=dropout, init_lora_weights=False, **kw)
    with torch.no_grad():
        layer.magnitude.mul_(1 + 0.2 * torch.randn(d_out, device=device).to(dtype))
    return layer


def reference(layer, x, noise=None):
    """float64 output of ``layer`` on ``x`` (norm detached) and the leaves (x, A, B, m) to differentiate.

    ``noise``: the dropout multiplier (0 or 1/(1−p)); then PEFT's semantics: x·Wᵀ + b + (g−1)·(x̃·Wᵀ) + g·s·lora(x̃).
    """
    W = layer.base_layer.weight.detach().double()
    b = layer.base_layer.bias
    xd = x.detach().double().requires_grad_()
    A, B, m = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    s = layer.scale
    n = torch.linalg.vector_norm(W + s * (B @ A), dim=1).detach()
    g = m / n
    xl = xd if noise is None else xd * noise.double()
    base_l, lora = xl @ W.T, (xl @ A.T) @ B.T
    out = (xd @ W.T + (g - 1) * base_l + g * s * lora) if noise is not None else g * (base_l + s * lora)
    if b is not None:
        out = out + b.detach().double()
    return out, (xd, A, B, m)


def grads(layer, x, dout):
    xl = x.detach().clone().requires_grad_()
    out = layer(xl)
    gx, gA, gB, gm = torch.autograd.grad(out, [xl, layer.lora_A, layer.lora_B, layer.magnitude], dout)
    return out, [gx, gA, gB, gm]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_float64(dtype, case, bias):
    d_in, d_out, r, xshape = case
    layer = make_layer(d_in, d_out, r, dtype, bias=bias, seed=d_in + d_out)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*xshape, generator=gen).to(dtype)
    dout = torch.randn(*xshape[:-1], d_out, generator=gen).to(dtype)
    out, got = grads(layer, x, dout)
    assert out.dtype == dtype and out.shape == (*xshape[:-1], d_out)
    ref, leaves = reference(layer, x)
    want = torch.autograd.grad(ref, leaves, dout.double())
    errs = [relerr(out, ref)] + [relerr(a, b) for a, b in zip(got, want, strict=True)]
    assert max(errs) <= TOL[dtype], errs
    for t, gr in zip((x, layer.lora_A, layer.lora_B, layer.magnitude), got, strict=True):
        assert gr.dtype == t.dtype and gr.shape == t.shape
    assert layer.base_layer.weight.grad is None  # frozen


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_no_grad_runs_the_node_without_autograd(dtype, monkeypatch):
    layer = make_layer(37, 19, 4, dtype, dropout=0.3).eval()
    x = torch.randn(2, 3, 37).to(dtype)
    calls = []
    real = layer_mod.dora_layer_unchecked
    monkeypatch.setattr(layer_mod, "dora_layer_unchecked", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.no_grad():
        out = layer(x)
    assert len(calls) == 1 and calls[0]["full"] and not out.requires_grad
    assert relerr(out, reference(layer, x)[0]) <= TOL[dtype]  # eval: no dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_follows_peft_semantics(dtype):
    p = 0.4
    layer = make_layer(37, 19, 4, dtype, dropout=p).train()
    x = torch.randn(3, 5, 37).to(dtype)
    dout = torch.randn(3, 5, 19).to(dtype)
    torch.manual_seed(123)
    out, got = grads(layer, x, dout)
    torch.manual_seed(123)
    noise = F.dropout(torch.ones_like(x), p, training=True)  # the same draw the layer made
    assert (noise == 0).any() and (noise != 0).any()
    ref, leaves = reference(layer, x, noise)
    want = torch.autograd.grad(ref, leaves, dout.double())
    errs = [relerr(out, ref)] + [relerr(a, b) for a, b in zip(got, want, strict=True)]
    assert max(errs) <= TOL[dtype], errs
    # not the no-dropout output
    assert relerr(out, reference(layer, x)[0]) > 10 * TOL[dtype]


def test_matches_peft_layer():
    peft = pytest.importorskip("peft")
    for dropout in (0.0, 0.25):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(37, 19))
        pm = peft.get_peft_model(
            base, peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=dropout, use_dora=True, target_modules=["0"])
        )
        pl = pm.base_model.model[0]
        with torch.no_grad():
            pl.lora_B["default"].weight.normal_(0, 0.3)
            pl.lora_magnitude_vector["default"].weight.mul_(1.1)
        ours = DoRALinear(copy.deepcopy(pl.base_layer), r=4, alpha=6, dropout=dropout)
        with torch.no_grad():
            ours.lora_A.copy_(pl.lora_A["default"].weight)
            ours.lora_B.copy_(pl.lora_B["default"].weight)
            ours.magnitude.copy_(pl.lora_magnitude_vector["default"].weight)
        x = torch.randn(2, 7, 37)
        for mode in ("train", "eval"):
            pm.train(mode == "train")
            ours.train(mode == "train")
            torch.manual_seed(5)
            want = pm(x)
            torch.manual_seed(5)
            got = ours(x)
            assert relerr(got, want) <= 1e-6, (dropout, mode)
            gw = torch.autograd.grad(
                want.square().sum(),
                [pl.lora_A["default"].weight, pl.lora_B["default"].weight, pl.lora_magnitude_vector["default"].weight],
            )
            gg = torch.autograd.grad(got.square().sum(), [ours.lora_A, ours.lora_B, ours.magnitude])
            assert max(relerr(a, b) for a, b in zip(gg, gw, strict=True)) <= 1e-5, (dropout, mode)


def counting_norm(monkeypatch):
    """Counts the norms the layers compute: in full (``factored_norm``) or recomputed by a known plan
    (``run_norm``, the same tensors after an in-place change)."""
    calls = []
    for name in ("factored_norm", "run_norm"):
        real = getattr(layer_mod, name)
        monkeypatch.setattr(layer_mod, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


def test_norm_once_per_optimizer_step_with_accumulation_and_checkpointing(monkeypatch):
    layer = make_layer(37, 19, 4, torch.float32).train()
    calls = counting_norm(monkeypatch)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(3, 4, 37)
    for step in range(3):
        for _ in range(4):  # accumulation: four micro-steps, one of them through gradient checkpointing
            layer(x).square().mean().backward()
        torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).square().mean().backward()
        assert len(calls) == step + 1  # one norm per optimizer step, checkpoint recompute included
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert relerr(layer(x), reference(layer, x)[0]) <= TOL[torch.float32] and len(calls) == 4


def test_norm_of_new_values_runs_the_known_plan_bitwise(monkeypatch):
    """After an in-place change of the same tensors the cache recomputes by the plan of its last full computation
    (no checks, no planning), bitwise the full computation; a different plan (a force() block) takes the full path."""
    from dora_tune.dispatch import force
    from dora_tune.kernels import factored_norm

    layer = make_layer(37, 19, 4, torch.float32).train()
    full, fast = [], []
    for name, calls in (("factored_norm", full), ("run_norm", fast)):
        real = getattr(layer_mod, name)
        monkeypatch.setattr(layer_mod, name, lambda *a, _r=real, _c=calls, **k: _c.append(1) or _r(*a, **k))
    W, A, B = layer.base_layer.weight, layer.lora_A, layer.lora_B
    layer(torch.randn(4, 37))
    assert (len(full), len(fast)) == (1, 0)
    with torch.no_grad():
        B.mul_(1.5)
    got = layer.weight_norm()
    assert (len(full), len(fast)) == (1, 1)
    assert torch.equal(got, factored_norm(W, A, B, layer.scale))
    with torch.no_grad():
        A.mul_(0.5)
    with force("eager"):  # the dispatcher's plan for this key is another one here
        again = layer.weight_norm()
    assert (len(full), len(fast)) == (2, 1) and torch.equal(again, factored_norm(W, A, B, layer.scale))


def test_cached_norm_is_bitwise_the_recomputed_one():
    layer = make_layer(37, 19, 4, torch.float32).train()
    x, dout = torch.randn(5, 37), torch.randn(5, 19)
    cached = [grads(layer, x, dout) for _ in range(2)][1]  # the second forward reuses the norm
    layer.clear_cache()
    fresh = grads(layer, x, dout)
    assert torch.equal(cached[0], fresh[0]) and all(torch.equal(a, b) for a, b in zip(cached[1], fresh[1], strict=True))


CHANGES = [
    "adamw",
    "sgd_foreach_off",
    "load_state_dict",
    "copy_",
    "zero_",
    "dtype_move",
    "new_tensor",
    "data_then_clear",
]


def change_weights(layer, change, run, x, clear):
    """Change W, A or B of ``layer`` the way ``change`` says (``run``: the layer's call, eager or compiled;
    ``clear``: what forgets the cached norm after a write through ``.data``)."""
    if change in ("adamw", "sgd_foreach_off"):
        run(x).square().sum().backward()
        params = [layer.lora_A, layer.lora_B]
        adamw = torch.optim.AdamW(params, lr=0.5)
        opt = adamw if change == "adamw" else torch.optim.SGD(params, lr=0.5, foreach=False)
        opt.step()
    elif change == "load_state_dict":
        sd = {k: v.clone() for k, v in layer.state_dict().items()}
        sd["lora_B"] = sd["lora_B"] * 2
        layer.load_state_dict(sd)
    elif change == "copy_":
        with torch.no_grad():
            layer.lora_A.copy_(layer.lora_A * 1.5)
    elif change == "zero_":
        with torch.no_grad():
            layer.lora_B.zero_()
    elif change == "dtype_move":  # round trip: the storage may come back at the old address, values rounded
        layer.to(torch.bfloat16)
        run(x.to(torch.bfloat16))
        layer.to(torch.float32)
    elif change == "new_tensor":
        layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.detach() * 1.5, requires_grad=False)
    elif change == "data_then_clear":  # writes through .data are invisible: clearing the cache is the remedy
        layer.lora_B.data.mul_(0.5)
        clear()


@pytest.mark.parametrize("change", CHANGES)
def test_norm_cache_never_stale(change, monkeypatch):
    layer = make_layer(37, 19, 4, torch.float32).train()
    calls = counting_norm(monkeypatch)
    x = torch.randn(4, 37)
    y1 = layer(x)
    layer(x)
    assert len(calls) == 1
    change_weights(layer, change, layer, x, layer.clear_cache)
    n_before = len(calls)
    y2 = layer(x)
    assert len(calls) == n_before + 1, change  # recomputed
    assert relerr(y2, reference(layer, x)[0]) <= TOL[torch.float32] and relerr(y2, y1) > 1e-4, change


@pytest.fixture
def fresh_dispatcher():
    """A process-wide dispatcher of its own (no shipped cache), dropped afterwards."""
    from dora_tune.dispatch import runtime

    d = runtime.Dispatcher(use_shipped=False, force_env="")
    runtime.reset_default_dispatcher(d)
    try:
        yield d
    finally:
        runtime.reset_default_dispatcher(None)


@pytest.mark.parametrize("change", CHANGES)
def test_compiled_norm_cache_never_stale(change, fresh_dispatcher):
    """Compiled (AOTAutograd: the graph's ops see aliases of the parameters), the ``dora_tune::cached_norm`` op
    computes the norm once while W, A and B are unchanged, and again after each kind of change."""
    torch._dynamo.reset()
    layer = make_layer(37, 19, 4, torch.float32).train()
    run = torch.compile(layer, backend="aot_eager")
    norms = fresh_dispatcher.norms
    x = torch.randn(4, 37)
    y1 = run(x)
    run(x).sum().backward()
    assert norms.computed == 1
    change_weights(layer, change, run, x, norms.clear)
    n_before = norms.computed
    y2 = run(x)
    assert norms.computed == n_before + 1, change  # recomputed
    assert relerr(y2, reference(layer, x)[0]) <= TOL[torch.float32] and relerr(y2, y1) > 1e-4, change
    torch._dynamo.reset()


def test_compiled_norm_once_per_step_bitwise_and_fresh_layers(fresh_dispatcher):
    """Compiled training with accumulation: one norm per layer per optimizer step; outputs and gradients bitwise
    those of a recomputed norm; a new model built where a freed one lived never gets the old model's norms."""
    torch._dynamo.reset()
    norms = fresh_dispatcher.norms
    x, dout = torch.randn(2, 5, 37), torch.randn(2, 5, 19)
    for seed in (0, 0, 1):  # the same sizes again: the allocator may hand the freed storages to the new model
        torch.manual_seed(seed)
        model = Stack()
        params = [p for p in model.parameters() if p.requires_grad]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        opt = torch.optim.SGD(params, lr=0.1)
        for _step in range(2):
            before = norms.computed
            for _ in range(3):
                got = compiled(x)
                gg = torch.autograd.grad(got, params, dout)
            assert norms.computed == before + 2  # two layers, once each per optimizer step
            assert relerr(got, model(x)) <= 1e-6  # eager (its own cache) agrees
            norms.clear()  # recomputed: bitwise the same
            again = compiled(x)
            assert torch.equal(again, got)
            assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(again, params, dout), gg, strict=True))
            for p, g in zip(params, gg, strict=True):
                p.grad = g
            opt.step()
        del model, compiled, opt, params
    torch._dynamo.reset()


def test_norm_cache_and_inference_mode_and_copies(monkeypatch):
    layer = make_layer(37, 19, 4, torch.float32).eval()
    calls = counting_norm(monkeypatch)
    x = torch.randn(4, 37)
    with torch.inference_mode():  # a norm cached under inference_mode is not handed to autograd later
        y6 = layer(x)
        assert len(calls) == 1 and torch.equal(layer(x), y6) and len(calls) == 1
    x_grad = x.clone().requires_grad_()
    layer(x_grad).sum().backward()
    assert len(calls) == 2 and x_grad.grad is not None
    clone = copy.deepcopy(layer)  # copies start with an empty cache and compute their own norm
    with torch.no_grad():
        clone.lora_B.mul_(3)
    assert relerr(clone(x), reference(clone, x)[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_only_dropout_against_float64(dtype):
    p = 0.4
    layer = make_layer(37, 19, 4, dtype, dropout=p, dropout_mode="lora_only").train()
    x = torch.randn(3, 5, 37).to(dtype)
    dout = torch.randn(3, 5, 19).to(dtype)
    torch.manual_seed(123)
    out, got = grads(layer, x, dout)
    torch.manual_seed(123)
    noise = F.dropout(torch.ones_like(x), p, training=True)
    # y = g ⊙ (x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ) + b
    W, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    xd = x.detach().double().requires_grad_()
    A, B, m = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    g = m / torch.linalg.vector_norm(W + layer.scale * (B @ A), dim=1).detach()
    ref = g * (xd @ W.T + layer.scale * ((xd * noise.double()) @ A.T) @ B.T) + b
    want = torch.autograd.grad(ref, (xd, A, B, m), dout.double())
    errs = [relerr(out, ref)] + [relerr(a, c) for a, c in zip(got, want, strict=True)]
    assert max(errs) <= TOL[dtype], errs
    layer.eval()  # eval: no dropout, the same model as PEFT's
    assert relerr(layer(x), reference(layer, x)[0]) <= TOL[dtype]
    with pytest.raises(ValueError, match="dropout_mode"):
        make_layer(37, 19, 4, dtype, dropout=p, dropout_mode="base")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_merge(dtype, bias):
    layer = make_layer(37, 19, 4, dtype, bias=bias).eval()
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.weight.dtype == dtype
    assert (merged.bias is None) == (not bias)
    x = torch.randn(6, 37).to(dtype)
    with torch.no_grad():
        ref = reference(layer, x)[0]
        assert relerr(merged(x), ref) <= TOL[dtype]
        W = layer.base_layer.weight.double()
        dense = W + layer.scale * layer.lora_B.double() @ layer.lora_A.double()
        want_w = layer.magnitude.double()[:, None] * dense / torch.linalg.vector_norm(dense, dim=1, keepdim=True)
        assert relerr(merged.weight, want_w) <= {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
        if bias:
            assert torch.equal(merged.bias, layer.base_layer.bias)


def test_state_dict_keys_and_roundtrip():
    layer = make_layer(37, 19, 4, torch.float32)
    sd = layer.state_dict()
    assert set(sd) == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B", "magnitude"}
    assert sd["lora_A"].shape == (4, 37) and sd["lora_B"].shape == (19, 4) and sd["magnitude"].shape == (19,)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B", "magnitude"}
    other = make_layer(37, 19, 4, torch.float32, seed=9)
    x = torch.randn(3, 37)
    assert relerr(other(x), layer(x)) > 1e-2
    other.load_state_dict(sd)
    assert torch.equal(other(x), layer(x))
    assert set(make_layer(37, 19, 4, torch.float32, bias=False).state_dict()) == {
        "base_layer.weight",
        "lora_A",
        "lora_B",
        "magnitude",
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_init_is_identity(dtype):
    torch.manual_seed(0)
    base = nn.Linear(37, 19).to(dtype)
    x = torch.randn(2, 5, 37).to(dtype)
    want = base(x)
    for init in (True, "gaussian"):
        layer = DoRALinear.from_linear(base, r=4, alpha=16, init_lora_weights=init)
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
        ref_m = torch.linalg.vector_norm(base.weight.double(), dim=1)
        assert relerr(layer.magnitude, ref_m) <= TOL[dtype] and layer.magnitude.dtype == dtype
        assert relerr(layer(x), want) <= TOL[dtype]
    assert DoRALinear(base, r=16, alpha=8).scale == 0.5
    assert DoRALinear(base, r=16, alpha=8, use_rslora=True).scale == 8 / math.sqrt(16)


def test_adapter_dtype_differs_from_base():
    torch.manual_seed(0)
    base = nn.Linear(37, 19).to(torch.bfloat16)
    layer = DoRALinear(base, r=4, dtype=torch.float32, init_lora_weights=False)
    assert layer.lora_A.dtype == torch.float32 and layer.magnitude.dtype == torch.float32
    x = torch.randn(3, 37).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert relerr(out, reference(layer, x)[0]) <= TOL[torch.bfloat16]


def test_bad_arguments():
    base = nn.Linear(8, 4)
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        DoRALinear(nn.Conv1d(8, 4, 1))
    with pytest.raises(ValueError, match="r must"):
        DoRALinear(base, r=0)
    with pytest.raises(ValueError, match="dropout"):
        DoRALinear(base, dropout=1.0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        DoRALinear(base, init_lora_weights="pissa")
    with pytest.raises(TypeError, match="dtype"):
        DoRALinear(base, dtype=torch.float64)
    with pytest.raises(TypeError, match="plain"):
        DoRALinear(nn.Linear(8, 4).double())
    text = repr(DoRALinear(base, r=2, alpha=4, dropout=0.1))
    assert "r=2" in text and "scale=2" in text and "dropout=0.1" in text


def test_lazy_export():
    import subprocess
    import sys

    assert dora_tune.DoRALinear is DoRALinear
    assert "DoRALinear" in dora_tune.__all__ and "DoRALinear" in dir(dora_tune)
    with pytest.raises(AttributeError):
        dora_tune.NoSuchThing  # noqa: B018
    mods = "('torch', 'dora_tune.nn.layer', 'peft')"
    code = f"import sys, dora_tune; print([m for m in {mods} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]"]


# ----------------------------------------------------------------------------------------------- torch.compile


class Stack(nn.Module):
    def __init__(self, dtype=torch.float32, device="cpu"):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = make_layer(37, 48, 4, dtype, seed=1, device=device)
        self.l2 = make_layer(48, 19, 4, dtype, seed=2, device=device, bias=False)

    def forward(self, x):
        return self.l2(F.silu(self.l1(x)))


def dora_ops_in(graphs):
    return sorted({str(n.target) for gm in graphs for n in gm.graph.nodes if "dora_tune" in str(n.target)})


def recording_backend(dynamo_graphs, aot_graphs):
    """aot_eager that keeps the Dynamo graphs and the AOT forward/backward graphs it sees."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, _):
        aot_graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        dynamo_graphs.append(gm)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    return backend


def test_compiled_stack_matches_eager():
    model = Stack()
    x = torch.randn(2, 5, 37)
    dout = torch.randn(2, 5, 19)
    dynamo_graphs, aot_graphs = [], []
    compiled = torch.compile(model, backend=recording_backend(dynamo_graphs, aot_graphs), fullgraph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for mode in ("train", "eval"):
        model.train(mode == "train")
        want = model(x)
        gw = torch.autograd.grad(want, params, dout)
        got = compiled(x)
        gg = torch.autograd.grad(got, params, dout)
        assert relerr(got, want) <= 1e-6
        assert max(relerr(a, b) for a, b in zip(gg, gw, strict=True)) <= 1e-6
        with torch.no_grad():
            assert relerr(compiled(x), want) <= 1e-6
    # fullgraph=True: no graph break; the norm is one opaque node (its cache), the rest plain torch ops that Inductor
    # fuses into its own kernels
    assert dora_ops_in(dynamo_graphs) == ["dora_tune.cached_norm"]
    assert dora_ops_in(aot_graphs) == ["dora_tune.cached_norm.default"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_layer_and_compiled(dtype):
    model = Stack(dtype, "cuda")
    x = torch.randn(4, 300, 37, device="cuda").to(dtype)
    dout = torch.randn(4, 300, 19, device="cuda").to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    want = model(x)
    gw = torch.autograd.grad(want, params, dout)
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x)
    gg = torch.autograd.grad(got, params, dout)
    assert relerr(got, want) <= TOL[dtype]
    assert max(relerr(a, b) for a, b in zip(gg, gw, strict=True)) <= TOL[dtype]
    # a single layer against float64
    layer = make_layer(130, 70, 8, dtype, device="cuda")
    xs = torch.randn(3, 50, 130, device="cuda").to(dtype)
    ds = torch.randn(3, 50, 70, device="cuda").to(dtype)
    out, got_g = grads(layer, xs, ds)
    ref, leaves = reference(layer, xs)
    want_g = torch.autograd.grad(ref, leaves, ds.double())
    assert max([relerr(out, ref)] + [relerr(a, b) for a, b in zip(got_g, want_g, strict=True)]) <= TOL[dtype]
    assert HAS_CUDA


@pytest.mark.gpu
def test_cuda_graphs_replay_matches_eager():
    """torch.compile(mode="reduce-overhead") captures the DoRA custom ops into CUDA graphs (no skip) and its
    replays follow new inputs and in-place parameter updates (an optimizer step) like the eager model."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    dtype = torch.bfloat16
    model = Stack(dtype, "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, mode="reduce-overhead")
    for step in range(4):
        x = torch.randn(4, 300, 37, device="cuda").to(dtype)
        dout = torch.randn(4, 300, 19, device="cuda").to(dtype)
        want = model(x)
        gw = torch.autograd.grad(want, params, dout)
        got = compiled(x)
        gg = torch.autograd.grad(got, params, dout)
        assert relerr(got, want) <= TOL[dtype], step
        assert max(relerr(a, b) for a, b in zip(gg, gw, strict=True)) <= TOL[dtype], step
        with torch.no_grad():  # an optimizer step: in place, so the graphs' static parameters see it
            for p, g in zip(params, gw, strict=True):
                p.add_(g, alpha=-1e-2)
    assert counters["inductor"]["cudagraph_skips"] == 0
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_both_paths_and_the_path_race(dtype):
    """On CUDA a training layer runs either the torch ops or the one-node Triton path, whichever its first call's
    race kept: both match float64 (forced), and the race records its choice and both wall times."""
    from dora_tune.dispatch import default_dispatcher, force

    layer = make_layer(130, 70, 8, dtype, device="cuda", seed=4)
    x = torch.randn(3, 50, 130, device="cuda").to(dtype)
    dout = torch.randn(3, 50, 70, device="cuda").to(dtype)
    ref, leaves = reference(layer, x)
    want = torch.autograd.grad(ref, leaves, dout.double())
    for path in ("eager", "triton", None):
        with force(path) if path else contextlib.nullcontext():
            out, got = grads(layer, x, dout)
        errs = [relerr(out, ref)] + [relerr(a, b) for a, b in zip(got, want, strict=True)]
        assert max(errs) <= TOL[dtype], (path, errs)
    notes = [v for k, v in default_dispatcher().path_notes().items() if k[0] == "dora_layer" and k[2] == 70]
    assert notes and "raced at first use" in notes[0] and "eager" in notes[0] and "triton" in notes[0]


def test_old_module_path_still_works_with_a_deprecation_warning():
    """dora_tune.dispatch.layer moved to dora_tune.nn.layer: the old path gives the same objects, and says so."""
    import importlib

    old = importlib.import_module("dora_tune.dispatch.layer")
    with pytest.warns(DeprecationWarning, match=r"moved to dora_tune\.nn\.layer\.DoRALinear"):
        assert old.DoRALinear is DoRALinear
    with pytest.warns(DeprecationWarning):
        assert old.NormCache is layer_mod.NormCache
    with pytest.raises(AttributeError):
        old.NoSuchThing  # noqa: B018
    from dora_tune.nn import DoRALinear as from_package

    assert from_package is DoRALinear is dora_tune.DoRALinear
