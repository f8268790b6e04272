"""Real single-node Slurm cluster (slurm/local_cluster.sh): jobs run, get
accounted in sacct, and over-asking jobs are refused at submit time.

Needs root (the daemons run as SlurmUser=root) and either the Debian packages
or apt-get to install them. The cluster is started once per module and stopped
afterwards only if this module started it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"


def _skip_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root: local_cluster.sh runs the Slurm daemons as SlurmUser=root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is unavailable to install it"
    if shutil.which("bash") is None:
        return "needs bash to run slurm/local_cluster.sh"
    return None


def _run(args, env, timeout=60, check=False):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def slurm_env():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    was_up = _run(["bash", str(SCRIPT), "status"], env).returncode == 0
    # first start on a bare machine installs packages (apt-get): allow for it
    started = _run(["bash", str(SCRIPT), "start"], env, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"local_cluster.sh start failed:\n{started.stderr}")
    for line in _run(["bash", str(SCRIPT), "env"], env, check=True).stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    yield env
    if not was_up:
        _run(["bash", str(SCRIPT), "stop"], env, timeout=120)


HOLD_LOCK = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.lockf(f, fcntl.LOCK_EX); print(1, flush=True); time.sleep(60)"


def _apt_run(tmp_path, lock: Path, timeout_s: int) -> tuple[subprocess.CompletedProcess, float]:
    """The script's apt_run on a stand-in command (echo), with `lock` as the only apt/dpkg lock."""
    script = (
        f"source {SCRIPT}; APT_LOCKS=({lock}); APT_LOCK_TIMEOUT={timeout_s}; "
        f'apt_run {tmp_path}/apt.log echo ran || echo "rc=$? $LOCK_ERROR"'
    )
    t0 = time.monotonic()
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    return res, time.monotonic() - t0


def test_apt_waits_for_a_held_dpkg_lock_then_runs(tmp_path):
    # Another apt-get or dpkg holds its lock (an fcntl lock, as apt's are): the install waits, says once
    # whom it waits for, and runs when the lock is free, instead of failing as apt-get does at once.
    lock = tmp_path / "lock-frontend"
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # held
        subprocess.Popen(["bash", "-c", f"sleep 2; kill {holder.pid}"])
        res, took = _apt_run(tmp_path, lock, timeout_s=30)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 0 and "rc=" not in res.stdout, res
    assert took >= 1.5, took
    waits = [line for line in res.stderr.splitlines() if "waiting for the apt/dpkg lock" in line]
    assert len(waits) == 1, res.stderr  # said once, not once a second
    assert waits[0].startswith(f"local_cluster: waiting for the apt/dpkg lock: {lock} held by process {holder.pid} (")
    assert (tmp_path / "apt.log").read_text().startswith("ran -o DPkg::Lock::Timeout=")  # apt's own wait too


