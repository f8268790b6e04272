"""Hydra multirun sweeps on a real Slurm (slurm/local_cluster.sh) through hydra/launcher=slurm.

    python -m pytest -m slurm tests/test_sweeps.py        # as root; starts the cluster if it is down

Every job is a real `train.py` run (tiny VLM, debug=smoke, recipe=single, algo=sft) in a Slurm array job:
a sweep lands in multirun/<date>/<time>/<job>/ run dirs; one job failing or killed leaves the others'
results, and rerun into its sweep dir the sweep runs only those; a 2-node job (two slurmd on this host)
trains with 2 gloo processes and both resume after a signal; a job signalled (USR2, then scontrol requeue)
saves a checkpoint at the next step, is requeued and resumes there in the same run dir; requests the
cluster cannot hold fail before submitting. The main node has 2 CPUs, so every job asks for 1 CPU per task
(hardware=slurm_cpu).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from reinforce_cot import rundir
from tests.helpers import run_sweep

pytestmark = pytest.mark.slurm

TINY = ("recipe=single", "algo=sft", "debug=smoke", "hardware=slurm_cpu")
STEPS = 4  # debug=smoke's max_steps
ROWS, BATCH = 96, 16  # debug=smoke's data.train.n and per_device_train_batch_size


def sacct_states(env, job_id: str, timeout: float = 60) -> list[str]:
    """Every record's state (-D: requeued runs too), oldest first, for an allocation (no steps), once the
    last one is final: the result file reaches the driver a moment before Slurm sees the job end."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "JobID,State"],
            env=env,
            capture_output=True,
            text=True,
        ).stdout
        states = [state.split()[0] for _, state in (line.split("|") for line in out.splitlines())]
        if states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def sweep_table(sweep_dir: Path) -> list[dict]:
    """<sweep dir>/sweep.md, the launcher's end-of-sweep table (reinforce_cot.sweeps), as one dict per row."""
    header, _, *lines = (sweep_dir / "sweep.md").read_text().splitlines()
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return [dict(zip(cells(header), cells(line))) for line in lines]


def jobs_txt(run_dir: Path) -> list[dict]:
    """backup/jobs.txt: one line per start of the job (reinforce_cot.cluster)."""
    lines = (run_dir / "backup" / "jobs.txt").read_text().splitlines()
    return [dict(f.split("=", 1) for f in line.split(" ") if "=" in f) for line in lines]


def loss_steps(result: dict) -> list[int]:
    return sorted({h["step"] for h in result["log_history"] if "loss" in h})


def test_sweep_runs_each_job_in_its_own_run_dir(slurm, tmp_path):
    sweep = run_sweep(tmp_path, *TINY, "seed=0,1,2", env=slurm)
    assert sweep.returncode == 0, sweep
    rel = sweep.dir.relative_to(tmp_path).as_posix()
    assert re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", rel), rel  # conf/train.yaml's hydra.sweep
    assert [p.name for p in sweep.jobs()] == ["0", "1", "2"]
    array_ids = set()
    for num, run_dir in enumerate(sweep.jobs()):
        backup = run_dir / "backup"
        assert f"seed: {num}\n" in (backup / "config.yaml").read_text()
        assert f"- seed={num}" in (backup / "overrides.yaml").read_text()
        command = (backup / "command.txt").read_text()
        assert "sweep: python " in command and "seed=0,1,2" in command, command
        assert command.splitlines()[1].startswith("job:   python train.py ")
        assert command.splitlines()[1].endswith(f" recipe=single algo=sft debug=smoke hardware=slurm_cpu seed={num}")
        assert (backup / "pip_freeze.txt").stat().st_size > 0 and (backup / "git.txt").exists()
        [start] = jobs_txt(run_dir)
        assert start["executor"] == "slurm" and start["restart"] == "0" and start["tasks"] == "1"
        array_id, _, index = start["job"].partition("_")
        assert index == str(num)  # one Slurm array for the sweep, task <num> ran job <num>
        array_ids.add(array_id)
        assert Path(start["log"]).is_file() and start["log"].startswith(str(sweep.dir / ".submitit"))
        train = sweep.result(num, "01_sft.json")
        assert train["global_step"] == STEPS and loss_steps(train) == list(range(1, STEPS + 1))
        summary = sweep.result(num, "summary.json")
        assert [row["stage"] for row in summary["rows"]] == ["01_sft"]
        assert 0.0 <= summary["rows"][0]["greedy_acc"] <= 1.0
        assert list((run_dir / "tensorboard" / "01_sft").glob("events.out.tfevents.*"))
        assert (run_dir / "ckpt" / "01_sft" / "final" / "model.safetensors").is_file()
        assert "[02_evaluate] start" in (run_dir / "output.log").read_text()
        assert sacct_states(slurm, start["job"]) == ["COMPLETED"]
    assert len(array_ids) == 1
    rows = sweep_table(sweep.dir)  # the launcher's table: every job ok, with its Slurm state and metric
    assert [(r["job"], r["overrides"], r["slurm state"], r["result"]) for r in rows] == [
        (str(n), f"seed={n}", "COMPLETED", "ok") for n in range(3)
    ]
    for n, row in enumerate(rows):
        assert float(row["greedy_acc"]) == pytest.approx(sweep.result(n, "summary.json")["rows"][-1]["greedy_acc"])


