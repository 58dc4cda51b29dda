"""``DoRALinear``: a DoRA adapter around a frozen ``nn.Linear``, computed with dora-tune's dispatched kernels.

Math (DESIGN.md §1): ``y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias`` with ``g = m / ‖W + s·B·A‖_row`` (the norm detached).
The norm comes from :func:`~dora_tune.kernels.factored_norm` (never building ``B·A``), cached while W, A and B are
unchanged (:class:`NormCache`: once per optimizer step in training); the rest of the layer is
:func:`~dora_tune.kernels.dora_layer.dora_layer` (GEMMs, ``g`` and the compose: a few torch ops or one node around
the fused kernels), each with ``impl="auto"`` (the dispatcher's choice, through the front door :mod:`dora_tune.auto`).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dora_tune.auto import dora_layer_unchecked, factored_norm
from dora_tune.auto.custom_ops import cached_norm_op
from dora_tune.dispatch.runtime import auto
from dora_tune.kernels._common import SUPPORTED_DTYPES
from dora_tune.kernels._sharded import fsdp_sources, source_versions
from dora_tune.kernels.compose import dora_scale
from dora_tune.kernels.norm import run_norm

_INITS = (True, False, "gaussian")
DROPOUT_MODES = ("peft", "lora_only")


class DoRALinear(nn.Module):
    """DoRA (weight-decomposed low-rank adaptation) of a frozen ``nn.Linear``.

    Parameters (trainable) and state-dict keys:

    - ``lora_A``: ``[r, in_features]``, the LoRA down-projection A.
    - ``lora_B``: ``[out_features, r]``, the LoRA up-projection B.
    - ``magnitude``: ``[out_features]``, the DoRA magnitude m; initialised to ``‖W + s·B·A‖_row`` (the row norm of
      W when B starts at zero), so a fresh layer computes exactly what the base layer does.
    - ``base_layer.weight`` ``[out_features, in_features]`` and ``base_layer.bias`` ``[out_features]`` (if any): the
      wrapped layer, frozen (``requires_grad=False``) by the constructor.

    Forward, with ``s = alpha / r`` (``alpha / √r`` with ``use_rslora``) and ``g = m / ‖W + s·B·A‖_row`` (float32,
    detached norm; ``g = 1`` on rows whose norm is 0)::

        y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias                                   (eval, or dropout = 0)
        y = x·Wᵀ + bias + (g − 1) ⊙ (x̃·Wᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ,  x̃ = dropout(x)   (training with dropout > 0)

    The second line is PEFT's DoRA semantics with ``lora_dropout > 0``: the base output of the un-dropped input
    passes through, and the DoRA rescale acts on the dropped-out input (one extra GEMM, as in PEFT). The bias is
    never scaled by ``g``. The output has the base layer's output dtype.

    Dtypes: bfloat16, float16, float32 (base weight and adapters may differ: ``dtype`` sets the adapters' dtype;
    the LoRA branch then runs in it and the composition in the promoted dtype). Devices: CPU (torch
    implementations) and CUDA (the dispatcher picks Triton kernels and configs per shape).

    The norm is cached and reused until one of W, A or B changes — in training too, where it is a constant between
    optimizer steps (gradient-accumulation micro-steps and gradient-checkpointing recomputes reuse it) — keyed on
    each tensor's identity, storage and in-place version counter, so ``optimizer.step()``, ``load_state_dict``,
    ``.copy_``, ``zero_()`` and dtype/device moves invalidate it; a write through ``.data`` does not (call
    :meth:`clear_cache` after one). The cached norm is bitwise the one a recomputation would give. A compiled
    forward (``torch.compile``) does not cache: the norm's custom op runs every call.

    ``dropout_mode``: ``"peft"`` (default) is PEFT's semantics above; ``"lora_only"`` (torchtune's) drops out the
    LoRA branch's input only, ``y = g ⊙ (x·Wᵀ + s·dropout(x)·Aᵀ·Bᵀ) + bias``: a different model (not a faster PEFT)
    whose training step needs no second base GEMM.

    The rest of the layer (GEMMs, scale, compose) is :func:`~dora_tune.kernels.dora_layer.dora_layer`: a few torch
    ops under torch's autograd or one autograd node around the fused Triton kernels, whichever the first training
    step timed cheaper for this layer shape (host included).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        dtype: torch.dtype | None = None,
        dropout_mode: str = "peft",
    ) -> None:
        """Wrap ``base_layer`` (frozen in place) with a rank-``r`` DoRA adapter.

        Args:
            base_layer: the ``nn.Linear`` to adapt; its weight must be a plain bf16/fp16/fp32 tensor.
            r: LoRA rank, ≥ 1.
            alpha: LoRA alpha; the scale is ``alpha / r`` (``alpha / √r`` with ``use_rslora``).
            dropout: dropout probability on the LoRA input, in ``[0, 1)`` (PEFT's ``lora_dropout``).
            use_rslora: rank-stabilised scale ``alpha / √r``.
            init_lora_weights: ``True`` (PEFT's default: A Kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r²),
                B = 0) or ``False`` (A and B both random: not an identity at init; for tests).
            dtype: dtype of ``lora_A``, ``lora_B`` and ``magnitude`` (default: the base weight's).
            dropout_mode: ``"peft"`` (PEFT's semantics) or ``"lora_only"`` (dropout on the LoRA branch only).
        """
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        weight = base_layer.weight
        if type(weight) not in (nn.Parameter, torch.Tensor) or weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"base_layer.weight must be a plain bfloat16/float16/float32 tensor, got "
                f"{type(weight).__name__} of {weight.dtype}"
            )
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not (init_lora_weights is True or init_lora_weights is False or init_lora_weights == "gaussian"):
            raise ValueError(f"init_lora_weights must be one of {_INITS}, got {init_lora_weights!r}")
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        if dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {dropout_mode!r}")

        self.base_layer = base_layer
        for p in base_layer.parameters(recurse=False):
            p.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout_p = float(dropout)
        self.dropout_mode = dropout_mode
        self.lora_dropout: nn.Module = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        adtype = dtype or weight.dtype
        kw: dict[str, Any] = {"device": weight.device, "dtype": adtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.magnitude = nn.Parameter(torch.empty(self.out_features, **kw))
        self._norm_cache = NormCache()
        self.reset_parameters(init_lora_weights)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int = 8, alpha: float = 8.0, dropout: float = 0.0, **kwargs: Any
    ) -> DoRALinear:
        """``DoRALinear(linear, r, alpha, dropout, **kwargs)``: wrap ``linear`` (frozen in place). Keyword
        arguments as in the constructor (``use_rslora``, ``init_lora_weights``, ``dtype``)."""
        return cls(linear, r, alpha, dropout, **kwargs)

    @torch.no_grad()
    def reset_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Re-initialise A and B (see the constructor) and set ``magnitude = ‖W + s·B·A‖_row``."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)
        norm = factored_norm(self.base_layer.weight, self.lora_A, self.lora_B, self.scale)
        self.magnitude.copy_(norm)
        self.clear_cache()

    # ------------------------------------------------------------------------------------------- forward

    def clear_cache(self) -> None:
        """Forget the eval-mode norm (needed only after writing W, A or B through ``.data``)."""
        self._norm_cache.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> DoRALinear:
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``.half`` ...): the tensors move, the cached norm goes."""
        self.clear_cache()
        return super()._apply(fn, recurse)

    def weight_norm(self) -> torch.Tensor:
        """``‖W + s·B·A‖_row``: float32 ``[out_features]``, detached (cached, see the class doc)."""
        W, A, B = self.base_layer.weight, self.lora_A, self.lora_B
        if torch.compiler.is_compiling():  # one opaque op that reuses the norm while W, A and B are unchanged
            return cached_norm_op(W, A, B, self.scale)
        return self._norm_cache(W, A, B, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` → ``[..., out_features]`` in the base layer's output dtype (see the class doc)."""
        W, bias = self.base_layer.weight, self.base_layer.bias
        norm = self.weight_norm()
        if not (self.training and self.dropout_p > 0):  # one node: base GEMM, LoRA GEMMs, scale and compose
            return dora_layer_unchecked(
                x, W, self.lora_A, self.lora_B, self.magnitude, norm, self.scale, bias, full=True
            )
        x_l = self.lora_dropout(x)
        if self.dropout_mode == "lora_only":  # base of the input as it came, LoRA of the dropped-out input
            base = F.linear(x, W)
            m, s = self.magnitude, self.scale
            return dora_layer_unchecked(
                x_l, W, self.lora_A, self.lora_B, m, norm, s, bias, base, sub_bias=False, full=True
            )
        # PEFT: the un-dropped base output passes through unscaled; the DoRA delta acts on the dropped-out input
        delta = dora_layer_unchecked(x_l, W, self.lora_A, self.lora_B, self.magnitude, norm, self.scale)
        out = F.linear(x, W, bias)
        return (out + delta).to(out.dtype)

    # ------------------------------------------------------------------------------------------- export

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer's eval-mode output: ``W' = g[:, None] · (W + s·B·A)`` formed in
        float32 (``g = m / ‖W + s·B·A‖_row``, zero-norm rows → g = 1), cast to W's dtype; the bias copied. Same
        device and dtype as the base layer; this layer is left unchanged."""
        W, bias = self.base_layer.weight, self.base_layer.bias
        dense = W.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())
        g = dora_scale(self.magnitude.detach(), torch.linalg.vector_norm(dense, dim=1))
        merged = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=W.device, dtype=W.dtype)
        merged.weight.copy_((g[:, None] * dense).to(W.dtype))
        if bias is not None:
            merged.bias.copy_(bias)
        return merged

    def extra_repr(self) -> str:
        """Sizes, rank, alpha, scale, dropout, rsLoRA and bias, for ``repr``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
            f"scale={self.scale:g}, dropout={self.dropout_p:g}, dropout_mode={self.dropout_mode}, "
            f"use_rslora={self.use_rslora}, "
            f"bias={self.base_layer.bias is not None}"
        )