def test_apt_gives_up_on_a_lock_held_too_long_with_a_clear_message(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()
        res, took = _apt_run(tmp_path, lock, timeout_s=1)
    finally:
        holder.kill()
        holder.wait()
    assert f"rc=75 waited 1s for the apt/dpkg lock ({lock} held by process {holder.pid} (" in res.stdout, res
    assert "raise RCOT_SLURM_APT_LOCK_TIMEOUT" in res.stdout and took < 10
    assert not (tmp_path / "apt.log").exists()  # apt-get never ran


def _wait_for_state(job_id: str, env, wanted: set[str], timeout: float) -> str:
    """Poll sacct for the allocation's State until it is in ``wanted``."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = _run(["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State"], env).stdout
        state = out.strip().split(" ")[0]  # "CANCELLED by 0" -> "CANCELLED"
        if state in wanted:
            return state
        time.sleep(0.3)
    raise AssertionError(f"job {job_id}: state {state!r} after {timeout}s, wanted {wanted}")


def _sbatch(env, *args: str):
    return _run(["sbatch", "--parsable", *args], env)


def _node_value(env, fmt: str) -> int:
    return int(_run(["sinfo", "-h", "-N", "-o", fmt], env, check=True).stdout.split()[0])


def test_status_reports_up(slurm_env):
    res = _run(["bash", str(SCRIPT), "status"], slurm_env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cluster: up" in res.stdout


def test_batch_job_runs_and_is_accounted(slurm_env, tmp_path):
    out = tmp_path / "result.txt"
    res = _sbatch(
        slurm_env,
        "-o",
        str(tmp_path / "slurm-%j.out"),
        "--wrap",
        f"echo hello-from-$SLURM_JOB_ID > {out}",
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    assert _wait_for_state(job_id, slurm_env, {"COMPLETED", "FAILED"}, 60) == "COMPLETED"
    assert out.read_text() == f"hello-from-{job_id}\n"
    # every record of the job (allocation and batch step) is COMPLETED
    states = _run(["sacct", "-j", job_id, "-n", "-o", "State"], slurm_env).stdout.split()
    assert states and set(states) == {"COMPLETED"}, states


def test_more_cpus_than_node_rejected_at_submit(slurm_env):
    cpus = _node_value(slurm_env, "%c")
    res = _sbatch(slurm_env, "-c", str(cpus + 1), "--wrap", "true")
    assert res.returncode != 0
    assert "More processors requested than permitted" in res.stderr, res.stderr


def test_more_memory_than_node_rejected_at_submit(slurm_env):
    mem_mb = _node_value(slurm_env, "%m")
    res = _sbatch(slurm_env, f"--mem={mem_mb + 1024}M", "--wrap", "true")
    assert res.returncode != 0
    assert "Batch job submission failed" in res.stderr, res.stderr


def test_time_above_partition_limit_rejected_at_submit(slurm_env):
    res = _sbatch(slurm_env, "--time=2:00:00", "--wrap", "true")
    assert res.returncode != 0
    assert "Requested time limit is invalid" in res.stderr, res.stderr


def test_requeue_restarts_job(slurm_env, tmp_path):
    log = tmp_path / "requeue.out"
    res = _sbatch(
        slurm_env,
        "-o",
        str(log),
        "--open-mode=append",
        "--wrap",
        "echo run-${SLURM_RESTART_COUNT:-0}; sleep 60",
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    try:
        _wait_for_state(job_id, slurm_env, {"RUNNING"}, 30)
        deadline = time.monotonic() + 10
        while "run-0" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "first run wrote nothing"
            time.sleep(0.2)
        req = _run(["scontrol", "requeue", job_id], slurm_env)
        assert req.returncode == 0, req.stderr
        # a requeued job waits cred_expire (10 s here) before it may start again
        deadline = time.monotonic() + 45
        while "run-1" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
    finally:
        _run(["scancel", job_id], slurm_env)
    assert _wait_for_state(job_id, slurm_env, {"CANCELLED"}, 30) == "CANCELLED"


@pytest.mark.skipif(
    os.environ.get("RCOT_SLURM_SLOW") != "1",
    reason="slow (60-90 s: slurmctld checks time limits every 30 s); set RCOT_SLURM_SLOW=1",
)
def test_time_limit_kills_job(slurm_env):
    res = _sbatch(slurm_env, "--time=1", "-o", "/dev/null", "--wrap", "sleep 600")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    assert _wait_for_state(job_id, slurm_env, {"TIMEOUT", "FAILED"}, 150) == "TIMEOUT"


def test_submitit_autoexecutor_roundtrip(slurm_env, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    for key in ("SLURM_CONF", "RCOT_SLURM_STATE"):
        monkeypatch.setenv(key, slurm_env[key])
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(slurm_partition="debug", timeout_min=1, cpus_per_task=1)
    assert executor.cluster == "slurm"
    # a builtin pickles by reference, so the job needs no import of this module
    job = executor.submit(os.getenv, "SLURM_JOB_ID")
    assert job.result() == job.job_id  # ran inside the Slurm job it was given
    # job.state is a cached view; ask sacct directly
    assert _wait_for_state(job.job_id, slurm_env, {"COMPLETED", "FAILED"}, 30) == "COMPLETED"
