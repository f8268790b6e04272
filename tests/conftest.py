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
