"""Real single-node Slurm cluster (slurm/local_cluster.sh): jobs run, get
accounted in sacct, and over-asking jobs are refused at submit time.

Needs root (the daemons run as SlurmUser=root) and either the Debian packages
or apt-get to install them. The cluster is the session's (the `slurm` fixture of
tests/conftest.py), stopped at the end only if the session started it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from tests.helpers import SLURM_SCRIPT as SCRIPT

pytestmark = pytest.mark.slurm


def _run(args, env, timeout=60, check=False):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=check)


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


def test_status_reports_up(slurm):
    res = _run(["bash", str(SCRIPT), "status"], slurm)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cluster: up" in res.stdout


def test_batch_job_runs_and_is_accounted(slurm, tmp_path):
    out = tmp_path / "result.txt"
    res = _sbatch(
        slurm,
        "-o",
        str(tmp_path / "slurm-%j.out"),
        "--wrap",
        f"echo hello-from-$SLURM_JOB_ID > {out}",
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    assert _wait_for_state(job_id, slurm, {"COMPLETED", "FAILED"}, 60) == "COMPLETED"
    assert out.read_text() == f"hello-from-{job_id}\n"
    # every record of the job (allocation and batch step) is COMPLETED
    states = _run(["sacct", "-j", job_id, "-n", "-o", "State"], slurm).stdout.split()
    assert states and set(states) == {"COMPLETED"}, states


def test_more_cpus_than_node_rejected_at_submit(slurm):
    cpus = _node_value(slurm, "%c")
    res = _sbatch(slurm, "-c", str(cpus + 1), "--wrap", "true")
    assert res.returncode != 0
    assert "More processors requested than permitted" in res.stderr, res.stderr


def test_more_memory_than_node_rejected_at_submit(slurm):
    mem_mb = _node_value(slurm, "%m")
    res = _sbatch(slurm, f"--mem={mem_mb + 1024}M", "--wrap", "true")
    assert res.returncode != 0
    assert "Batch job submission failed" in res.stderr, res.stderr


def test_time_above_partition_limit_rejected_at_submit(slurm):
    res = _sbatch(slurm, "--time=2:00:00", "--wrap", "true")
    assert res.returncode != 0
    assert "Requested time limit is invalid" in res.stderr, res.stderr


def test_requeue_restarts_job(slurm, tmp_path):
    log = tmp_path / "requeue.out"
    res = _sbatch(
        slurm,
        "-o",
        str(log),
        "--open-mode=append",
        "--wrap",
        "echo run-${SLURM_RESTART_COUNT:-0}; sleep 60",
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    try:
        _wait_for_state(job_id, slurm, {"RUNNING"}, 30)
        deadline = time.monotonic() + 10
        while "run-0" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "first run wrote nothing"
            time.sleep(0.2)
        req = _run(["scontrol", "requeue", job_id], slurm)
        assert req.returncode == 0, req.stderr
        # a requeued job waits cred_expire (10 s here) before it may start again
        deadline = time.monotonic() + 45
        while "run-1" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
    finally:
        _run(["scancel", job_id], slurm)
    assert _wait_for_state(job_id, slurm, {"CANCELLED"}, 30) == "CANCELLED"


@pytest.mark.skipif(
    os.environ.get("RCOT_SLURM_SLOW") != "1",
    reason="slow (60-90 s: slurmctld checks time limits every 30 s); set RCOT_SLURM_SLOW=1",
)
def test_time_limit_kills_job(slurm):
    res = _sbatch(slurm, "--time=1", "-o", "/dev/null", "--wrap", "sleep 600")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    assert _wait_for_state(job_id, slurm, {"TIMEOUT", "FAILED"}, 150) == "TIMEOUT"


def test_submitit_autoexecutor_roundtrip(slurm, tmp_path, monkeypatch):
    for key in ("SLURM_CONF", "RCOT_SLURM_STATE"):
        monkeypatch.setenv(key, slurm[key])
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(slurm_partition="debug", timeout_min=1, cpus_per_task=1)
    assert executor.cluster == "slurm"
    # a builtin pickles by reference, so the job needs no import of this module
    job = executor.submit(os.getenv, "SLURM_JOB_ID")
    assert job.result() == job.job_id  # ran inside the Slurm job it was given
    # job.state is a cached view; ask sacct directly
    assert _wait_for_state(job.job_id, slurm, {"COMPLETED", "FAILED"}, 30) == "COMPLETED"
