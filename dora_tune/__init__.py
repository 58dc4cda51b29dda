"""dora-tune: autotuned, dispatched DoRA kernels (factored row norm, fused compose) for PyTorch.

Importing this package is cheap: it opens no database and imports neither Triton nor scikit-learn. The kernels live
in :mod:`dora_tune.kernels`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dora-tune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