def test_failed_and_killed_jobs_leave_the_others_results(slurm, tmp_path):
    # Job 1's batch size is invalid (fails in the job's validation, before any provenance); job 2 is killed
    # from outside (scancel) as soon as it runs, which ends it without a result. Job 0 must be untouched.
    def cancel_job_2(proc):
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i %Z"], env=slurm, capture_output=True, text=True)
            running = [line.split()[0] for line in out.stdout.splitlines() if line.endswith(str(tmp_path))]
            if any(job.endswith("_2") for job in running):
                subprocess.run(["scancel", next(j for j in running if j.endswith("_2"))], env=slurm, check=True)
                return
            time.sleep(0.5)
        raise AssertionError("job 2 never ran")

    sweep = run_sweep(tmp_path, *TINY, "algo.args.per_device_train_batch_size=16,0,15", env=slurm, wait=cancel_job_2)
    assert sweep.returncode == 1, sweep  # once every job has ended: the failed ones listed, one line each
    listing = sweep.stderr[sweep.stderr.index("error: 2 of 3 jobs of the sweep failed:") :].splitlines()
    assert re.match(
        r"  #1 job \d+_1 .*_size=0: error: algo.args.per_device_train_batch_size=0: must be >= 1", listing[1]
    )
    assert re.match(r"  #2 job \d+_2 .*_size=15: job \d+_2 ended without a result \(state CANCELLED", listing[2])
    rerun_hint = sweep.stderr.strip().splitlines()[-1]  # the sweep dir as the command wrote it (relative here)
    assert rerun_hint.startswith("rerun the failed and unfinished jobs: python ")
    assert rerun_hint.endswith(f" hydra.sweep.dir={sweep.dir.relative_to(tmp_path)}"), rerun_hint
    rows = sweep_table(sweep.dir)
    assert [r["slurm state"] for r in rows] == ["COMPLETED", "COMPLETED", "CANCELLED"]  # Slurm's view of each
    assert rows[0]["result"] == "ok" and rows[1]["result"].startswith(
        "FAILED: error: algo.args.per_device_train_batch_size=0: must be"
    )
    assert rows[2]["result"].startswith(f"FAILED: job {rows[2]['slurm job']} ended without a result")

    assert sweep.result(0, "01_sft.json")["global_step"] == STEPS
    assert sweep.result(0, "summary.json")["rows"][0]["stage"] == "01_sft"
    failed = sweep.job(1)
    assert rundir.failure(failed) == "error: algo.args.per_device_train_batch_size=0: must be >= 1"
    assert "error: algo.args.per_device_train_batch_size=0" in (failed / "output.log").read_text()
    assert not (failed / "backup" / "config.yaml").exists()  # bad input: never looks like a (resumable) run
    assert not (sweep.job(2) / "result" / "01_sft.json").exists()
    assert rundir.status(sweep.job(2)) == "incomplete"  # killed from outside: no FAILED, resumable

    # Rerun into its sweep dir: jobs 1 (failed) and 2 (killed) run again, each in its own run dir; job 0 is done
    # and not submitted. Job 1 fails again (its batch size is still 0), so the rerun exits 1 too.
    done_before = (sweep.job(0) / "backup" / "jobs.txt").read_text()
    rerun = run_sweep(tmp_path, *TINY, "algo.args.per_device_train_batch_size=16,0,15", f"hydra.sweep.dir={sweep.dir}",
                      env=slurm)  # fmt: skip
    assert rerun.returncode == 1 and rerun.dir == sweep.dir, rerun
    assert "1 job(s) done before, not run again (#0); running #1 #2" in rerun.stdout, rerun
    assert "error: 1 of 3 jobs of the sweep failed:" in rerun.stderr
    assert (sweep.job(0) / "backup" / "jobs.txt").read_text() == done_before  # job 0 did not run
    assert len(jobs_txt(sweep.job(1))) == 2  # started once per run of the sweep
    assert sweep.result(2, "01_sft.json")["global_step"] == STEPS and rundir.status(sweep.job(2)) == "ok"
    # job 1 failed before it started
    assert list(sweep.job(1).glob("backup/rerun-*/FAILED")) and rundir.status(sweep.job(1)) == "failed"
    rows = sweep_table(sweep.dir)
    assert [(r["job"], r["slurm state"], r["result"].split(":")[0]) for r in rows] == [
        ("0", "COMPLETED", "ok (done before)"),
        ("1", "COMPLETED", "FAILED"),
        ("2", "COMPLETED", "ok"),
    ]
    assert rows[0]["slurm job"] == jobs_txt(sweep.job(0))[-1]["job"]  # its own, from the first run
    assert (
        rows[1]["slurm job"].split("_")[0] == rows[2]["slurm job"].split("_")[0] != rows[0]["slurm job"].split("_")[0]
    )
    assert float(rows[2]["greedy_acc"]) == pytest.approx(sweep.result(2, "summary.json")["rows"][-1]["greedy_acc"])


