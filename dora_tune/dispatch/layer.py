"""``DoRALinear``: a DoRA adapter around a frozen ``nn.Linear``, computed with dora-tune's dispatched kernels.

Math (DESIGN.md §1): ``y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias`` with ``g = m / ‖W + s·B·A‖_row`` (the norm detached).
The norm comes from :func:`~dora_tune.kernels.factored_norm` (never building ``B·A``), ``g`` from
:func:`~dora_tune.kernels.dora_scale` and the composition from :func:`~dora_tune.kernels.dora_compose_train` (grad
enabled; ``compose_train`` with ``g`` formed inside its one autograd node) or :func:`~dora_tune.kernels.compose` (no
grad), each with ``impl="auto"`` (the dispatcher's choice).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dora_tune.kernels import compose, dora_compose_train, dora_scale, factored_norm
from dora_tune.kernels._common import SUPPORTED_DTYPES

_INITS = (True, False, "gaussian")


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

    In eval mode the norm is cached and reused until one of W, A or B changes (keyed on each tensor's identity,
    storage and in-place version counter, so ``optimizer.step()``, ``load_state_dict`` and ``.copy_`` invalidate
    it; a write through ``.data`` does not — call :meth:`clear_cache` after one). Training mode never caches, and
    neither does a compiled forward (under ``torch.compile`` the norm is recomputed by the custom op each call).
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
        """
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        weight = base_layer.weight
        if type(weight) not in (nn.Parameter, torch.Tensor) or weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"base_layer.weight must be a plain bfloat16/float16/float32 tensor, got "
                            f"{type(weight).__name__} of {weight.dtype}")  # fmt: skip
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

    def train(self, mode: bool = True) -> DoRALinear:
        """``nn.Module.train``; entering training mode also drops the eval-mode norm cache."""
        if mode:
            self.clear_cache()
        return super().train(mode)

    def weight_norm(self) -> torch.Tensor:
        """``‖W + s·B·A‖_row``: float32 ``[out_features]``, detached (cached in eval mode, see the class doc)."""
        W, A, B = self.base_layer.weight, self.lora_A, self.lora_B
        if self.training or torch.compiler.is_compiling():
            return factored_norm(W, A, B, self.scale)
        return self._norm_cache(W, A, B, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` → ``[..., out_features]`` in the base layer's output dtype (see the class doc)."""
        W, bias = self.base_layer.weight, self.base_layer.bias
        A, B = self.lora_A, self.lora_B
        norm = self.weight_norm()
        dropped = self.training and self.dropout_p > 0
        x_l = self.lora_dropout(x) if dropped else x
        lora = F.linear(F.linear(x_l.to(A.dtype), A), B)
        base = F.linear(x_l, W)  # x·Wᵀ without the bias: DoRA scales only this
        out_dtype = base.dtype
        dt = torch.promote_types(lora.dtype, base.dtype)
        lora_c, base_c = lora.to(dt), base.to(dt)
        delta = dora_delta(lora_c, base_c, self.magnitude, norm, self.scale)
        if dropped:  # PEFT: the un-dropped base output passes through unscaled
            return (F.linear(x, W, bias) + delta).to(out_dtype)
        out = base_c + delta
        if bias is not None:
            out.add_(bias)  # in place: keeps the dtype (no promotion to the bias dtype under autocast)
        return out.to(out_dtype)

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
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
                f"scale={self.scale:g}, dropout={self.dropout_p:g}, use_rslora={self.use_rslora}, "
                f"bias={self.base_layer.bias is not None}")  # fmt: skip


def dora_delta(
    lora: torch.Tensor, base: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scale: float
) -> torch.Tensor:
    """The DoRA delta ``(g−1)·base + g·(s·lora)``, ``g = m / norm``, as a layer computes it (``impl="auto"``):
    :func:`~dora_tune.kernels.dora_compose_train` when autograd records (one node, gradients to lora, base and m),
    else :func:`~dora_tune.kernels.compose` of :func:`~dora_tune.kernels.dora_scale`. ``lora``/``base``
    ``[..., d_out]`` of one dtype, ``magnitude``/``norm`` ``[d_out]``; the result has ``base``'s shape and dtype."""
    if torch.is_grad_enabled():
        return dora_compose_train(lora, base, magnitude, norm, scale)
    return compose(lora, base, dora_scale(magnitude, norm), scale)


class NormCache:
    """``factored_norm(W, A, B, s)`` remembered while W, A and B stay the same tensors with the same storage and
    in-place version counter (``optimizer.step()``, ``load_state_dict`` and ``.copy_`` bump it; writes through
    ``.data`` do not). Holds weak references only; copies and pickles start empty. A norm computed under
    ``torch.inference_mode`` is reused only inside inference mode."""

    __slots__ = ("_key", "_norm")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._norm: torch.Tensor | None = None

    def clear(self) -> None:
        """Forget the cached norm."""
        self._key = self._norm = None

    def __call__(self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """The float32 ``[d_out]`` norm, computed (``impl="auto"``) only when the tensors changed."""
        key = (scale, *((weakref.ref(t), t.data_ptr(), t._version) for t in (W, A, B)))
        old = self._key
        # a norm computed under inference_mode cannot take part in autograd later: reuse it only there
        usable = old is not None and (not self._norm.is_inference() or torch.is_inference_mode_enabled())
        if usable and old[0] == scale:
            for (ref_a, ptr_a, ver_a), (ref_b, ptr_b, ver_b) in zip(old[1:], key[1:], strict=True):
                t = ref_a()
                if t is None or t is not ref_b() or ptr_a != ptr_b or ver_a != ver_b:
                    break
            else:
                return self._norm
        norm = factored_norm(W, A, B, scale)
        self._key, self._norm = key, norm
        return norm

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()

    def __deepcopy__(self, memo: dict) -> NormCache:
        return NormCache()
