"""Training-loop benchmark: whole optimizer steps of DoRA fine-tuning, PEFT DoRA vs dora-tune vs plain LoRA.

Run (GPU, one cell):  python benchmarks/train_loop.py [--model llama|qwen] [--layers 2] [--tokens 4096] [--rank 384]
                          [--dropout 0] [--accum 1] [--warmup 3] [--steps 8] [--rounds 1] [--compile]
                          [--profile] [--out PATH]
Grid (GPU):           python benchmarks/train_loop.py --grid [--grid-tokens 256,1024,2048,4096,8192]
                          [--grid-ranks 16,64,384] [--grid-dropouts 0,0.05] [--grid-accums 1,4] [--max-minutes 25]
Smoke (CPU):          python benchmarks/train_loop.py --device cpu --tiny --steps 2 --warmup 1 --tokens 16 --rank 4
Default out: ``$OUT/train-loop.json`` if ``$OUT`` is set, else ``benchmarks/results/<gpu-slug>-train-loop.json``
(``cpu-train-loop-tiny.json`` on the CPU): the whole run (profiles, losses, every step). Result rows (the harness,
``benchmarks/README.md``): one per cell and variant — item the variant, shape the model, layers, tokens, rank,
dropout, accum, dtype, compile, dropout mode; figures the step times, throughput, memory, ratios and loss gap (with
``--profile`` also the GPU busy time, aten op count and the weight norm's calls and times). Shared flags
(``--out --device --dtype --seed --note --no-record``) come from ``harness.add_flags``.

Model: ``LlamaForCausalLM`` (``--model llama``: hidden 4096, intermediate 14336, 32 heads, 8 KV heads — the
projection dims of Llama-3-8B) or ``Qwen2ForCausalLM`` (``--model qwen``: 3584, 18944, 28, 4, q/k/v with bias —
Qwen2.5-7B), ``--layers`` decoder layers built from the config with random weights (seeded) directly on the device,
bf16 on CUDA (fp32 on the CPU), SDPA attention, a vocabulary of ``--vocab`` (1024) tokens: nothing is downloaded and
the LM head and loss cost little. ``--tiny`` shrinks the dims (64/128, 4 heads, 2 KV heads, vocabulary 128) for a
CPU smoke run.

Adapters on q, k, v, o, gate, up, down: ``LoraConfig(r=--rank, lora_alpha=2·r, lora_dropout=--dropout,
use_dora=...)`` with ``autocast_adapter_dtype=False`` (adapters in the model dtype; ``--adapter-dtype fp32``: PEFT's
default instead, float32 adapters on a bf16 model, and ``DoRALinear(dtype=torch.float32)``). Every variant starts
from the same weights: the base model from one seed, and per adapted projection A ~ U(±1/√d_in) (PEFT's Kaiming-uniform
init) and B ~ N(0, σ²) redrawn from a generator seeded by the projection's name, σ such that ‖s·B·A‖ ≈ 0.1·‖W‖ per
row (PEFT starts B at 0, which makes DoRA an identity); DoRA's magnitude is then set to ‖W + s·B·A‖_row computed in
float32, as PEFT would initialise it for those weights. Variants (``--variants``, default the first four):
  ``peft_dora``    PEFT's own DoRA;
  ``dora_tune``    the same PEFT DoRA model (its own copy) under ``dora_tune.integrations.peft.enable(model)``
                   (``dropout_mode=`` passed only when ``--dropout-mode`` is not ``peft``); enabled around each of
                   its runs and disabled after (with ``--compile``: for the whole (rank, dropout) block);
  ``dora_linear``  the base model with every target projection replaced by ``dora_tune.DoRALinear`` carrying the
                   same A, B and magnitude, everything else frozen;
  ``lora``         plain PEFT LoRA (``use_dora=False``), the same A and B: the floor DoRA's extra cost sits above;
  ``dora_linear_node`` (only when named) ``dora_linear`` with ``DORA_TUNE_FOLDED_LINEAR=0`` during its runs: the
                   layers' path race without the folded linear (a race of its own, not ``dora_linear``'s).
``--compile`` wraps each variant's model in ``torch.compile(model)`` (default mode); the compilation lands in the
first warm-up step (``first_step_ms``), never in the timed steps.

Training step: AdamW (lr 1e-4, torch's default ``foreach``) over the trainable parameters; ``--accum K`` micro-batches
of ``--tokens`` tokens (batch 1; random ids and labels from a seeded generator, the same batches for every variant)
with ``loss = model(input_ids, labels=labels).loss / K`` and ``backward()`` each, then ``optimizer.step();
optimizer.zero_grad(set_to_none=True)``. ``--warmup`` untimed optimizer steps (the first, with Triton compilation,
dora-tune's first-use race and torch.compile, is reported as ``first_step_ms``), then ``--steps`` timed steps: wall
time from a ``torch.cuda.synchronize()`` before the step to one after it (what training pays, host included: the
harness's host timer ``harness.wall_us`` on one call — on purpose not GPU time alone, since a step of small layers
waits for the host): median, min and max ms per optimizer step. ``--rounds R`` (use 2–3 where the step is
host-bound: the device host's speed drifts within a run and differs up to 2× between machine starts) repeats that R
times per cell, interleaved — every variant's run in turn, the order reversed every other round, one warm-up step in
later rounds — and pools the timed steps of all rounds (``round_medians_ms`` keeps each round's median). Peak
memory: ``max_memory_allocated`` over the timed steps, absolute and above what was allocated when they started (in
grid mode, and with ``--rounds`` above 1, every variant's model stays on the device, so compare ``delta_MiB``
there). ``--profile`` adds one step per variant under ``torch.profiler``: the top ops by host and by GPU time, the aten
op count, the GPU busy time (the kernels' own times), the weight norm's calls, host ms and GPU ms (PEFT's
``get_weight_norm``, dora-tune's ``factored_norm``; Triton kernels launched through dora-tune's lean launcher are not
attributed to that range, so its GPU ms counts cuBLAS only), the host-device synchronisations inside the step (CUDA:
torch's sync debug mode; count and the Python lines that synchronised) and the dispatcher's path races. The loss of
every micro-step (warm-up included) is recorded; each variant reports its largest relative gap to ``peft_dora``'s losses
(dropout 0: the same math, so only rounding; ``lora`` is a different model and shows a real gap). Ratios:
``speedup_vs_peft_dora`` = peft_dora median / variant median, ``vs_lora`` = variant median / lora median.

``--grid`` runs tokens × rank × dropout × accum (each list overridable). Each variant's model is built once per (rank,
dropout) and reused across tokens and accum; every cell gets a fresh optimizer and reloads the initial adapter
weights (a CPU copy), so every cell starts from the same weights. The JSON is rewritten after every cell;
``--max-minutes`` stops the grid between cells once exceeded (the skipped cells are listed). A variant that raises is
recorded (error text in the JSON) and the others go on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import harness
import torch
from bench_models import TARGETS, Spec, build_decoder
from rich.console import Console
from rich.table import Table

VARIANTS = {
    "peft_dora": "PEFT DoRA",
    "dora_tune": "PEFT DoRA + dora-tune",
    "dora_linear": "DoRALinear",
    "lora": "PEFT LoRA",
    "dora_linear_node": "DoRALinear, no folded linear",
}
SHORT = {
    "peft_dora": "PEFT",
    "dora_tune": "+dt",
    "dora_linear": "DoRALin",
    "lora": "LoRA",
    "dora_linear_node": "DLnode",
}
#: run unless --variants names others (dora_linear_node: DoRALinear with DORA_TUNE_FOLDED_LINEAR=0 during its runs
#: only — the layers' path race without the folded linear, as before stop 28 — so that one run compares the two on
#: the same host start)
DEFAULT_VARIANTS = ("peft_dora", "dora_tune", "dora_linear", "lora")
DELTA_RATIO = 0.1  # lora_B is drawn so that ‖s·B·A‖ ≈ DELTA_RATIO·‖W‖ per row
GRID_TOKENS = (256, 1024, 2048, 4096, 8192)
GRID_RANKS = (16, 64, 384)
GRID_DROPOUTS = (0.0, 0.05)
GRID_ACCUMS = (1, 4)
MIB = 2**20
console = Console(width=None if sys.stdout.isatty() else 150)  # logs: no wrapping at 80


MODELS = {
    "llama": Spec("llama", 4096, 14336, 32, 8),  # Llama-3-8B projection dims
    "qwen": Spec("qwen2", 3584, 18944, 28, 4),  # Qwen2.5-7B (q/k/v with bias)
}
TINY = {k: Spec(s.family, 64, 128, 4, 2) for k, s in MODELS.items()}


@dataclasses.dataclass
class Slot:
    """One adapted projection: its name without PEFT's prefix, base weight, A, B, magnitude (DoRA) and scale."""

    name: str
    W: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    m: torch.Tensor | None
    scale: float


