"""Prebuilt, read-only tuning databases shipped with the wheel (one SQLite file per GPU model).

Empty until the profiler lands; files placed here are package data (see ``pyproject.toml``).
"""
