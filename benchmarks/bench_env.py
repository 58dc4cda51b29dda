"""The environment a benchmark records with its figures: device, versions, date, command, and what code ran.

Imported by the benchmark scripts as ``benchmarks.bench_env`` (they put the repository root on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def environment(device: torch.device) -> dict[str, Any]:
    """Device (GPU name, compute capability, SMs, memory; or the CPU), Python, torch, CUDA, triton, peft,
    transformers and dora-tune versions, date, the command line, the git commit and a hash of ``dora_tune``'s
    source (a copy of a working tree, as the device machine gets, can carry a stale HEAD: the code, hashed, says
    what ran)."""
    cuda = device.type == "cuda"
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([sys.executable, *sys.argv]),
    }
    for name in ("triton", "peft", "transformers", "dora_tune"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if cuda:
        props = torch.cuda.get_device_properties(device)
        env["capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
        env["memory_GiB"] = props.total_memory / 2**30
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        env["git_commit"] = head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    digest = hashlib.sha256()
    for f in sorted((REPO / "dora_tune").rglob("*.py")):
        digest.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    env["dora_tune_source_sha256"] = digest.hexdigest()[:16]
    return env
