import copy
import importlib
import inspect
import math
import sys
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.tuners.lora.dora import DoraLinearLayer  # noqa: E402
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402

from dora_tune.integrations import peft as dp  # noqa: E402

from conftest import relerr  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 2
N_DORA = len(TARGETS) * N_LAYERS


def tiny_llama(dropout=0.0, dtype=torch.float32, device="cpu", seed=0, **peft_kwargs):
    """A 2-layer Llama (hidden 64, vocab 128, random weights, biased projections) with DoRA on every projection;
    lora_B and the magnitude perturbed (PEFT starts B at zero, where DoRA is the identity)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=True,
    )
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, target_modules=TARGETS)
    pm = peft.get_peft_model(model, config, **peft_kwargs)
    perturb(pm)
    return pm


@torch.no_grad()
def perturb(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen).to(p.device))
        elif name.endswith("base_layer.bias"):  # transformers initialises biases to zero
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def logits_of(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def run(model, ids, *, seed=0, grad=True):
    """Logits and every trainable parameter's gradient of a fixed random projection of the logits."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    if not grad:
        with torch.no_grad():
            return logits_of(model(input_ids=ids)).float(), {}
    logits = logits_of(model(input_ids=ids))
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7)).to(logits.device)
    (logits.float() * w).sum().backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad.detach().float().clone()  # a compiled module's names
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return logits.detach().float(), grads


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    dp.disable()
    monkeypatch.setattr(dp, "_SAID", set())
    yield
    dp.disable()


@pytest.fixture
def calls(monkeypatch):
    """Counts of dora-tune's kernels called by the integration: the norm, and the one-node layer with autograd
    recording ("compose_train") or without ("compose")."""
    from dora_tune.nn import layer

    counts = {"factored_norm": 0, "compose_train": 0, "compose": 0}
    for name in ("factored_norm", "run_norm"):  # the norm caches (layer.NormCache): in full, or by a known plan
        real_norm = getattr(layer, name)

        def norm(*a, _real=real_norm, **k):
            counts["factored_norm"] += 1
            return _real(*a, **k)

        monkeypatch.setattr(layer, name, norm)
    real_node = dp.dora_layer_unchecked

    def node(*a, **k):
        counts["compose_train" if torch.is_grad_enabled() else "compose"] += 1
        return real_node(*a, **k)

    monkeypatch.setattr(dp, "dora_layer_unchecked", node)
    return counts


def assert_close(got, want, tol):
    (yg, gg), (yw, gw) = got, want
    assert relerr(yg, yw) <= tol
    assert sorted(gg) == sorted(gw)
    errs = {n: relerr(gg[n], gw[n]) for n in gw}
    worst = max(errs, key=errs.get) if errs else None
    assert not errs or errs[worst] <= tol, (worst, errs[worst])


def grad_kinds(grads):
    return {k for n in grads for k in ("lora_A", "lora_B", "lora_magnitude_vector") if k in n}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_logits_and_adapter_grads_match_peft(dropout, mode, ids, calls):
    pm = tiny_llama(dropout)
    pm.train(mode == "train")
    want = run(pm, ids)
    if mode == "train" and dropout > 0:  # PEFT's own path is deterministic under the seed
        assert torch.equal(run(pm, ids)[0], want[0])
    assert len(want[1]) == 3 * N_DORA and grad_kinds(want[1]) == {"lora_A", "lora_B", "lora_magnitude_vector"}
    handle = dp.enable(pm)
    assert handle.layers == N_DORA
    got = run(pm, ids)
    assert calls["compose_train"] == N_DORA and calls["factored_norm"] == N_DORA
    assert_close(got, want, 1e-5)
    if mode == "train" and dropout > 0:  # dropout really acted: eval differs
        pm.eval()
        assert relerr(run(pm, ids)[0], want[0]) > 1e-3


