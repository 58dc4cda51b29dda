"""Helpers of the benchmark tests: load a script's module as ``python3 benchmarks/x.py`` runs it, and run scripts
with their result rows sent to a temporary directory (never into benchmarks/results)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str):
    """The module of ``benchmarks/<name>.py``, registered in ``sys.modules`` as ``bench_<name>`` (dataclasses look
    their module up), with ``benchmarks/`` on ``sys.path`` while it imports (for ``harness``, ``bench_models``)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    finally:
        sys.path.remove(str(BENCH))
    return module


def script_env(results: Path, **extra: str) -> dict[str, str]:
    """The environment to run a script in: rows to ``results``, no ``$OUT``, no commit override, ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DORA_TUNE_BENCH_COMMIT")}
    return {**env, "DORA_TUNE_BENCH_RESULTS": str(results), **extra}


def run_script(name: str, *args: str, results: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python3 benchmarks/<name>.py ARGS`` with its rows sent to ``results``; fails the test on a non-zero exit."""
    cmd = [sys.executable, str(BENCH / f"{name}.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=script_env(results, **env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
