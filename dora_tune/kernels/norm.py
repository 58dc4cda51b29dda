"""Row norm of the DoRA weight ``W + s·B·A`` without building ``B·A``.

``n_j = ‖W_j + s·(B·A)_j‖₂`` for each output row j, from the factored form (DESIGN.md §1)

    n² = ‖W‖²_row + 2s·rowsum(B ⊙ U) + s²·rowsum((B·G) ⊙ B),   U = W·Aᵀ [d_out, r],  G = A·Aᵀ [r, r],

accumulated in float32 and clamped at 0 before the square root, so the result is never NaN for finite inputs.
The norm is a detached quantity in DoRA: these functions take no part in autograd (they run under ``no_grad``).

Implementations:

- ``"dense"``: the float32 reference; builds ``B·A`` in float32 (``4·d_out·d_in`` extra bytes).
- ``"factored_torch"``: chunks over ``d_in`` with torch ops; working memory ``4·d_out·(r + chunk)`` bytes.
- ``"triton"``: the fused kernel of :mod:`dora_tune.kernels._norm_triton`; one pass over W on the tensor cores.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch

from dora_tune import ops
from dora_tune.kernels._common import (
    KernelConfig,
    Planner,
    check_same_device,
    check_scale,
    check_tensor,
    config_field,
    need_planner,
    require_triton,
)
from dora_tune.kernels._sharded import ShardIndex, source_versions
from dora_tune.kernels.spec import ANY_DEVICE, CUDA_ONLY, NORM_TOL, ImplSpec, OpSpec

IMPLS: tuple[str, ...] = ops.NORM.impls

#: working-memory budget of one d_in chunk in ``factored_torch`` (bytes of the float32 chunk of W).
_CHUNK_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class NormConfig(KernelConfig):
    """Launch config of the fused norm kernel.

    ``block_m`` rows of W and ``block_n`` columns of ``U`` per program, ``block_k`` columns of W per K step;
    ``split_k`` K ranges per tile (more programs for a better last wave; the partial sums add up exactly).
    """

    op = "norm"
    block_m: int = config_field(lo=16, hi=256)
    block_n: int = config_field(lo=16, hi=256)
    block_k: int = config_field(lo=16, hi=256)
    num_warps: int = config_field(lo=1, hi=16)
    num_stages: int = config_field(lo=1, hi=8, pow2=False)
    split_k: int = config_field(lo=1, hi=16, pow2=False)


DEFAULT_NORM_CONFIG = NormConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, split_k=1)

#: shared memory per SM on the GPUs we target (H100/H200: 227 KB usable by one block).
_SMEM_LIMIT = 220 * 1024


def norm_config_space(rank: int | None = None) -> list[NormConfig]:
    """Every config worth trying; with ``rank`` given, drop ``block_n`` wider than the rank needs.

    Filters: the fp32 accumulator stays ≤ 128 registers a thread, and the pipelined tiles of either loop (the
    main loop over d_in, the short B·G loop over r) fit in shared memory (16-bit operands).
    """
    out = []
    grid = itertools.product((64, 128, 256), (32, 64, 128, 256), (64, 128), (4, 8), (3, 4), (1, 2, 3, 4))
    for bm, bn, bk, w, st, sk in grid:
        if rank is not None and bn > max(32, 1 << max(0, rank - 1).bit_length()):
            continue
        if bm * bn // (w * 32) > 128:
            continue
        main_smem = st * (bm + bn) * bk * 2
        g_smem = 2 * (bm + 2 * bn) * 32 * 2
        if max(main_smem, g_smem) > _SMEM_LIMIT:
            continue
        out.append(NormConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st, split_k=sk))
    return out


def norm_tuning_space(rank: int | None = None) -> list[NormConfig]:
    """The part of :func:`norm_config_space` that profiling sweeps by default: ``block_k = 64``, 8 warps,
    ``block_m ≤ 128``. Every winner of a full sweep on the H200 lay there (docs/norm.md), and it compiles in a
    quarter of the time."""
    return [c for c in norm_config_space(rank) if c.block_k == 64 and c.num_warps == 8 and c.block_m <= 128]


def _check_norm_inputs(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: object) -> float:
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    check_same_device(weight=weight, lora_A=lora_A, lora_B=lora_B)
    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    if lora_A.shape[1] != d_in:
        raise ValueError(
            f"lora_A must be [r, d_in] = [r, {d_in}] to match weight {tuple(weight.shape)}, got {tuple(lora_A.shape)}"
        )
    if tuple(lora_B.shape) != (d_out, r):
        raise ValueError(f"lora_B must be [d_out, r] = [{d_out}, {r}], got {tuple(lora_B.shape)}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")
    return check_scale(scale)


def _compute_dtype(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    """The dtype the fused kernel computes in: the promotion of W's and the adapters' dtypes."""
    return torch.promote_types(weight.dtype, lora_A.dtype)


def norm_reference(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``‖W + s·B·A‖_row`` computed densely in ``dtype`` (float64 for tests). Returns ``[d_out]`` in ``dtype``."""
    w = weight.to(dtype)
    return torch.linalg.vector_norm(w + scale * (lora_B.to(dtype) @ lora_A.to(dtype)), dim=1)


