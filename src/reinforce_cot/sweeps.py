"""A sweep's jobs: rerunning the failed and unfinished ones into their sweep dir, and the end-of-sweep table.

    python train.py -m seed=0,1,2 algo=grpo,gspo hydra/launcher=slurm          # multirun/<date>/<time>/
    python train.py -m seed=0,1,2 algo=grpo,gspo hydra/launcher=slurm hydra.sweep.dir=multirun/<date>/<time>

Running the same sweep again into its sweep dir (`hydra.sweep.dir=`, which the failed sweep prints as
its rerun command) runs only the jobs whose run dir has not finished (reinforce_cot.rundir.status): failed
ones (result/FAILED), ones killed or cut short (a stage without its result/<stage>.json), ones that never
started. Each goes into its own run dir again, `<sweep dir>/<job num>`, where it resumes from its last
checkpoint (or starts afresh when it failed before it started: the old result/FAILED moves to
backup/rerun-<time>/). Jobs already done are not submitted. The rerun is refused before anything is
submitted when a job's run dir was made by different overrides (another sweep's dir) or its Slurm job is
still queued or running.

Every launcher (sequential, local, slurm) ends with `finish`: one table row per job of the sweep, done
earlier or now (job, the overrides that vary between jobs, Slurm job id and its sacct state, result,
the last evaluated stage's greedy accuracy), logged and written to <sweep dir>/sweep.md; when any job
failed, one stderr line per failed job (the contract in reinforce_cot.rundir), the rerun command, exit 1.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from reinforce_cot import rundir
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)
NOT_FINAL = ("RUNNING", "COMPLETING", "PENDING", "REQUEUED", "RESIZING", "SUSPENDED")  # sacct states


@dataclass
class Job:
    num: int
    overrides: list[str]
    run_dir: Path | None = None  # known before the job runs only when its sweep dir already has job dirs
    ret: JobReturn | None = None  # None: finished in an earlier run of the sweep, not run again
    slurm_job: str | None = None  # <array>_<index> when it ran on Slurm

    @property
    def label(self) -> str:
        return f"#{self.num}" + (f" job {self.slurm_job}" if self.slurm_job else "")


def plan(config, hydra_context, job_overrides: Sequence[Sequence[str]], first: int) -> tuple[list[Job], list[Job]]:
    """Every job of this launch, and those to run: all of them in a new sweep dir; in one that already holds
    job dirs, the ones not done (see the module docstring). Raises ConfigError when a rerun is unsafe."""
    jobs = [Job(first + i, list(o)) for i, o in enumerate(job_overrides)]
    sweep_dir = Path(str(config.hydra.sweep.dir))
    if not sweep_dir.is_dir() or not any(p.is_dir() and not p.name.startswith(".") for p in sweep_dir.iterdir()):
        return jobs, jobs
    for job in jobs:
        job.run_dir = _job_dir(config, hydra_context, job)
    _check_rerun(jobs, sweep_dir)
    todo = [j for j in jobs if rundir.status(j.run_dir) != "ok"]
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for job in todo:
        if rundir.failure(job.run_dir) is not None and not rundir.is_run_dir(job.run_dir):
            # failed before it started (not resumable): the job starts afresh; keep why the last try failed
            rundir.keep_failure(job.run_dir, f"rerun-{stamp}")
    done = [j for j in jobs if j not in todo]
    for job in done:
        job.slurm_job = _last_slurm_job(job.run_dir)
    log.info("rerun into %s: %d job(s) done before, not run again (%s); running %s", sweep_dir, len(done),
             " ".join(f"#{j.num}" for j in done) or "-", " ".join(f"#{j.num}" for j in todo) or "nothing")  # fmt: skip
    return jobs, todo


def _job_dir(config, hydra_context, job: Job) -> Path:
    """Where Hydra puts this job: hydra.sweep.dir / hydra.sweep.subdir, composed as the job itself will be."""
    cfg = hydra_context.config_loader.load_sweep_config(config, job.overrides)
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = job.num
    return Path(str(cfg.hydra.sweep.dir)) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))


def _check_rerun(jobs: list[Job], sweep_dir: Path) -> None:
    for job in jobs:
        recorded = rundir.overrides(job.run_dir)
        if recorded and sorted(recorded) != sorted(job.overrides):
            raise ConfigError(
                f"hydra.sweep.dir={sweep_dir}: job {job.num} there ran with {' '.join(recorded)}, but this sweep's "
                f"job {job.num} is {' '.join(job.overrides)}; rerun with the sweep's own overrides, or pick a new "
                "sweep dir"
            )
    busy = {j.num: s for j in jobs if (s := _queued(_last_slurm_job(j.run_dir)))}
    if busy:
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir}: "
            + ", ".join(f"job {n} is still {state} as Slurm job {job}" for n, (job, state) in busy.items())
            + "; wait for it (or scancel it), then rerun"
        )


def _last_slurm_job(run_dir: Path | None) -> str | None:
    """The Slurm job id of the newest start of a job (backup/jobs.txt, reinforce_cot.cluster), if on Slurm."""
    path = rundir.jobs_log(run_dir) if run_dir else None
    if path is None or not path.is_file() or not path.read_text().strip():
        return None
    fields = dict(f.split("=", 1) for f in path.read_text().splitlines()[-1].split(" ") if "=" in f)
    return fields.get("job") if fields.get("executor") == "slurm" else None


def _queued(slurm_job: str | None) -> tuple[str, str] | None:
    if not slurm_job or shutil.which("squeue") is None:
        return None
    out = subprocess.run(["squeue", "-h", "-j", slurm_job, "-o", "%T"], capture_output=True, text=True, timeout=60)
    state = out.stdout.strip().splitlines()
    return (slurm_job, state[0]) if out.returncode == 0 and state else None


def returns(jobs: list[Job]) -> list[JobReturn]:
    """One JobReturn per job for Hydra's sweeper; a job done in an earlier run of the sweep counts as done."""
    out = []
    for job in jobs:
        if job.ret is None:
            job.ret = JobReturn(overrides=job.overrides, status=JobStatus.COMPLETED)
            job.ret.return_value = {"status": "ok", "done_before": str(job.run_dir)}
        out.append(job.ret)
    return out


