"""What the tests share, in one place (fixtures are in tests/conftest.py):

- configs: `compose_cfg(*overrides)` composes conf/train.yaml with Hydra's compose API, as `python train.py
  <overrides>` does (no hidden defaults: each test lists its own overrides);
- runs: `run_train` is `python train.py ...` in a subprocess, as a user runs it (exit code, console, output.log
  included); `run_in_process` runs the same recipe in the test's own process, ~5 s faster (no interpreter start
  and no imports), for tests that check what the run wrote rather than how the CLI behaved; `run_sweep`,
  `kill_at_checkpoint` and the Slurm helpers are the other CLI paths;
- what runs write: `read_jsonl`, and checkpoints compared tensor by tensor (`changed_tensors`,
  `assert_every_tensor_moved`: TRL's tests check that every trainable parameter changed after a few steps).

Import them as `from tests.helpers import ...` (tests/ is a package, so no sys.path edits are needed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# ------------------------------------------------------------------------------------------------- configs
@contextlib.contextmanager
def hydra_on_conf():
    """Hydra's global state initialised on conf/ (what `compose` needs), unless a caller already did."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside the hydra_ctx fixture
        yield
        return
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose_cfg(*overrides: str, config_name: str = "train", return_hydra_config: bool = False):
    """conf/<config_name>.yaml composed with `overrides`, as the command line would."""
    from hydra import compose

    with hydra_on_conf():
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def free_port() -> int:
    """A TCP port nothing listens on (closed again at once: a server, or nobody, may take it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    """Every line parsed, strictly: unlike generation.read_jsonl (which skips a line a crash cut short), a
    corrupt line in what a run wrote fails the test."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------- weights
def tensors(folder_or_file: Path | str) -> dict:
    """The tensors of a checkpoint folder (its model.safetensors) or of one .safetensors file."""
    from safetensors.torch import load_file

    path = Path(folder_or_file)
    return load_file(path / "model.safetensors" if path.is_dir() else path)


def changed_tensors(before, after) -> list[str]:
    """Names of the tensors that differ between two checkpoints (folders, files or loaded dicts)."""
    a = before if isinstance(before, dict) else tensors(before)
    b = after if isinstance(after, dict) else tensors(after)
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return [k for k in a if not (a[k] == b[k]).all()]


def assert_every_tensor_moved(before, after, keys=None) -> None:
    """Every tensor (or every one of `keys`) changed: training reached all of it, not just some (TRL's tests
    check every trainable parameter the same way)."""
    a = before if isinstance(before, dict) else tensors(before)
    b = after if isinstance(after, dict) else tensors(after)
    keys = list(a) if keys is None else list(keys)
    assert keys, "no tensors to compare"
    still = [k for k in keys if (a[k] == b[k]).all()]
    assert not still, f"{len(still)} of {len(keys)} tensors did not move: {still[:8]}"


# ------------------------------------------------------------------------------------------------- runs
class Run:
    """A finished `python train.py` call (or an in-process run): exit code, output, and its run dir."""

    def __init__(self, returncode: int, stdout: str, stderr: str, run_dir: Path | None, results: dict | None = None):
        self.returncode, self.stdout, self.stderr, self.dir = returncode, stdout, stderr, run_dir
        self.results = results  # in process: what recipes.run returned, per stage

    @classmethod
    def found_under(cls, proc: subprocess.CompletedProcess, root: Path) -> Run:
        dirs = sorted(p for p in root.rglob("backup") if p.is_dir())
        return cls(proc.returncode, proc.stdout, proc.stderr, dirs[-1].parent if dirs else None)

    def result(self, name: str) -> dict:
        return json.loads((self.dir / "result" / name).read_text())

    def __repr__(self):
        return (
            f"Run(rc={self.returncode}, dir={self.dir})\nSTDOUT:\n{self.stdout[-3000:]}\nSTDERR:\n{self.stderr[-3000:]}"
        )


def _cli(tmp_path: Path, *overrides: str, multirun: bool = False) -> list[str]:
    flags = ["-m"] if multirun else []
    return [sys.executable, str(ROOT / "train.py"), *flags, f"output_root={tmp_path / 'outputs'}", *overrides]


def run_train(tmp_path: Path, *overrides: str, timeout: int = 600, env: dict | None = None) -> Run:
    """`python train.py output_root=<tmp_path>/outputs <overrides>` from tmp_path, as a user runs it."""
    proc = subprocess.run(
        _cli(tmp_path, *overrides),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return Run.found_under(proc, tmp_path)


def run_in_process(tmp_path: Path, *overrides: str) -> Run:
    """The recipe of `python train.py <overrides>` run here, as main runs it (recipes.prepare: compose,
    validate, load data; recipes.run: provenance, every stage) into `<tmp_path>/run`. No output.log (Hydra's
    logging is the CLI's): read the log with caplog. Bad input raises ConfigError instead of exiting 2."""
    from reinforce_cot import recipes

    run_dir = tmp_path / "run"
    with hydra_on_conf():  # recipes compose each stage too
        results = recipes.run(recipes.prepare(compose_cfg(*overrides), run_dir, list(overrides)))
    return Run(0, "", "", run_dir, results)


def kill_at_checkpoint(tmp_path: Path, pattern: str, *overrides: str, env: dict | None = None) -> Path:
    """Start `python train.py <overrides>` and SIGKILL it (as a preemption would: no clean-up) as soon as a
    complete checkpoint matching `pattern` (under output_root) appears; returns the run dir, checked to be
    unfinished."""
    out = tmp_path / "outputs"
    proc = subprocess.Popen(
        _cli(tmp_path, *overrides),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
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
    cmd = _cli(tmp_path, *overrides, multirun=True)
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


# ------------------------------------------------------------------------------------------------- Slurm
SLURM_SCRIPT = ROOT / "slurm" / "local_cluster.sh"


def slurm_skip_reason() -> str | None:
    """Why the `slurm` tests cannot run here, or None: slurm/local_cluster.sh needs root, bash, and Slurm's
    Debian packages or apt-get to install them."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root: slurm/local_cluster.sh runs the Slurm daemons as SlurmUser=root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is unavailable to install it"
    if shutil.which("bash") is None:
        return "needs bash to run slurm/local_cluster.sh"
    return None
