import json

import pytest

from dora_tune.tuning.shapes import (
    MODEL_PRESETS,
    ShapeError,
    build_shape_set,
    default_shapes,
    load_shapes_file,
    model_shapes,
)


def test_model_presets_have_real_dims():
    proj = MODEL_PRESETS["llama-3-8b"].projections()
    assert proj["q"] == (4096, 4096) and proj["k"] == (1024, 4096) and proj["down"] == (4096, 14336)
    assert MODEL_PRESETS["llama-3-70b"].projections()["up"] == (28672, 8192)
    assert MODEL_PRESETS["qwen2.5-7b"].projections()["k"] == (512, 3584)
    assert {"llama-3-8b", "llama-3-70b", "qwen2.5-7b", "qwen2.5-32b", "mistral-7b"} <= set(MODEL_PRESETS)


def test_model_shapes_dedupe_and_cover_ops():
    s = model_shapes("llama-3-8b", (16,), (128,))
    assert {"d_out": 14336, "d_in": 4096, "r": 16} in s["norm"]
    assert len(s["norm"]) == len({tuple(x.values()) for x in s["norm"]})  # k and v share a shape: once
    assert s["compose"] == s["compose_train"] and {"rows": 128, "cols": 1024} in s["compose"]


def test_default_set_spans_the_ranges():
    s = default_shapes()
    ds = {x["d_out"] for x in s["norm"]} | {x["d_in"] for x in s["norm"]}
    assert min(ds) == 512 and max(ds) == 28672
    assert {x["r"] for x in s["norm"]} >= {8, 768}
    assert {x["rows"] for x in s["compose"]} >= {1, 32768}
    small = default_shapes(cpu=True)
    assert max(x["d_out"] * x["d_in"] for x in small["norm"]) <= 1024 * 1024


def test_dora_linear_has_its_own_smaller_defaults():
    """dora_linear's trials cost a layer's GEMMs: its default set is 5 projections × ranks {16, 64, 384} × tokens
    {512, 2048, 8192}; a preset's projections likewise; --rank and --tokens replace its defaults."""
    s = default_shapes()["dora_linear"]
    assert len(s) == 45 and {x["r"] for x in s} == {16, 64, 384} and {x["rows"] for x in s} == {512, 2048, 8192}
    assert all(set(x) == {"rows", "d_out", "d_in", "r"} for x in s)
    assert {"rows": 2048, "d_out": 14336, "d_in": 4096, "r": 64} in s
    assert len(default_shapes(cpu=True)["dora_linear"]) == 2
    llama = model_shapes("llama-3-8b", (), ())["dora_linear"]
    assert len(llama) == 4 * 3 * 3  # q/o, k/v, gate/up, down: 4 distinct (d_out, d_in)
    assert {(x["r"], x["rows"]) for x in model_shapes("llama-3-8b", (8,), (100,))["dora_linear"]} == {(8, 100)}
    picked = build_shape_set(ranks=(32,), tokens=(1000, 3000))["dora_linear"]
    assert len(picked) == 5 * 2 and {x["r"] for x in picked} == {32}


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ShapeError, match=r"unknown model 'llama-9'.*presets: "):
        build_shape_set(models=("llama-9",))


def test_shapes_file_json_and_csv(tmp_path):
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"norm": [{"d_out": 64, "d_in": 32, "r": 4}], "compose": [{"rows": 2, "cols": 8}]}))
    s = load_shapes_file(j)
    assert s["norm"] == [{"d_out": 64, "d_in": 32, "r": 4}] and s["compose_train"] == [{"rows": 2, "cols": 8}]
    c = tmp_path / "s.csv"
    c.write_text("op,d_out,d_in,r,rows,cols\nnorm,64,32,4,,\ncompose_train,,,,3,16\n")
    s = load_shapes_file(c)
    assert s == {"norm": [{"d_out": 64, "d_in": 32, "r": 4}], "compose_train": [{"rows": 3, "cols": 16}]}


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("a.json", "{not json", "not valid JSON"),
        ("a.json", json.dumps({"norm": [{"d_out": 1, "d_in": 2}]}), "exactly the keys"),
        ("a.json", json.dumps({"conv": []}), "keys among"),
        ("a.json", json.dumps({"norm": [{"d_out": 0, "d_in": 2, "r": 1}]}), "positive integer"),
        ("a.csv", "op,rows,cols\ncompose,x,3\n", "line 2"),
        ("a.csv", "rows,cols\n1,2\n", "'op' column"),
        ("a.txt", "", ".json or .csv"),
    ],
)
def test_malformed_shapes_files(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ShapeError, match=match):
        load_shapes_file(p)


def test_missing_shapes_file(tmp_path):
    with pytest.raises(ShapeError, match="cannot read"):
        load_shapes_file(tmp_path / "nope.json")
