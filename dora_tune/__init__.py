"""dora-tune: autotuned, dispatched DoRA kernels (factored row norm, fused compose) for PyTorch.

Importing this package is cheap: it opens no database and imports neither Triton nor scikit-learn. The kernels live
in :mod:`dora_tune.kernels`.
"""

__version__ = "0.1.0"  # the one source of the version (pyproject.toml reads it)