@dataclasses.dataclass
class Built:
    """A variant's model for one (rank, dropout) block, ready to train."""

    model: torch.nn.Module
    fn: torch.nn.Module  # what is called: the model, or torch.compile(model)
    params: list[torch.nn.Parameter]
    init: dict[str, torch.Tensor]  # the initial trainable state, on the CPU
    info: dict[str, Any]
    handle: Any = None  # dora_tune's enable() handle while held enabled (--compile)


# ---------------------------------------------------------------- dora-tune
def load_dt_peft() -> ModuleType:
    """``dora_tune.integrations.peft``, which must have callable ``enable`` and ``disable``."""
    from dora_tune.integrations import peft as dt_peft

    for name in ("enable", "disable"):
        if not callable(getattr(dt_peft, name, None)):
            raise RuntimeError(f"dora_tune.integrations.peft has no callable {name}()")
    return dt_peft


def dt_enable(model: torch.nn.Module, args: argparse.Namespace) -> Any:
    """``enable(model)``; ``dropout_mode=`` only when it is not PEFT's (older dora-tune does not take it)."""
    dt_peft = load_dt_peft()
    kw = {} if args.dropout_mode == "peft" else {"dropout_mode": args.dropout_mode}
    return dt_peft.enable(model, **kw)


def dt_disable() -> None:
    load_dt_peft().disable()


# ---------------------------------------------------------------- model
def build_base(spec: Spec, args: argparse.Namespace) -> torch.nn.Module:
    """The random decoder stack (seeded), built on the device in the working dtype."""
    return build_decoder(
        spec,
        layers=args.layers,
        vocab=args.vocab,
        max_tokens=max(args.cell_tokens),
        dtype=args.torch_dtype,
        device=args.device,
        seed=args.seed,
    )


