"""Fixtures every test module may use, and the suite's tiers (helpers that are not fixtures: tests/helpers.py).

Tiers (pyproject.toml registers the markers; `--strict-markers` refuses others):
- unmarked: units, composition, validation, bad input in process: `make test-fast` runs only these. They
  train nothing: a test that trains (in process or through `train`), starts torchrun or a server, or takes
  more than a few seconds is marked `slow` (placed by measured `--durations`, each with a comment saying
  how long), and a test asking for a fixture that trains must be (checked at collection, below).
- `slow`: end-to-end runs through the real CLI and TRL, in process or as subprocesses (`make test` runs all).
- `slurm`: the real local Slurm cluster; all on one xdist worker (`--dist loadgroup`).

Tests call `python train.py ...` in a subprocess where the CLI itself is under test (Hydra composition, the
run dir, logging and exit codes), and `run_in_process` where only what the run wrote is. Sizes are shrunk
through `debug=smoke` (and explicit overrides, each with a comment); assertions are not.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, hydra_on_conf, run_train, slurm_skip_reason

# Fixtures that train a model: a test asking for one is end-to-end, so it must be marked slow.
TRAINING_FIXTURES = {"sft_checkpoint", "sft_text_checkpoint"}


def _session_dir(tmp_path_factory, worker_id: str) -> Path:
    """A folder every xdist worker of this session shares (each worker's basetemp is a child of it)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session", autouse=True)
def _env(tmp_path_factory, worker_id):
    # One tiny-model cache for the session, shared by the workers (tiny.build writes a folder atomically).
    os.environ.setdefault("RCOT_CACHE", str(_session_dir(tmp_path_factory, worker_id) / "rcot_cache"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    yield


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads xdist_group marks into the test ids
def pytest_collection_modifyitems(items):
    for item in items:
        # One local Slurm cluster serves the whole session: keep its tests on one xdist worker, so one worker
        # starts it and stops it, and none stops it under another (without tryfirst they spread over the
        # workers, and the first to finish stopped the cluster under a running sweep).
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        trains = TRAINING_FIXTURES & set(getattr(item, "fixturenames", ()))
        if trains and not item.get_closest_marker("slow"):
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(trains)}, which train a model: mark it slow")
    # the Slurm tests run one after another on their worker (~4 min, the longest chain): scheduled first
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)


@pytest.fixture
def hydra_ctx():
    """Hydra's global state initialised on conf/, for tests that call `compose` or `recipes.compose_stages`."""
    with hydra_on_conf():
        yield


@pytest.fixture
def train(tmp_path):
    """`train(*overrides)`: `python train.py <overrides>` in tmp_path (helpers.run_train)."""

    def _train(*overrides: str, **kw):
        return run_train(tmp_path, *overrides, **kw)

    return _train


def _shared_once(tmp_path_factory, worker_id: str, name: str, make) -> Path:
    """`make(folder)` once per session for all xdist workers (the first one builds, the others wait on a file
    lock, then reuse): a checkpoint fixture would otherwise train once per worker. Returns what make returned."""
    root = _session_dir(tmp_path_factory, worker_id)
    done = root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            done.write_text(str(make(root / name)))
    return Path(done.read_text())


def _sft(folder: Path, *overrides: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    run = run_train(folder, "recipe=single", "algo=sft", "reward=none", *overrides)
    assert run.returncode == 0, run
    return run.dir / "ckpt" / "01_sft" / "final"


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory, worker_id) -> Path:
    """A tiny VLM after a short SFT: RL tests start here, since RL from random weights gets no reward
    signal at all (every completion scores 0, so every advantage and gradient is 0)."""
    return _shared_once(
        tmp_path_factory,
        worker_id,
        "sft",
        lambda folder: _sft(
            folder,
            "data.train.n=1200",  # ~75 steps of 16: enough for the format and some correct answers
            "algo.args.per_device_train_batch_size=16",
            "eval.max_prompts=16",
            "eval.k=2",
            "generation.batch_size=8",  # 2+ batches per generation: test_sharded shares them between 2 ranks
        ),
    )


@pytest.fixture(scope="session")
def sft_text_checkpoint(tmp_path_factory, worker_id) -> Path:
    """The text twin of `sft_checkpoint`: tiny_lm after a short SFT on arithmetic (~15 s), so that RL on a
    text model has completions that differ in reward (measured: format reward mean 0.14, 62% of groups
    with non-zero reward spread)."""
    return _shared_once(
        tmp_path_factory,
        worker_id,
        "sft_text",
        lambda folder: _sft(
            folder,
            "model=tiny_lm",
            "data=arithmetic",
            "data.train.n=1200",
            "algo.args.per_device_train_batch_size=16",
            "eval.max_prompts=16",
            "eval.k=2",
        ),
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """A running single-node Slurm (slurm/local_cluster.sh) for the whole session; returns the environment
    for its clients (SLURM_CONF). Started here when down, and then stopped at the end of the session."""
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    script = ["bash", str(ROOT / "slurm" / "local_cluster.sh")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    was_up = subprocess.run([*script, "status"], env=env, capture_output=True).returncode == 0
    # the first start on a bare machine installs the packages (apt-get): allow for it
    started = subprocess.run([*script, "start"], env=env, capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"slurm/local_cluster.sh start failed:\n{started.stderr}")
    out = subprocess.run([*script, "env"], env=env, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    yield env
    if not was_up:
        subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def slurm(slurm_cluster, tmp_path):
    """The cluster's client environment; jobs a test leaves behind (driver killed by a timeout) are cancelled."""
    yield slurm_cluster
    out = subprocess.run(["squeue", "-h", "-o", "%i %Z"], env=slurm_cluster, capture_output=True, text=True).stdout
    mine = [job for job, _, workdir in (line.partition(" ") for line in out.splitlines()) if workdir == str(tmp_path)]
    if mine:
        subprocess.run(["scancel", *mine], env=slurm_cluster)
