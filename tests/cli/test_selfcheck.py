from click.testing import CliRunner

from dora_tune.cli import cli
from dora_tune.selfcheck import run_selfcheck


def test_run_selfcheck_covers_every_op_impl_dtype():
    results = run_selfcheck("cpu")
    combos = {(r.op, r.impl, r.dtype) for r in results}
    assert len(combos) == len(results) == 3 * (3 + 2 + 2 + 3)
    assert {r.op for r in results} == {"factored_norm", "compose", "compose_train", "dora_linear"}
    # Under the test session's interpreter (no CUDA) the Triton kernels run too; nothing fails.
    assert [r for r in results if r.status != "ok" and not r.status.startswith("skipped")] == []
    assert all(r.relerr is not None and r.relerr <= r.tolerance for r in results if r.status == "ok")


def test_selfcheck_command_prints_table_and_passes():
    result = CliRunner().invoke(cli, ["selfcheck", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "factored_norm" in result.output and "checks passed" in result.output


def test_selfcheck_fails_loudly_when_a_kernel_is_wrong(monkeypatch):
    import dora_tune.selfcheck as sc

    real = sc.compose

    def broken(lora, base, g, scale, *, impl="auto", config=None):
        out = real(lora, base, g, scale, impl=impl, config=config)
        return out * 1.01 if impl == "eager" else out

    monkeypatch.setattr(sc, "compose", broken)
    result = CliRunner().invoke(cli, ["selfcheck", "--device", "cpu"])
    assert result.exit_code != 0
    assert "checks failed" in result.output


def test_version_option():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and "dora-tune" in result.output
