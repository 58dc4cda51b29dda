import pytest
import torch
from click.testing import CliRunner

from dora_tune.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_lookup_uses_the_shipped_h200_cache_for_a_measured_shape(tmp_path):
    res = run("lookup", "--op", "norm", "--rows", "4096", "--cols", "4096", "--rank", "384", "--gpu", "NVIDIA H200",
              "--db", str(tmp_path / "none.sqlite"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "triton" in res.output and "source: measured — shipped DB" in res.output


def test_lookup_shows_the_norm_shortlist_raced_at_first_use(tmp_path):
    # an unmeasured norm shape on the shipped H200 cache: the model's decision and the configs raced at first use
    res = run("lookup", "--op", "norm", "--rows", "6000", "--cols", "3000", "--rank", "100", "--gpu", "NVIDIA H200",
              "--db", str(tmp_path / "none.sqlite"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "source: model — shipped DB decision table" in res.output
    assert "raced at the first call (fastest kept), on the call's own inputs: 3 configs" in res.output
    assert res.output.count("'split_k'") == 4  # the plan's config and the three raced
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DORA_TUNE_RACE", "0")
        off = run("lookup", "--op", "norm", "--rows", "6000", "--cols", "3000", "--rank", "100", "--gpu",
                  "NVIDIA H200", "--db", str(tmp_path / "none.sqlite"))  # fmt: skip
    assert off.exit_code == 0 and "raced" not in off.output


def test_lookup_shows_the_compose_train_shortlist_raced_once_per_cell(tmp_path):
    res = run("lookup", "--op", "compose_train", "--rows", "3000", "--cols", "14336", "--gpu", "NVIDIA H200",
              "--db", str(tmp_path / "none.sqlite"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "source: model — shipped DB decision table" in res.output
    assert "raced at the first call of this table cell (shared by its shapes) (fastest kept)" in res.output
    assert res.output.count("'row_iters'") == 4  # the plan's config and the three raced


def test_lookup_unmeasured_shape_and_no_shipped(tmp_path):
    res = run("lookup", "--op", "compose_train", "--rows", "100", "--cols", "512", "--gpu", "NVIDIA H200",
              "--db", str(tmp_path / "none.sqlite"), "--no-shipped")  # fmt: skip
    assert res.exit_code == 0 and "eager" in res.output and "source: heuristic" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for the local GPU there")
def test_lookup_on_cpu_says_why(tmp_path):
    res = run("lookup", "--op", "compose", "--rows", "8", "--cols", "8", "--db", str(tmp_path / "none.sqlite"))
    assert res.exit_code == 0 and "source: fallback" in res.output and "--gpu NAME" in res.output


def test_lookup_argument_errors():
    assert run("lookup", "--op", "norm", "--rows", "8", "--cols", "8").exit_code == 2  # --rank required
    assert run("lookup", "--op", "compose", "--rows", "8", "--cols", "8", "--rank", "4").exit_code == 2
    assert run("lookup", "--op", "compose", "--rows", "0", "--cols", "8").exit_code == 2
