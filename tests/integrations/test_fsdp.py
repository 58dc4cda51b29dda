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


def spawn(tmp_path, kind, world=WORLD, device="cpu", steps=4, accum=2):
    import fsdp_worker

    args = (world, free_port(), str(tmp_path), kind, steps, accum, device)
    torch.multiprocessing.spawn(fsdp_worker.run, args=args, nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def check(ranks, kind, tol):
    ref = ranks[0]["losses"]["ref"]
    for r in ranks:  # every rank trained the same reference (its own process: compared with a tolerance)
        assert max(abs(a - b) / abs(b) for a, b in zip(r["losses"]["ref"], ref, strict=True)) < 1e-6
    # each rank's loss is the mean over its share of the batch: their mean is the whole batch's
    sharded = [sum(v) / len(ranks) for v in zip(*(r["losses"]["sharded"] for r in ranks), strict=True)]
    assert len(ref) == 8 and max(abs(a - b) / abs(b) for a, b in zip(sharded, ref, strict=True)) < tol
    before, after = ranks[0]["probe"]
    assert after < before  # it trained: the objective on one fixed batch went down (each step's batch is fresh)
    for r in ranks:
        if kind == "peft":  # every DoRA layer call of both models went through dora-tune (2 layers a forward)
            assert r["calls"]["sharded"] >= 2 * len(ref) and r["calls"]["ref"] >= 2 * len(ref), r["calls"]
        assert r["n_params"] == 6  # A, B and m of both layers: the frozen weights and biases stay frozen
        assert max(r["param_diffs"].values()) < tol, r["param_diffs"]
        assert r["out_diff"] < tol


@pytest.mark.parametrize("kind", ["dora_linear", "peft"])
def test_sharded_training_matches_the_unsharded_model(tmp_path, kind):
    if kind == "peft":
        pytest.importorskip("peft")
    check(spawn(tmp_path, kind), kind, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dora_linear", "peft"])
def test_gpu_fully_shard_with_nccl_matches_the_unsharded_model(tmp_path, kind):
    """FSDP2 on CUDA (NCCL; as many GPUs as the machine has, one is enough to exercise the CUDA path: DTensor
    parameters, the all-gathered weight under the norm cache and dora-tune's CUDA kernels), float32."""
    if kind == "peft":
        pytest.importorskip("peft")
    if not dist.is_nccl_available():
        pytest.skip("needs NCCL")
    check(spawn(tmp_path, kind, world=torch.cuda.device_count(), device="cuda"), kind, 1e-4)


def test_norm_caches_follow_the_shard_not_the_gathered_tensor(tmp_path):
    """FSDP2 refills the unsharded parameter in place without bumping its version counter (and the CUDA allocator
    often hands it the same address): a norm cache keyed on that tensor alone would keep the norm of the weights
    before ``optimizer.step()``. Both caches key on the sharded parameter's counter too."""
    import fsdp_worker

    torch.multiprocessing.spawn(fsdp_worker.run_gather_check, args=(1, free_port(), str(tmp_path)), nprocs=1)
    seen = json.loads((tmp_path / "gather.json").read_text())
    assert seen["shard_type"] == "DTensor" and seen["same_tensor"] == [True, True]
    assert seen["fsdp_in_use"] == [False, True]  # what keeps the layers' race off the one-node path
    assert seen["before_step"] == 0.0  # the shard did not move: the cached norm is reused (documented)
    assert seen["layer_vs_old"] > 1e-3  # the new values change the norm ...
    assert seen["layer_vs_fresh"] < 1e-6 and seen["shared_vs_fresh"] < 1e-6  # ... and both caches follow
    assert seen["shared_vs_old"] > 1e-3
