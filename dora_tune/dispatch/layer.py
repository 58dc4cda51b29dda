"""Moved: ``DoRALinear`` and ``NormCache`` live in :mod:`dora_tune.nn` (``dora_tune.nn.layer``). This alias is
deprecated and will be removed in the next release; ``dora_tune.DoRALinear`` is unchanged."""

from dora_tune._moved import forwarder

__getattr__ = forwarder(__name__, ["dora_tune.nn.layer"])
