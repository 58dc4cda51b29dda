"""The benchmarks' harness: shared flags, the environment a figure was measured in, one GPU timer and one host
timer, and result rows.

Every script in ``benchmarks/`` builds its own setup and measures through this module:

* **flags** — :func:`add_flags` puts ``--out``, ``--device``, ``--dtype`` (where they apply), ``--seed``, ``--note``
  and ``--no-record`` on the script's parser; :func:`resolve` turns ``--device`` into a ``torch.device`` (CUDA's
  index resolved and made current) and fills ``--dtype``'s device-dependent default.
* **environment** — :func:`environment`: device, Python, torch, CUDA, triton, peft, transformers and dora-tune
  versions, date, command line, git commit and a hash of ``dora_tune``'s source (a copy of a working tree, as the
  device machine gets, can carry a stale HEAD or none: the hashed code says what ran).
* **timing** — GPU work: :func:`gpu_us`, the median of :func:`dora_tune.dispatch.timing.gpu_times` (GPU time per
  call, L2 flushed, the host kept out by a spin kernel). Host or CPU work, and whatever a training step pays with the
  host included: :func:`wall_us`, :func:`dora_tune.dispatch.timing.wall_times` (wall time per call of a batch of
  back-to-back calls, synchronised before and after; one call, one round: a one-off event such as a first use).
  :func:`call_times_us` is :func:`dora_tune.dispatch.timing.interleaved_times`, per call, for quantiles. A script
  that times otherwise on purpose says why in its docstring.
* **rows** — :class:`Recorder` appends one JSON line per measurement to ``<results>/<gpu-slug>.jsonl`` (the slug as
  :func:`dora_tune.autotune_db.gpu_slug` names GPUs, ``cpu`` for figures no GPU measured), so a new measurement is a
  row and comparing runs is a query: :func:`rows` in Python, ``python3 benchmarks/harness.py query`` from the shell.

A row::

    {"script": "train_loop", "item": "dora_tune", "shape": {"tokens": 256, "rank": 64, ...},
     "figures": {"median_ms": 41.2, ...}, "gpu": "nvidia-h100-80gb-hbm3", "commit": "f8ff28f…",
     "date": "2026-12-07T12:10:17+00:00", "env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", ...},
     "command": "benchmarks/train_loop.py --tokens 256 ...", "note": "..."}

``item`` names what was measured at that shape (a variant, an implementation, a host-cost item; "" where a script
measures one thing); ``gpu`` is the GPU the figures describe: the run's device, or for the scripts that read a tuning
database (cv_seeds, compare_versions, retest, verify_dispatch) the GPU that database measured; ``env.device`` says
where the script ran. ``note`` is ``--note``'s text, present only when given.

The results directory is ``$DORA_TUNE_BENCH_RESULTS`` when set, else ``$OUT/results`` when ``$OUT`` is set (the
device machine returns only ``$OUT``: merge what comes back with ``harness.py merge``), else ``benchmarks/results``.
``commit`` is ``$DORA_TUNE_BENCH_COMMIT`` when set, else git's HEAD of the repository, else null.

    python3 benchmarks/harness.py query --script train_loop --gpu nvidia-h100-80gb-hbm3 [--where tokens=256]
    python3 benchmarks/harness.py merge FILES_AT/results [--commit SHA]

Imported by the scripts as ``harness`` (running ``python3 benchmarks/x.py`` puts ``benchmarks/`` on ``sys.path``).
Imports torch only where a function needs it: the query runs without it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_ENV = "DORA_TUNE_BENCH_RESULTS"
COMMIT_ENV = "DORA_TUNE_BENCH_COMMIT"
#: the working dtypes ``--dtype`` names
DTYPE_NAMES = ("bf16", "fp16", "fp32")
#: the keys of :func:`environment` a row keeps (``env``), under these names
COMPACT_ENV = {
    "device": "device",
    "python": "python",
    "torch": "torch",
    "cuda": "cuda",
    "triton": "triton",
    "peft": "peft",
    "transformers": "transformers",
    "dora_tune": "dora_tune",
    "dora_tune_source_sha256": "source",
    "git_dirty": "dirty",
}
ROW_FIELDS = ("script", "item", "shape", "figures", "gpu", "commit", "date", "env", "command", "note")


# ---------------------------------------------------------------- flags
def add_flags(
    parser: argparse.ArgumentParser,
    *,
    out_default: str | None = None,
    out_required: bool = False,
    out_help: str | None = None,
    device: str | None = None,
    dtype: str | bool = False,
    dtype_choices: Sequence[str] | None = DTYPE_NAMES,
    dtype_help: str | None = None,
    seed: int | None = 0,
) -> argparse.ArgumentParser:
    """Put the shared flags on ``parser`` and return it.

    * ``--out PATH``: the script's own output file (default ``out_default``; required with ``out_required``).
    * ``--device`` (only when ``device`` is given): ``"auto"`` — CUDA when available, else the CPU; ``"cuda"`` — a
      CUDA-only script (``cuda`` or ``cuda:N``). :func:`resolve` makes it a ``torch.device``.
    * ``--dtype`` (only when ``dtype`` is not False): the working dtype, from ``dtype_choices`` (None: any name);
      default ``dtype``, or with ``dtype=True`` bf16 on CUDA and fp32 on the CPU (filled by :func:`resolve`).
    * ``--seed N`` (unless ``seed`` is None; default ``seed``).
    * ``--note TEXT``: free text kept with every row of the run; ``--no-record``: append no rows.
    """
    parser.add_argument(
        "--out", default=out_default, required=out_required, help=out_help or "output file (default %(default)s)"
    )
    if device is not None:
        if device not in ("auto", "cuda"):
            raise ValueError(f"device must be 'auto' or 'cuda', got {device!r}")
        parser.add_argument(
            "--device",
            default=None if device == "auto" else "cuda",
            help="cuda (default when available) or cpu" if device == "auto" else "the CUDA device (default cuda)",
        )
    if dtype is not False:
        default = None if dtype is True else dtype
        parser.add_argument(
            "--dtype",
            choices=list(dtype_choices) if dtype_choices is not None else None,
            default=default,
            help=dtype_help or ("default bf16 on CUDA, fp32 on CPU" if dtype is True else "default %(default)s"),
        )
    if seed is not None:
        parser.add_argument("--seed", type=int, default=seed, help="random seed (default %(default)s)")
    parser.add_argument("--note", default=None, help="free text kept with every result row of this run")
    parser.add_argument(
        "--no-record", dest="record", action="store_false", help="append no result rows (benchmarks/README.md)"
    )
    parser._harness = {"device": device, "dtype": dtype}  # type: ignore[attr-defined]  # read by resolve()
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Finish the shared flags of ``args`` (parsed by ``parser``, which :func:`add_flags` set up): ``args.device``
    becomes a ``torch.device`` (CUDA: the index resolved and made the current device; an error through ``parser``
    when CUDA is missing), ``args.dtype`` gets its device-dependent default and ``args.torch_dtype`` its dtype."""
    import torch

    conf = getattr(parser, "_harness", {})
    if conf.get("device") is not None:
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if conf["device"] == "cuda" and dev.type != "cuda":
            parser.error(f"--device {args.device}: this script runs on a CUDA GPU")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                hint = " (use --device cpu)" if conf["device"] == "auto" else ""
                parser.error(f"--device {args.device or 'cuda'} but CUDA is not available{hint}")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
        args.device = dev
    if conf.get("dtype", False) is not False:
        if args.dtype is None:
            cuda = getattr(args, "device", None) is not None and args.device.type == "cuda"
            args.dtype = "bf16" if cuda else "fp32"
        args.torch_dtype = torch_dtype(args.dtype) if args.dtype in DTYPE_NAMES else None
    return args


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a working-dtype name (bf16, fp16, fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def default_out(name: str) -> str:
    """``$OUT/name`` when ``$OUT`` is set (the device machine returns that folder), else ``benchmarks/results/name``:
    the default ``--out`` of the scripts that write one file per run."""
    return os.path.join(os.environ.get("OUT") or str(REPO / "benchmarks" / "results"), name)


def write_json(path: str | Path, obj: Any, *, indent: int = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` (folders made; non-JSON values as ``str``); return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    return p


# ---------------------------------------------------------------- environment
@functools.cache
def git_commit() -> str | None:
    """``$DORA_TUNE_BENCH_COMMIT`` when set, else the repository's HEAD, else None (no git, or not a checkout)."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else None


@functools.cache
def git_dirty() -> bool | None:
    """Whether ``dora_tune/`` or ``benchmarks/`` differ from HEAD (None without git)."""
    try:
        st = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "dora_tune", "benchmarks"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(st.stdout.strip()) if st.returncode == 0 else None


@functools.cache
def source_hash() -> str:
    """The first 16 hex digits of a SHA-256 over ``dora_tune``'s Python files (paths and contents)."""
    digest = hashlib.sha256()
    for f in sorted((REPO / "dora_tune").rglob("*.py")):
        digest.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def gpu_name(device: torch.device | str | None) -> str | None:
    """The CUDA device's name, or None for the CPU (or no device)."""
    if device is None:
        return None
    import torch

    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def slug(gpu: str | None) -> str:
    """The results file name of a GPU: :func:`dora_tune.autotune_db.gpu_slug` of its name; ``cpu`` for None."""
    if not gpu:
        return "cpu"
    from dora_tune.autotune_db import gpu_slug

    return gpu_slug(gpu)


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Device (GPU name, compute capability, SMs, memory; or the CPU), Python, torch, CUDA, triton, peft,
    transformers and dora-tune versions, date, the command line, the git commit (and whether ``dora_tune`` or
    ``benchmarks`` differ from it) and a hash of ``dora_tune``'s source."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = dev.type == "cuda"
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({platform.machine()})",
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
        props = torch.cuda.get_device_properties(dev)
        env["capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
        env["memory_GiB"] = props.total_memory / 2**30
    env["cpu"] = platform.processor() or platform.machine()
    env["cpus"] = os.cpu_count()
    env["git_commit"] = git_commit()
    env["git_dirty"] = git_dirty()
    env["dora_tune_source_sha256"] = source_hash()
    return env


def compact_env(env: dict[str, Any]) -> dict[str, Any]:
    """The versions part of :func:`environment` that every row keeps (``source``: the dora_tune source hash)."""
    return {short: env.get(key) for key, short in COMPACT_ENV.items()}


# ---------------------------------------------------------------- timing
def sync(device: torch.device | str | None) -> None:
    """Wait for the CUDA device's queued work (nothing on the CPU)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gpu_us(fn: Callable[[], Any], *, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median GPU time of one call of ``fn`` on the current CUDA device, in µs: the GPU timer of every benchmark,
    :func:`dora_tune.dispatch.timing.gpu_times` (CUDA events around each call, L2 flushed before it, a spin kernel
    keeping the GPU ahead of the host so that only the GPU's time is counted). ``warmup_ms`` / ``rep_ms`` as in
    ``triton.testing.do_bench`` (defaults are its own)."""
    from dora_tune.dispatch.timing import gpu_times

    return statistics.median(gpu_times(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)) * 1e3


def wall_us(fn: Callable[[], Any], device: torch.device | str | None, *, calls: int = 1, rounds: int = 1) -> float:
    """Wall time of one call of ``fn`` in µs, host included: the host timer of every benchmark,
    :func:`dora_tune.dispatch.timing.wall_times` — ``calls`` back-to-back calls between two synchronisations of
    ``device`` (none on the CPU), the least of ``rounds`` such batches, divided by ``calls``. ``calls=1, rounds=1``
    times one event (a first use, one optimizer step)."""
    import torch

    from dora_tune.dispatch.timing import wall_times

    return wall_times([fn], torch.device(device or "cpu"), calls=calls, rounds=rounds)[0]


def call_times_us(
    fns: Sequence[Callable[[], Any]],
    device: torch.device | str | None,
    *,
    reps: int,
    rounds: int = 4,
    warmup_ms: float = 5.0,
) -> list[list[float]]:
    """``reps`` timed calls of each of ``fns`` in µs, interleaved over ``rounds`` rounds:
    :func:`dora_tune.dispatch.timing.interleaved_times` (GPU time as :func:`gpu_us` on CUDA, wall time per call on
    the CPU), for figures that need the spread of single calls."""
    import torch

    from dora_tune.dispatch.timing import interleaved_times

    return interleaved_times(fns, torch.device(device or "cpu"), reps=reps, rounds=rounds, warmup_ms=warmup_ms)


def quantiles(times: Sequence[float], qs: Sequence[float] = (0.5, 0.2, 0.8)) -> list[float]:
    """Linear-interpolated quantiles of ``times`` (as ``torch.quantile`` and ``numpy.quantile`` by default)."""
    xs = sorted(times)
    if not xs:
        raise ValueError("no times")
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


# ---------------------------------------------------------------- rows
def results_dir() -> Path:
    """Where rows go: ``$DORA_TUNE_BENCH_RESULTS``, else ``$OUT/results``, else ``benchmarks/results``."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "results"
    return REPO / "benchmarks" / "results"


def _numbers(figures: dict[str, Any]) -> dict[str, Any]:
    """Numbers only: None dropped, non-finite numbers as None (JSON null), numpy and torch scalars as floats; a
    value that is not a number is dropped with a warning (a row must not cost the run that measured it)."""
    out: dict[str, Any] = {}
    for k, v in figures.items():
        if v is None:
            continue
        if isinstance(v, bool | int):
            out[k] = v
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            print(f"warning: figure {k}={v!r} is not a number; not recorded", file=sys.stderr)
            continue
        out[k] = float(f"{f:.6g}") if math.isfinite(f) else None  # 6 significant digits: rows stay short
    return out


def _command() -> str:
    argv0 = Path(sys.argv[0])
    try:
        argv0 = argv0.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join([argv0.as_posix(), *sys.argv[1:]])


class Recorder:
    """Appends a script's result rows (one JSON line per measurement) to ``<results>/<gpu-slug>.jsonl``.

    ``device``: where the script runs (its GPU names the rows' file unless :meth:`record` is told the GPU the figures
    describe); ``env``: :func:`environment` of it, taken once (``Recorder.env``, for a script's own JSON);
    ``record=False``: :meth:`record` builds the rows and writes nothing (``--no-record``); ``results``: the results
    directory (default :func:`results_dir`, read when the first row is written)."""

    def __init__(
        self,
        script: str,
        *,
        device: torch.device | str | None = None,
        note: str | None = None,
        record: bool = True,
        env: dict[str, Any] | None = None,
        results: str | Path | None = None,
    ) -> None:
        self.script = Path(script).stem
        self.device = device
        self.note = note
        self.enabled = record
        self.env = env if env is not None else environment(device)
        self.gpu = gpu_name(device)
        self.results = Path(results) if results is not None else None
        self.written: dict[Path, int] = {}

    def row(
        self,
        shape: dict[str, Any],
        figures: dict[str, Any],
        *,
        item: str = "",
        gpu: str | None = None,
    ) -> dict[str, Any]:
        """The row of one measurement: ``figures`` (numbers; None dropped, non-finite numbers as null) of ``item``
        at ``shape``, on ``gpu`` (a GPU name or slug; default the run's device)."""
        row: dict[str, Any] = {
            "script": self.script,
            "item": item,
            "shape": dict(shape),
            "figures": _numbers(figures),
            "gpu": slug(gpu if gpu is not None else self.gpu),
            "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "env": compact_env(self.env),
            "command": _command(),
        }
        if self.note:
            row["note"] = self.note
        return row

    def record(
        self,
        shape: dict[str, Any],
        figures: dict[str, Any],
        *,
        item: str = "",
        gpu: str | None = None,
    ) -> dict[str, Any]:
        """Append the :meth:`row` of one measurement to its GPU's file (unless recording is off); return it."""
        row = self.row(shape, figures, item=item, gpu=gpu)
        if self.enabled:
            path = (self.results or results_dir()) / f"{row['gpu']}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            self.written[path] = self.written.get(path, 0) + 1
        return row

    def summary(self) -> str:
        """One line: how many rows went where (for the script's last words)."""
        if not self.enabled:
            return "no rows recorded (--no-record)"
        if not self.written:
            return "no rows recorded"
        return ", ".join(f"{n} row{'s' * (n != 1)} appended to {_show(p)}" for p, n in self.written.items())


def _show(p: Path) -> str:
    try:
        return p.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(p)


def start(script: str, args: argparse.Namespace, *, env: dict[str, Any] | None = None) -> Recorder:
    """The :class:`Recorder` of a run: ``script`` (``__file__``), and from ``args`` the device (if the script has
    ``--device``), ``--note`` and ``--no-record``."""
    return Recorder(
        script,
        device=getattr(args, "device", None),
        note=getattr(args, "note", None),
        record=getattr(args, "record", True),
        env=env,
    )


def _files(path: str | Path | None) -> list[Path]:
    p = Path(path) if path is not None else results_dir()
    if p.is_dir():
        return sorted(p.glob("*.jsonl"))
    return [p] if p.exists() else []


def read_rows(path: str | Path | None = None) -> Iterable[dict[str, Any]]:
    """Every row of ``path`` (a ``.jsonl`` file, or a directory: each ``*.jsonl`` in it; default
    :func:`results_dir`), in file order; lines that are not JSON objects are skipped with a warning."""
    for f in _files(path):
        with f.open() as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    print(f"warning: {f}:{n}: not JSON ({e}); skipped", file=sys.stderr)
                    continue
                if isinstance(row, dict):
                    yield row


def _same(have: Any, want: Any) -> bool:
    if callable(want):
        return bool(want(have))
    if isinstance(want, str) and not isinstance(have, str):  # a value from the command line
        if isinstance(have, bool):
            return want.lower() == str(have).lower()
        if isinstance(have, int | float):
            try:
                return float(want) == have
            except ValueError:
                return False
        return json.dumps(have) == want or str(have) == want
    return have == want


def matches(row: dict[str, Any], **filters: Any) -> bool:
    """Whether ``row`` passes every filter (see :func:`rows`)."""
    for key, want in filters.items():
        if want is None:
            continue
        if key == "gpu":
            if callable(want):
                if not want(row.get("gpu")):
                    return False
            elif slug(str(want)) not in str(row.get("gpu", "")):
                return False
        elif key == "commit":
            have = row.get("commit") or ""
            if not (want(have) if callable(want) else str(have).startswith(str(want))):
                return False
        elif key == "since":
            if str(row.get("date", "")) < str(want):
                return False
        elif key == "until":
            if str(row.get("date", "")) > str(want):
                return False
        elif key in ROW_FIELDS:
            if not _same(row.get(key), want):
                return False
        else:
            for part in ("shape", "figures", "env"):
                if key in (row.get(part) or {}):
                    if not _same(row[part][key], want):
                        return False
                    break
            else:
                return False
    return True


def rows(path: str | Path | None = None, **filters: Any) -> list[dict[str, Any]]:
    """The rows of ``path`` (as :func:`read_rows`) that pass every filter, in file order.

    Filters (None: no filter): ``gpu`` — a GPU name or slug, or part of one ("h100"); ``commit`` — a prefix;
    ``since`` / ``until`` — ISO dates (or their prefixes) the row's date is at least / at most; any other row field
    (``script``, ``item``, ``note`` ...) — equal; any other name — equal to that key of the row's ``shape``, else of
    its ``figures``, else of its ``env`` (a row without it fails). A string matches a number by its text
    (``tokens="256"``); a callable is a predicate on the value.
    """
    return [r for r in read_rows(path) if matches(r, **filters)]


# ---------------------------------------------------------------- the command line: query, merge
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def table(found: Sequence[dict[str, Any]], figures: Sequence[str] | None = None, title: str | None = None) -> Any:
    """A ``rich`` table of rows: date, commit, then the script, GPU and item where they vary, the shape keys that
    vary (the others in the caption), and the figures (``figures``: only these)."""
    from rich.table import Table

    def keys(part: str) -> list[str]:
        seen: dict[str, None] = {}
        for r in found:
            for k in r.get(part) or {}:
                seen.setdefault(k, None)
        return list(seen)

    shape_keys = keys("shape")
    varying = [k for k in shape_keys if len({_fmt((r.get("shape") or {}).get(k)) for r in found}) > 1]
    fixed = {k: (found[0].get("shape") or {}).get(k) for k in shape_keys if k not in varying} if found else {}
    fig_keys = list(figures) if figures else keys("figures")
    top = [k for k in ("script", "gpu", "item") if len({str(r.get(k)) for r in found}) > 1]
    if found and "item" not in top and found[0].get("item"):
        fixed = {"item": found[0]["item"], **fixed}
    t = Table(title=title, caption=" ".join(f"{k}={_fmt(v)}" for k, v in fixed.items()) or None)
    for col in ("date", "commit", *top):
        t.add_column(col)
    for col in varying:
        t.add_column(col, justify="right")
    for col in fig_keys:
        t.add_column(col, justify="right")
    if any(r.get("note") for r in found):
        t.add_column("note")
    for r in found:
        cells = [str(r.get("date", ""))[:16].replace("T", " "), (r.get("commit") or "-")[:8]]
        cells += [str(r.get(k, "")) for k in top]
        cells += [_fmt((r.get("shape") or {}).get(k)) for k in varying]
        cells += [_fmt((r.get("figures") or {}).get(k)) for k in fig_keys]
        if any(x.get("note") for x in found):
            cells.append(r.get("note") or "")
        t.add_row(*cells)
    return t


def merge(sources: Sequence[str | Path], *, commit: str | None = None, dest: str | Path | None = None) -> int:
    """Append the rows of ``sources`` (files or directories of ``*.jsonl``, as the device machine returns
    ``$OUT/results``) to the results directory (``dest``, default :func:`results_dir`), each to its GPU's file,
    skipping rows already there; rows without a commit get ``commit``. Returns how many were appended."""
    out = Path(dest) if dest is not None else results_dir()
    have: dict[Path, set[str]] = {}
    n = 0
    for src in sources:
        for row in read_rows(src):
            if commit and not row.get("commit"):
                row["commit"] = commit
            path = out / f"{row.get('gpu') or 'cpu'}.jsonl"
            if path not in have:
                have[path] = {json.dumps(r, sort_keys=True) for r in read_rows(path)}
            key = json.dumps(row, sort_keys=True)
            if key in have[path]:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            have[path].add(key)
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Query and merge the benchmarks' result rows (benchmarks/README.md).")
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("query", help="print the rows that match as a table")
    q.add_argument("--results", default=None, help="a .jsonl file or a directory of them (default: the results dir)")
    q.add_argument("--script", default=None, help="the script's name without .py (train_loop, e2e ...)")
    q.add_argument("--gpu", default=None, help="GPU name or slug, or part of one (h100); cpu for CPU rows")
    q.add_argument("--item", default=None, help="what was measured (a variant, an implementation ...)")
    q.add_argument("--commit", default=None, help="a commit or its prefix")
    q.add_argument("--since", default=None, help="rows dated on or after this ISO date (2026-12-01)")
    q.add_argument("--note", default=None, help="rows with exactly this note")
    q.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="shape, figure or env value")
    q.add_argument("--figures", default=None, help="comma-separated figures to show (default: all)")
    q.add_argument("--last", type=int, default=None, metavar="N", help="only the last N matching rows")
    q.add_argument("--json", action="store_true", help="print the rows as JSON lines instead of a table")
    m = sub.add_parser("merge", help="append returned rows (files or directories) to the results directory")
    m.add_argument("sources", nargs="+")
    m.add_argument("--commit", default=None, help="commit for rows without one (default: this checkout's HEAD)")
    m.add_argument("--results", default=None, help="destination directory (default: the results dir)")
    args = ap.parse_args(argv)

    if args.command == "merge":
        n = merge(args.sources, commit=args.commit or git_commit(), dest=args.results)
        print(f"appended {n} rows to {args.results or results_dir()}")
        return 0
    filters: dict[str, Any] = {
        k: getattr(args, k) for k in ("script", "gpu", "item", "commit", "since", "note") if getattr(args, k)
    }
    for w in args.where:
        key, sep, value = w.partition("=")
        if not sep or not key:
            ap.error(f"--where needs KEY=VALUE, got {w!r}")
        filters[key] = value
    found = rows(args.results, **filters)
    if args.last is not None:
        found = found[-args.last :] if args.last > 0 else []
    if args.json:
        for r in found:
            print(json.dumps(r))
        return 0
    if not found:
        print(f"no rows match in {args.results or results_dir()}", file=sys.stderr)
        return 1
    from rich.console import Console

    figs = [f.strip() for f in args.figures.split(",") if f.strip()] if args.figures else None
    title = f"{len(found)} row{'s' * (len(found) != 1)}" + "".join(f" {k}={v}" for k, v in filters.items())
    Console(width=None if sys.stdout.isatty() else 200).print(table(found, figs, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
