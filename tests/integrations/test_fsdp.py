"""DoRA layers under FSDP2 (``torch.distributed.fsdp.fully_shard``) on the CPU with the gloo backend, world size 2:
``DoRALinear`` models and PEFT models with ``enable()`` train sharded to the same losses and adapter weights as the
same model unsharded — the norm computed from the weight FSDP gathers for each forward, its cache right across
reshards and optimizer steps, frozen base weights beside trainable adapters in one sharded module."""

import json
import socket

import pytest
import torch
import torch.distributed as dist

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not dist.is_gloo_available() or not hasattr(fsdp, "fully_shard"):
    pytest.skip("needs torch.distributed with gloo and FSDP2 (fully_shard)", allow_module_level=True)

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(tmp_path, kind, steps=4, accum=2):
    import fsdp_worker

    torch.multiprocessing.spawn(
        fsdp_worker.run, args=(WORLD, free_port(), str(tmp_path), kind, steps, accum), nprocs=WORLD, join=True
    )
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("kind", ["dora_linear", "peft"])
def test_sharded_training_matches_the_unsharded_model(tmp_path, kind):
    if kind == "peft":
        pytest.importorskip("peft")
    ranks = spawn(tmp_path, kind)
    ref = ranks[0]["losses"]["ref"]
    assert ref == ranks[1]["losses"]["ref"]  # both ranks trained the same reference
    # each rank's loss is the mean over its half of the batch: their mean is the whole batch's
    sharded = [(a + b) / 2 for a, b in zip(ranks[0]["losses"]["sharded"], ranks[1]["losses"]["sharded"], strict=True)]
    assert len(ref) == 8 and max(abs(a - b) / abs(b) for a, b in zip(sharded, ref, strict=True)) < 1e-5
    assert ref[-1] < ref[0]  # it trained
    for r in ranks:
        if kind == "peft":  # every DoRA layer call of both models went through dora-tune (2 layers a forward)
            assert r["calls"]["sharded"] >= 2 * len(ref) and r["calls"]["ref"] >= 2 * len(ref), r["calls"]
        assert r["n_params"] == 6  # A, B and m of both layers: the frozen weights and biases stay frozen
        assert max(r["param_diffs"].values()) < 1e-5, r["param_diffs"]
        assert r["out_diff"] < 1e-5