def test_no_grad_eval_runs_the_node_and_caches_the_norm(ids, calls):
    pm = tiny_llama(0.1).eval()
    want = run(pm, ids, grad=False)[0]
    dp.enable(pm)
    got = run(pm, ids, grad=False)[0]
    assert calls["compose"] == N_DORA and calls["compose_train"] == 0 and calls["factored_norm"] == N_DORA
    assert relerr(got, want) <= 1e-5
    assert torch.equal(run(pm, ids, grad=False)[0], got) and calls["factored_norm"] == N_DORA  # cached
    # an in-place change of an adapter invalidates that layer's norm only, and the result follows it
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(3)
    got2 = run(pm, ids, grad=False)[0]
    assert calls["factored_norm"] == N_DORA + 1
    dp.disable()
    assert relerr(got2, run(pm, ids, grad=False)[0]) <= 1e-5
    # training caches too (the norm is a constant between optimizer steps); disable() dropped the caches
    dp.enable(pm)
    pm.train()
    run(pm, ids), run(pm, ids)
    assert calls["factored_norm"] == 2 * N_DORA + 1


def test_disable_restores_peft_exactly(ids, calls):
    subclasses = dp._subclasses(DoraLinearLayer)
    originals = {c: c.__dict__.get("forward") for c in [DoraLinearLayer, LoraLinear, *subclasses]}
    pm = tiny_llama(0.1)
    want = run(pm, ids)
    for how in ("model", "global"):
        dp.enable(pm if how == "model" else None)
        got = run(pm, ids)
        assert_close(got, want, 1e-5)
        assert not torch.equal(got[0], want[0])  # a different computation ...
        dp.disable()
        again = run(pm, ids)  # ... and PEFT's own after disable, bit for bit
        assert torch.equal(again[0], want[0])
        assert all(torch.equal(again[1][n], want[1][n]) for n in want[1])
        assert {c: c.__dict__.get("forward") for c in originals} == originals
        assert not [m for m in pm.modules() if any(k.startswith("_dora_tune") for k in vars(m))]
        assert not dp.is_enabled()
    assert calls["compose_train"] == 2 * N_DORA
    dp.disable()  # a no-op when nothing is enabled


def test_enable_model_is_scoped_and_global_covers_new_models(ids, calls):
    pm_a, pm_b = tiny_llama(seed=0), tiny_llama(seed=1)
    dp.enable(pm_a)
    run(pm_b, ids)
    assert calls["compose_train"] == 0
    run(pm_a, ids)
    assert calls["compose_train"] == N_DORA
    layer = pm_a.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"]
    assert dp.is_enabled(layer) and not dp.is_enabled()
    dp.disable()
    dp.enable()
    pm_c = tiny_llama(seed=2)  # created after the global switch
    want = copy.deepcopy(pm_c)
    assert dp.is_enabled(pm_c.base_model.model.model.layers[1].mlp.down_proj.lora_magnitude_vector["default"])
    got = run(pm_c, ids)
    assert calls["compose_train"] == 2 * N_DORA
    dp.disable()
    assert_close(got, run(want, ids), 1e-5)


@pytest.fixture
def peft_linear_calls(monkeypatch):
    """How many LoRA Linear calls went to PEFT's own ``Linear.forward`` (not the one-call route): a counting
    wrapper stands in for PEFT's method before dora-tune patches it (and is what disable() puts back)."""
    seen = []
    real = LoraLinear.forward

    def forward(self, *a, **k):
        seen.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(LoraLinear, "forward", forward)
    return seen


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_one_call_route_where_no_dropout_acts(dropout, mode, ids, calls, peft_linear_calls):
    """With no dropout acting (eval, or lora_dropout 0) an enabled layer is one DoRA layer call for the whole LoRA
    Linear (the full output, base included); with dropout in training PEFT's forward keeps its place (its
    semantics: the delta on the dropped-out input). Values and gradients match PEFT's either way."""
    pm = tiny_llama(dropout)
    pm.train(mode == "train")
    want = run(pm, ids)
    del peft_linear_calls[:]
    dp.enable(pm)
    got = run(pm, ids)
    routed = not (mode == "train" and dropout > 0)
    assert len(peft_linear_calls) == (0 if routed else N_DORA)
    assert calls["compose_train"] == N_DORA
    assert_close(got, want, 1e-5)


