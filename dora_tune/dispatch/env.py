"""Moved: :mod:`dora_tune.tuning.env` (an offline tool). This alias is deprecated and will be removed in the next
release."""

from dora_tune._moved import forwarder

__getattr__ = forwarder(__name__, ["dora_tune.tuning.env"])
