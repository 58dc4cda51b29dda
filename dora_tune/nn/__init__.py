"""Training layers: :class:`DoRALinear` (a DoRA adapter around a frozen ``nn.Linear``) and the norm cache that
makes its norm once per optimizer step (:class:`NormCache`). They compute with the dispatched kernels
(:mod:`dora_tune.kernels`, ``impl="auto"``); PEFT's layers reach the same code through
:mod:`dora_tune.integrations.peft`."""

from dora_tune.nn.layer import DROPOUT_MODES, DoRALinear, NormCache

__all__ = ["DROPOUT_MODES", "DoRALinear", "NormCache"]
