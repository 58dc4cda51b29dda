"""Tuning database (SQLAlchemy 2.0): every measured trial, per GPU environment, implementation version, shape,
dtype and config.

Not built yet: it lands with the profiler (``dora-tune profile``). Importing this package must stay free of torch.
"""
