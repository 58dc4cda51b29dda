"""Property-based tests (hypothesis) of every public op, on the CPU (``impl="auto"``: the torch implementations).

Valid inputs — random sizes (rows 1, columns that are no power of two, 3-D inputs), dtypes and scales, values from
a seeded normal (never zeros) — must match the float64 reference within the dtype's rounding; invalid inputs — one
argument broken at a time: a wrong type, dtype, rank, shape or device, a non-finite scale, an unknown option —
must raise ``TypeError`` or ``ValueError`` naming that argument. 800 valid and 250 invalid examples of each of the
six ops (``factored_norm``, ``compose``, ``compose_train``, ``dora_scale``, ``dora_compose_train``, ``dora_layer``):
6 300 calls, ~15 s (the Triton kernels' own tests check them against the same references under the interpreter
and on the GPU)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dora_tune.kernels import (
    compose,
    compose_reference,
    compose_train,
    dora_compose_train,
    dora_layer,
    dora_layer_reference,
    dora_scale,
    factored_norm,
    norm_reference,
)

from conftest import relerr

# derandomized: CI sees the same examples every run (a failure is reproducible, never a flake); explored with 14
# random seeds when written (all passing)
COMMON = {"deadline": None, "derandomize": True, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
VALID = settings(max_examples=800, **COMMON)
INVALID = settings(max_examples=250, **COMMON)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}

dims = st.integers(min_value=1, max_value=24)
scales = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False).filter(lambda s: abs(s) > 1e-3)
leads = st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=2)  # [rows] or [batch, seq]


def randn(gen, shape, dtype, positive=False):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return (t.abs() + 0.1 if positive else t).to(dtype)


@st.composite
def compose_inputs(draw):
    dtype, lead, cols = draw(st.sampled_from(DTYPES)), draw(leads), draw(dims)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    lora, base = randn(gen, [*lead, cols], dtype), randn(gen, [*lead, cols], dtype)
    g = randn(gen, [cols], torch.float32, positive=True)
    return lora, base, g, draw(scales)


@st.composite
def norm_inputs(draw):
    dtype, d_out, d_in, r = draw(st.sampled_from(DTYPES)), draw(dims), draw(dims), draw(dims)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return randn(gen, [d_out, d_in], dtype), randn(gen, [r, d_in], dtype), randn(gen, [d_out, r], dtype), draw(scales)


@st.composite
def layer_inputs(draw):
    dtype, lead, d_out, d_in, r = draw(st.sampled_from(DTYPES)), draw(leads), draw(dims), draw(dims), draw(dims)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x, W = randn(gen, [*lead, d_in], dtype), randn(gen, [d_out, d_in], dtype)
    A, B = randn(gen, [r, d_in], dtype), randn(gen, [d_out, r], dtype)
    m, n = randn(gen, [d_out], dtype, positive=True), randn(gen, [d_out], torch.float32, positive=True)
    bias = randn(gen, [d_out], dtype) if draw(st.booleans()) else None
    base_result = None
    if draw(st.booleans()):
        base_result = (x.double() @ W.double().t() + (bias.double() if bias is not None else 0)).to(dtype)
    return x, W, A, B, m, n, draw(scales), bias, base_result, draw(st.sampled_from(["delta", "full"]))


# ------------------------------------------------------------------------------------------------ valid inputs


def compose_err(out, lora, base, g, s):
    """‖out − reference‖ over the size of the terms of ``g·base − base + g·s·lora``: the result can be tiny where
    they cancel (g ≈ 1), and no dtype rounds a cancelling sum — or ``g`` itself — better than its terms."""
    want = compose_reference(lora, base, g, s)
    g64 = g.reshape(-1).double().abs()
    terms = (g64 + 1) * base.double().abs() + g64 * abs(s) * lora.double().abs()
    return ((out.double() - want).norm() / max(terms.norm().item(), 1e-30)).item()


@VALID
@given(norm_inputs())
def test_factored_norm_matches_float64(args):
    W, A, B, s = args
    out = factored_norm(W, A, B, s)
    assert out.dtype == torch.float32 and out.shape == (W.shape[0],)
    # n² = ‖W‖² + 2s⟨W, BA⟩ + s²‖BA‖² (and BA's own sums) cancel: measure n² against its terms' size, per row
    ref = norm_reference(W, A, B, s)
    terms = (W.double().norm(dim=1) + abs(s) * (B.double().abs() @ A.double().abs()).norm(dim=1)) ** 2
    err = ((out.double() ** 2 - ref**2).abs() / terms.clamp_min(1e-30)).max().item()
    assert err <= 1e-5, err


@pytest.mark.parametrize("fn", [compose, compose_train])
@VALID
@given(args=compose_inputs())
def test_compose_and_compose_train_match_float64(fn, args):
    lora, base, g, s = args
    out = fn(lora, base, g, s)
    assert out.shape == base.shape and out.dtype == base.dtype
    assert compose_err(out, lora, base, g, s) <= TOL[base.dtype]


def scale_pair(g, dtype, zero_row):
    """``(m, n, g = m/n in float64)`` with the zero-norm policy (g = 1 where n = 0) on the first row if asked."""
    m = g.to(dtype)
    n = torch.linspace(0.5, 2.0, g.numel())
    if zero_row:
        n[0] = 0.0
    return m, n, torch.where(n > 0, m.double() / torch.where(n > 0, n, 1).double(), 1.0)


@VALID
@given(compose_inputs(), st.booleans())
def test_dora_scale_matches_float64(args, zero_row):
    m, n, want_g = scale_pair(args[2], args[1].dtype, zero_row)
    got = dora_scale(m, n)
    assert got.dtype == torch.float32 and relerr(got, want_g) <= 1e-6


@VALID
@given(compose_inputs(), st.booleans())
def test_dora_compose_train_matches_float64(args, zero_row):
    lora, base, g, s = args
    m, n, want_g = scale_pair(g, base.dtype, zero_row)
    out = dora_compose_train(lora, base, m, n, s)
    assert compose_err(out, lora, base, want_g, s) <= TOL[base.dtype]


@VALID
@given(layer_inputs())
def test_dora_layer_matches_float64(args):
    x, W, A, B, m, n, s, bias, base_result, output = args
    out = dora_layer(x, W, A, B, m, n, s, bias=bias, base_result=base_result, output=output)
    want = dora_layer_reference(x, W, A, B, m, n, s, bias=bias, base_result=base_result, output=output)
    assert out.shape == want.shape
    # the GEMMs' sums and (g − 1)·base cancel: measure against the size of every term, as compose_err does
    X, g = x.double().abs(), (m.double() / n.double()).abs()
    base = base_result.double().abs() if base_result is not None else X @ W.double().abs().t()
    lora = (X @ A.double().abs().t()) @ B.double().abs().t() * abs(s)
    terms = (g + 1) * base + g * lora + (bias.double().abs() if bias is not None else 0)
    err = ((out.double() - want).norm() / max(terms.norm().item(), 1e-30)).item()
    assert math.isfinite(err) and err <= TOL[x.dtype], err


# ------------------------------------------------------------------------------------------------ invalid inputs


def breakages(t, name):
    """Ways to break tensor argument ``name``: (replacement, what the error must name)."""
    return [
        (t.tolist(), name),  # not a tensor
        (t.to(torch.int64), name),  # not a float dtype
        (torch.ones(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype), name),  # a size that does not fit
        (t.to(torch.float64) if t.dtype != torch.float64 else t.float(), None),  # float64 (kept or refused)
    ]


def assert_refused(fn, broken_name):
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    if broken_name is not None:
        assert broken_name in str(info.value), (broken_name, str(info.value))


def check_broken(fn, args, names, which, how):
    """Break argument ``which`` of ``args`` (named ``names``) the ``how``-th way and check the refusal."""
    args = list(args)
    name = names[which]
    if name == "scale":
        args[which] = [float("nan"), float("inf"), "2.0", torch.tensor([1.0, 2.0])][how % 4]
        assert_refused(lambda: fn(*args), "scale")
        return
    ways = breakages(args[which], name)
    args[which], expect = ways[how % len(ways)]
    if expect is None:  # float64 is not a supported dtype: refused with its name, or (norm) computed exactly
        try:
            fn(*args)
        except (TypeError, ValueError) as e:
            assert name in str(e) or "dtype" in str(e)
        return
    assert_refused(lambda: fn(*args), expect)


@INVALID
@given(norm_inputs(), st.integers(0, 3), st.integers(0, 3))
def test_factored_norm_refuses_bad_arguments(args, which, how):
    check_broken(factored_norm, args, ["weight", "lora_A", "lora_B", "scale"], which, how)


@pytest.mark.parametrize("fn", [compose, compose_train])
@INVALID
@given(args=compose_inputs(), which=st.integers(0, 3), how=st.integers(0, 3))
def test_compose_refuses_bad_arguments(fn, args, which, how):
    check_broken(fn, args, ["lora", "base", "g", "scale"], which, how)


@INVALID
@given(compose_inputs(), st.integers(0, 4), st.integers(0, 3))
def test_dora_compose_train_refuses_bad_arguments(args, which, how):
    lora, base, g, s = args
    full = (lora, base, g.to(base.dtype), torch.linspace(0.5, 2.0, g.numel()), s)
    check_broken(dora_compose_train, full, ["lora", "base", "magnitude", "norm", "scale"], which, how)


@INVALID
@given(layer_inputs(), st.integers(0, 6), st.integers(0, 3))
def test_dora_layer_refuses_bad_arguments(args, which, how):
    x, W, A, B, m, n, s, bias, base_result, _ = args
    names = ["x", "weight", "lora_A", "lora_B", "magnitude", "norm", "scale"]
    check_broken(
        lambda *a: dora_layer(*a, bias=bias, base_result=base_result), (x, W, A, B, m, n, s), names, which, how
    )


@INVALID
@given(compose_inputs(), st.integers(0, 1), st.integers(0, 3))
def test_dora_scale_refuses_bad_arguments(args, which, how):
    m, n, _ = scale_pair(args[2], args[1].dtype, False)
    check_broken(dora_scale, (m, n), ["magnitude", "norm"], which, how)


@INVALID
@given(compose_inputs())
def test_unknown_options_are_refused_by_name(args):
    lora, base, g, s = args
    assert_refused(lambda: compose(lora, base, g, s, impl="fast"), "impl")
    assert_refused(lambda: compose_train(lora, base, g, s, impl="cuda"), "impl")
    assert_refused(lambda: dora_scale(g, g[:-1] if g.numel() > 1 else g.reshape(1, 1)), "norm")
