"""Moved: the custom ops are the front door under ``torch.compile`` and live above the kernels, in
:mod:`dora_tune.auto.custom_ops` (they plan with the dispatcher when they run). This alias is deprecated and will be
removed in the next release; it imports nothing until one of its names is read."""

from dora_tune._moved import forwarder

__getattr__ = forwarder(__name__, ["dora_tune.auto.custom_ops"])
