import hashlib
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import torch

import dora_tune.dispatch.registry as registry_mod
from dora_tune.dispatch.registry import (
    SAME_KERNELS_AS,
    _object_source,
    registry,
    source_version,
)
from dora_tune.ops import OPS
from dora_tune.tuning.trials import make_inputs


def test_registry_covers_every_op_and_impl():
    reg = registry()
    assert {i.name for i in reg["norm"]} == {"dense", "factored_torch", "triton"}
    assert {i.name for i in reg["compose"]} == {"eager", "triton"}
    assert {i.name for i in reg["compose_train"]} == {"eager", "triton"}
    assert {i.name for i in reg["dora_linear"]} == {"composed", "fused", "folded"}
    for op, impls in reg.items():
        for impl in impls:
            assert len(impl.version) == 12
            assert impl.runs_on(torch.device("cuda"))
            # the torch implementations run anywhere; the Triton ones (dora_linear's folded too) on CUDA only
            triton = impl.name == OPS[op].triton_impl or (op, impl.name) == ("dora_linear", "folded")
            assert impl.runs_on(torch.device("cpu")) == (not triton)


def test_versions_follow_the_source():
    reg = registry()
    eager, triton = reg["compose"]
    assert eager.version != triton.version  # the Triton one hashes its kernel module too
    assert source_version(("dora_tune.kernels.compose:compose_formula",)) == eager.version
    src = source_version(("dora_tune.kernels._compose_triton",))
    assert SAME_KERNELS_AS.get(("compose", "triton", src), src) == triton.version


def test_same_kernels_table_maps_only_to_other_hashes(monkeypatch):
    """An entry renames a new source hash to the earlier one its measurements carry; without the entry the new
    hash is the version (stale measurements then, as for any kernel edit)."""
    for (op, name, new), old in SAME_KERNELS_AS.items():
        assert len(new) == len(old) == 12 and new != old and name in {i.name for i in registry()[op]}
    impl = registry()["norm"][-1]
    src = source_version(impl.sources)
    monkeypatch.setattr(registry_mod, "SAME_KERNELS_AS", {("norm", "triton", src): "0123456789ab"})
    assert impl.version == "0123456789ab"
    monkeypatch.setattr(registry_mod, "SAME_KERNELS_AS", {})
    assert impl.version == src


def test_versions_hash_what_inspect_reads_without_importing_triton():
    """A version is the hash of each module file / each object's ``inspect.getsource`` text; the fast reads
    (module files found without running them, a class cut from its file) must give exactly that text."""
    for impls in registry().values():
        for impl in impls:
            h = hashlib.sha256()
            for spec in impl.sources:
                name, _, qualname = spec.partition(":")
                module = importlib.import_module(name)
                if qualname:
                    obj = module
                    for part in qualname.split("."):
                        obj = getattr(obj, part)
                    h.update(inspect.getsource(obj).encode())
                else:
                    h.update(Path(module.__file__).read_bytes())
            assert source_version(impl.sources) == h.hexdigest()[:12], impl
    kernels = importlib.import_module("dora_tune.kernels.compose_train")
    assert _object_source(kernels, "_ComposeTrainFn") == inspect.getsource(kernels._ComposeTrainFn)
    configs = importlib.import_module("dora_tune.kernels.compose")  # a decorated class: inspect's own reading
    assert _object_source(configs, "ComposeConfig") == inspect.getsource(configs.ComposeConfig)
    code = 'import sys; from dora_tune.dispatch.registry import registry; registry()["compose"][1].version; '
    code += "print('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_configs_parse_and_run_on_cpu():
    reg = registry()
    for op, shape in (
        ("norm", {"d_out": 8, "d_in": 16, "r": 2}),
        ("compose", {"rows": 3, "cols": 8}),
        ("compose_train", {"rows": 3, "cols": 8}),
    ):
        x = make_inputs(op, shape, "fp32", torch.device("cpu"))
        for impl in reg[op]:
            cfgs = impl.configs(shape)
            assert cfgs and all(isinstance(c, dict) for c in cfgs)
            if impl.name != "triton":
                assert cfgs == [{}]
                assert impl.runner(x, {})() is not None
            else:
                impl.parse_config(cfgs[0])  # validates


def test_norm_space_holds_the_default_config_at_every_rank():
    from dora_tune.kernels import DEFAULT_NORM_CONFIG

    (triton,) = [i for i in registry()["norm"] if i.name == "triton"]
    for r in (8, 16, 384, 768):
        cfgs = triton.configs({"d_out": 4096, "d_in": 4096, "r": r})
        assert cfgs.count(DEFAULT_NORM_CONFIG.as_dict()) == 1 and len(cfgs) > 1