def canonical(name: str) -> str:
    """A module name without PEFT's wrapper prefix: the same for a PEFT model and the plain model."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def peft_slots(model: torch.nn.Module) -> list[Slot]:
    from peft.tuners.lora import LoraLayer

    slots = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        W = mod.get_base_layer().weight
        for adapter in mod.lora_A:
            mags = getattr(mod, "lora_magnitude_vector", {})
            m = mags[adapter].weight if adapter in mags else None
            scale = float(mod.scaling[adapter])
            slots.append(Slot(canonical(name), W, mod.lora_A[adapter].weight, mod.lora_B[adapter].weight, m, scale))
    return slots


def dora_linear_slots(model: torch.nn.Module) -> list[Slot]:
    from dora_tune import DoRALinear

    return [
        Slot(canonical(name), mod.base_layer.weight, mod.lora_A, mod.lora_B, mod.magnitude, float(mod.scale))
        for name, mod in model.named_modules()
        if isinstance(mod, DoRALinear)
    ]


@torch.no_grad()
def init_adapters(slots: list[Slot], seed: int) -> None:
    """Draw A (Kaiming-uniform, as PEFT) and B (‖s·B·A‖ ≈ 0.1·‖W‖ per row) per projection from a generator seeded
    by its name, so that every variant gets the same values, and set DoRA's magnitude to ‖W + s·B·A‖_row (fp32)."""
    for s in slots:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(s.name.encode())) % 2**63)
        r, d_in = s.A.shape
        s.A.copy_((torch.rand(s.A.shape, generator=gen, dtype=torch.float32) * 2 - 1) / math.sqrt(d_in))
        A, W = s.A.float(), s.W.float()
        # ‖s·(B·A)_j‖ ≈ s·√r·σ_B·σ_A·√d_in against ‖W_j‖ ≈ σ_W·√d_in
        sigma = DELTA_RATIO * W.std().item() / (s.scale * math.sqrt(r) * A.std().item())
        s.B.copy_(torch.randn(s.B.shape, generator=gen, dtype=torch.float32) * sigma)
        if s.m is not None:
            s.m.copy_(torch.linalg.vector_norm(W + s.scale * (s.B.float() @ A), dim=1))
        del A, W