def norm_factored_torch(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, chunk: int | None = None
) -> torch.Tensor:
    """Factored norm with torch ops, chunked over ``d_in`` so the float32 working set stays bounded.

    Returns ``[d_out]`` float32. ``chunk`` (columns of W per step) defaults to a 16 MB float32 slab.
    """
    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    dev = weight.device
    if chunk is None:
        chunk = max(64, _CHUNK_BYTES // (4 * max(d_out, 1)))
    wsq = torch.zeros(d_out, device=dev, dtype=torch.float32)
    U = torch.zeros(d_out, r, device=dev, dtype=torch.float32)
    G = torch.zeros(r, r, device=dev, dtype=torch.float32)
    for start in range(0, d_in, chunk):
        wc = weight[:, start : start + chunk].float()
        ac = lora_A[:, start : start + chunk].float()
        wsq += wc.square().sum(dim=1)
        U.addmm_(wc, ac.t())
        G.addmm_(ac, ac.t())
        del wc, ac
    Bf = lora_B.float()
    n2 = wsq + 2.0 * scale * (Bf * U).sum(dim=1) + scale * scale * ((Bf @ G) * Bf).sum(dim=1)
    return n2.clamp_min_(0.0).sqrt_()


def _race_run(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, config: Any) -> Any:
    """One norm launch with ``config`` for the dispatcher's first-use race (:meth:`Dispatcher.settle`)."""
    from dora_tune.kernels._norm_triton import factored_norm_triton

    with torch.no_grad():
        return factored_norm_triton(weight, lora_A, lora_B, scale, config)


class SharedNormCache:
    """Norms of ``(W, A, B, scale)`` remembered by **storage**, for callers that see aliases of the parameters
    rather than the parameters (a compiled graph hands its ops views of them): one entry per (device, the three data
    pointers, scale), reused while the three storages are alive (weak references: an address freed and reused by a
    new tensor never matches) and the three tensors' in-place version counters, dtypes, shapes and strides are as
    they were. ``optimizer.step()``, ``load_state_dict``, ``.copy_`` and ``zero_()`` bump the counter (views share
    it); a dtype or device move gives a new storage. Writes through ``.data`` are invisible (call :meth:`clear`).

    The instance the custom op ``dora_tune::cached_norm`` uses belongs to the process-wide dispatcher (its explicit
    cache; ``Dispatcher.clear`` empties it). Entries hold the float32 ``[d_out]`` norm only; those of freed tensors
    are dropped as the table grows. A norm computed under ``torch.inference_mode`` is reused only there. Under FSDP2
    the counters of the sharded parameters W, A and B were gathered from are part of the stamp
    (:mod:`dora_tune.kernels._sharded`: a gather keeps the unsharded tensor's counter and often its address).
    """

    __slots__ = ("_compute", "_entries", "_prune_at", "_shards", "computed")

    def __init__(self, compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
        #: ``(W, A, B, scale)`` → the norm (the dispatcher's: :func:`factored_norm` with ``impl="auto"``)
        self._compute = compute
        self._entries: dict[tuple, tuple[tuple, tuple, torch.Tensor, bool]] = {}
        self._prune_at = 64
        self._shards = ShardIndex()
        #: how many norms were computed (not reused) — for tests and benchmarks
        self.computed = 0

    def clear(self) -> None:
        """Forget every norm."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """The float32 ``[d_out]`` norm (``impl="auto"``), computed only when the tensors changed. The returned
        tensor is the cached one: callers that hand it to code which may write into it copy it first."""
        key = (W.device, W.data_ptr(), A.data_ptr(), B.data_ptr(), scale)
        stamp = tuple((t._version, t.dtype, t.shape, t.stride()) for t in (W, A, B))
        stamp = (*stamp, source_versions(self._shards.sources((W, A, B))))
        hit = self._entries.get(key)
        if hit is not None:
            refs, old, norm, inference = hit
            if (
                old == stamp
                and not any(r.expired() for r in refs)
                and (not inference or torch.is_inference_mode_enabled())
            ):
                return norm
        from torch.multiprocessing.reductions import StorageWeakRef

        norm = self._compute(W, A, B, scale)
        self.computed += 1
        refs = tuple(StorageWeakRef(t.untyped_storage()) for t in (W, A, B))
        self._entries[key] = (refs, stamp, norm, norm.is_inference())
        if len(self._entries) >= self._prune_at:  # drop the norms of freed tensors (amortised: the bar doubles)
            for k in [k for k, e in self._entries.items() if any(r.expired() for r in e[0])]:
                del self._entries[k]
            self._prune_at = max(64, 2 * len(self._entries))
        return norm


def run_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    impl: str,
    config: NormConfig | None,
) -> torch.Tensor:
    """The computation of :func:`factored_norm` for inputs it validated and an implementation it resolved —
    ``"dense"``, ``"factored_torch"`` or ``"triton"`` (Triton available; ``config`` None: the default) — with
    nothing checked or planned: the hot path of a norm recomputed for the same tensors after an optimizer step
    (:class:`~dora_tune.nn.layer.NormCache`). float32 ``[d_out]``, no gradient."""
    with torch.no_grad():
        if impl == "dense":
            return norm_reference(weight, lora_A, lora_B, scale, dtype=torch.float32)
        if impl == "factored_torch" or lora_A.shape[0] == 0 or weight.shape[1] == 0:  # no tensor-core work
            return norm_factored_torch(weight, lora_A, lora_B, scale)
        from dora_tune.kernels._norm_triton import factored_norm_triton

        return factored_norm_triton(weight, lora_A, lora_B, scale, config or DEFAULT_NORM_CONFIG)


def factored_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    *,
    impl: str = "auto",
    config: NormConfig | None = None,
    planner: Planner | None = None,
) -> torch.Tensor:
    """Row norm of ``W + scale·B·A``, never building ``B·A`` (except ``impl="dense"``).

    Args:
        weight: ``[d_out, d_in]`` frozen base weight W (bfloat16, float16 or float32).
        lora_A: ``[r, d_in]`` LoRA down-projection A.
        lora_B: ``[d_out, r]`` LoRA up-projection B, same dtype as ``lora_A``.
        scale: the LoRA scale s (e.g. ``lora_alpha / r``), a Python number.
        impl: ``"dense"``, ``"factored_torch"``, ``"triton"`` or ``"auto"`` (chosen by ``planner``).
        config: launch config for ``impl="triton"`` (default :data:`DEFAULT_NORM_CONFIG`); ignored otherwise.
        planner: what answers ``impl="auto"`` (:class:`~dora_tune.kernels._common.Planner`); the public
            :func:`dora_tune.kernels.factored_norm` (the front door, :mod:`dora_tune.auto`) passes the dispatcher's.

    Returns:
        ``[d_out]`` float32 tensor of row norms, ≥ 0 and never NaN for finite inputs. It carries no gradient.
    """
    s = _check_norm_inputs(weight, lora_A, lora_B, scale)
    chosen = None
    if impl == "auto":
        auto = need_planner("factored_norm", planner).auto
        # keyed on the dtype the kernel computes in (fp32 adapters on a bf16 W compute in fp32: other configs fit)
        dims, compute = (weight.shape[0], weight.shape[1], lora_A.shape[0]), _compute_dtype(weight, lora_A)
        # the first call of a model plan with a shortlist times it on these inputs and keeps the fastest (dispatch)
        race = None
        if config is None and lora_A.shape[0] and weight.shape[1]:
            race = lambda: functools.partial(_race_run, weight, lora_A, lora_B, s)  # noqa: E731
        chosen = auto("norm", dims, compute, weight.device, race)
        impl = chosen.impl
        if config is None:
            config = chosen.config
        else:  # the caller's own config: its launch errors are the caller's to see
            chosen = None
    if impl in ("dense", "factored_torch"):
        return run_norm(weight, lora_A, lora_B, s, impl, None)
    if impl == "triton":
        require_triton(weight.device)
        if config is not None and not isinstance(config, NormConfig):
            raise TypeError(f"config must be a NormConfig, got {type(config).__name__}")
        try:
            return run_norm(weight, lora_A, lora_B, s, impl, config)
        except Exception as e:  # a planned config that cannot launch must not break training
            from triton.runtime.errors import OutOfResources

            if chosen is None or not isinstance(e, OutOfResources):
                raise
            planner.auto_failed("norm", dims, compute, weight.device, chosen, str(e).split(".")[0])
            # the new plan: the default config, then torch
            return factored_norm(weight, lora_A, lora_B, s, planner=planner)
    raise ValueError(f"impl must be one of {IMPLS} or 'auto', got {impl!r}")


# ----------------------------------------------------------------------------------------------- the op's spec


def _norm_space(shape: dict[str, int]) -> list[dict]:
    # the tuning space, plus the default config (the fixed crossover's pick, measured so it can be compared)
    space = [c.as_dict() for c in norm_tuning_space(shape["r"])]
    default = DEFAULT_NORM_CONFIG.as_dict()
    return space if default in space else [*space, default]


def _norm_runner(name: str, x: dict[str, Any], cfg: NormConfig | None) -> Any:
    return lambda: factored_norm(x["W"], x["A"], x["B"], x["s"], impl=name, config=cfg)


def _norm_inputs(shape: dict[str, int], rnd: Any) -> dict[str, Any]:
    o, i, r = shape["d_out"], shape["d_in"], shape["r"]
    return {"W": rnd(o, i, scale=0.02), "A": rnd(r, i, scale=1 / math.sqrt(i)), "B": rnd(o, r, scale=0.02), "s": 2.0}


_K = "dora_tune.kernels."
#: the norm's facts, configs, implementations, runner and inputs (:data:`dora_tune.kernels.OP_SPECS`)
NORM_SPEC = OpSpec(
    ops.NORM,
    NormConfig,
    DEFAULT_NORM_CONFIG,
    impls=(
        ImplSpec("dense", ANY_DEVICE, (_K + "norm:norm_reference",), selfcheck_tol=NORM_TOL),
        ImplSpec("factored_torch", ANY_DEVICE, (_K + "norm:norm_factored_torch",), selfcheck_tol=NORM_TOL),
        ImplSpec("triton", CUDA_ONLY, (_K + "_norm_triton",), _norm_space, NormConfig.from_dict, ("r",), NORM_TOL),
    ),
    runner=_norm_runner,
    inputs=_norm_inputs,
)
