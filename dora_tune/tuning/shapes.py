"""Shape sets to profile: model presets, rank/token lists, shape files and the default set.

A *shape* is op-specific and always a dict of ints: ``norm`` → ``{"d_out", "d_in", "r"}``, ``compose`` and
``compose_train`` → ``{"rows", "cols"}`` (rows = tokens in the batch, cols = d_out of the projection),
``dora_linear`` → ``{"rows", "d_out", "d_in", "r"}`` (a whole layer's GEMMs: its own, smaller default ranks and
token counts, :data:`LINEAR_RANKS` and :data:`LINEAR_TOKENS`, since each of its trials costs a layer's forward and
backward).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from pathlib import Path

from dora_tune.ops import OP_SHAPE_KEYS

OPS: tuple[str, ...] = tuple(OP_SHAPE_KEYS)


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Projection dimensions of a decoder layer (from the model's published config)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    def projections(self) -> dict[str, tuple[int, int]]:
        """``name → (d_out, d_in)`` of every linear projection of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h), "down": (h, i)}


#: Real projection dims (config.json of each model: hidden_size, intermediate_size, num_attention_heads,
#: num_key_value_heads, head_dim).
MODEL_PRESETS: dict[str, ModelDims] = {
    "llama-3-8b": ModelDims(4096, 14336, 32, 8, 128),
    "llama-3-70b": ModelDims(8192, 28672, 64, 8, 128),
    "qwen2.5-7b": ModelDims(3584, 18944, 28, 4, 128),
    "qwen2.5-32b": ModelDims(5120, 27648, 40, 8, 128),
    "mistral-7b": ModelDims(4096, 14336, 32, 8, 128),
}
DEFAULT_RANKS: tuple[int, ...] = (8, 16, 64, 128, 384, 768)
DEFAULT_TOKENS: tuple[int, ...] = (1, 128, 1024, 4096, 16384, 32768)
#: The default set: d 512–28672 (squares and the common MLP rectangles), r 8–768, rows 1–32768.
_DEFAULT_NORM_DIMS = [
    (512, 512),
    (1024, 1024),
    (2048, 2048),
    (4096, 4096),
    (8192, 8192),
    (4096, 14336),
    (14336, 4096),
    (8192, 28672),
    (28672, 8192),
]
_DEFAULT_COLS = (512, 1024, 2048, 4096, 8192, 14336, 28672)
#: dora_linear's defaults (where --rank / --tokens do not say): the ranks of the train-loop benchmark, training
#: micro-batches of 512 to 8192 tokens; its default set's projections: the squares and MLP rectangles of the
#: 8B-class models, a GQA key/value projection and a 70B square
LINEAR_RANKS: tuple[int, ...] = (16, 64, 384)
LINEAR_TOKENS: tuple[int, ...] = (512, 2048, 8192)
_DEFAULT_LINEAR_DIMS = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (8192, 8192)]
#: The small CPU set: what the torch implementations need to show their trends in a few minutes.
_CPU_NORM_DIMS = [(256, 256), (512, 1024), (1024, 512), (1024, 1024)]
_CPU_RANKS = (8, 64)
_CPU_TOKENS = (1, 64, 512)
_CPU_COLS = (256, 1024, 2048)
_CPU_LINEAR = [(64, 256, 256, 8), (512, 1024, 512, 64)]


class ShapeError(ValueError):
    """A shape set, model name or shapes file that cannot be used."""