# ----------------------------------------------------------------------------- the end of a sweep
def finish(jobs: list[Job], sweep_dir: Path) -> None:
    """Log the table (and write <sweep dir>/sweep.md); when any job failed, list those on stderr with the
    rerun command and exit 1 (the contract: reinforce_cot.rundir). A job failed when Hydra says so: main
    raised (JobFailed: bad input, an exception, a torchrun child), or it ended without a result."""
    from reinforce_cot.report import format_table

    for job in jobs:
        if job.run_dir is None and job.ret is not None and job.ret.hydra_cfg is not None:
            job.run_dir = Path(job.ret.hydra_cfg.hydra.runtime.output_dir)
    states = _sacct([j.slurm_job for j in jobs if j.slurm_job])
    varying = _varying([j.overrides for j in jobs])
    rows, failed = [], []
    for job in jobs:
        where = str(job.run_dir) if job.run_dir else "no run dir"
        if job.ret is None:
            result = "ok (done before)"
        elif job.ret.status == JobStatus.COMPLETED:
            result = "ok"
        else:
            why = " ".join(str(job.ret._return_value).split())
            result = "FAILED: " + (why if len(why) <= 60 else why[:57] + "...")
            failed.append(f"  {job.label} {' '.join(filter_overrides(job.overrides))}: {why}  ({where})")
        rows.append({
            "job": str(job.num),
            "overrides": " ".join(o for o in filter_overrides(job.overrides) if o.split("=", 1)[0] in varying) or "-",
            "slurm job": job.slurm_job or "-",
            "slurm state": states.get(job.slurm_job, "-"),
            "result": result,
            **_final_metric(job.run_dir),
        })  # fmt: skip
    table = format_table(_same_columns(rows))
    log.info("sweep %s: %d job(s), %d failed\n%s", sweep_dir, len(jobs), len(failed), table)
    if sweep_dir.is_dir():
        (sweep_dir / "sweep.md").write_text(table + "\n")
    if failed:
        rerun = shlex.join(["python", *[a for a in sys.argv if not a.startswith("hydra.sweep.dir=")]])
        print(f"error: {len(failed)} of {len(jobs)} jobs of the sweep failed:", *failed, sep="\n", file=sys.stderr)
        print(f"rerun the failed and unfinished jobs: {rerun} hydra.sweep.dir={sweep_dir}", file=sys.stderr)
        raise SystemExit(1)


def _varying(overrides: list[list[str]]) -> set[str]:
    """Keys whose value is not the same in every job (all keys when there is one job)."""
    parsed = [dict(o.split("=", 1) for o in filter_overrides(ov) if "=" in o) for ov in overrides]
    keys = {k for kv in parsed for k in kv}
    return keys if len(parsed) < 2 else {k for k in keys if len({kv.get(k) for kv in parsed}) > 1}


def _final_metric(run_dir: Path | None) -> dict:
    """The last evaluated stage's greedy accuracy (result/summary.json), '-' without one."""
    summary = rundir.summary(run_dir) if run_dir else None
    if summary is None or not summary.is_file():
        return {"final stage": "-", "greedy_acc": "-"}
    import json

    rows = json.loads(summary.read_text()).get("rows") or [{}]
    return {"final stage": rows[-1].get("stage", "-"), "greedy_acc": rows[-1].get("greedy_acc", "-")}


def _same_columns(rows: list[dict]) -> list[dict]:
    if rows and all(r["slurm job"] == "-" for r in rows):  # not on Slurm: no Slurm columns
        rows = [{k: v for k, v in r.items() if not k.startswith("slurm")} for r in rows]
    return rows


def _sacct(ids: list[str], wait_s: float = 10) -> dict[str, str]:
    """Each Slurm job's state in sacct (its newest run), waiting a little for states to become final: the
    result file reaches the driver a moment before Slurm records the job's end."""
    if not ids or shutil.which("sacct") is None:
        return {}
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(
            ["sacct", "-j", ",".join(ids), "-X", "-n", "-P", "-o", "JobID,State"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        states = {jid: state.split()[0] for jid, _, state in (line.partition("|") for line in out.splitlines())}
        if not any(states.get(i) in NOT_FINAL for i in ids) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)
