"""Integrations with other libraries, each in its own module and imported only on request.

- :mod:`dora_tune.integrations.peft`: ``enable(model=None)`` / ``disable()`` route PEFT's DoRA Linear layers
  through dora-tune's kernels (needs the ``peft`` extra: ``pip install 'dora-tune[peft]'``).
"""