def _canon(op: str, shape: dict) -> dict[str, int]:
    keys = OP_SHAPE_KEYS[op]
    if set(shape) != set(keys):
        raise ShapeError(f"a {op} shape needs exactly the keys {list(keys)}, got {sorted(shape)}")
    out = {}
    for k in keys:
        v = shape[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ShapeError(f"{op} shape: {k} must be a positive integer, got {v!r}")
        out[k] = v
    return out


def _dedupe(shapes: list[dict[str, int]]) -> list[dict[str, int]]:
    seen, out = set(), []
    for s in shapes:
        key = tuple(sorted(s.items()))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _linear(dims: list[tuple[int, int]], ranks: tuple[int, ...], tokens: tuple[int, ...]) -> list[dict[str, int]]:
    out = [
        {"rows": t, "d_out": o, "d_in": i, "r": r}
        for (o, i), r, t in itertools.product(dims, ranks or LINEAR_RANKS, tokens or LINEAR_TOKENS)
    ]
    return _dedupe(out)


def model_shapes(model: str, ranks: tuple[int, ...], tokens: tuple[int, ...]) -> dict[str, list[dict[str, int]]]:
    """Shapes of every projection of ``model`` for each op (empty ``ranks`` / ``tokens``: each op's defaults)."""
    try:
        dims = MODEL_PRESETS[model.lower()]
    except KeyError:
        raise ShapeError(f"unknown model {model!r}; presets: {', '.join(sorted(MODEL_PRESETS))}") from None
    proj = list(dims.projections().values())
    norm = [{"d_out": o, "d_in": i, "r": r} for (o, i), r in itertools.product(proj, ranks or DEFAULT_RANKS)]
    comp = [{"rows": t, "cols": o} for (o, _), t in itertools.product(proj, tokens or DEFAULT_TOKENS)]
    comp = _dedupe(comp)
    return {"norm": _dedupe(norm), "compose": comp, "compose_train": comp, "dora_linear": _linear(proj, ranks, tokens)}


def default_shapes(*, cpu: bool = False) -> dict[str, list[dict[str, int]]]:
    """The default set (``cpu=True``: the small set for machines without a GPU)."""
    dims, ranks = (_CPU_NORM_DIMS, _CPU_RANKS) if cpu else (_DEFAULT_NORM_DIMS, DEFAULT_RANKS)
    tokens, cols = (_CPU_TOKENS, _CPU_COLS) if cpu else (DEFAULT_TOKENS, _DEFAULT_COLS)
    norm = [{"d_out": o, "d_in": i, "r": r} for (o, i), r in itertools.product(dims, ranks)]
    comp = [{"rows": t, "cols": c} for t, c in itertools.product(tokens, cols)]
    if cpu:
        linear = [{"rows": t, "d_out": o, "d_in": i, "r": r} for t, o, i, r in _CPU_LINEAR]
    else:
        linear = _linear(_DEFAULT_LINEAR_DIMS, (), ())
    return {"norm": norm, "compose": comp, "compose_train": list(comp), "dora_linear": linear}


def load_shapes_file(path: str | Path) -> dict[str, list[dict[str, int]]]:
    """Read shapes from JSON or CSV.

    JSON: ``{"norm": [{"d_out": .., "d_in": .., "r": ..}, ...], "compose": [{"rows": .., "cols": ..}], ...}``
    (ops may be left out; ``compose_train`` defaults to the ``compose`` list). CSV: a header with ``op`` and the
    shape columns (``op,d_out,d_in,r,rows,cols``), one shape a row, unused columns empty.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ShapeError(f"cannot read shapes file {p}: {e.strerror}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShapeError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict) or not data or any(op not in OPS for op in data):
            raise ShapeError(f"{p}: expected an object with keys among {list(OPS)}")
        out = {}
        for op, items in data.items():
            if not isinstance(items, list) or not all(isinstance(s, dict) for s in items):
                raise ShapeError(f"{p}: {op} must be a list of objects")
            out[op] = _dedupe([_canon(op, s) for s in items])
    elif p.suffix.lower() == ".csv":
        out = {}
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "op" not in rows[0]:
            raise ShapeError(f"{p}: expected a CSV header with an 'op' column and shape columns")
        for n, row in enumerate(rows, start=2):
            op = (row.get("op") or "").strip()
            if op not in OPS:
                raise ShapeError(f"{p} line {n}: op must be one of {list(OPS)}, got {op!r}")
            try:
                shape = {k: int(row[k]) for k in OP_SHAPE_KEYS[op]}
            except (KeyError, TypeError, ValueError):
                raise ShapeError(f"{p} line {n}: {op} needs integer columns {list(OP_SHAPE_KEYS[op])}") from None
            out.setdefault(op, []).append(_canon(op, shape))
        out = {op: _dedupe(v) for op, v in out.items()}
    else:
        raise ShapeError(f"{p}: shapes files are .json or .csv")
    if "compose" in out and "compose_train" not in out:
        out["compose_train"] = list(out["compose"])
    return out


def build_shape_set(
    *,
    models: tuple[str, ...] = (),
    ranks: tuple[int, ...] = (),
    tokens: tuple[int, ...] = (),
    shapes_file: str | Path | None = None,
    cpu: bool = False,
) -> dict[str, list[dict[str, int]]]:
    """Union of the model presets and the shapes file; the default set when neither is given."""
    for name, vals in (("rank", ranks), ("tokens", tokens)):
        if any(v < 1 for v in vals):
            raise ShapeError(f"--{name} values must be positive, got {list(vals)}")
    parts = []
    for m in models:
        parts.append(model_shapes(m, ranks, tokens))
    if shapes_file is not None:
        parts.append(load_shapes_file(shapes_file))
    if not parts:
        base = default_shapes(cpu=cpu)
        if ranks:
            base["norm"] = _dedupe([{**s, "r": r} for s in base["norm"] for r in ranks])
        if tokens:
            base["compose"] = base["compose_train"] = _dedupe(
                [{**s, "rows": t} for s in base["compose"] for t in tokens]
            )
        if ranks or tokens:
            linear = base["dora_linear"]
            linear = _dedupe([{**s, "r": r} for s in linear for r in ranks]) if ranks else linear
            base["dora_linear"] = _dedupe([{**s, "rows": t} for s in linear for t in tokens]) if tokens else linear
        return base
    out: dict[str, list[dict[str, int]]] = {op: [] for op in OPS}
    for part in parts:
        for op, shapes in part.items():
            out[op].extend(shapes)
    return {op: _dedupe(v) for op, v in out.items() if v}
