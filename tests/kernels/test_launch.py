"""The lean launcher (``dora_tune.kernels._launch``): same launches as Triton's, its key, its fallbacks.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), where ``@triton.jit`` gives an
``InterpretedFunction`` and lean launches always fall back; the lean path itself is exercised on CPU through a real
``JITFunction`` whose Triton launch (``JITFunction.run``) is replaced by a fake returning a fake compiled kernel.
"""

import itertools

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.runtime.jit import JITFunction  # noqa: E402

from dora_tune.kernels import _launch  # noqa: E402
from dora_tune.kernels._launch import LEAN_ENV_VAR, lean, lean_supported, specialization_key  # noqa: E402

from conftest import HAS_CUDA  # noqa: E402


def _axpby(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr, ADD_Y: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * alpha
    if ADD_Y:
        r += tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


axpby = triton.jit(_axpby)  # an InterpretedFunction under TRITON_INTERPRET=1, a JITFunction on a GPU run


def _sig(a_ptr, n, scale, flag, opt, BLOCK: tl.constexpr, MODE: tl.constexpr = 2):
    pass  # never compiled: the tests below fake Triton's launch


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    """Each test decides the once-per-process switches afresh (version, env switch, CUDA driver)."""
    monkeypatch.delenv(LEAN_ENV_VAR, raising=False)
    caches = (_launch.lean_supported, _launch.lean_enabled, _launch._cuda_launch_env)
    for f in caches:
        f.cache_clear()
    yield
    for f in caches:
        f.cache_clear()


class FakeCompiled:
    """Stands for a ``CompiledKernel``: its ``run`` records the launcher calls."""

    def __init__(self, tag):
        self.function = f"function-{tag}"
        self.packed_metadata = ("meta", tag)
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class FakeTriton:
    """Replaces ``JITFunction.run`` (Triton's launch) and the CUDA device/stream getters."""

    def __init__(self, monkeypatch, device=0):
        self.device = device
        self.launches = []  # (args, kwargs, grid) of each launch through Triton
        self.compiled = []  # the FakeCompiled each of them returned
        self.returns_compiled = True
        self.error = None  # raised by the launch through Triton when set
        fake = self

        def run(self, *args, grid, warmup, **kwargs):
            fake.launches.append((args, kwargs, grid))
            if fake.error is not None:
                raise fake.error
            compiled = FakeCompiled(len(fake.compiled))
            fake.compiled.append(compiled)
            return compiled if fake.returns_compiled else object()

        monkeypatch.setattr(JITFunction, "run", run)
        monkeypatch.setattr(_launch, "_cuda_launch_env", lambda: (lambda: self.device, lambda d: 1000 + d))

    @property
    def lean_calls(self):
        return [c for compiled in self.compiled for c in compiled.calls]


@pytest.fixture
def fake(monkeypatch):
    return FakeTriton(monkeypatch)


def sig_kernel():
    return JITFunction(_sig)  # a fresh kernel (lean state is memoised per kernel object)


# ------------------------------------------------------------------------------ 1. same output as Triton's launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lean_output_equals_normal_launch(dtype, triton_device):
    lk = lean(axpby)
    assert lean(axpby) is lk
    base = torch.randn(300, generator=torch.Generator().manual_seed(0)).to(dtype).to(triton_device)
    for n, block, add_y, offset in itertools.product((1, 17, 100), (16, 64), (False, True), (0, 1)):
        x, y = base[offset : offset + n], base[160 + offset : 160 + offset + n]  # offset 1: not 16-byte aligned
        assert (x.data_ptr() % 16 == 0) == (y.data_ptr() % 16 == 0) == (offset == 0)
        grid = (triton.cdiv(n, block),)
        ref = torch.full((n,), float("nan"), dtype=dtype, device=triton_device)
        axpby[grid](x, y, ref, n, 0.5, BLOCK=block, ADD_Y=add_y)
        for _ in range(2):  # a first (learning) launch, then a lean one where lean launches are possible
            out = torch.full((n,), float("nan"), dtype=dtype, device=triton_device)
            lean(axpby)[grid](x, y, out, n, 0.5, BLOCK=block, ADD_Y=add_y)
            assert torch.equal(out, ref), (n, block, add_y, offset)
        expect = x.float() * 0.5 + (y.float() if add_y else 0)
        assert torch.equal(ref, expect.to(dtype)), (n, block, add_y, offset)
    if triton_device == "cpu":
        assert lk._active is False and not lk.entries  # the interpreter: every launch went through Triton


# ----------------------------------------------------------------------------------------------- 2. the key


def key1(value, exact=False):
    return specialization_key((value,), (exact,))


def test_int_keys():
    keys = {v: key1(v) for v in (1, 2, 16, 2**40)}
    assert len(set(keys.values())) == 4
    assert key1(2) == key1(3) == key1(-1) == key1(2**31 - 1)  # i32, not divisible by 16
    assert key1(16) == key1(32) == key1(0) == key1(-16)  # i32, divisible by 16
    assert key1(2**31 - 16) != key1(2**31)  # i32 vs i64
    assert key1(2**40) == key1(2**62) != key1(2**63)  # i64 vs u64
    assert key1(2**40 + 1) != key1(2**40)
    assert key1(True) != key1(1) and key1(True) != key1(False) and key1(1.0) != key1(1)


def test_tensor_keys():
    a = torch.zeros(64, dtype=torch.float32)
    b = torch.ones(8, dtype=torch.float32)
    assert a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
    assert key1(a) == key1(b) == key1(torch.nn.Parameter(b))  # same dtype and alignment: one key
    assert key1(a) != key1(a.half())  # dtype
    assert key1(a) != key1(a[1:]) == key1(a[2:])  # 16-byte alignment
    assert key1(a[4:]) == key1(a)  # 16 bytes in: aligned again


def test_exact_keys_for_constexpr_and_options():
    assert key1(64, True) == key1(64, True) != key1(128, True)
    assert key1(2, True) != key1(3, True)  # a runtime int would share these two
    assert len({key1(v, True) for v in (1, 1.0, True)}) == 3  # equal in Python, different kernels
    assert key1(0.0, True) != key1(-0.0, True)
    assert key1(torch.float16, True) != key1(torch.bfloat16, True)
    assert key1("ieee", True) != key1("tf32", True)
    assert key1(None, True) == key1(None, True)


def test_triton_scalar_dtypes_are_exact_keys():
    """``tl.bfloat16``-style constexprs (e.g. the norm kernel's DOT_DTYPE) key by name; their pointer types do not
    key at all (a launch through Triton)."""
    tl = pytest.importorskip("triton.language")
    assert key1(tl.bfloat16, True) == key1(tl.bfloat16, True) != key1(tl.float16, True)
    assert key1(tl.float32, True) != key1("fp32", True)  # a dtype's name as a string is another constexpr
    assert key1(tl.pointer_type(tl.float32), True) is None
    fast = _launch._compile_key([tl.float32.__class__], [True])
    for v in (tl.float32, tl.bfloat16, tl.float16):
        assert fast((v,)) == key1(v, True)
    assert fast(("x",)) is None


@pytest.mark.parametrize("value", [(1, 2), [1], "s", object(), torch.Size([2]), np.int64(3), np.float32(1)])
def test_unknown_types_have_no_key(value):
    assert key1(value) is None
    assert specialization_key((1, value), (False, False)) is None


@pytest.mark.parametrize("value", [(1,), [1], object(), np.int64(3), torch.zeros(1)])
def test_only_simple_constexpr_values_are_keyed(value):
    assert key1(value, True) is None


SAMPLES = [0, 1, 2, 15, 16, -16, -17, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**40, 2**63 - 1, 2**63, 2**64 - 1]
SAMPLES += [True, False, 0.5, -0.0, None]


def test_key_never_coarser_than_triton():
    """Where two values share a lean key, the installed Triton specialises them alike (ints, tensors, scalars)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    buf = torch.zeros(64, dtype=torch.float32)
    values = [*SAMPLES, buf, buf[1:], buf[4:], buf.half(), buf.half()[1:], buf.double()]
    for a, b in itertools.product(values, repeat=2):
        if key1(a) == key1(b):
            for specialize, align in ((True, True), (True, False), (False, True)):
                ta = native_specialize_impl(BaseBackend, a, False, specialize, align)
                tb = native_specialize_impl(BaseBackend, b, False, specialize, align)
                assert ta == tb, (a, b, ta, tb)


def test_compiled_key_matches_general_key():
    buf = torch.zeros(64)
    values = [*SAMPLES, buf, buf[1:], torch.nn.Parameter(buf), 64, torch.float16, "x"]
    for v, exact in itertools.product(values, (False, True)):
        fast = _launch._compile_key([v.__class__], [exact])
        if fast is None:
            assert key1(v, exact) is None, (v, exact)  # a class the key does not know, either way
            continue
        for w in values:  # same class: the same key; another class or an int past i32: None (general loop)
            got = fast((w,))
            if w.__class__ is v.__class__ and (w.__class__ is not int or exact or -(2**31) <= w < 2**31):
                assert got == key1(w, exact), (v, w, exact)
            else:
                assert got is None, (v, w, exact)
    row = (buf, 7, 0.5, True, None, 64, "x")
    exact = (False,) * 5 + (True, True)
    fast = _launch._compile_key([v.__class__ for v in row], exact)
    assert fast(row) == specialization_key(row, exact) is not None
    assert _launch._compile_key([], []) is not None and _launch._compile_key([], [])(()) == ()


# --------------------------------------------------------------------- 4. the lean path, on a fake compiled kernel


def test_lean_path_reuses_the_compiled_launcher(fake):
    k = sig_kernel()
    t = torch.zeros(32)
    c0 = lean(k)[(3,)](t, 100, 0.5, True, None, BLOCK=64)  # learns: a launch through Triton
    assert c0 is fake.compiled[0] and len(fake.launches) == 1 and fake.launches[0][2] == (3,)
    assert lean(k)[(3,)](t, 200, 0.25, True, None, BLOCK=64) is None  # same key (100, 200: i32, not /16)
    assert lean(k)[(3, 4)](t, 200, 0.25, True, None, BLOCK=64) is None  # the grid is not in the key
    assert len(fake.launches) == 1
    # grid padded to 3 dims, the stream of the current device, the function and metadata of that compilation,
    # no launch metadata nor hooks, then every parameter in signature order: constexprs and defaults included
    tail = (fake.compiled[0].function, ("meta", 0), None, None, None, t, 200, 0.25, True, None, 64, 2)
    assert fake.compiled[0].calls == [(3, 1, 1, 1000, *tail), (3, 4, 1, 1000, *tail)]
    assert fake.compiled[0].calls[0][9] is t

    lean(k)[(3,)](t, 1, 0.25, True, None, BLOCK=64)  # n == 1: Triton specialises on it, so a launch through it
    assert len(fake.launches) == 2
    lean(k)[(5, 6, 7)](t, 1, 0.75, True, None, BLOCK=64)
    head = ("function-1", ("meta", 1), None, None, None)
    assert fake.compiled[1].calls == [(5, 6, 7, 1000, *head, t, 1, 0.75, True, None, 64, 2)]
    for new_spec in (
        dict(args=(t, 16, 0.5, True, None), kwargs=dict(BLOCK=64)),  # divisible by 16
        dict(args=(t, 2**40, 0.5, True, None), kwargs=dict(BLOCK=64)),  # i64
        dict(args=(t[1:], 100, 0.5, True, None), kwargs=dict(BLOCK=64)),  # misaligned pointer
        dict(args=(t.half(), 100, 0.5, True, None), kwargs=dict(BLOCK=64)),  # dtype
        dict(args=(t, 100, 0.5, True, t), kwargs=dict(BLOCK=64)),  # None -> tensor
        dict(args=(t, 100, 0.5, True, None), kwargs=dict(BLOCK=128)),  # constexpr
        dict(args=(t, 100, 0.5, True, None), kwargs=dict(BLOCK=64, MODE=2)),  # the default, given
        dict(args=(t, 100, 0.5, True, None), kwargs=dict(BLOCK=64, num_warps=8)),  # an option
    ):
        before = len(fake.launches)
        lean(k)[(3,)](*new_spec["args"], **new_spec["kwargs"])
        assert len(fake.launches) == before + 1, new_spec
        lean(k)[(3,)](*new_spec["args"], **new_spec["kwargs"])
        assert len(fake.launches) == before + 1, new_spec  # learnt
    fake.device = 1  # another current device: compiled per device
    lean(k)[(3,)](t, 200, 0.25, True, None, BLOCK=64)
    assert len(fake.launches) == 11
    lean(k)[(3,)](t, 200, 0.25, True, None, BLOCK=64)
    assert len(fake.launches) == 11 and fake.compiled[-1].calls[-1][3] == 1001


def test_keyword_arguments_reach_their_signature_positions(fake):
    k = sig_kernel()
    t = torch.zeros(32)
    kwargs = dict(num_warps=4, MODE=3, opt=t, BLOCK=32, scale=1.5, flag=False, n=48)
    lean(k)[(2,)](t, **kwargs)
    lean(k)[(2,)](t, **{**kwargs, "n": 64, "scale": 2.5})
    assert len(fake.launches) == 1
    assert fake.launches[0][0] == (t,) and fake.launches[0][1] == kwargs  # the learning launch: as given
    head = ("function-0", ("meta", 0), None, None, None)
    assert fake.compiled[0].calls == [(2, 1, 1, 1000, *head, t, 64, 2.5, False, t, 32, 3)]


def test_trailing_options_are_dropped(fake):
    k = sig_kernel()
    t = torch.zeros(32)
    for n in (100, 200):
        lean(k)[(2,)](t, n, 0.5, True, None, BLOCK=64, MODE=3, num_warps=4, num_stages=2)
    head = ("function-0", ("meta", 0), None, None, None)
    assert len(fake.launches) == 1 and fake.compiled[0].calls == [
        (2, 1, 1, 1000, *head, t, 200, 0.5, True, None, 64, 3)
    ]


@pytest.mark.parametrize(
    "order, pad, expected",
    [
        ([0, 1, 2], (), ("a", "b", "c")),  # (the identity is no gatherer at all)
        ([0, 1], (), ("a", "b")),  # trailing options dropped
        ([2, 0], (), ("c", "a")),
        ([1], (), ("b",)),
        ([3], ("d",), ("d",)),
        ([0, 3, 4], ("d", "e"), ("a", "d", "e")),
    ],
)
def test_gatherer(order, pad, expected):
    assert _launch._gatherer(order, pad)(("a", "b", "c")) == expected


def test_calls_triton_rejects_still_go_to_triton(fake):
    k = sig_kernel()
    t = torch.zeros(32)
    lean(k)[(1,)](t, 4)  # missing parameters: Triton's error (here the fake accepts it)
    lean(k)[(1,)](t, 4)
    lean(k)[(1,)](t, 4, 0.5, True, None, 64, 2, 99)  # too many positionals
    lean(k)[(1,)](t, 4, 0.5, True, None, 64, 2, 99)
    lean(k)[(1,)](t, 4, 0.5, True, None, 64, n=4)  # n twice
    lean(k)[(1,)](t, 4, 0.5, True, None, 64, n=4)
    assert len(fake.launches) == 6 and not lean(k).entries


def test_triton_errors_propagate_after_one_launch(fake):
    k = sig_kernel()
    t = torch.zeros(32)
    fake.error = TypeError("from triton")
    calls = [
        ((t, 4), {}),  # a missing argument: no plan
        ((t, 4, 0.5, True, None), {"BLOCK": [64]}),  # no key
        ((t.to_sparse(), 4, 0.5, True, None), {"BLOCK": 64}),  # the key raises (data_ptr of a sparse tensor)
        ((t, 4, 0.5, True, None), {"BLOCK": 64}),  # a first launch
    ]
    for args, kwargs in calls:
        before = len(fake.launches)
        with pytest.raises(TypeError, match="from triton"):
            lean(k)[(1,)](*args, **kwargs)
        assert len(fake.launches) == before + 1, (args, kwargs)
    assert not lean(k).entries
    fake.error = None
    lean(k)[(1,)](t, 4, 0.5, True, None, BLOCK=64)
    lean(k)[(1,)](t, 4, 0.5, True, None, BLOCK=64)
    assert len(fake.launches) == 5 and len(fake.lean_calls) == 1


# ------------------------------------------------------------------------------------------------ 3. fallbacks


def launch_three_times(k):
    t = torch.zeros(32)
    for n in (100, 200, 300):
        lean(k)[(3,)](t, n, 0.5, True, None, BLOCK=64)


@pytest.mark.parametrize("version", ["3.5.1", "3.10.0", "4.0.0", "2.3.1", "nightly"])
def test_unknown_triton_version_launches_through_triton(fake, monkeypatch, version):
    monkeypatch.setattr(triton, "__version__", version)
    assert not lean_supported()
    k = sig_kernel()
    launch_three_times(k)
    assert len(fake.launches) == 3 and not fake.lean_calls and not lean(k).entries


@pytest.mark.parametrize("version", ["3.6.0", "3.7.1", "3.8.0+git1234", "3.9.0"])
def test_supported_triton_versions(fake, monkeypatch, version):
    monkeypatch.setattr(triton, "__version__", version)
    assert lean_supported()
    launch_three_times(sig_kernel())
    assert len(fake.launches) == 1 and len(fake.lean_calls) == 2


def test_version_is_decided_once(fake, monkeypatch):
    assert lean_supported()
    monkeypatch.setattr(triton, "__version__", "2.0.0")
    assert lean_supported()  # cached for the process


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_env_switch_off_launches_through_triton(fake, monkeypatch, value):
    monkeypatch.setenv(LEAN_ENV_VAR, value)
    launch_three_times(sig_kernel())
    assert len(fake.launches) == 3 and not fake.lean_calls


def test_env_switch_on_is_the_default(fake, monkeypatch):
    monkeypatch.setenv(LEAN_ENV_VAR, "1")
    launch_three_times(sig_kernel())
    assert len(fake.launches) == 1


@pytest.mark.parametrize("which", ["launch_enter_hook", "launch_exit_hook"])
@pytest.mark.parametrize("how", ["chain", "assign"])
def test_launch_hooks_send_launches_through_triton(fake, monkeypatch, which, how):
    k = sig_kernel()
    launch_three_times(k)
    assert len(fake.launches) == 1  # learnt
    seen = []
    if how == "chain":  # proton and friends add to the HookChain
        monkeypatch.setattr(getattr(triton.knobs.runtime, which), "calls", [seen.append])
    else:  # or assign a callable
        monkeypatch.setattr(triton.knobs.runtime, which, seen.append)
    launch_three_times(k)
    assert len(fake.launches) == 4 and len(fake.lean_calls) == 2


def test_hook_chain_added_and_removed(fake):
    k = sig_kernel()
    chain = triton.knobs.runtime.launch_enter_hook
    hook = lambda metadata: None  # noqa: E731
    chain.add(hook)
    try:
        launch_three_times(k)
        assert len(fake.launches) == 3
    finally:
        chain.remove(hook)
    launch_three_times(k)
    assert len(fake.launches) == 4 and len(fake.lean_calls) == 2


def test_instrumentation_and_pre_run_hooks_send_launches_through_triton(fake, monkeypatch):
    k = sig_kernel()
    launch_three_times(k)
    monkeypatch.setattr(triton.knobs.compilation, "instrumentation_mode", "fpsan")
    launch_three_times(k)
    assert len(fake.launches) == 4
    monkeypatch.setattr(triton.knobs.compilation, "instrumentation_mode", "")
    k.add_pre_run_hook(lambda *a, **kw: None)
    launch_three_times(k)
    assert len(fake.launches) == 7 and len(fake.lean_calls) == 2


def test_debug_knob_is_in_the_key(fake, monkeypatch):
    k = sig_kernel()
    launch_three_times(k)
    monkeypatch.setattr(triton.knobs.runtime, "debug", not triton.knobs.runtime.debug)
    launch_three_times(k)
    assert len(fake.launches) == 2 and len(fake.lean_calls) == 4


def test_unknown_argument_types_and_grids_launch_through_triton(fake):
    np = pytest.importorskip("numpy")
    k = sig_kernel()
    t = torch.zeros(32)
    for _ in range(2):
        lean(k)[(3,)](t, np.int64(100), 0.5, True, None, BLOCK=64)  # a numpy int
        lean(k)[(3,)](t, 100, 0.5, True, (1, 2), BLOCK=64)  # a tuple
        lean(k)[(3,)](t, 100, 0.5, True, None, BLOCK=[64])  # an unhashable constexpr
        lean(k)[lambda meta: (3,)](t, 100, 0.5, True, None, BLOCK=64)  # a callable grid
        lean(k)[[3]](t, 100, 0.5, True, None, BLOCK=64)  # a list grid
    assert len(fake.launches) == 10 and not fake.lean_calls


def test_no_compiled_kernel_launches_through_triton(fake):
    fake.returns_compiled = False
    launch_three_times(k := sig_kernel())
    assert len(fake.launches) == 3 and not lean(k).entries


def test_interpreted_and_other_kernels_launch_through_triton(fake, monkeypatch):
    calls = []

    class Wrapped:  # e.g. an autotuner: launched as obj[grid](...), not a JITFunction
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((grid, a, kw))

    w = Wrapped()
    for _ in range(3):
        lean(w)[(2,)](1, x=2)
    assert calls == [((2,), (1,), {"x": 2})] * 3 and lean(w)._active is False

    k = sig_kernel()
    monkeypatch.setattr(k, "run", JITFunction.run.__get__(k))  # a run patched onto the kernel: it decides
    launch_three_times(k)
    assert len(fake.launches) == 3


def test_changed_global_launches_through_triton(fake):
    k = sig_kernel()
    scope = {"G": 1}
    k.used_global_vals = {("G", id(scope)): (1, scope)}
    launch_three_times(k)
    assert len(fake.launches) == 1
    scope["G"] = 2  # Triton raises "Global variable G has changed" here: the launch must reach it
    launch_three_times(k)
    assert len(fake.launches) == 4


def test_non_cuda_driver_launches_through_triton(fake, monkeypatch):
    monkeypatch.setattr(_launch, "_cuda_launch_env", lambda: None)
    launch_three_times(sig_kernel())
    assert len(fake.launches) == 3


def test_module_imports_no_triton_and_reads_no_env_at_import():
    import subprocess
    import sys

    code = (
        "import sys; import dora_tune.kernels._launch as m; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert m.lean_enabled.cache_info().currsize == m.lean_supported.cache_info().currsize == 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------------ 5. GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_lean_launches_match_and_are_taken(monkeypatch):
    assert isinstance(axpby, JITFunction) and lean_supported(), triton.__version__
    assert _launch._cuda_launch_env() is not None  # the active driver is CUDA and launches on torch's stream
    triton_launches = []
    original_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        triton_launches.append(args)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counting_run)
    kernel = triton.jit(_axpby)  # a fresh JITFunction: no launchers learnt by other tests
    lk = lean(kernel)
    gen = torch.Generator(device="cuda").manual_seed(0)
    base32 = torch.randn(4096, device="cuda", generator=gen)
    specs = [  # (dtype, n, offset): three specialisations
        (torch.float32, 1000, 0),
        (torch.float32, 1, 0),  # n == 1
        (torch.float16, 1000, 1),  # another dtype, misaligned pointers
    ]
    lean_launches = 0
    for dtype, n, offset in specs:
        base = base32.to(dtype)
        for rep in range(3):
            x = base[offset + rep : offset + rep + n] if offset else base[16 * rep : 16 * rep + n]
            y = base[2048 + offset : 2048 + offset + n]
            alpha = 0.5 + rep
            grid = (triton.cdiv(n, 256),)
            ref = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
            kernel[grid](x, y, ref, n, alpha, BLOCK=256, ADD_Y=True)
            out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
            before = len(triton_launches)
            lk[grid](x, y, out, n, alpha, BLOCK=256, ADD_Y=True)
            lean_launches += len(triton_launches) == before
            torch.cuda.synchronize()
            assert torch.equal(out, ref), (dtype, n, offset, rep)
            assert not out.isnan().any()
    assert lean_launches == 6  # the first launch of each specialisation goes through Triton, then lean
    assert len(lk.entries) == 3

    # the lean launch uses the current stream
    streams = []
    key, (run, *rest) = next(iter(lk.entries.items()))
    lk.entries[key] = (lambda *a: (streams.append(a[3]), run(*a)), *rest)
    x = base32[:1000]
    out = torch.empty_like(x)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        lk[(4,)](x, x, out, 1000, 2.0, BLOCK=256, ADD_Y=True)
    side.synchronize()
    assert streams == [side.cuda_stream]
    assert torch.equal(out, x * 2.0 + x)