def build_variant(variant: str, spec: Spec, rank: int, dropout: float, args: argparse.Namespace) -> Built:
    """``variant``'s model for (rank, dropout): built, adapters initialised, trainable state saved, maybe compiled."""
    t0 = time.perf_counter()
    base = build_base(spec, args)
    if variant in ("dora_linear", "dora_linear_node"):
        from dora_tune import DoRALinear

        for p in base.parameters():
            p.requires_grad_(False)
        kw: dict[str, Any] = {} if args.dropout_mode == "peft" else {"dropout_mode": args.dropout_mode}
        if args.adapter_dtype == "fp32":
            kw["dtype"] = torch.float32
        for name, mod in list(base.named_modules()):
            if name.rsplit(".", 1)[-1] in TARGETS and isinstance(mod, torch.nn.Linear):
                base.set_submodule(name, DoRALinear(mod, r=rank, alpha=2 * rank, dropout=dropout, **kw))
        model = base
        slots = dora_linear_slots(model)
    else:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=dropout,
            target_modules=TARGETS,
            use_dora=variant != "lora",
            bias="none",
        )
        kw = {}
        if "autocast_adapter_dtype" in inspect.signature(get_peft_model).parameters:
            kw["autocast_adapter_dtype"] = args.adapter_dtype == "fp32"  # PEFT's default is True (float32)
        elif args.adapter_dtype == "fp32":
            raise RuntimeError("--adapter-dtype fp32 needs a PEFT with get_peft_model(autocast_adapter_dtype=...)")
        with torch.device(args.device):
            model = get_peft_model(base, lcfg, **kw)
        slots = peft_slots(model)
    init_adapters(slots, args.seed + 1)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    want = 3 * len(slots) if variant != "lora" else 2 * len(slots)
    if len(named) != want:
        raise RuntimeError(f"{variant}: {len(named)} trainable tensors, expected {want} ({len(slots)} projections)")
    init = {n: p.detach().to("cpu", copy=True) for n, p in named}
    built = Built(model=model, fn=model, params=[p for _, p in named], init=init, info={})
    if variant == "dora_tune" and args.compile:  # enabled before tracing, for the whole block: no recompiles
        built.handle = dt_enable(model, args)
    if args.compile:
        built.fn = torch.compile(model)
    harness.sync(args.device)
    built.info = {
        "adapted_layers": len(slots),
        "trainable_params": sum(p.numel() for _, p in named),
        "total_params": sum(p.numel() for p in model.parameters()),
        "adapter_dtypes": sorted({str(p.dtype) for _, p in named}),
        "build_s": time.perf_counter() - t0,
    }
    return built


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- one training run
def make_batches(tokens: int, accum: int, args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every micro-batch of a cell (warm-up and timed steps): ids and labels [1, tokens] on the device."""
    n = (args.warmup + args.steps) * accum
    gen = torch.Generator().manual_seed(args.seed + 3)
    ids = torch.randint(0, args.vocab, (n, 2, 1, tokens), generator=gen).to(args.device)
    return [(ids[i, 0], ids[i, 1]) for i in range(n)]


@torch.no_grad()
def load_initial(built: Built) -> None:
    named = dict(built.model.named_parameters())
    for n, t in built.init.items():
        named[n].copy_(t)


def train(
    built: Built,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    accum: int,
    args: argparse.Namespace,
    warmup: int,
    profile: bool,
) -> dict:
    """Fresh AdamW, initial weights, ``warmup`` + ``--steps`` optimizer steps of ``accum`` micro-batches each (the
    batches of the first ``warmup`` steps are the cell's warm-up batches, so every round sees the same data)."""
    dev = args.device
    load_initial(built)
    built.model.train()
    torch.manual_seed(args.seed + 5)  # dropout masks: the same sequence for every run of a variant
    opt = torch.optim.AdamW(built.params, lr=args.lr)
    losses: list[torch.Tensor] = []
    times: list[float] = []
    it = iter(batches[(args.warmup - warmup) * accum :])
    before = None

    def step() -> None:  # one optimizer step: accum micro-batches, then AdamW
        for _ in range(accum):
            ids, labels = next(it)
            loss = built.fn(input_ids=ids, labels=labels).loss
            losses.append(loss.detach())
            (loss / accum).backward()
            del loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    collections = 0
    try:  # the optimizer and the gradients go whatever happens: the next run needs the memory
        for n in range(warmup + args.steps):
            if n == warmup:
                # every variant starts its timed steps with no garbage left by the previous run; the collector
                # stays on (a variant that makes cyclic garbage pays for it) and its full collections are counted
                gc.collect()
                collections = gc.get_stats()[2]["collections"]
                if dev.type == "cuda":
                    harness.sync(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    before = torch.cuda.memory_allocated(dev)
            # the harness's host timer, one call: synchronised before and after the step (host included)
            times.append(harness.wall_us(step, dev) / 1e3)
        collections = gc.get_stats()[2]["collections"] - collections
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        loss_values = torch.stack(losses).float().cpu().tolist()
        prof = _profile_step(built, batches, accum, opt, args) if profile else None
    finally:
        opt.zero_grad(set_to_none=True)
        opt, losses = None, []  # the optimizer state goes now (the step closure holds these names)
    res = {
        "first_step_ms": times[0],
        "warmup_ms": times[:warmup],
        "steps_ms": times[warmup:],
        "peak_MiB": None if peak is None else peak / MIB,
        "before_MiB": None if before is None else before / MIB,
        "losses": loss_values,
        "gc_full_collections": collections,  # during the timed steps
        **({"profile": prof} if prof is not None else {}),
    }
    summarise(res, accum * batches[0][0].shape[-1])
    return res


def summarise(res: dict, tokens_per_step: int) -> None:
    """Median/min/max over every timed step of a variant's runs (``steps_ms``), throughput and the memory delta."""
    timed = res["steps_ms"]
    res["median_ms"] = median = statistics.median(timed)
    res["min_ms"], res["max_ms"] = min(timed), max(timed)
    res["tokens_per_s"] = tokens_per_step / (median / 1e3)
    peak, before = res["peak_MiB"], res["before_MiB"]
    res["delta_MiB"] = None if peak is None or before is None else peak - before


def merge_round(first: dict, later: dict, tokens_per_step: int) -> None:
    """Fold a later round of one variant into its first: every timed step counts, the highest peak memory; the
    losses, first step and warm-up stay the first round's (later rounds start warm)."""
    first.setdefault("round_medians_ms", [first["median_ms"]]).append(later["median_ms"])
    first["steps_ms"] = first["steps_ms"] + later["steps_ms"]
    first["gc_full_collections"] = first.get("gc_full_collections", 0) + later.get("gc_full_collections", 0)
    if later["peak_MiB"] is not None:
        first["peak_MiB"] = max(first["peak_MiB"], later["peak_MiB"])
    if "profile" in later:
        first["profile"] = later["profile"]
    summarise(first, tokens_per_step)


NORM_RANGE = "train_loop::weight_norm"


@contextlib.contextmanager
def _norm_ranges() -> Iterator[None]:
    """PEFT's and dora-tune's weight-norm functions wrapped in one profiler range while the block runs."""
    from peft.tuners.lora.dora import DoraLinearLayer

    import dora_tune.nn.layer as dt_layer

    def ranged(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            with torch.profiler.record_function(NORM_RANGE):
                return fn(*a, **k)

        return wrapper

    # dora-tune's norm cache computes in full (factored_norm) or, for the same tensors after an optimizer step, by
    # the known plan (run_norm): both are the norm
    peft_fn, dt_full, dt_again = DoraLinearLayer.get_weight_norm, dt_layer.factored_norm, dt_layer.run_norm
    DoraLinearLayer.get_weight_norm = ranged(peft_fn)
    dt_layer.factored_norm, dt_layer.run_norm = ranged(dt_full), ranged(dt_again)
    try:
        yield
    finally:
        DoraLinearLayer.get_weight_norm, dt_layer.factored_norm, dt_layer.run_norm = peft_fn, dt_full, dt_again


@contextlib.contextmanager
def _sync_warnings(enabled: bool) -> Iterator[list[warnings.WarningMessage]]:
    """Inside the block, every operation that synchronises the host with the GPU warns (``torch.cuda``'s sync debug
    mode, CUDA only: ``enabled``; the mode is restored after); those warnings are collected in the yielded list, not
    shown, and any other warning is shown as usual after the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = torch.cuda.get_sync_debug_mode() if enabled else None
        if enabled:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if enabled:
                torch.cuda.set_sync_debug_mode(old)
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    for w in caught:
        if w not in syncs:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    caught[:] = syncs


def sync_report(caught: list[warnings.WarningMessage]) -> dict[str, Any]:
    """``{"count": n, "sites": {"file:line": calls}}`` of the synchronisation warnings :func:`_sync_warnings`
    collected (the Python line that synchronised; the most frequent first)."""
    sites = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught)
    return {"count": len(caught), "sites": dict(sites.most_common())}


def _profile_step(built: Built, batches: list, accum: int, opt: Any, args: argparse.Namespace) -> dict:
    """One more optimizer step under ``torch.profiler``: the ops costing the host most (self CPU time) and the
    GPU most (self device time), as tables; and the dispatcher's path races (which path each layer shape runs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    with _norm_ranges(), profile(activities=activities) as prof:
        with _sync_warnings(args.device.type == "cuda") as caught:
            for ids, labels in batches[:accum]:
                (built.fn(input_ids=ids, labels=labels).loss / accum).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        harness.sync(args.device)
    avg = prof.key_averages()
    kernels = [e for e in avg if e.device_type == torch.autograd.DeviceType.CUDA]
    norm = next((e for e in avg if e.key == NORM_RANGE), None)
    out = {
        "host_top": avg.table(sort_by="self_cpu_time_total", row_limit=18),
        # how many ops the step ran and how long the GPU was busy (the kernels' own times): a step whose wall time
        # is far above the busy time waits for the host
        "ops": sum(e.count for e in avg if e.key.startswith("aten::")),
        "gpu_busy_ms": sum(e.self_device_time_total for e in kernels) / 1e3,
        # the weight norm (PEFT's get_weight_norm, dora-tune's factored_norm): calls in the step, host and GPU ms
        "norm": None
        if norm is None
        else {"calls": norm.count, "host_ms": norm.cpu_time_total / 1e3, "gpu_ms": norm.device_time_total / 1e3},
        # host-device synchronisations inside the step (CUDA: torch's sync debug mode): each one drains the launch
        # queue, so a step with any pays host and GPU time in series
        "syncs": sync_report(caught),
    }
    if args.device.type == "cuda":
        out["device_top"] = avg.table(sort_by="self_device_time_total", row_limit=12)
    from dora_tune.dispatch.runtime import default_dispatcher

    out["path_races"] = {str(k): v for k, v in default_dispatcher().path_notes().items()}
    return out


def run_variant(
    variant: str, built: Built, batches: list, accum: int, args: argparse.Namespace, warmup: int, profile: bool
) -> dict:
    """One variant's run in one cell; ``dora_tune`` eager is enabled for the run only (PEFT's path stays pure).

    Compiled, a dora-tune variant must compute its norms in ``dora_tune::cached_norm``: none computed means its
    compiled code is another model's (dynamo reused PEFT's compiled DoRA on torch 2.11), and the run is an error."""
    norms = compiled_norms() if args.compile and variant != "peft_dora" and variant != "lora" else None
    before = None if norms is None else norms.computed
    if variant == "dora_linear_node":
        from dora_tune.kernels.dora_linear import FOLDED_LINEAR_ENV

        old = os.environ.get(FOLDED_LINEAR_ENV)
        os.environ[FOLDED_LINEAR_ENV] = "0"  # the layers' path race without the folded linear (its own race key)
        try:
            res = train(built, batches, accum, args, warmup, profile)
        finally:
            if old is None:
                del os.environ[FOLDED_LINEAR_ENV]
            else:
                os.environ[FOLDED_LINEAR_ENV] = old
    elif variant != "dora_tune":
        res = train(built, batches, accum, args, warmup, profile)
    else:
        handle = built.handle if built.handle is not None else dt_enable(built.model, args)
        try:
            res = train(built, batches, accum, args, warmup, profile)
        finally:
            if built.handle is None:
                dt_disable()
        res["enabled_layers"] = getattr(handle, "layers", None)  # PEFT DoRA layers dora-tune computed
    if norms is not None:
        res["norms_computed"] = norms.computed - before
        if res["norms_computed"] == 0:
            raise RuntimeError(f"{variant}: the compiled model computed no dora-tune norm: it ran other code")
    return res


def compiled_norms() -> Any:
    """The norm cache that ``dora_tune::cached_norm`` (compiled graphs) fills: its ``computed`` counts norms."""
    from dora_tune.dispatch.runtime import default_dispatcher

    return default_dispatcher().norms


def finish_cell(cell: dict) -> None:
    """Loss gaps against peft_dora and the speed ratios, into each variant's figures."""
    v = cell["variants"]
    ok = {k: r for k, r in v.items() if "error" not in r}
    ref, lora = ok.get("peft_dora"), ok.get("lora")
    for name, r in ok.items():
        gap = None
        if ref is not None and name != "peft_dora" and len(r["losses"]) == len(ref["losses"]):
            gap = max(
                (abs(a - b) / max(abs(b), 1e-30) for a, b in zip(r["losses"], ref["losses"], strict=True)), default=None
            )
        r["loss_gap_vs_peft_dora"] = gap
        r["speedup_vs_peft_dora"] = None if ref is None else ref["median_ms"] / r["median_ms"]
        r["vs_lora"] = None if lora is None else r["median_ms"] / lora["median_ms"]


# ---------------------------------------------------------------- the grid
def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:500]}"


class Block:
    """The variants' models of one (rank, dropout): built on first use (a failed build is recorded once), freed on
    request or at :meth:`close` (dora-tune disabled, torch.compile's graphs dropped)."""

    def __init__(self, spec: Spec, rank: int, dropout: float, args: argparse.Namespace, res: dict) -> None:
        self.spec, self.rank, self.dropout, self.args, self.res = spec, rank, dropout, args, res
        self.key = f"r{rank}-p{dropout:g}"
        self.record: dict[str, Any] = {"rank": rank, "dropout": dropout, "models": {}, "errors": {}}
        res["blocks"][self.key] = self.record
        self.models: dict[str, Built] = {}

    def get(self, variant: str) -> Built | None:
        if variant in self.models:
            return self.models[variant]
        if variant in self.record["errors"]:
            return None
        try:
            built = build_variant(variant, self.spec, self.rank, self.dropout, self.args)
        except Exception as e:  # recorded; the other variants go on
            traceback.print_exc()
            self.record["errors"][variant] = f"build: {error_text(e)}"
            self.res["errors"].append(f"{self.key} {variant}: build: {error_text(e)}")
            release(self.args.device)
            return None
        self.models[variant] = built
        self.record["models"][variant] = built.info
        return built

    def free(self, variant: str) -> None:
        built = self.models.pop(variant, None)
        if built is not None and built.handle is not None:
            dt_disable()
        del built
        release(self.args.device)

    def close(self) -> None:
        for v in list(self.models):
            self.free(v)
        if self.args.compile:
            torch._dynamo.reset()


def run_cell(block: Block, tokens: int, accum: int, one_cell: bool) -> dict:
    """Every variant on one (tokens, rank, dropout, accum) cell, on the same batches, in ``--rounds`` interleaved
    rounds (the order reversed every other round) so that drift of the host or the GPU clock hits every variant
    alike; each variant's figures pool the timed steps of all rounds."""
    args, res = block.args, block.res
    t0 = time.time()
    cell: dict[str, Any] = {"tokens": tokens, "rank": block.rank, "dropout": block.dropout, "accum": accum}
    cell["variants"] = {}
    batches = make_batches(tokens, accum, args)
    out = cell["variants"]
    for rnd in range(args.rounds):
        last = rnd == args.rounds - 1
        for v in args.variants if rnd % 2 == 0 else args.variants[::-1]:
            if "error" in out.get(v, {}):
                continue
            built = block.get(v)
            if built is None:
                out[v] = {"error": block.record["errors"][v]}
                continue
            try:
                # later rounds: one warm-up step (the variant's kernels are compiled and its races run)
                r = run_variant(v, built, batches, accum, args, args.warmup if rnd == 0 else 1, args.profile and last)
                if v in out:
                    merge_round(out[v], r, accum * tokens)
                else:
                    out[v] = r
            except Exception as e:  # recorded; the other variants go on
                traceback.print_exc()
                out[v] = {"error": error_text(e)}
                res["errors"].append(f"{block.key} tokens {tokens} accum {accum} {v}: {error_text(e)}")
            finally:
                del built
                if one_cell and last:  # one cell: build, run and free each variant in turn
                    block.free(v)
                else:
                    release(args.device)
    cell["variants"] = {v: out[v] for v in args.variants if v in out}
    del batches
    finish_cell(cell)
    cell["seconds"] = time.time() - t0
    return cell


def record_cell(rec: harness.Recorder, cell: dict, args: argparse.Namespace) -> None:
    """One result row per variant of ``cell`` that ran (the headline figures; the JSON keeps the rest)."""
    shape = {
        "model": args.model,
        "layers": args.layers,
        "tokens": cell["tokens"],
        "rank": cell["rank"],
        "dropout": cell["dropout"],
        "accum": cell["accum"],
        "dtype": args.dtype,
        "compile": args.compile,
        "dropout_mode": args.dropout_mode,
        "adapter_dtype": args.adapter_dtype,
        "tiny": args.tiny,
    }
    keys = ("median_ms", "min_ms", "max_ms", "first_step_ms", "tokens_per_s", "peak_MiB", "delta_MiB")
    keys += ("speedup_vs_peft_dora", "vs_lora", "loss_gap_vs_peft_dora")
    for v, r in cell["variants"].items():
        if "error" in r:
            continue
        figures = {k: r.get(k) for k in keys} | {"steps_timed": len(r["steps_ms"])}
        prof = r.get("profile")
        if prof:
            norm = prof.get("norm") or {}
            figures |= {"gpu_busy_ms": prof.get("gpu_busy_ms"), "aten_ops": prof.get("ops")}
            figures |= {"syncs": (prof.get("syncs") or {}).get("count")}
            figures |= {f"norm_{k}": norm.get(k) for k in ("calls", "host_ms", "gpu_ms")}
        rec.record(shape, figures, item=v)


def run_all(args: argparse.Namespace, res: dict, path: Path, rec: harness.Recorder) -> None:
    """Every cell, (rank, dropout) blocks outside, (tokens, accum) inside; the JSON rewritten and the cell's rows
    appended after each cell."""
    spec = (TINY if args.tiny else MODELS)[args.model]
    res["spec"] = dataclasses.asdict(spec)
    t_start = time.time()
    cell_keys = [(t, k) for t in args.cell_tokens for k in args.cell_accums]
    one_cell = len(cell_keys) == 1

    def out_of_time() -> bool:
        return args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes

    def write() -> None:
        res["seconds"] = time.time() - t_start
        res["ok"] = not res["errors"]
        path.write_text(json.dumps(res, indent=1, default=str))

    for rank in args.cell_ranks:
        for dropout in args.cell_dropouts:
            if out_of_time():
                res["skipped_cells"] += [
                    {"tokens": t, "rank": rank, "dropout": dropout, "accum": k} for t, k in cell_keys
                ]
                continue
            block = Block(spec, rank, dropout, args, res)
            try:
                if not one_cell:  # every variant's model lives for the whole block
                    for v in args.variants:
                        block.get(v)
                for tokens, accum in cell_keys:
                    if out_of_time():
                        res["skipped_cells"].append(
                            {"tokens": tokens, "rank": rank, "dropout": dropout, "accum": accum}
                        )
                        continue
                    cell = run_cell(block, tokens, accum, one_cell)
                    res["cells"].append(cell)
                    write()
                    record_cell(rec, cell, args)
                    log_cell(cell)
            finally:
                block.close()
    write()


# ---------------------------------------------------------------- output
def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def log_cell(cell: dict) -> None:
    parts = []
    for v, r in cell["variants"].items():
        if "error" in r:
            parts.append(f"{SHORT[v]} [red]error[/red]")
        else:
            parts.append(f"{SHORT[v]} {r['median_ms']:.2f} ms (first {r['first_step_ms']:.0f})")
    console.print(
        f"r={cell['rank']} p={cell['dropout']:g} tokens={cell['tokens']} accum={cell['accum']}: "
        + ", ".join(parts)
        + f" [{cell['seconds']:.1f} s]",
        highlight=False,
    )


def print_cell_table(cell: dict, res: dict) -> None:
    a = res["args"]
    s = res["spec"]
    t = Table(
        title=f"{a['model']} {s['hidden']}/{s['intermediate']}, {a['layers']} layers, {cell['tokens']} tokens × "
        f"{cell['accum']} accum, r={cell['rank']}, dropout {cell['dropout']:g}, {a['dtype']}"
        + (", compiled" if a["compile"] else "")
    )
    cols = (
        "variant",
        "first step ms",
        "median ms",
        "min ms",
        "max ms",
        "tok/s",
        "peak MiB",
        "Δpeak MiB",
        "× PEFT DoRA",
        "÷ LoRA",
        "loss gap",
    )
    for col in cols:
        t.add_column(col, justify="left" if col == "variant" else "right")
    for name, r in cell["variants"].items():
        if "error" in r:
            t.add_row(VARIANTS[name], f"[red]{r['error'][:60]}[/red]", *([""] * (len(cols) - 2)))
            continue
        t.add_row(
            VARIANTS[name],
            _f(r["first_step_ms"], ".0f"),
            _f(r["median_ms"]),
            _f(r["min_ms"]),
            _f(r["max_ms"]),
            _f(r["tokens_per_s"], ".0f"),
            _f(r["peak_MiB"], ".0f"),
            _f(r["delta_MiB"], ".0f"),
            _f(r["speedup_vs_peft_dora"]),
            _f(r["vs_lora"]),
            _f(r["loss_gap_vs_peft_dora"], ".1e"),
        )
    console.print(t)


def print_grid_tables(res: dict) -> None:
    """One table per (rank, dropout): rows tokens × accum; each variant's median ms, then the ratios."""
    variants = res["args"]["variants"]
    groups: dict[tuple[int, float], list[dict]] = {}
    for cell in res["cells"]:
        groups.setdefault((cell["rank"], cell["dropout"]), []).append(cell)
    for (rank, dropout), cells in groups.items():
        t = Table(
            title=f"r={rank}, dropout {dropout:g}: ms per optimizer step (median); × PEFT = speedup over PEFT "
            "DoRA; ÷ LoRA = time over plain LoRA"
        )
        t.add_column("tokens", justify="right")
        t.add_column("accum", justify="right")
        for v in variants:
            t.add_column(f"{SHORT[v]} ms", justify="right")
        speed = [v for v in variants if v != "peft_dora" and "peft_dora" in variants]
        over = [v for v in variants if v != "lora" and "lora" in variants]
        for v in speed:
            t.add_column(f"{SHORT[v]} × PEFT", justify="right")
        for v in over:
            t.add_column(f"{SHORT[v]} ÷ LoRA", justify="right")
        for cell in cells:
            r = cell["variants"]

            def get(v: str, key: str, r: dict = r) -> float | None:
                return None if v not in r or "error" in r[v] else r[v][key]

            t.add_row(
                str(cell["tokens"]),
                str(cell["accum"]),
                *(("[red]err[/red]" if "error" in r.get(v, {}) else _f(get(v, "median_ms"))) for v in variants),
                *(_f(get(v, "speedup_vs_peft_dora")) for v in speed),
                *(_f(get(v, "vs_lora")) for v in over),
            )
        console.print(t)


# ---------------------------------------------------------------- main
def _list(cast: type, text: str) -> list:
    return [cast(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--model", choices=list(MODELS), default="llama", help="llama (Llama-3-8B dims) or qwen (Qwen2.5-7B)"
    )
    ap.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}"
    )
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    ap.add_argument(
        "--tokens", type=int, default=None, help="tokens per micro-batch, batch 1 (default 4096; --tiny 64)"
    )
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank r (default 384; --tiny 8); lora_alpha = 2·r")
    ap.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
    ap.add_argument(
        "--dropout-mode",
        choices=["peft", "lora_only"],
        default="peft",
        help="dora-tune's dropout semantics (default peft: PEFT's exactly; passed to dora-tune only when not peft)",
    )
    ap.add_argument(
        "--adapter-dtype",
        choices=("model", "fp32"),
        default="model",
        help="adapters in the model's dtype (default) or in float32 on a bf16/fp16 model (PEFT's own default, "
        "autocast_adapter_dtype=True; DoRALinear(dtype=torch.float32))",
    )
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (default 3, at least 1)")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per round (default 8)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved rounds per cell: every variant runs --steps timed steps in each, the order reversed every "
        "other round; figures pool all rounds (default 1)",
    )
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 1024; --tiny 128)")
    ap.add_argument(
        "--profile", action="store_true", help="one more step per variant under torch.profiler (tables in the JSON)"
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile(model) for every variant (default mode)")
    ap.add_argument("--grid", action="store_true", help="tokens × rank × dropout × accum (see --grid-*)")
    ap.add_argument("--grid-tokens", default=",".join(map(str, GRID_TOKENS)), help="default %(default)s")
    ap.add_argument("--grid-ranks", default=",".join(map(str, GRID_RANKS)), help="default %(default)s")
    ap.add_argument("--grid-dropouts", default=",".join(map(str, GRID_DROPOUTS)), help="default %(default)s")
    ap.add_argument("--grid-accums", default=",".join(map(str, GRID_ACCUMS)), help="default %(default)s")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop the grid between cells after this long")
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    harness.add_flags(
        ap,
        out_help="JSON path (default $OUT/train-loop.json or benchmarks/results/<gpu-slug>-train-loop.json)",
        device="auto",
        dtype=True,
    )
    args = harness.resolve(ap.parse_args(argv), ap)
    for name, full, small in (("tokens", 4096, 64), ("rank", 384, 8), ("vocab", 1024, 128)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.tiny else full)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if not args.variants or len(set(args.variants)) != len(args.variants):
        ap.error("--variants: a non-empty list without repeats")
    if args.warmup < 1 or args.steps < 1 or args.accum < 1 or args.rounds < 1:
        ap.error("--warmup, --steps, --accum and --rounds must be at least 1")
    try:
        if args.grid:
            args.cell_tokens = _list(int, args.grid_tokens)
            args.cell_ranks = _list(int, args.grid_ranks)
            args.cell_dropouts = _list(float, args.grid_dropouts)
            args.cell_accums = _list(int, args.grid_accums)
        else:
            args.cell_tokens, args.cell_ranks = [args.tokens], [args.rank]
            args.cell_dropouts, args.cell_accums = [args.dropout], [args.accum]
    except ValueError as e:
        ap.error(f"--grid-*: {e}")
    cells = (args.cell_tokens, args.cell_ranks, args.cell_dropouts, args.cell_accums)
    if not all(cells) or min(args.cell_tokens + args.cell_ranks + args.cell_accums) < 1:
        ap.error("--grid-*: non-empty lists of positive tokens, ranks and accums")
    if not all(0.0 <= p < 1.0 for p in args.cell_dropouts):
        ap.error("dropout must be in [0, 1)")
    if args.out is None:
        if os.environ.get("OUT"):
            args.out = os.path.join(os.environ["OUT"], "train-loop.json")
        else:
            slug = harness.slug(harness.gpu_name(args.device))
            tail = "train-loop-tiny.json" if args.tiny else "train-loop.json"
            args.out = harness.default_out(f"{slug}-{tail}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile:  # one compiled graph per model instance and shape: more than dynamo's default 8
        for knob in (
            "recompile_limit",
            "cache_size_limit",
            "accumulated_recompile_limit",
            "accumulated_cache_size_limit",
        ):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    rec = harness.start(__file__, args)
    res: dict[str, Any] = {
        "env": rec.env,
        "args": {k: (str(v) if isinstance(v, torch.device | torch.dtype) else v) for k, v in vars(args).items()},
        "grid": args.grid,
        "blocks": {},
        "cells": [],
        "skipped_cells": [],
        "errors": [],
    }
    env = res["env"]
    console.print(
        f"{env['device']}: torch {env['torch']}, triton {env['triton']}, peft {env['peft']}, "
        f"transformers {env['transformers']}, dora_tune {env['dora_tune']}",
        highlight=False,
    )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_all(args, res, path, rec)
    if args.grid:
        print_grid_tables(res)
    else:
        for cell in res["cells"]:
            print_cell_table(cell, res)
    if res["skipped_cells"]:
        console.print(f"[yellow]--max-minutes reached: {len(res['skipped_cells'])} cells skipped[/yellow]")
    console.print(f"wrote {path} in {res['seconds']:.0f} s; {rec.summary()}", highlight=False)
    if res["errors"]:
        console.print("[red]FAILED:[/red]\n  " + "\n  ".join(res["errors"]), highlight=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