def test_one_call_route_with_float32_adapters_on_a_bf16_model(ids, calls, peft_linear_calls):
    """PEFT's default upcasts the adapters to float32 on a bf16 model: the whole call is still one DoRA layer call
    (the LoRA branch on the input cast to float32, the output cast back to bf16, as PEFT does), and values and
    gradients match PEFT's within bf16 rounding."""
    pm = tiny_llama(0.0, dtype=torch.bfloat16)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.dtype == torch.float32 and q.base_layer.weight.dtype == torch.bfloat16
    exact = run(copy.deepcopy(pm).float(), ids)  # the same model in float32: what both approximate
    want = run(pm, ids)
    del peft_linear_calls[:]
    dp.enable(pm)
    got = run(pm, ids)
    assert len(peft_linear_calls) == 0 and calls["compose_train"] == N_DORA

    def worst(r):  # the largest relative error of the logits and of any gradient against the float32 model
        return max(relerr(r[0], exact[0]), *(relerr(r[1][n], exact[1][n]) for n in exact[1]))

    # bf16 rounding through a random 2-layer model moves small gradients by several % (PEFT's own: ~6 %)
    assert sorted(got[1]) == sorted(exact[1]) and worst(got) <= 1.5 * worst(want) + 1e-3


def test_one_call_route_keeps_hooks_adapter_switches_and_lora_only(ids, calls, peft_linear_calls):
    """Anything the direct computation would skip or change sends the call to PEFT's forward: a hook on the base
    layer (which then fires), disabled or merged adapters, dropout_mode="lora_only", autocast, an input of another
    dtype."""
    pm = tiny_llama(0.0).eval()
    with pm.disable_adapter():
        base_out = run(pm, ids, grad=False)[0]
    del peft_linear_calls[:]
    dp.enable(pm)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    fired = []
    handle = q.base_layer.register_forward_hook(lambda *a: fired.append(1))
    run(pm, ids, grad=False)
    handle.remove()
    assert fired == [1] and len(peft_linear_calls) == 1  # that layer only
    with pm.disable_adapter():
        plain = run(pm, ids, grad=False)[0]
    assert len(peft_linear_calls) == 1 + N_DORA and torch.equal(plain, base_out)  # the base model's output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(pm, ids, grad=False)
    assert len(peft_linear_calls) == 1 + 2 * N_DORA
    x = torch.randn(3, q.in_features, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # PEFT's own error for a float64 input on float32 weights
        q(x)
    assert len(peft_linear_calls) == 2 + 2 * N_DORA
    dp.disable()
    pm = tiny_llama(0.1).train()
    want = run(pm, ids)
    dp.enable(pm, dropout_mode="lora_only")
    del peft_linear_calls[:]
    run(pm, ids)
    assert len(peft_linear_calls) == N_DORA
    pm.merge_adapter()
    pm.eval()
    merged = run(pm, ids, grad=False)[0]
    assert len(peft_linear_calls) == 2 * N_DORA
    pm.unmerge_adapter()
    dp.disable()
    assert relerr(merged, run(pm, ids, grad=False)[0]) <= 1e-5 and relerr(merged, want[0]) > 0


def test_context_manager(ids, calls):
    pm = tiny_llama()
    with dp.enable(pm) as handle:
        run(pm, ids)
        assert "14 layers" in repr(handle)
    assert calls["compose_train"] == N_DORA
    assert DoraLinearLayer.__dict__["forward"] is not dp._dora_forward
    run(pm, ids)
    assert calls["compose_train"] == N_DORA


class Mixed(nn.Module):
    """An embedding, a Linear and a GPT-2 style Conv1D (fan_in_fan_out weights)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 24)
        self.c1d = Conv1D(24, 16)
        self.head = nn.Linear(24, 8)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return self.head(self.lin(h) + self.c1d(h))


def mixed_model(**config):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note on Conv1D and fan_in_fan_out
        pm = peft.get_peft_model(Mixed(), peft.LoraConfig(r=4, use_dora=True, **config))
    perturb(pm)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_embedding_B" in name:
                p.normal_(0, 0.05)
    return pm


def messages(record):
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("how", ["model", "global"])
def test_unsupported_layers_keep_peft_path_and_say_so_once(how, calls):
    pm = mixed_model(target_modules=["emb", "lin", "c1d"])
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    want = run(pm, ids)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        dp.enable(pm if how == "model" else None)
        got = run(pm, ids)
    said = messages(rec)
    assert any("DoraEmbeddingLayer keep PEFT's own path" in m for m in said), said
    assert any("fan_in_fan_out" in m for m in said), said
    assert len(said) == 2
    assert calls["compose_train"] == 1  # only `lin`
    assert_close(got, want, 1e-5)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        run(pm, ids)
    assert messages(rec) == []


def test_biased_lora_B_keeps_peft_path(calls):
    """PEFT refuses lora_bias=True with DoRA; a lora_B with a bias put there by hand keeps PEFT's path too."""
    pm = mixed_model(target_modules=["lin"])
    lin = pm.base_model.model.lin
    biased = nn.Linear(4, 24, bias=True)
    with torch.no_grad():
        biased.weight.copy_(lin.lora_B["default"].weight)
        biased.bias.normal_()
    lin.lora_B["default"] = biased
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    want = run(pm, ids)
    dp.enable(pm)
    with pytest.warns(RuntimeWarning, match="lora_bias"):
        got = run(pm, ids)
    assert calls["compose_train"] == 0
    assert torch.equal(got[0], want[0])


def test_eligibility_is_checked_once_until_the_call_changes(calls, monkeypatch):
    """The per-call checks run once per layer and call site and again only when something they look at changes
    (here a bias put on lora_B in place, then taken off; an input dtype dora-tune does not take). Two call sites:
    the LoRA Linear's one-call route, and — when that route is refused — the DoRA layer's own call."""
    pm = mixed_model(target_modules=["lin"])
    lin = pm.base_model.model.lin
    checks = []
    real = dp._why_not
    monkeypatch.setattr(dp, "_why_not", lambda *a: checks.append(1) or real(*a))
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    dp.enable(pm)
    for _ in range(3):
        run(pm, ids)
    assert len(checks) == 1 and calls["compose_train"] == 3
    lin.lora_B["default"].bias = nn.Parameter(torch.ones(24))  # in place: same module, one more parameter
    with pytest.warns(RuntimeWarning, match="lora_bias"):
        run(pm, ids)
    run(pm, ids)
    assert len(checks) == 3 and calls["compose_train"] == 3  # the route refused, then the DoRA layer's call too
    lin.lora_B["default"].bias = None
    run(pm, ids)
    assert len(checks) == 4 and calls["compose_train"] == 4  # the route again: one call
    layer = lin.lora_magnitude_vector["default"]
    kwargs = {
        "lora_A": lin.lora_A["default"],
        "lora_B": lin.lora_B["default"],
        "scaling": 0.5,
        "base_layer": lin.base_layer,
    }
    x = torch.randn(2, 16)
    assert dp._checked_why_not(layer, x, kwargs) is None
    assert "plain float tensor" in dp._checked_why_not(layer, x.double(), kwargs)
    assert "scaling" in dp._checked_why_not(layer, x, {**kwargs, "scaling": torch.tensor([0.5, 1.0])})
    dp.disable()
    assert dp._VERDICT not in layer.__dict__


def test_zero_norm_rows_stay_finite(calls):
    pm = mixed_model(target_modules=["lin"])
    lin = pm.base_model.model.lin
    with torch.no_grad():
        lin.base_layer.weight[3].zero_()
        lin.lora_B["default"].weight[3].zero_()
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    peft_out = run(pm, ids, grad=False)[0]
    dp.enable(pm)
    ours, grads = run(pm, ids)
    assert not torch.isfinite(peft_out).all()  # PEFT: 0 / 0 in g
    assert torch.isfinite(ours).all() and all(torch.isfinite(g).all() for g in grads.values())


def test_compiled_peft_model_has_no_graph_break():
    """torch.compile(fullgraph=True) of a PEFT model with dora-tune on (training, dropout): no graph break, the norm
    one node (its cache), the composition torch ops for Inductor, and the result is PEFT's."""
    pm = mixed_model(target_modules=["lin"], lora_dropout=0.1).train()
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    want = run(pm, ids)
    dp.enable(pm)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    from dora_tune.dispatch import runtime

    norms = runtime.default_dispatcher().norms
    norms.clear()
    n_dora = sum(isinstance(m, DoraLinearLayer) for m in pm.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AOTAutograd's note on boxed calling conventions
        compiled = torch.compile(pm, backend=backend, fullgraph=True)
        got = run(compiled, ids)
        assert n_dora and norms.computed >= n_dora and len(norms) == n_dora
        computed = norms.computed
        assert_close(run(compiled, ids), want, 1e-5)  # the norm once while nothing changed
        assert norms.computed == computed
        with torch.no_grad():  # an update of every B: each norm again
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.mul_(1.5)
        run(compiled, ids)
        assert norms.computed == computed + n_dora
    assert_close(got, want, 1e-5)
    ops = {str(n.target) for gm in graphs for n in gm.graph.nodes if "dora_tune" in str(n.target)}
    assert ops == {"dora_tune.cached_norm"}


def test_enable_and_disable_drop_code_compiled_on_the_other_path(monkeypatch):
    """A model compiled before enable() must not go on running PEFT's compiled DoRA (torch 2.11 reused it: no guard
    on the patched class method), nor one compiled while enabled go on running dora-tune's after disable()."""
    resets = []
    real_reset = torch.compiler.reset
    monkeypatch.setattr(torch.compiler, "reset", lambda: (resets.append(1), real_reset()))
    pm = mixed_model(target_modules=["lin"]).train()
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    def dora_tune_ops():
        return {str(n.target) for gm in graphs for n in gm.graph.nodes if "dora_tune" in str(n.target)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AOTAutograd's note on boxed calling conventions, PEFT's graph breaks
        compiled = torch.compile(pm, backend=backend)
        want = run(compiled, ids)
        assert graphs and not dora_tune_ops()
        dp.enable(pm)
        assert resets, "enable() kept the code compiled on PEFT's path"
        graphs.clear()
        got = run(compiled, ids)
        assert dora_tune_ops() == {"dora_tune.cached_norm"}
        assert_close(got, want, 1e-5)
        dp.disable()
        assert len(resets) == 2
        graphs.clear()
        run(compiled, ids)
        assert graphs and not dora_tune_ops()
    dp.disable()  # nothing enabled: nothing to drop
    assert len(resets) == 2


def test_refuses_an_unknown_peft_api(monkeypatch):
    def forward(self, x, *, lora_A, lora_B):  # no scaling, no base_layer
        raise AssertionError

    monkeypatch.setattr(DoraLinearLayer, "forward", forward)
    with pytest.raises(RuntimeError, match=r"peft .* lacks \['scaling', 'base_layer'\]"):
        dp.enable()
    assert DoraLinearLayer.forward is forward


def test_enable_without_dora_layers_warns():
    with pytest.warns(RuntimeWarning, match="no PEFT DoRA Linear layer"):
        assert dp.enable(nn.Linear(3, 3)).layers == 0
    with pytest.raises(TypeError, match=r"nn\.Module"):
        dp.enable("model")


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "dora_tune.integrations.peft")
    with pytest.raises(ImportError, match=r"pip install 'dora-tune\[peft\]'"):
        importlib.import_module("dora_tune.integrations.peft")


# ----------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("adapter_fp32", [False, True])
def test_cuda_bf16_parity(adapter_fp32):
    """bf16 on the GPU: dora-tune is about as close to a float64 PEFT run as PEFT's own bf16 path — logits, and the
    adapter gradients taken together (geometric mean of the per-tensor errors) — and no single gradient is grossly
    off. bf16 adapters, or float32 ones (PEFT's autocast_adapter_dtype).

    Why not a per-tensor ratio: in bf16 a different but equally exact rounding path moves single q/k gradients of
    this tiny model (attention amplifies it) by several times PEFT's own error — on the H200 one lora_A measured
    0.11 vs PEFT's 0.02 — while the geometric mean matches; a CPU emulation of the fused kernels' rounding (fp32
    math, one rounding per output) shows the same 2.5–2.8× on the same tensors over three seeds.
    """
    if "autocast_adapter_dtype" not in inspect.signature(peft.get_peft_model).parameters:
        pytest.skip("this PEFT has no autocast_adapter_dtype")
    kw = {"autocast_adapter_dtype": adapter_fp32}
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(3)).cuda()
    ref = run(tiny_llama(0.0, torch.float64, "cuda", **kw).train(), ids)
    pm = tiny_llama(0.0, torch.bfloat16, "cuda", **kw).train()
    lora_dtype = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype
    assert lora_dtype == (torch.float32 if adapter_fp32 else torch.bfloat16)
    peft_bf16 = run(pm, ids)
    dp.enable(pm)
    ours = run(pm, ids)
    assert relerr(ours[0], ref[0]) <= 2 * relerr(peft_bf16[0], ref[0]) + 2e-3
    errs = {n: (relerr(ours[1][n], ref[1][n]), relerr(peft_bf16[1][n], ref[1][n])) for n in ref[1]}
    geo = [math.exp(sum(math.log(e[k]) for e in errs.values()) / len(errs)) for k in (0, 1)]
    assert geo[0] <= 1.25 * geo[1], geo
    for n, (e_ours, e_peft) in errs.items():  # a wrong formula gives errors of order 1
        assert e_ours <= max(6 * e_peft, 0.15), (n, e_ours, e_peft)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_fp32_parity_with_dropout(mode, calls):
    """float32 on the GPU (the Triton norm and compose), dropout 0.1: train mode under one seed, eval mode without
    grad (compose); logits and adapter gradients match PEFT's."""
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(3)).cuda()
    pm = tiny_llama(0.1, torch.float32, "cuda").train(mode == "train")
    want = run(pm, ids, grad=mode == "train")
    dp.enable(pm)
    got = run(pm, ids, grad=mode == "train")
    assert calls["compose_train" if mode == "train" else "compose"] == N_DORA
    assert_close(got, want, 1e-4)


