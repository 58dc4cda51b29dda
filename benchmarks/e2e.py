"""End-to-end DoRA on decoder stacks with real projection dims: PEFT DoRA vs PEFT DoRA + dora-tune vs plain LoRA.

Run (GPU):   python benchmarks/e2e.py [--models llama-3-8b,qwen2.5-32b] [--layers 2] [--tokens 4096] [--rank 384]
                 [--out benchmarks/results/h200-e2e.json]      (default out: $OUT/h200-e2e.json if $OUT is set)
Smoke (CPU): python benchmarks/e2e.py --device cpu --tiny --out /tmp/e2e-tiny.json [--variants peft_dora,lora]

Model: ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` built from ``LlamaConfig`` / ``Qwen2Config`` with the real hidden
size, intermediate size, attention heads and KV heads of Llama-3-8B (4096, 14336, 32, 8) and Qwen2.5-32B (5120,
27648, 40, 8; q/k/v with bias), ``--layers`` decoder layers, random weights built directly on the device in the
working dtype (bf16 on CUDA), SDPA attention (flash kernels on the GPU, the same for every variant). The vocabulary is
tiny (``--vocab``, 1024): the LM head and the loss then cost under 1% of the step, so the step is the 7 adapted
projections per layer plus attention, and nothing has to be downloaded. Loss = cross-entropy of the logits (upcast
to fp32) against random labels; embeddings, LM head and all base weights are frozen (PEFT does that).

Adapters on every projection (q, k, v, o, gate, up, down): ``LoraConfig(r=--rank, lora_alpha=--alpha (2·r),
lora_dropout=0, use_dora=...)``, adapters kept in the model dtype (``autocast_adapter_dtype=False``; ``--fp32-adapters``
gives PEFT's default fp32 adapters). PEFT initialises ``lora_B`` to 0; it is redrawn once, from a fixed seed shared by
every variant, with N(0, σ²) such that ‖s·B·A‖ ≈ 0.1·‖W‖ per row (the DoRA scale m/‖W + s·B·A‖ then is ≈ 0.995,
not exactly 1). Variants, each on ``--tokens`` tokens (batch 1):
  (a) ``peft_dora``  PEFT DoRA, PEFT's own path;
  (b) ``dora_tune``  the same model object after ``dora_tune.integrations.peft.enable(model)`` (factored norm + fused
      compose); ``disable()`` afterwards restores (a);
  (c) ``lora``       plain PEFT LoRA (``use_dora=False``), a separate model built from the same seeds (reference);
  (d) ``dora_tune_eager`` (only when asked for) (b) under ``dora_tune.dispatch.force("eager")``: the same integration
      on the torch implementations, whose backward is C++ autograd — (b) − (d) is what the fused kernels and their
      Python autograd nodes change;
  (e) ``dora_tune_compiled`` (only when asked for) (b) under ``torch.compile`` (the DoRA ops are custom ops in the
      graph; one compiled backward instead of a Python autograd node per layer). Compile time is in the JSON;
  (f) ``dora_tune_cudagraphs`` (only when asked for) (b) under ``torch.compile(mode="reduce-overhead")``: the
      compiled graphs are replayed as CUDA graphs, so no Python or launch cost per layer remains on the host;
  (g) ``peft_dora_compiled`` (only when asked for) (a) under ``torch.compile``: what compiling alone gives PEFT;
  (h) ``peft_dora_cudagraphs`` (only when asked for) (a) under ``torch.compile(mode="reduce-overhead")``.

Per variant: forward time in training mode with autograd recording (the training forward), forward time in eval
mode under ``torch.no_grad()`` (inference), forward+backward time (gradients set to None before every repetition
through ``do_bench``'s ``grad_to_none``), all ``triton.testing.do_bench`` medians (p20/p80 in the JSON, L2 flushed)
after 3 untimed calls of each (Triton compilation, dispatcher first use); then peak memory of one forward+backward:
``max_memory_allocated`` absolute and above what was allocated before it (model, batch), in MiB. ``--trace N`` adds
a ``torch.profiler`` run of N forward+backward steps: wall and device-busy time per step (the gap is the device
waiting for the host) and the costliest kernels and host ops.

Correctness, same run: loss, logits (training and no-grad forward) and the gradient of every adapter parameter
(lora_A, lora_B, magnitude, every layer) of (b) against (a), as ‖x − y‖ / ‖y‖ per tensor, max per kind; both are also
compared with a reference in fp32 (fp64 when the working dtype is fp32: a deep copy of the model run through PEFT's
path) to show which side is closer. (b) fails where its error against the reference exceeds 1.25× PEFT's own (+ a
twentieth of ``--tol-out`` / ``--tol-grad``; without a reference (``--no-ref``): (b) vs (a) beyond those tolerances,
whose defaults are a bound of the dtype's rounding noise, :func:`default_tolerances`), which exits with status 1
after the JSON is written; so does any variant that fails. The JSON records the environment (GPU, torch, triton,
peft, transformers versions, date, command). ``--device cpu --tiny`` runs the same code with tiny dims in fp32 on the
CPU, timed by the harness's per-call wall times (``harness.call_times_us``; a smoke test, not a benchmark).

Timing: ``do_bench`` is kept on CUDA on purpose, not the harness's GPU timer: its events around each call take in
the host's time wherever enqueuing a step takes longer than the GPU runs it (the eager PEFT step at these sizes),
which is what training pays and what (b) changes; the harness's timer holds the GPU ahead of the host and would hide
it. It also keeps the figures comparable with the recorded ones. Result rows (the harness, ``benchmarks/README.md``):
one per model and variant — shape the model, layers, tokens, rank, alpha, dtype, adapter dtype; figures the three
times (median, p20, p80), their speedups over (a), peak memory, with ``--trace`` the traced wall and device-busy
time per step, and for (b) whether it passed the correctness check. Shared flags (``--out --device --dtype --seed
--note --no-record``) come from ``harness.add_flags``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import inspect
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import harness
import torch
import torch.nn.functional as F
from bench_models import TARGETS, Spec, build_decoder
from rich.console import Console
from rich.table import Table

VARIANTS = {
    "peft_dora": "(a) PEFT DoRA",
    "dora_tune": "(b) (a) + dora-tune",
    "lora": "(c) PEFT LoRA",
    "dora_tune_eager": "(d) (b), torch impls",
    "dora_tune_compiled": "(e) (b), torch.compile",
    "dora_tune_cudagraphs": "(f) (b), compiled, CUDA graphs",
    "peft_dora_compiled": "(g) (a), torch.compile",
    "peft_dora_cudagraphs": "(h) (a), compiled, CUDA graphs",
}
DT_VARIANTS = {"dora_tune", "dora_tune_eager", "dora_tune_compiled", "dora_tune_cudagraphs"}  # need enable()
DEFAULT_VARIANTS = ("peft_dora", "dora_tune", "lora")  # (d) on request: it separates kernel time from host cost
GRAD_KINDS = {"lora_A": "grad lora_A", "lora_B": "grad lora_B", "lora_magnitude_vector": "grad magnitude"}
WARM_CALLS = 3  # untimed calls of each function before timing: Triton compilation, dispatcher first use
DELTA_RATIO = 0.1  # lora_B is drawn so that ‖s·B·A‖ ≈ DELTA_RATIO·‖W‖ per row
console = Console(width=None if sys.stdout.isatty() else 150)  # logs: no wrapping at 80


MODELS = {
    "llama-3-8b": Spec("llama", 4096, 14336, 32, 8),
    "qwen2.5-32b": Spec("qwen2", 5120, 27648, 40, 8),
}
TINY = {  # same families (Qwen2: q/k/v with bias), dims for a CPU smoke run
    "llama-3-8b": Spec("llama", 64, 224, 4, 2),
    "qwen2.5-32b": Spec("qwen2", 80, 432, 5, 1),
}


# ---------------------------------------------------------------- dora-tune switch
def load_dt_peft() -> ModuleType:
    """``dora_tune.integrations.peft`` with callable ``enable`` and ``disable``, or exit with a clear message."""
    hint = "run with --variants peft_dora,lora to measure without it"
    try:
        from dora_tune.integrations import peft as dt_peft
    except ImportError as e:
        sys.exit(f"error: variant dora_tune needs dora_tune.integrations.peft, which does not import ({e}); {hint}")
    for name in ("enable", "disable"):
        if not callable(getattr(dt_peft, name, None)):
            sys.exit(f"error: dora_tune.integrations.peft has no callable {name}(); {hint}")
    return dt_peft


def dt_disable(dt_peft: ModuleType, model: torch.nn.Module) -> None:
    """``disable()`` — or ``disable(model)`` should it take the model."""
    params = inspect.signature(dt_peft.disable).parameters.values()
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    dt_peft.disable(model) if required else dt_peft.disable()


# ---------------------------------------------------------------- model
def build_model(spec: Spec, args: argparse.Namespace, use_dora: bool) -> tuple[torch.nn.Module, dict]:
    """Random decoder stack on the device in the working dtype, wrapped by PEFT; lora_B redrawn (seeded)."""
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    base = build_decoder(
        spec,
        layers=args.layers,
        vocab=args.vocab,
        max_tokens=args.tokens,
        dtype=args.torch_dtype,
        device=args.device,
        seed=args.seed,
    )
    cfg = base.config
    lcfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        use_dora=use_dora,
        target_modules=TARGETS,
        lora_dropout=0.0,
        bias="none",
    )
    kw: dict[str, Any] = {}
    if "autocast_adapter_dtype" in inspect.signature(get_peft_model).parameters:
        kw["autocast_adapter_dtype"] = args.fp32_adapters
    torch.manual_seed(args.seed + 1)
    with torch.device(args.device):
        model = get_peft_model(base, lcfg, **kw)
    n_layers = perturb_lora_B(model, args.seed + 2)
    model.train()
    harness.sync(args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    info = {
        "config": {k: getattr(cfg, k) for k in (*keys, "vocab_size")},
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "adapted_layers": n_layers,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "adapter_dtypes": sorted({str(p.dtype) for p in trainable}),
        "build_s": time.perf_counter() - t0,
    }
    return model, info


@torch.no_grad()
def perturb_lora_B(model: torch.nn.Module, seed: int) -> int:
    """Redraw every lora_B (PEFT: zeros) from one seeded generator, in module order: the same for every variant."""
    from peft.tuners.lora import LoraLayer

    gen: torch.Generator | None = None
    n = 0
    for _, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        W = mod.get_base_layer().weight
        for name in mod.lora_B:
            A, B = mod.lora_A[name].weight, mod.lora_B[name].weight
            if gen is None:
                gen = torch.Generator(device=B.device).manual_seed(seed)
            # ‖s·(B·A)_j‖ ≈ s·√r·σ_B·σ_A·√d_in against ‖W_j‖ ≈ σ_W·√d_in
            sigma_a, sigma_w = A.float().std().item(), W.float().std().item()
            sigma = DELTA_RATIO * sigma_w / (mod.scaling[name] * math.sqrt(A.shape[0]) * sigma_a)
            B.copy_(torch.randn(B.shape, generator=gen, device=B.device, dtype=torch.float32) * sigma)
            n += 1
    return n


def adapter_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed + 3)
    ids = torch.randint(0, args.vocab, (2, args.tokens), generator=gen).to(args.device)
    return ids[:1], ids[1:]  # input ids, labels


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def loss_of(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits_of(model, ids)
    up = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 → fp32; a float64 reference stays so
    return F.cross_entropy(up.flatten(0, 1), labels.flatten()), logits


# ---------------------------------------------------------------- measurement
def zero_grads(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def bench(fn: Callable[[], object], args: argparse.Namespace, grads: list[torch.nn.Parameter] | None = None) -> dict:
    """Median / p20 / p80 in ms: ``do_bench`` on CUDA (see the module docstring: kept on purpose), on the CPU the
    harness's per-call wall times (``harness.call_times_us``), as many calls as ``--rep`` ms hold, after ``--warmup``
    ms of calls; ``grads`` are set to None before every call."""
    if args.device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8])
    else:

        def call() -> None:
            zero_grads(grads or [])
            fn()

        call()
        est = max(harness.wall_us(call, args.device) / 1e3, 1e-3)
        reps = max(5, int(args.rep / est))
        (times,) = harness.call_times_us([call], args.device, reps=reps, rounds=1, warmup_ms=args.warmup)
        q = harness.quantiles([t / 1e3 for t in times], (0.5, 0.2, 0.8))
    return {"ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}


def peak_memory(step: Callable[[], None], params: list[torch.nn.Parameter], device: torch.device) -> dict:
    """Peak allocated memory of one forward+backward (gradients start as None), absolute and above the start."""
    if device.type != "cuda":
        return {"before_MiB": None, "peak_MiB": None, "delta_MiB": None}
    zero_grads(params)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    zero_grads(params)
    mib = 2**20
    return {"before_MiB": before / mib, "peak_MiB": peak / mib, "delta_MiB": (peak - before) / mib}


def measure(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace) -> dict:
    ids, labels = batch
    params = [p for _, p in adapter_params(model)]

    def fwd_train() -> None:
        logits_of(model, ids)

    def fwd_nograd() -> None:
        with torch.no_grad():
            logits_of(model, ids)

    def step() -> None:
        loss_of(model, ids, labels)[0].backward()

    t0 = time.perf_counter()
    model.train()
    for _ in range(WARM_CALLS):
        fwd_train()
        step()
        zero_grads(params)
    model.eval()
    for _ in range(WARM_CALLS):
        fwd_nograd()
    model.train()
    harness.sync(args.device)
    res: dict[str, Any] = {"warm_s": time.perf_counter() - t0}
    res["fwd_train"] = bench(fwd_train, args)
    model.eval()
    res["fwd_nograd"] = bench(fwd_nograd, args)
    model.train()
    res["fwd_bwd"] = bench(step, args, grads=params)
    zero_grads(params)
    res["memory"] = peak_memory(step, params, args.device)
    if args.trace:
        res["trace"] = trace(step, params, args)
    return res


def trace(step: Callable[[], None], params: list[torch.nn.Parameter], args: argparse.Namespace) -> dict:
    """``torch.profiler`` over ``--trace`` forward+backward steps: wall time and device-busy time per step (their
    gap is time the device waited for the host), the kernels and the host ops that cost most, per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = args.trace
    zero_grads(params)
    harness.sync(args.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
            zero_grads(params)
        harness.sync(args.device)
        wall = (time.perf_counter() - t0) * 1e3 / n
    events = prof.key_averages()

    def dev_self(e: Any) -> float:  # µs
        return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)

    # device-side events only (kernels, memsets, copies): host ops also carry their kernels' device time
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=dev_self, reverse=True)
    busy = sum(dev_self(e) for e in kernels) / 1e3 / n
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "steps": n,
        "wall_ms_per_step": wall,
        "device_busy_ms_per_step": busy if cuda else None,
        "device_idle_ms_per_step": wall - busy if cuda else None,
        "top_kernels": [
            {"name": e.key[:120], "ms_per_step": dev_self(e) / 1e3 / n, "calls_per_step": e.count / n}
            for e in kernels[:25]
        ],
        "top_host_ops": [
            {"name": e.key[:120], "self_ms_per_step": e.self_cpu_time_total / 1e3 / n, "calls_per_step": e.count / n}
            for e in host[:25]
        ],
    }


