"""One rank of the FSDP2 parity runs of ``test_fsdp.py`` (CPU, gloo): an unsharded reference and a model sharded
with ``torch.distributed.fsdp.fully_shard`` train the same steps on the same data; each rank writes what it saw to
``<out>/rank<N>.json``. Imported by the spawned processes (``torch.multiprocessing.spawn``)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


def _dora_linear_model(seed: int) -> torch.nn.Module:
    from dora_tune import DoRALinear

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        DoRALinear(torch.nn.Linear(32, 48), r=4, alpha=8),
        torch.nn.GELU(),
        DoRALinear(torch.nn.Linear(48, 16), r=4, alpha=8),
    )
    with torch.no_grad():  # B starts at zero (DoRA = identity there): perturb it so the norm matters
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(0, 0.1)
    return model


def _peft_model(seed: int) -> torch.nn.Module:
    import peft

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Linear(32, 48)
            self.down = torch.nn.Linear(48, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.nn.functional.gelu(self.up(x)))

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["up", "down"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Mlp(), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _shard(model: torch.nn.Module, kind: str) -> None:
    from torch.distributed.fsdp import fully_shard

    if kind == "dora_linear":
        for layer in (model[0], model[2]):
            fully_shard(layer)
    else:
        for name, mod in model.named_modules():
            if name.endswith(("up", "down")) and hasattr(mod, "lora_A"):
                fully_shard(mod)
    fully_shard(model)


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def run(rank: int, world: int, port: int, out: str, kind: str, steps: int, accum: int, device: str = "cpu") -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dev = torch.device(device, rank) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        build = _dora_linear_model if kind == "dora_linear" else _peft_model
        ref, sharded = build(0).to(dev), build(0).to(dev)
        calls = {"ref": 0, "sharded": 0}  # dora-tune's DoRA layer calls by model (PEFT: enable() took the layers)
        phase = ["ref"]
        if kind == "peft":
            from dora_tune.integrations import peft as dt_peft

            dt_peft.enable(ref)
            dt_peft.enable(sharded)
            inner = dt_peft.dora_layer_unchecked

            def counted(*args, **kwargs):
                calls[phase[0]] += 1
                return inner(*args, **kwargs)

            dt_peft.dora_layer_unchecked = counted
        _shard(sharded, kind)
        opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref, sharded)]
        gen = torch.Generator().manual_seed(1)
        probe = torch.randn(256, 32, generator=torch.Generator().manual_seed(2)).to(dev)  # one fixed batch

        def probe_loss() -> float:  # the reference's loss on it: whether training lowered the objective
            with torch.no_grad():
                return ref(probe).pow(2).mean().item()

        before = probe_loss()
        losses: dict[str, list[float]] = {"ref": [], "sharded": []}
        for _ in range(steps):
            for _ in range(accum):  # the norm cached across micro-steps; FSDP reshards after each forward
                x = torch.randn(4 * world, 32, generator=gen).to(dev)
                for name, model, inp in (("ref", ref, x), ("sharded", sharded, x.chunk(world)[rank])):
                    phase[0] = name
                    loss = model(inp).pow(2).mean()
                    (loss / accum).backward()
                    losses[name].append(loss.item())
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
        trained = (before, probe_loss())
        with torch.no_grad():
            ref_params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
            diffs = {
                n: (_full(p) - ref_params[n]).abs().max().item()
                for n, p in sharded.named_parameters()
                if p.requires_grad
            }
            x = torch.randn(8, 32, generator=gen).to(dev)
            out_diff = (sharded(x) - ref(x)).abs().max().item()
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "losses": losses,
                    "param_diffs": diffs,
                    "out_diff": out_diff,
                    "n_params": len(diffs),
                    "calls": calls,
                    "probe": trained,
                }
            )
        )
    finally:
        dist.destroy_process_group()


def run_gather_check(rank: int, world: int, port: int, out: str) -> None:
    """The norm caches against what an FSDP2 all-gather does (world size 1, gloo): inside a forward, new values
    written into the gathered ``lora_A`` under FSDP's own version-counter preservation (same tensor, address and
    counter — what a gather after ``optimizer.step()`` looks like when the allocator reuses the block) are seen as
    soon as the sharded parameter's counter moves, by the layer's ``NormCache`` and by the dispatcher's
    ``SharedNormCache`` (handed views, as compiled code does). Writes ``<out>/gather.json``."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        from dora_tune import DoRALinear
        from dora_tune.dispatch.runtime import default_dispatcher
        from dora_tune.kernels import factored_norm

        torch.manual_seed(0)
        layer = DoRALinear(torch.nn.Linear(32, 48), r=4, alpha=8)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
        from dora_tune.kernels._sharded import fsdp_in_use

        before = fsdp_in_use()
        fully_shard(layer)
        shard = dict(layer.named_parameters())["lora_A"]  # outside a forward: the sharded parameter
        seen: dict[str, object] = {"shard_type": type(shard).__name__, "fsdp_in_use": [before, fsdp_in_use()]}

        def inside(module: torch.nn.Module, args: tuple) -> None:  # runs after FSDP's unshard (registered later)
            W, A, B, s = module.base_layer.weight, module.lora_A, module.lora_B, module.scale
            shared = default_dispatcher().norms
            cached = module._norm_cache(W, A, B, s)
            shared_first = shared(W.view_as(W), A.view_as(A), B.view_as(B), s).clone()
            ptr, version = A.data_ptr(), A._version
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(A):
                A.mul_(1.5)  # a gather's new values: same tensor, address and counter
            seen["same_tensor"] = [A.data_ptr() == ptr, A._version == version]
            seen["before_step"] = (module._norm_cache(W, A, B, s) - cached).abs().max().item()
            with torch.no_grad():
                shard.mul_(1.0)  # what optimizer.step() does to the counter that matters: the shard's
            fresh = factored_norm(W, A, B, s)
            seen["layer_vs_fresh"] = (module._norm_cache(W, A, B, s) - fresh).abs().max().item()
            seen["layer_vs_old"] = (fresh - cached).abs().max().item()
            now = shared(W.view_as(W), A.view_as(A), B.view_as(B), s)
            seen["shared_vs_fresh"] = (now - fresh).abs().max().item()
            seen["shared_vs_old"] = (now - shared_first).abs().max().item()

        layer(torch.randn(4, 32)).sum().backward()  # a first forward: FSDP's lazy init, the caches filled
        handle = layer.register_forward_pre_hook(inside)
        layer(torch.randn(4, 32))
        handle.remove()
        Path(out, "gather.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()