class FixedMask(nn.Module):
    """A deterministic stand-in for dropout: multiplies by a fixed 0/2 mask (what dropout(p=0.5) draws)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def test_lora_only_dropout_mode_against_float64_and_restored_by_disable():
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        nn.Sequential(nn.Linear(16, 24)),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, use_dora=True, target_modules=["0"]),
    )
    perturb(pm)
    lin = pm.base_model.model[0]
    x = torch.randn(3, 16)
    mask = (torch.rand(3, 16, generator=torch.Generator().manual_seed(4)) > 0.5).float() * 2
    original = lin.lora_dropout["default"]
    lin.lora_dropout["default"] = FixedMask(mask)
    with pytest.raises(ValueError, match="needs the model"):
        dp.enable(None, dropout_mode="lora_only")
    with pytest.raises(ValueError, match="dropout_mode"):
        dp.enable(pm, dropout_mode="base")
    dp.enable(pm, dropout_mode="lora_only")
    assert isinstance(lin.lora_dropout["default"], nn.Identity)  # out of PEFT's sight
    pm.train()
    got = pm(x)
    W, b = lin.base_layer.weight.double(), lin.base_layer.bias.double()
    A, B = lin.lora_A["default"].weight.double(), lin.lora_B["default"].weight.double()
    m, s = lin.lora_magnitude_vector["default"].weight.double(), lin.scaling["default"]
    g = m / torch.linalg.vector_norm(W + s * B @ A, dim=1)
    want = g * (x.double() @ W.T + s * ((x.double() * mask) @ A.T) @ B.T) + b  # base of x, LoRA of the masked x
    assert relerr(got, want) <= 1e-5
    pm.eval()  # eval: no dropout, PEFT's model
    dp.disable()
    assert isinstance(lin.lora_dropout["default"], FixedMask)  # put back
    want_eval = pm(x)
    dp.enable(pm, dropout_mode="lora_only")
    assert relerr(pm(x), want_eval) <= 1e-5
    dp.disable()
    lin.lora_dropout["default"] = original


def test_a_dtype_move_drops_the_norm_cache(ids, calls):
    pm = tiny_llama().eval()
    dp.enable(pm)
    first = run(pm, ids, grad=False)[0]
    assert calls["factored_norm"] == N_DORA
    pm.to(torch.bfloat16)  # the weights are rounded: a cached norm would be stale
    pm.to(torch.float32)
    got = run(pm, ids, grad=False)[0]
    assert calls["factored_norm"] == 2 * N_DORA and relerr(got, first) > 1e-4
    dp.disable()
    assert relerr(got, run(pm, ids, grad=False)[0]) <= 1e-5
