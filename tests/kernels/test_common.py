import pytest

from dora_tune.kernels import ComposeConfig, ComposeTrainConfig, NormConfig
from dora_tune.kernels.compose_train import ComposeBwdConfig


def test_config_round_trip():
    cfg = NormConfig(block_m=64, block_n=32, block_k=64, num_warps=4, num_stages=3, split_k=2)
    assert NormConfig.from_dict(cfg.as_dict()) == cfg
    tcfg = ComposeTrainConfig(ComposeConfig(4, 256, 4), ComposeBwdConfig(2, 512, 4, 8))
    assert ComposeTrainConfig.from_dict(tcfg.as_dict()) == tcfg


@pytest.mark.parametrize(
    "data, exc",
    [
        ({"block_r": 3, "block_c": 256, "num_warps": 4}, ValueError),  # not a power of two
        ({"block_r": 4, "block_c": 1 << 20, "num_warps": 4}, ValueError),  # out of range
        ({"block_r": 0, "block_c": 256, "num_warps": 4}, ValueError),
        ({"block_r": 4, "block_c": 256}, ValueError),  # missing key
        ({"block_r": 4, "block_c": 256, "num_warps": 4, "extra": 1}, ValueError),  # unknown key
        ({"block_r": 4.0, "block_c": 256, "num_warps": 4}, TypeError),
        ({"block_r": True, "block_c": 256, "num_warps": 4}, TypeError),
        ([4, 256, 4], TypeError),
    ],
)
def test_config_validation_rejects(data, exc):
    with pytest.raises(exc):
        ComposeConfig.from_dict(data)


def test_train_config_rejects_bad_shape():
    with pytest.raises(ValueError):
        ComposeTrainConfig.from_dict({"fwd": {"block_r": 4, "block_c": 256, "num_warps": 4}})
    with pytest.raises(TypeError):
        ComposeTrainConfig(ComposeConfig(4, 256, 4), ComposeConfig(4, 256, 4))


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, dora_tune, dora_tune.kernels; print('triton' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
