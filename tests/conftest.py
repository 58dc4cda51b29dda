"""Test setup: on a machine without CUDA, Triton kernels run on CPU tensors under TRITON_INTERPRET=1.

The variable must be set before Triton decorates the kernels; dora_tune imports its Triton modules lazily, so
setting it here (before any test imports them) is enough.
"""

import contextlib
import math
import os

import pytest
import torch

from dora_tune.autotune_db import EnvInfo, TrialResult

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def cpu_profile_args(db_path: str, *extra: str, rep: str = "1", warmup: str = "0") -> list[str]:
    """``dora-tune profile`` on the CPU into ``db_path``, quiet, with short trials, then ``extra``."""
    return ["profile", "--gpu", "cpu", "--db", db_path, "--rep", rep, "--warmup", warmup, "--no-progress", *extra]


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when out has a NaN or inf (so NaN never passes)."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def dora_inputs(lead, d_in, d_out, r, dtype, device, seed=0, zero_rows=()):
    """A DoRA layer's tensors, random and never zero, scaled as in training: ``(x [*lead, d_in], W, A, B, m, n,
    bias, s, dout [*lead, d_out])`` with ``n`` the float32 norm ``‖W + s·B·A‖_row`` (rows ``zero_rows`` of W and B
    zeroed, so n = 0 there) and ``m`` within ~10 % of it."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=gen)).to(dtype).to(device)

    W = rnd(d_out, d_in, std=d_in**-0.5)
    A = rnd(r, d_in, std=d_in**-0.5)
    B = rnd(d_out, r, std=0.3 * r**-0.5)
    for j in zero_rows:
        W[j] = 0
        B[j] = 0
    s = 1.5
    n = torch.linalg.vector_norm(W.double() + s * (B.double() @ A.double()), dim=1).float()
    m = (n.double() * (1 + 0.1 * torch.randn(d_out, generator=gen, dtype=torch.float64).to(device))).to(dtype)
    bias = rnd(d_out)
    x = rnd(*lead, d_in)
    dout = rnd(*lead, d_out)
    return x, W, A, B, m, n, bias, s, dout


@pytest.fixture
def triton_device() -> str:
    """Where Triton kernels run in this session: CUDA if present, else CPU under the interpreter, else skip."""
    if HAS_CUDA:
        return "cuda"
    if INTERPRET:
        return "cpu"
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def dev_for(request):
    """``dev_for(impl)``: the device to test ``impl`` on (Triton's device for "triton", else the CPU)."""
    return lambda impl: request.getfixturevalue("triton_device") if impl == "triton" else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        if os.environ.get("PYTEST_XDIST_WORKER"):  # other workers' kernels would land inside the timed spans
            shared = pytest.mark.skip(reason="times the GPU: needs it to itself, run without -n")
            for item in items:
                if "gpu_timing" in item.keywords:
                    item.add_marker(shared)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- a dispatcher whose one table cell races (GPU tests)


@contextlib.contextmanager
def racing_dispatcher(tmp_path, op: str, axes: dict, cfgs: list[dict]):
    """The process-wide dispatcher, for the block, on a user DB holding one ``op`` bf16 decision table for this GPU:
    every cell decides ``cfgs[0]`` (Triton) with ``cfgs[1:]`` as runners-up, racing on. Yields the dispatcher."""
    from dora_tune.autotune_db import TuningDB
    from dora_tune.dispatch import runtime
    from dora_tune.dispatch.decisions import DecisionTable
    from dora_tune.dispatch.registry import registry
    from dora_tune.tuning.env import environment

    env = environment(torch.device("cuda"))
    versions = {i.name: i.version for i in registry()[op]}
    n = math.prod(len(v) for v in axes.values())
    runners = [tuple(("triton", c) for c in cfgs[1:])] * n
    table = DecisionTable(op, "bf16", env.gpu_name, versions, axes, [("triton", cfgs[0])] * n, runners)
    user = str(tmp_path / "user.sqlite")
    with TuningDB.open(user) as db:
        db.save_model(env, op, "bf16", "linear_trees", table.to_json(), {"cv": {}})
    d = runtime.Dispatcher(user, use_shipped=False, force_env="", race=True)
    runtime.reset_default_dispatcher(d)
    try:
        yield d
    finally:
        runtime.reset_default_dispatcher(None)


# ---------------------------------------------------------------- a tuning DB with a known crossover (cost model)

ROWS = (64, 128, 256, 512, 1024, 2048, 4096)
COLS = (512, 1024, 2048, 4096, 8192)
FACTORS = (1.0, 1.15, 1.3, 1.6)  # the triton configs' factors: the first (the library default) is the fastest


H200 = EnvInfo("cuda", "NVIDIA H200", "9.0", 132, 150_000_000_000, "580.1", "13.0", "2.11.0", "3.6.0", "0.1.0")


def ok(us: float) -> TrialResult:
    """An "ok" TrialResult of ``us`` µs."""
    return TrialResult("ok", median_us=us, p20_us=us, p80_us=us, reps=10)


def known_time(impl: str, rows: int, cols: int, factor: float = 1.0) -> float:
    """The synthetic law: eager 50 + n·1e-3 µs, triton (400 + n·0.25e-3)·factor µs (n = rows·cols)."""
    n = rows * cols
    return 50 + n * 1e-3 if impl == "eager" else (400 + n * 0.25e-3) * factor


def fill_known_crossover(db, env=H200) -> None:
    """compose_train bf16 trials on the ROWS × COLS grid timed by :func:`known_time` — triton wins above
    n = 350 / 0.75e-3 ≈ 4.7e5 elements — for eager and four configs of the registry's triton space."""
    from dora_tune.dispatch.registry import registry
    from dora_tune.kernels import DEFAULT_COMPOSE_TRAIN_CONFIG

    impls = {i.name: i for i in registry()["compose_train"]}
    default = DEFAULT_COMPOSE_TRAIN_CONFIG.as_dict()
    others = [c for c in impls["triton"].configs({"rows": 1, "cols": 1}) if c != default]
    configs = [default, *others[:3]]
    for rows in ROWS:
        for cols in COLS:
            shape = {"rows": rows, "cols": cols}
            us = known_time("eager", rows, cols)
            db.record_trial(env, "compose_train", "eager", impls["eager"].version, shape, "bf16", {}, ok(us))
            for cfg, f in zip(configs, FACTORS, strict=True):
                us = known_time("triton", rows, cols, f)
                db.record_trial(env, "compose_train", "triton", impls["triton"].version, shape, "bf16", cfg, ok(us))


# ---------------------------------------------------------------- PostgreSQL (tests marked `postgres`)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_pg_server() -> tuple[str, str]:
    """A throwaway server from the machine's binaries (``.ci/pg.sh``): ``(admin URL, data dir)``; RuntimeError with
    the script's message when none can be started."""
    import subprocess

    res = subprocess.run([os.path.join(REPO, ".ci", "pg.sh"), "start"], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip() or "pg.sh start failed")
    env = dict(line.removeprefix("export ").split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return env["DORA_TUNE_TEST_PG_URL"], env["DORA_TUNE_TEST_PG_DIR"]


def stop_pg_server(data_dir: str) -> None:
    import subprocess

    subprocess.run([os.path.join(REPO, ".ci", "pg.sh"), "stop", data_dir], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def pg_admin_url():
    """The admin URL (database ``postgres``) of a PostgreSQL server: ``$DORA_TUNE_TEST_PG_URL`` (``.ci/run`` starts
    one), else one started here for the session; the test is skipped when there is neither (or no psycopg)."""
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    url = os.environ.get("DORA_TUNE_TEST_PG_URL")
    if url:
        yield url
        return
    try:
        url, data_dir = start_pg_server()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"no PostgreSQL server: {e}")
    try:
        yield url
    finally:
        stop_pg_server(data_dir)


def _pg_exec(admin_url: str, sql: str) -> None:
    import psycopg

    conninfo = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture
def pg_url(pg_admin_url):
    """A fresh, empty database on the test server (dropped afterwards): its SQLAlchemy URL."""
    import uuid

    name = f"dt_{uuid.uuid4().hex[:12]}"
    _pg_exec(pg_admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield pg_admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        _pg_exec(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
