"""Shared fixtures: a per-session tiny-model cache, and `train(...)` which runs the real CLI.

Tests call `python train.py ...` in a subprocess, as a user would: Hydra composition, the run dir,
logging and exit codes are part of what is tested. Sizes are shrunk through `debug=smoke` (and
explicit overrides); assertions are not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session", autouse=True)
def _env(tmp_path_factory):
    # One tiny-model cache for the whole session: every test reuses the same built folder.
    os.environ.setdefault("RCOT_CACHE", str(tmp_path_factory.mktemp("rcot_cache")))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    yield


def pytest_collection_modifyitems(items):
    # One local Slurm cluster serves the whole session: keep its tests on one xdist worker, so one worker
    # starts it and stops it, and none stops it under another.
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


class Run:
    """A finished `python train.py` call: exit code, output, and its run dir."""

    def __init__(self, proc: subprocess.CompletedProcess, root: Path):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        dirs = sorted(p for p in root.rglob("backup") if p.is_dir())
        self.dir = dirs[-1].parent if dirs else None

    def result(self, name: str) -> dict:
        return json.loads((self.dir / "result" / name).read_text())

    def __repr__(self):
        return (
            f"Run(rc={self.returncode}, dir={self.dir})\nSTDOUT:\n{self.stdout[-3000:]}\nSTDERR:\n{self.stderr[-3000:]}"
        )


def run_train(tmp_path: Path, *overrides: str, timeout: int = 600, env: dict | None = None) -> Run:
    out = tmp_path / "outputs"
    cmd = [sys.executable, str(ROOT / "train.py"), f"output_root={out}", *overrides]
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    return Run(proc, tmp_path)


def kill_at_checkpoint(tmp_path: Path, pattern: str, *overrides: str, env: dict | None = None) -> Path:
    """Start `python train.py <overrides>` and SIGKILL it (as a preemption would: no clean-up) as soon as a
    complete checkpoint matching `pattern` (under output_root) appears; returns the run dir, checked to be
    unfinished."""
    import os
    import signal
    import time

    out = tmp_path / "outputs"
    cmd = [sys.executable, str(ROOT / "train.py"), f"output_root={out}", *overrides]
    env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state, deadline = None, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list(out.glob(f"*/ckpt/{pattern}/trainer_state.json"))
        if found:
            state = found[0]
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert state is not None, "no checkpoint appeared before the run ended"
    run_dir = state.parents[3]
    assert not list((run_dir / "result").glob("[0-9][0-9]_*.json")), "the run finished before it was killed"
    return run_dir


@pytest.fixture
def train(tmp_path):
    def _train(*overrides: str, **kw) -> Run:
        return run_train(tmp_path, *overrides, **kw)

    return _train


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory) -> Path:
    """A tiny VLM after a short SFT: RL tests start here, since RL from random weights gets no reward
    signal at all (every completion scores 0, so every advantage and gradient is 0)."""
    tmp = tmp_path_factory.mktemp("sft")
    run = run_train(
        tmp,
        "recipe=single",
        "algo=sft",
        "reward=none",
        "data.train.n=1200",  # ~75 steps of 16: enough for the format and some correct answers
        "algo.args.per_device_train_batch_size=16",
        "eval.max_prompts=16",
        "eval.k=2",
        "generation.batch_size=8",  # 2+ batches per generation: test_sharded shares them between 2 ranks
    )
    assert run.returncode == 0, run
    return run.dir / "ckpt" / "01_sft" / "final"


@pytest.fixture(scope="session")
def sft_text_checkpoint(tmp_path_factory) -> Path:
    """The text twin of `sft_checkpoint`: tiny_lm after a short SFT on arithmetic (~15 s), so that RL on a
    text model has completions that differ in reward (measured: format reward mean 0.14, 62% of groups
    with non-zero reward spread)."""
    tmp = tmp_path_factory.mktemp("sft_text")
    run = run_train(
        tmp,
        "recipe=single",
        "algo=sft",
        "reward=none",
        "model=tiny_lm",
        "data=arithmetic",
        "data.train.n=1200",
        "algo.args.per_device_train_batch_size=16",
        "eval.max_prompts=16",
        "eval.k=2",
    )
    assert run.returncode == 0, run
    return run.dir / "ckpt" / "01_sft" / "final"


def slurm_skip_reason() -> str | None:
    """Why the `slurm` tests cannot run here, or None: slurm/local_cluster.sh needs root, and Slurm's
    Debian packages or apt-get to install them."""
    import shutil

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root: slurm/local_cluster.sh runs the Slurm daemons as SlurmUser=root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is unavailable to install it"
    return None


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


class Sweep:
    """A finished `python train.py -m ...`: exit code, output, the sweep folder and its job run dirs."""

    def __init__(self, proc: subprocess.CompletedProcess, root: Path):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        found = sorted(p.parent for p in root.rglob("multirun.yaml"))  # Hydra writes it in the sweep folder
        self.dir = found[-1] if found else None

    def job(self, num: int) -> Path:
        return self.dir / str(num)

    def jobs(self) -> list[Path]:
        return sorted((p for p in self.dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))

    def result(self, num: int, name: str) -> dict:
        return json.loads((self.job(num) / "result" / name).read_text())

    def __repr__(self):
        return f"Sweep(rc={self.returncode}, dir={self.dir})\nSTDOUT:\n{self.stdout[-4000:]}\nSTDERR:\n{self.stderr[-4000:]}"


def sweep_env(extra: dict | None = None) -> dict:
    """The environment of a sweep's driver, which its jobs inherit (sbatch exports it): this checkout's
    src/ first, so jobs import the code under test."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def run_sweep(tmp_path: Path, *overrides: str, timeout: int = 600, env: dict | None = None, wait=None) -> Sweep:
    """`python train.py -m <overrides>` from tmp_path (so multirun/ lands there). `wait(proc)`, if given, runs
    while the sweep does (to act on a running job)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"output_root={tmp_path / 'outputs'}", *overrides]
    out, err = tmp_path / "driver.out", tmp_path / "driver.err"  # files, not pipes: nobody reads them meanwhile
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=fo, stderr=fe, text=True, env=sweep_env(env))
        try:
            if wait is not None:
                wait(proc)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    done = subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())
    return Sweep(done, tmp_path)