def capture(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Loss, logits (training forward, no-grad eval forward) and every adapter gradient, as fp32 CPU tensors."""
    ids, labels = batch
    named = adapter_params(model)
    zero_grads([p for _, p in named])
    model.train()
    loss, logits = loss_of(model, ids, labels)
    loss.backward()
    out: dict[str, Any] = {
        "loss": loss.item(),
        "logits": logits.detach().float().cpu(),
        "grads": {n: None if p.grad is None else p.grad.detach().float().cpu() for n, p in named},
    }
    zero_grads([p for _, p in named])
    del loss, logits
    model.eval()
    with torch.no_grad():
        out["logits_nograd"] = logits_of(model, ids).float().cpu()
    model.train()
    return out


def relerr(x: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """‖x − ref‖ / ‖ref‖ (inf when x is missing or not finite)."""
    if x is None or ref is None or x.shape != ref.shape or not torch.isfinite(x).all():
        return math.inf
    den = torch.linalg.vector_norm(ref, dtype=torch.float64).item()
    num = torch.linalg.vector_norm(x.float() - ref.float(), dtype=torch.float64).item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def compare(x: dict, ref: dict) -> dict:
    res: dict[str, Any] = {
        "loss": abs(x["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30),
        "logits": relerr(x["logits"], ref["logits"]),
        "logits_nograd": relerr(x["logits_nograd"], ref["logits_nograd"]),
        "logits_max_abs_over_max": (
            ((x["logits"] - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
            if x["logits"].shape == ref["logits"].shape
            else math.inf
        ),
    }
    for kind in GRAD_KINDS:
        errs = {n: relerr(x["grads"].get(n), g) for n, g in ref["grads"].items() if f".{kind}." in n}
        if errs:
            worst = max(errs, key=lambda n: errs[n])
            res[f"grad_{kind}"] = errs[worst]
            res[f"grad_{kind}_worst"] = worst
            res[f"grad_{kind}_median"] = sorted(errs.values())[len(errs) // 2]
            res[f"grad_{kind}_tensors"] = len(errs)
    return res


#: with a reference run, (b) passes where its error is at most this × (a)'s error against the reference, + tol/20.
REF_FACTOR = 1.25

#: unit roundoff u of each working dtype (half the distance from 1 to the next number)
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-24}
#: the no-reference tolerances of a bf16/fp16 model, in units of u·√layers: outputs (loss, logits) and gradients
NOREF_UNITS_OUT, NOREF_UNITS_GRAD = 6.5, 15.0


def default_tolerances(dtype: str, layers: int) -> tuple[float, float]:
    """``(tol_out, tol_grad)``: how far (b) may be from (a) without a reference run, a bound of rounding alone.

    (a) and (b) round differently (other kernels, other orders of summation), so each differs from the exact result
    by the dtype's rounding noise, which grows like ``u·√(rounding steps)`` through the stack (errors of independent
    roundings add in quadrature), and (b) − (a) is as large as either. Measured with the fp32 reference (H200, bf16,
    2 layers, Llama-3-8B and Qwen2.5-32B dims, 4096 tokens, r 384): PEFT's own error 2.4e-2 = 6.1u on the logits and
    up to 6.0e-2 = 15u on a gradient; (b) vs (a) 2.3e-2 and 5.6e-2. The bound is ``6.5·u·√layers`` for outputs and
    ``15·u·√layers`` for gradients (2 layers of bf16: 3.6e-2 and 8.3e-2): about 1.5× the noise measured, so rounding
    alone never fails, while a wrong formula (errors of 1e-1 and more) does. fp32 models (the CPU smoke test, against
    an fp64 reference): 1e-4 and 1e-3, far above fp32 rounding and far below any error of the formula.
    """
    if dtype == "fp32":
        return 1e-4, 1e-3
    scale = UNIT_ROUNDOFF[dtype] * math.sqrt(max(layers, 1))
    return NOREF_UNITS_OUT * scale, NOREF_UNITS_GRAD * scale


def check(
    diff: dict, args: argparse.Namespace, ours_ref: dict | None = None, peft_ref: dict | None = None
) -> list[str]:
    """The quantities where (b) fails.

    With a reference run (fp32, or fp64 for an fp32 model): (b)'s error against it must be at most
    :data:`REF_FACTOR` × PEFT's own error against it (+ a twentieth of the tolerance) — in bf16 both sit at the
    dtype's noise (~2e-2 for logits, ~5e-2 for the worst gradient on the H200), so (b) vs (a) alone is as large as
    either error and says nothing about which is right. Without one: (b) vs (a) within ``--tol-out`` /
    ``--tol-grad``.
    """
    quantities = [(q, args.tol_out) for q in ("loss", "logits", "logits_nograd")]
    quantities += [(f"grad_{k}", args.tol_grad) for k in GRAD_KINDS if f"grad_{k}" in diff]
    if ours_ref is not None and peft_ref is not None:
        return [q for q, tol in quantities if not ours_ref[q] <= REF_FACTOR * peft_ref[q] + tol / 20]
    return [q for q, tol in quantities if not diff[q] <= tol]


# ---------------------------------------------------------------- one model
def run_model(key: str, spec: Spec, args: argparse.Namespace, dt_peft: ModuleType | None) -> dict:
    out: dict[str, Any] = {"spec": dataclasses.asdict(spec), "variants": {}, "failures": []}
    batch = make_batch(args)
    want = args.variants
    caps: dict[str, dict] = {}

    def attempt(what: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # record, go on with the next variant; the exit status says it failed
            traceback.print_exc()
            out["failures"].append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
            console.print(f"[red]{key} {what} failed: {type(e).__name__}: {str(e)[:300]}[/red]", highlight=False)
            return False

    def release() -> None:
        gc.collect()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()

    def reference(model: torch.nn.Module) -> None:
        ref_dtype = torch.float64 if args.torch_dtype == torch.float32 else torch.float32
        ref_model = copy.deepcopy(model).to(ref_dtype)
        try:
            caps["ref"] = capture(ref_model, batch)
            out["reference_dtype"] = str(ref_dtype)
        finally:
            del ref_model
            release()

    def variant(name: str, model: torch.nn.Module, keep: bool) -> None:
        out["variants"][name] = measure(model, batch, args)
        if keep:
            caps[name] = capture(model, batch)
        report_variant(key, name, out["variants"][name])

    def compiled_variant(name: str, model: torch.nn.Module, **compile_kwargs: Any) -> None:
        t0 = time.perf_counter()
        compiled = torch.compile(model, **compile_kwargs)
        try:
            variant(name, compiled, keep=False)
        finally:
            out.setdefault("compile_and_measure_s", {})[name] = round(time.perf_counter() - t0, 1)
            del compiled
            torch._dynamo.reset()

    def dora_tune(model: torch.nn.Module) -> None:
        assert dt_peft is not None
        from dora_tune.dispatch import force

        ret = dt_peft.enable(model)
        out["enable_returned"] = None if ret is None or isinstance(ret, torch.nn.Module) else repr(ret)[:200]
        try:
            if "dora_tune" in want:
                variant("dora_tune", model, keep=True)
            if "dora_tune_eager" in want:  # the same integration on the torch implementations (no Python backward)
                with force("eager"):
                    variant("dora_tune_eager", model, keep=False)
            if "dora_tune_compiled" in want:  # one compiled backward instead of a Python node per layer
                compiled_variant("dora_tune_compiled", model)
            if "dora_tune_cudagraphs" in want:  # ... replayed as CUDA graphs: no host cost per layer
                compiled_variant("dora_tune_cudagraphs", model, mode="reduce-overhead")
        finally:
            dt_disable(dt_peft, model)
        if "peft_dora" in caps:  # disable() must give PEFT's path back: the no-grad logits of (a) again
            model.eval()
            with torch.no_grad():
                again = logits_of(model, batch[0]).float().cpu()
            model.train()
            err = out["after_disable_logits_vs_peft"] = relerr(again, caps["peft_dora"]["logits_nograd"])
            if not err <= args.tol_out:
                out["failures"].append(f"after disable(), no-grad logits differ from (a) by {err:.2e}")

    if ({"peft_dora", "peft_dora_compiled", "peft_dora_cudagraphs"} | DT_VARIANTS) & set(want):
        built: list[torch.nn.Module] = []

        def build_dora() -> None:
            model, info = build_model(spec, args, use_dora=True)
            built.append(model)
            out["dora_model"] = info
            console.print(
                f"{key}: DoRA model built in {info['build_s']:.1f} s ({info['adapted_layers']} adapted layers, "
                f"{info['trainable_params']:,} trainable parameters, adapters {info['adapter_dtypes']})",
                highlight=False,
            )

        if attempt("building the DoRA model", build_dora):
            model = built.pop()
            if args.ref:
                attempt("fp32 reference", lambda: reference(model))
            if "peft_dora" in want:
                attempt("variant peft_dora", lambda: variant("peft_dora", model, keep=True))
            if "peft_dora_compiled" in want:
                attempt("variant peft_dora_compiled", lambda: compiled_variant("peft_dora_compiled", model))
            if "peft_dora_cudagraphs" in want:
                attempt(
                    "variant peft_dora_cudagraphs",
                    lambda: compiled_variant("peft_dora_cudagraphs", model, mode="reduce-overhead"),
                )
            if DT_VARIANTS & set(want):
                attempt("variant dora_tune", lambda: dora_tune(model))
            del model
        release()

    if "lora" in want:

        def lora() -> None:
            model, info = build_model(spec, args, use_dora=False)
            out["lora_model"] = info
            variant("lora", model, keep=False)

        attempt("variant lora", lora)
        release()

    out["correctness"] = correctness(key, caps, out, args)
    out["summary"] = summary(out["variants"])
    return out


def correctness(key: str, caps: dict, out: dict, args: argparse.Namespace) -> dict:
    res: dict[str, Any] = {"tol_out": args.tol_out, "tol_grad": args.tol_grad}
    if "ref" in caps:
        for v in ("peft_dora", "dora_tune"):
            if v in caps:
                res[f"{v}_vs_ref"] = compare(caps[v], caps["ref"])
    if "peft_dora" in caps and "dora_tune" in caps:
        diff = compare(caps["dora_tune"], caps["peft_dora"])
        res["dora_tune_vs_peft_dora"] = diff
        res["bitwise_identical_logits"] = bool(torch.equal(caps["dora_tune"]["logits"], caps["peft_dora"]["logits"]))
        res["criterion"] = f"(b) vs ref <= {REF_FACTOR} x (a) vs ref" if "ref" in caps else "(b) vs (a) <= tol"
        res["beyond_tolerance"] = check(diff, args, res.get("dora_tune_vs_ref"), res.get("peft_dora_vs_ref"))
        res["ok"] = not res["beyond_tolerance"]
        if not res["ok"]:
            out["failures"].append(f"(b) vs (a) beyond tolerance: {', '.join(res['beyond_tolerance'])}")
        if res["bitwise_identical_logits"]:
            console.print(f"[yellow]{key}: (b) logits are bitwise identical to (a): did enable() take effect?[/yellow]")
    return res


def report_variant(key: str, variant: str, r: dict) -> None:
    mem = r["memory"]["peak_MiB"]
    peak = "" if mem is None else f", peak {mem:.0f} MiB"
    console.print(
        f"{key} {VARIANTS[variant]}: fwd {r['fwd_train']['ms']:.2f} ms, no-grad {r['fwd_nograd']['ms']:.2f} ms, "
        f"fwd+bwd {r['fwd_bwd']['ms']:.2f} ms{peak} (warm-up {r['warm_s']:.1f} s)",
        highlight=False,
    )


def summary(variants: dict) -> dict:
    a, b = variants.get("peft_dora"), variants.get("dora_tune")
    if not (a and b):
        return {}
    s = {f"speedup_{k}": a[k]["ms"] / b[k]["ms"] for k in ("fwd_train", "fwd_nograd", "fwd_bwd")}
    pa, pb = a["memory"]["peak_MiB"], b["memory"]["peak_MiB"]
    s["peak_MiB_saved"] = None if pa is None else pa - pb
    s["target_fwd_bwd_2x"] = s["speedup_fwd_bwd"] >= 2.0
    s["target_lower_peak"] = None if pa is None else pb < pa
    return s


# ---------------------------------------------------------------- output
def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def print_tables(key: str, res: dict) -> None:
    v = res["variants"]
    a = v.get("peft_dora")
    t = Table(
        title=f"{key}: {res['spec']['hidden']}/{res['spec']['intermediate']}, {res['args_layers']} layers, "
        f"{res['args_tokens']} tokens, r={res['args_rank']}, {res['args_dtype']}"
    )
    for col in ("variant", "fwd ms (train)", "fwd ms (no grad)", "fwd+bwd ms", "peak MiB", "Δpeak MiB"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for col in ("× (a) fwd", "× (a) no grad", "× (a) fwd+bwd"):
        t.add_column(col, justify="right")
    for name, label in VARIANTS.items():
        r = v.get(name)
        if r is None:
            continue
        sp = [None if a is None else a[k]["ms"] / r[k]["ms"] for k in ("fwd_train", "fwd_nograd", "fwd_bwd")]
        t.add_row(
            label,
            _f(r["fwd_train"]["ms"]),
            _f(r["fwd_nograd"]["ms"]),
            _f(r["fwd_bwd"]["ms"]),
            _f(r["memory"]["peak_MiB"], ".0f"),
            _f(r["memory"]["delta_MiB"], ".0f"),
            *(_f(x) for x in sp),
        )
    console.print(t)
    c = res["correctness"]
    if "dora_tune_vs_peft_dora" in c or "peft_dora_vs_ref" in c:
        ref = res.get("reference_dtype", "").replace("torch.", "")
        t = Table(title=f"{key}: relative error ‖x − y‖/‖y‖ (per tensor; gradients: max over layers)")
        ref_cols = (f"(a) vs {ref}", f"(b) vs {ref}") if ref else ()
        for col in ("quantity", "(b) vs (a)", *ref_cols, "tolerance", "status"):
            t.add_column(col, justify="left" if col == "quantity" else "right")
        rows = [("loss", "loss"), ("logits", "logits (train fwd)"), ("logits_nograd", "logits (no grad)")]
        rows += [(f"grad_{k}", lab) for k, lab in GRAD_KINDS.items()]
        d, ra, rb = (c.get(k, {}) for k in ("dora_tune_vs_peft_dora", "peft_dora_vs_ref", "dora_tune_vs_ref"))
        for q, label in rows:
            if q not in d and q not in ra:
                continue
            tol = c["tol_grad"] if q.startswith("grad") else c["tol_out"]
            status = "-" if q not in d else ("[red]FAIL[/red]" if q in c.get("beyond_tolerance", ()) else "ok")
            refs = (_f(ra.get(q), ".2e"), _f(rb.get(q), ".2e")) if ref else ()
            t.add_row(label, _f(d.get(q), ".2e"), *refs, f"{tol:.0e}", status)
        console.print(t)
    s = res["summary"]
    if s:
        met = s["target_fwd_bwd_2x"] and s["target_lower_peak"] is not False
        console.print(
            f"{key}: (b) over (a): fwd {s['speedup_fwd_train']:.2f}×, no-grad {s['speedup_fwd_nograd']:.2f}×, "
            f"fwd+bwd {s['speedup_fwd_bwd']:.2f}×, peak {_f(s['peak_MiB_saved'], '.0f')} MiB lower — target "
            f"(≥2× fwd+bwd, lower peak): {'[green]met[/green]' if met else '[red]not met[/red]'}"
            + ("" if c.get("ok", True) else " [red](but (b) disagrees with (a): see above)[/red]"),
            highlight=False,
        )


def environment(args: argparse.Namespace) -> dict:
    """:func:`harness.environment`, and whether PEFT caches its DoRA weight norm."""
    env = harness.environment(args.device)
    try:
        from peft.tuners.lora import dora as peft_dora

        env["peft_dora_caching"] = getattr(peft_dora, "ENABLE_DORA_CACHING", None)
    except ImportError:
        pass
    return env


def record_model(rec: harness.Recorder, key: str, m: dict, args: argparse.Namespace) -> None:
    """One result row per variant measured on model ``key`` (the JSON keeps the rest)."""
    shape = {
        "model": key,
        "layers": args.layers,
        "tokens": args.tokens,
        "rank": args.rank,
        "alpha": args.alpha,
        "dtype": args.dtype,
        "fp32_adapters": args.fp32_adapters,
        "tiny": args.tiny,
    }
    a = m["variants"].get("peft_dora")
    correct = m.get("correctness", {}).get("ok")
    for name, r in m["variants"].items():
        figures: dict[str, Any] = {}
        for k in ("fwd_train", "fwd_nograd", "fwd_bwd"):
            figures |= {f"{k}_ms": r[k]["ms"], f"{k}_p20_ms": r[k]["p20_ms"], f"{k}_p80_ms": r[k]["p80_ms"]}
            if a is not None:
                figures[f"{k}_speedup_vs_peft_dora"] = a[k]["ms"] / r[k]["ms"]
        figures |= {"peak_MiB": r["memory"]["peak_MiB"], "delta_MiB": r["memory"]["delta_MiB"]}
        if "trace" in r:
            t = r["trace"]
            figures |= {"trace_wall_ms": t["wall_ms_per_step"], "trace_device_busy_ms": t["device_busy_ms_per_step"]}
        if name == "dora_tune" and correct is not None:
            figures["correct_vs_peft_dora"] = correct
        rec.record(shape, figures, item=name)


# ---------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}"
    )
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens, batch 1 (default 4096; --tiny 64)")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank r (default 384; --tiny 8)")
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2·r)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 1024; --tiny 128)")
    ap.add_argument("--warmup", type=float, default=None, help="do_bench warm-up, ms (default 100; --tiny 20)")
    ap.add_argument("--rep", type=float, default=None, help="do_bench repetition time, ms (default 1000; --tiny 100)")
    ap.add_argument("--tiny", action="store_true", help="tiny dims (smoke test)")
    ap.add_argument("--fp32-adapters", action="store_true", help="PEFT's autocast_adapter_dtype=True (fp32 adapters)")
    ap.add_argument(
        "--no-ref",
        dest="ref",
        action="store_false",
        help="skip the fp32/fp64 reference copy: (b) is then checked against (a) within --tol-out/--tol-grad",
    )
    ap.add_argument(
        "--tol-out",
        type=float,
        default=None,
        help="(b) vs (a) loss/logits (default: a bound of rounding, 6.5·u·√layers: 3.6e-2 at 2 bf16 layers; fp32 1e-4)",
    )
    ap.add_argument(
        "--tol-grad",
        type=float,
        default=None,
        help="(b) vs (a) gradients (default: 15·u·√layers, 8.3e-2 for 2 bf16 layers; fp32 1e-3)",
    )
    ap.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="N",
        help="also profile N forward+backward steps per variant (torch.profiler): device-busy vs wall "
        "time, top kernels and host ops, in the JSON",
    )
    harness.add_flags(
        ap,
        out_help="JSON path (default $OUT/h200-e2e.json or benchmarks/results/; cpu-e2e-tiny.json on the CPU)",
        device="auto",
        dtype=True,
    )
    args = harness.resolve(ap.parse_args(), ap)
    tiny = args.tiny
    for name, full, small in (
        ("tokens", 4096, 64),
        ("rank", 384, 8),
        ("vocab", 1024, 128),
        ("warmup", 100.0, 20.0),
        ("rep", 1000.0, 100.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    args.alpha = args.alpha if args.alpha is not None else 2 * args.rank
    tol_out, tol_grad = default_tolerances(args.dtype, args.layers)
    args.tol_out = args.tol_out if args.tol_out is not None else tol_out
    args.tol_grad = args.tol_grad if args.tol_grad is not None else tol_grad
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for v in args.variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if args.out is None:
        args.out = harness.default_out("cpu-e2e-tiny.json" if args.device.type == "cpu" else "h200-e2e.json")
    return args


def main() -> None:
    args = parse_args()
    dt_peft = load_dt_peft() if DT_VARIANTS & set(args.variants) else None
    t0 = time.time()
    rec = harness.start(__file__, args, env=environment(args))
    res: dict[str, Any] = {
        "env": rec.env,
        "args": {k: (str(v) if isinstance(v, torch.device | torch.dtype) else v) for k, v in vars(args).items()},
        "models": {},
    }
    env = res["env"]
    console.print(
        f"{env['device']}: torch {env['torch']}, triton {env['triton']}, peft {env['peft']}, "
        f"transformers {env['transformers']}",
        highlight=False,
    )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for key in args.models:
        spec = (TINY if args.tiny else MODELS)[key]
        m = run_model(key, spec, args, dt_peft)
        m.update(args_layers=args.layers, args_tokens=args.tokens, args_rank=args.rank, args_dtype=args.dtype)
        res["models"][key] = m
        failures += [f"{key}: {f}" for f in m["failures"]]
        res["seconds"] = time.time() - t0
        res["ok"] = not failures
        path.write_text(json.dumps(res, indent=1, default=str))  # after each model: a cut-short run keeps it
        record_model(rec, key, m, args)
        print_tables(key, m)
    console.print(f"wrote {path} in {res['seconds']:.0f} s; {rec.summary()}", highlight=False)
    if failures:
        console.print("[red]FAILED:[/red]\n  " + "\n  ".join(failures), highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