class NormCache:
    """``factored_norm(W, A, B, s)`` remembered while W, A and B stay the same tensors with the same storage, dtype
    and in-place version counter: ``optimizer.step()``, ``load_state_dict``, ``.copy_`` and ``zero_()`` bump the
    counter, a dtype or device move (``module.to``) replaces the storage — and the layers clear their cache in
    ``_apply`` too, so a storage freed and reused at the same address cannot alias. Writes through ``.data`` are
    invisible (call :meth:`clear`). Holds weak references only; copies and pickles start empty. A norm computed
    under ``torch.inference_mode`` is reused only inside inference mode. The norm is detached, so between optimizer
    steps it is a constant: reusing it is exact (bitwise the recomputation: the kernels are deterministic).

    Under FSDP2 the tensors a forward sees are all-gathered copies that keep their version counter and often their
    address while their values change; the counters of the sharded parameters they came from are part of the key
    (:mod:`dora_tune.kernels._sharded`)."""

    __slots__ = ("_inference", "_key", "_norm", "_plan", "_source_versions", "_sources")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._norm: torch.Tensor | None = None
        self._inference = False
        # the FSDP2 shards W, A and B were gathered from (None: not sharded), found when the key was made
        self._sources: tuple | None = None
        self._source_versions: Any = None
        # (dims, compute dtype, device, the dispatcher's plan) of the last full computation: recomputing for the
        # same tensors (new values, same shapes and dtypes) runs that plan without re-checking or re-planning
        self._plan: tuple | None = None

    def clear(self) -> None:
        """Forget the cached norm."""
        self._key = self._norm = self._plan = self._sources = self._source_versions = None

    def __call__(self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """The float32 ``[d_out]`` norm, computed (``impl="auto"``) only when the tensors changed."""
        key = self._key
        same = ident = False  # the same tensors (storage, dtype) as the cached norm's, maybe with new values
        if key is not None and key[0] == scale:
            _, (rw, pw, vw, dw), (ra, pa, va, da), (rb, pb, vb, db) = key
            ident = rw() is W and ra() is A and rb() is B
            same = (
                ident
                and W.data_ptr() == pw
                and A.data_ptr() == pa
                and B.data_ptr() == pb
                and W.dtype is dw
                and A.dtype is da
                and B.dtype is db
            )
            # a norm computed under inference_mode cannot take part in autograd later: reuse it only there
            if (
                same
                and W._version == vw
                and A._version == va
                and B._version == vb
                and (not self._inference or torch.is_inference_mode_enabled())
                and (self._sources is None or source_versions(self._sources) == self._source_versions)
            ):
                return self._norm
        norm = self._recompute(W, A, B, scale) if same else None
        if norm is None:
            norm = factored_norm(W, A, B, scale)
            dims, compute = (W.shape[0], W.shape[1], A.shape[0]), torch.promote_types(W.dtype, A.dtype)
            self._plan = (dims, compute, W.device, auto("norm", dims, compute, W.device))
        if not ident:  # new tensors: are they FSDP2 gathers? (an FSDP2 gather keeps its tensor and its shard)
            self._sources = fsdp_sources((W, A, B))
        self._source_versions = source_versions(self._sources)
        self._key = (scale, *((weakref.ref(t), t.data_ptr(), t._version, t.dtype) for t in (W, A, B)))
        self._norm, self._inference = norm, norm.is_inference()
        return norm

    def _recompute(self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor | None:
        """The norm of the cached tensors' new values by the plan of their last full computation, while the
        dispatcher still plans the same (a ``force()`` block or a re-plan changes it); None: take the full path."""
        prepared = self._plan
        if prepared is None or W.shape[0] != prepared[0][0] or W.shape[1] != prepared[0][1]:
            return None
        dims, compute, device, plan = prepared
        if A.shape[0] != dims[2] or auto("norm", dims, compute, device) is not plan:
            return None
        try:
            return run_norm(W, A, B, scale, plan.impl, plan.config)
        except Exception:  # whatever it was, the full path deals with it (re-plans, or raises its clear error)
            return None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()

    def __deepcopy__(self, memo: dict) -> NormCache:
        return NormCache()