def logged_step(run_dir: Path) -> int:
    """The newest training step a running job has logged: output.log's `[01_sft] step N/M` metric lines
    where the stage logs them there, else the count of the trainer's `{'loss': ...}` console lines in its
    submitit log (logging_steps=1: one per step; the file is appended to across requeues)."""
    log = run_dir / "output.log"
    steps = [int(m) for m in re.findall(r"\] step (\d+)/", log.read_text())] if log.is_file() else []
    if steps:
        return max(steps)
    if not (run_dir / "backup" / "jobs.txt").is_file():
        return 0
    out = Path(jobs_txt(run_dir)[0]["log"])
    return out.read_text().count("{'loss'") if out.is_file() else 0


def wait_for(what: str, check, proc, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert proc.poll() is None, f"the sweep ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)
    return found


def event_steps(folder: Path) -> list[list[int]]:
    """train/loss steps in each TensorBoard event file (one file per run of the job), read raw: a step
    logged twice would show twice (EventAccumulator would hide it)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    runs = []
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        steps = [e.step for e in EventFileLoader(str(path)).Load() for v in e.summary.value if v.tag == "train/loss"]
        runs.append(steps)
    return runs


# Enough steps (~4 a second) that each run is still training when the test signals it; few, for a quick test.
REQUEUE_STEPS = 40


def test_signalled_job_checkpoints_at_the_next_step_and_resumes(slurm, tmp_path):
    # No periodic checkpoint (save_steps > steps): every checkpoint comes from a signal. Once the job has
    # logged step 3, it gets USR2 as from Slurm's time-limit warning (`scancel --signal=USR2`; submitit asked
    # for it with --signal=USR2@<signal_delay_s>); once the requeued run has logged 3 more steps, `scontrol
    # requeue` preempts it (SIGTERM, then SIGKILL after KillWait=5 s). Each time the trainer must save at the
    # end of the step in flight and the job come back into the same run dir, resuming there.
    seen = {}

    def preempt_twice(proc):
        run_dir = wait_for("run dir", lambda: next(tmp_path.glob("multirun/*/*/0/backup/jobs.txt"), None), proc)
        run_dir = run_dir.parents[1]
        seen["usr2"] = wait_for("step 3", lambda: (s := logged_step(run_dir)) >= 3 and s, proc)
        job = jobs_txt(run_dir)[0]["job"]
        subprocess.run(["scancel", "--signal=USR2", job], env=slurm, check=True)
        wait_for("the requeued run", lambda: len(jobs_txt(run_dir)) == 2, proc)
        first = int(re.search(r"step=(\d+)", (run_dir / "backup" / "preemptions.txt").read_text())[1])
        seen["term"] = wait_for("3 more steps", lambda: (s := logged_step(run_dir)) >= first + 3 and s, proc)
        subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)

    sweep = run_sweep(
        tmp_path, *TINY, "seed=0", f"algo.args.max_steps={REQUEUE_STEPS}", "algo.args.save_steps=1000", "eval.k=0",
        env=slurm, wait=preempt_twice, timeout=300,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep
    assert [p.name for p in sweep.jobs()] == ["0"]  # every run of the job used the same run dir
    run_dir = sweep.job(0)
    starts = jobs_txt(run_dir)
    assert [s["restart"] for s in starts] == ["0", "1", "2"] and len({s["job"] for s in starts}) == 1
    assert sacct_states(slurm, starts[0]["job"]) == ["REQUEUED", "REQUEUED", "COMPLETED"]
    script = next((sweep.dir / ".submitit").rglob("*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR2@300\n" in script and "#SBATCH --requeue\n" in script  # the launcher's asks

    usr2, term = (run_dir / "backup" / "preemptions.txt").read_text().splitlines()
    k1 = int(re.search(r" step=(\d+) action=requeue why=checkpoint-\1_saved$", usr2)[1])
    k2 = int(re.search(r" step=(\d+) action=exit why=checkpoint-\1_saved$", term)[1])
    assert "signal=SIGUSR2" in usr2 and "signal=SIGTERM" in term
    # nothing the log showed before the signal is lost: the checkpoint is the step in flight (or the one logged)
    assert seen["usr2"] <= k1 < seen["term"] <= k2 < REQUEUE_STEPS, (seen, k1, k2)

    train = sweep.result(0, "01_sft.json")
    assert train["global_step"] == REQUEUE_STEPS
    assert Path(train["resumed_from"]) == run_dir / "ckpt" / "01_sft" / f"checkpoint-{k2}"
    assert loss_steps(train) == list(range(1, REQUEUE_STEPS + 1))
    # TensorBoard: each run logged exactly up to its checkpoint, the next one from the step after it, so no
    # step is recomputed or logged twice
    runs = event_steps(run_dir / "tensorboard" / "01_sft")
    assert runs == [list(range(1, k1 + 1)), list(range(k1 + 1, k2 + 1)), list(range(k2 + 1, REQUEUE_STEPS + 1))]
    log = (run_dir / "output.log").read_text()
    assert log.count("resuming from") == 2 and set(re.findall(r"run dir: (\S+)", log)) == {str(run_dir)}
    assert (run_dir / "result" / "summary.json").exists()


def test_two_node_job_trains_over_gloo_and_both_ranks_resume_after_a_signal(slurm, tmp_path):
    # Partition `multi` is two slurmd on this host (slurm/local_cluster.sh; Debian's Slurm has multiple-slurmd
    # support): one task on each of 2 nodes gets SLURM_JOB_NODELIST=<node>,<node>-2 and SLURM_NODEID 0 / 1,
    # which reinforce_cot.cluster turns into one gloo rendezvous at the first node. Signalled (USR2 reaches
    # both tasks) after step 3, both ranks save at the same step, rank 0 requeues, and the job resumes on 2
    # nodes to its planned step.
    steps = 40  # enough that the job is still training when the test signals it

    def preempt(proc):
        run_dir = wait_for("run dir", lambda: next(tmp_path.glob("multirun/*/*/0/backup/jobs.txt"), None), proc)
        run_dir = run_dir.parents[1]
        wait_for("step 3", lambda: logged_step(run_dir) >= 3, proc)
        subprocess.run(["scancel", "--signal=USR2", jobs_txt(run_dir)[0]["job"]], env=slurm, check=True)

    two_nodes = ("hydra.launcher.partition=multi", "hydra.launcher.nodes=2", "hardware.num_processes=2")
    sweep = run_sweep(
        tmp_path, *TINY, "seed=0", *two_nodes, f"algo.args.max_steps={steps}", "algo.args.save_steps=1000",
        "eval.k=0", env=slurm, wait=preempt, timeout=300,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep
    run_dir = sweep.job(0)
    starts = jobs_txt(run_dir)  # rank 0 alone records each start
    node = starts[0]["nodes"].split(",")[0]
    assert [(s["restart"], s["tasks"], s["nodes"]) for s in starts] == [
        ("0", "2", f"{node},{node}-2"),
        ("1", "2", f"{node},{node}-2"),
    ]
    [line] = (run_dir / "backup" / "preemptions.txt").read_text().splitlines()
    k = int(re.search(r" step=(\d+) action=requeue why=checkpoint-\1_saved$", line)[1])

    train = sweep.result(0, "01_sft.json")
    assert train["global_step"] == steps and Path(train["resumed_from"]).name == f"checkpoint-{k}"
    assert loss_steps(train) == list(range(1, steps + 1))
    # Each step consumed a batch on each of 2 processes: twice the epochs one process would log.
    assert train["log_history"][-1]["epoch"] == pytest.approx(steps * BATCH * 2 / ROWS)
    assert train["ranks"] == [0, 1] and train["distributed_type"] == "MULTI_CPU"  # gloo DDP across the 2 nodes
    assert event_steps(run_dir / "tensorboard" / "01_sft") == [list(range(1, k + 1)), list(range(k + 1, steps + 1))]

    folder = Path(starts[0]["log"]).parent
    rank0 = (folder / f"{starts[0]['job']}_0_log.out").read_text()
    rank1 = (folder / f"{starts[0]['job']}_1_log.out").read_text()  # both runs of the job append to it
    master = re.findall(rf"rank 0 of 2 on \('{node}', '{node}-2'\) \(master ({node}:\d+)\)", rank0)
    assert len(master) == 2, rank0  # the first node is the master, in each run
    assert rank1.count(f"rank 1 of 2 on ('{node}', '{node}-2') (master {master[0]})") == 2  # one rendezvous
    assert "SIGUSR2: saving a checkpoint at the end of the current step" in rank1  # rank 1 got it and agreed
    assert "[02_evaluate] start: evaluate (on rank 0)" in rank1  # rank 0 runs it; rank 1 only generates a share
    log = (run_dir / "output.log").read_text()
    assert "rank 0 of 2" in log and "rank 1" not in log and log.count("run dir:") == 2
    assert sweep.result(0, "summary.json")["rows"][0]["stage"] == "01_sft"


BAD = {
    "cpus": (
        ["hydra.launcher.cpus_per_task=3"],
        "error: hydra.launcher.cpus_per_task=3 x tasks_per_node=1 = 3 CPUs per node, but nodes of partition debug "
        "have at most 2",
    ),
    "memory": (
        ["hydra.launcher.mem_gb=4096"],
        "error: hydra.launcher.mem_gb=4096: nodes of partition debug have at most",
    ),
    "partition": (
        ["+cluster.partition=gpu"],
        "error: hydra.launcher.partition=gpu: no such partition on this cluster (sinfo lists ['debug', 'multi'])",
    ),
    "gpus": (["hardware=slurm_1node_8gpu"], "error: hydra.launcher.gpus_per_node=8: partition debug has no GPUs"),
    "time": (
        ["hydra.launcher.timeout_min=120"],
        "error: hydra.launcher.timeout_min=120: partition debug allows at most 60 min",
    ),
    "tasks": (
        ["hydra.launcher.tasks_per_node=2"],
        "error: hydra.launcher.nodes=1 x tasks_per_node=2 = 2 tasks, but hardware.num_processes=1",
    ),
    # sinfo cannot tell which features nodes have: sbatch refuses, and its reason is what the user sees
    "constraint": (
        ["+cluster.constraint=h100"],
        "error: hydra/launcher=slurm: sbatch refused the sweep: Batch job submission failed: "
        "Invalid feature specification",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_impossible_request_fails_before_any_job_runs(slurm, tmp_path, case):
    overrides, message = BAD[case]
    sweep = run_sweep(tmp_path, *TINY, "seed=0,1", *overrides, env=slurm, timeout=120)
    assert sweep.returncode == 2, sweep
    last = sweep.stderr.strip().splitlines()[-1]
    assert last.startswith(message), sweep  # one line that names the key, last on stderr
    queued = subprocess.run(["squeue", "-h", "-o", "%Z"], env=slurm, capture_output=True, text=True).stdout
    assert str(tmp_path) not in queued
    assert not [p for p in sweep.dir.glob(".submitit/*") if p.is_dir()], "a job was submitted"
    assert not list(sweep.dir.glob("[0-9]*"))  # no run dir either
