"""Hydra's submitit launchers, with a check before submitting and a sweep that survives a killed job.

    python train.py -m seed=0,1,2 algo=grpo,gspo hydra/launcher=slurm           # one Slurm array job
    python train.py -m seed=0,1,2 hardware=slurm_1node_8gpu                      # implies hydra/launcher=slurm
    python train.py -m seed=0,1,2 hydra/launcher=local                           # same jobs, this machine

conf/hydra/launcher/{slurm,local}.yaml extend the plugin's `submitit_slurm`/`submitit_local` configs, so
every key of hydra-submitit-launcher works as documented there (`hydra.launcher.partition=...`,
`timeout_min`, `max_num_timeout`, `additional_parameters`, `setup`...), and select the classes in
hydra_plugins/reinforce_cot_launcher/ (Hydra takes launchers only from the hydra_plugins namespace): the
plugin's launchers with this module's SubmititSweep mixed in. What it adds:

- Before anything is submitted, the request is checked against what `sinfo` says the partition has
  (partition exists; CPUs, memory and GPUs per node; node count; time limit) and against
  `hardware.num_processes`, with a one-line `error: ...` naming the key and the fix (exit code 2).
  What sinfo cannot tell (an unknown account, qos or constraint) is refused by sbatch; its reason is
  printed the same way. Nothing hangs.
- A job that ends without a result (killed by the time limit with no requeue left, out of memory,
  scancel, a lost node) no longer aborts the collection of the others: every job is waited for, a
  table is logged, and a sweep with failed jobs exits 1 listing them (reinforce_cot.sweeps.finish,
  shared with the default launcher, hydra/launcher=sequential).
- Rerun into its sweep dir (`hydra.sweep.dir=<dir>`), a sweep submits only the jobs not done there
  (reinforce_cot.sweeps.plan), each keeping its job number and run dir.
- Each job records the sweep's command line (RCOT_SWEEP_COMMAND) in its backup/command.txt.

Requeue: submitit asks Slurm for USR2 `signal_delay_s` before the time limit, and `_executor` adds sbatch
`--requeue`. Inside the job, reinforce_cot.preemption (installed by cluster.setup_job) has the trainer save a
checkpoint at the end of the step in flight before submitit requeues the job with the same arguments (the
plugin's `checkpoint` method); the requeued job lands in the same run dir (Hydra's `${now:}` values travel
resolved inside the pickled launcher), which recipes.run resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from reinforce_cot import cli, sweeps
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)


class JobEndedWithoutResult(RuntimeError):
    """A sweep job that Slurm (or the local executor) ended before it returned: time limit, kill, OOM."""


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    time_limit_min: int | None  # None: no limit
    partition: str


def count_gpus(gres: str) -> int:
    """GPUs in one sinfo %G field.

    >>> count_gpus("gpu:a100:4(S:0-1),gpu:v100:2"), count_gpus("gpu:8"), count_gpus("(null)")
    (6, 8, 0)
    """
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu" and len(parts) > 1 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_minutes(limit: str) -> int | None:
    """A Slurm time limit ([days-]hours:minutes:seconds, minutes:seconds, or infinite) in minutes.

    >>> parse_minutes("1:00:00"), parse_minutes("2-00:30:00"), parse_minutes("30:00"), parse_minutes("infinite")
    (60, 2910, 30, None)
    """
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


def cluster_nodes() -> tuple[list[Node], str | None] | None:
    """Every (node, partition) pair sinfo lists, and the default partition; None where sinfo is missing."""
    if shutil.which("sinfo") is None:
        return None
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%c|%m|%G|%l|%P"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ConfigError(f"hydra/launcher=slurm: sinfo failed ({out.stderr.strip()}); is Slurm reachable from here?")
    nodes, default = [], None
    for line in out.stdout.splitlines():
        name, cpus, mem, gres, limit, part = line.split("|")
        if part.endswith("*"):
            part = default = part[:-1]
        nodes.append(Node(name, int(cpus), int(mem), count_gpus(gres), parse_minutes(limit), part))
    return nodes, default


def check_request(params: dict, nodes: list[Node], default_partition: str | None, num_processes: int | None) -> None:
    """Refuse a launcher request no node of the partition can hold, before anything is submitted."""
    tasks = params.get("tasks_per_node") or 1
    if num_processes is not None and params["nodes"] * tasks != num_processes:
        raise ConfigError(
            f"hydra.launcher.nodes={params['nodes']} x tasks_per_node={tasks} = {params['nodes'] * tasks} tasks, "
            f"but hardware.num_processes={num_processes}; make them match (one task per GPU), "
            "or use a hardware=slurm_* preset, which sets both"
        )
    partition = params.get("partition") or default_partition
    known = sorted({n.partition for n in nodes})
    if partition not in known:
        raise ConfigError(
            f"hydra.launcher.partition={partition}: no such partition on this cluster (sinfo lists {known}); "
            "set cluster.partition in conf/local/default.yaml or pass hydra.launcher.partition=<name>"
        )
    pool = [n for n in nodes if n.partition == partition]
    gpus = params.get("gpus_per_node") or (params.get("gpus_per_task") or 0) * tasks
    cpus = (params.get("cpus_per_gpu") or 0) * gpus or (params.get("cpus_per_task") or 1) * tasks
    mem_mb = (params.get("mem_gb") or 0) * 1024
    where = f"partition {partition}"
    most_gpus = max(n.gpus for n in pool)
    if gpus and not most_gpus:
        raise ConfigError(
            f"hydra.launcher.gpus_per_node={gpus}: {where} has no GPUs; pick a GPU partition "
            "(cluster.partition in conf/local/default.yaml) or a CPU preset (hardware=slurm_cpu)"
        )
    if gpus > most_gpus:
        raise ConfigError(
            f"hydra.launcher.gpus_per_node={gpus}: nodes of {where} have at most {most_gpus} GPUs; "
            "use more nodes with fewer GPUs each (hydra.launcher.nodes) or another partition"
        )
    most_cpus = max(n.cpus for n in pool)
    if cpus > most_cpus:
        raise ConfigError(
            f"hydra.launcher.cpus_per_task={params.get('cpus_per_task') or 1} x tasks_per_node={tasks} = {cpus} "
            f"CPUs per node, but nodes of {where} have at most {most_cpus}; lower cpus_per_task or tasks_per_node"
        )
    most_mem = max(n.mem_mb for n in pool)
    if mem_mb > most_mem:
        raise ConfigError(
            f"hydra.launcher.mem_gb={params['mem_gb']}: nodes of {where} have at most {most_mem // 1024} GB "
            f"({most_mem} MB); lower hydra.launcher.mem_gb"
        )
    fit = [n for n in pool if n.gpus >= gpus and n.cpus >= cpus and n.mem_mb >= mem_mb]
    if params["nodes"] > len(fit):
        raise ConfigError(
            f"hydra.launcher.nodes={params['nodes']}: {where} has {len(fit)} node(s) with {cpus} CPUs, "
            f"{mem_mb // 1024} GB and {gpus} GPUs free to give; lower hydra.launcher.nodes"
        )
    limits = [n.time_limit_min for n in pool if n.time_limit_min is not None]
    if limits and params["timeout_min"] > max(limits):
        raise ConfigError(
            f"hydra.launcher.timeout_min={params['timeout_min']}: {where} allows at most {max(limits)} min; "
            "lower it (requeue with max_num_timeout continues longer runs) or pick another partition"
        )


class SubmititSweep:
    """What both launchers add to the plugin's (mixed in before the plugin's class, in hydra_plugins/)."""

    _EXECUTOR: str

    def _preflight(self) -> None:
        """Checks that need no cluster; the Slurm launcher adds sinfo's."""

    def _executor(self):
        import submitit

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        if "additional_parameters" in params:  # Slurm
            extra = params["additional_parameters"] or {}
            if not {"requeue", "no-requeue", "no_requeue"} & set(extra):
                # submitit's requeue (`scontrol requeue`) and a scheduler's PreemptMode=REQUEUE need a
                # requeueable job: where the cluster sets JobRequeue=0 only sbatch --requeue makes it one
                params["additional_parameters"] = {"requeue": True, **extra}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        # The plugin's generic keys (BaseQueueConf) are submitit's generic names; the rest are executor-specific.
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in generic else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.core.utils import FailedJobError

        with cli.exit_on_user_error():
            self._preflight()
        jobs, todo = plan_or_exit(self, job_overrides, initial_job_idx)
        os.environ["RCOT_SWEEP_COMMAND"] = shlex.join(["python", *sys.argv])  # jobs inherit the environment
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("submitit '%s' sweep of %d job(s) -> %s", self._EXECUTOR, len(todo), sweep_dir)
        calls = []
        for job in todo:  # each keeps its number (its run dir) in a rerun that skips the jobs done before
            log.info("\t#%d : %s", job.num, " ".join(filter_overrides(job.overrides)))
            calls.append((job.overrides, "hydra.sweep.dir", job.num, f"job_id_for_{job.num}", Singleton.get_state()))
        try:
            submitted = executor.map_array(self, *zip(*calls)) if calls else []
        except FailedJobError as e:  # sbatch refused: its own words are the clearest reason
            lines = [line.strip().removeprefix("sbatch: error: ") for line in str(e).splitlines()]
            reason = " ".join(line for line in lines if line)
            with cli.exit_on_user_error():
                raise ConfigError(f"hydra/launcher={self._EXECUTOR}: sbatch refused the sweep: {reason}") from None
        for job, run in zip(todo, submitted):
            job.ret = self._wait(run, job.overrides)
            job.slurm_job = run.job_id if self._EXECUTOR == "slurm" else None
        sweeps.finish(jobs, sweep_dir)
        return sweeps.returns(jobs)

    def _wait(self, job, overrides: list[str]) -> JobReturn:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return job.results()[0]  # one JobReturn per task; rank 0's speaks for the job
        except (UncompletedJobError, FailedJobError):
            ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
            ret.return_value = JobEndedWithoutResult(
                f"job {job.job_id} ended without a result (state {job.state}); its log: {job.paths.stderr}"
            )
            return ret


def plan_or_exit(launcher, job_overrides, initial_job_idx):
    """reinforce_cot.sweeps.plan for a launcher (every job, and those to run); an unsafe rerun exits 2."""
    with cli.exit_on_user_error():
        return sweeps.plan(launcher.config, launcher.hydra_context, job_overrides, initial_job_idx)


def preflight_slurm(params: dict, config) -> None:
    found = cluster_nodes()
    if found is None:
        log.warning("sinfo not found: resources not checked before submitting")
        return
    nodes, default = found
    check_request(params, nodes, default, OmegaConf.select(config, "hardware.num_processes"))


def preflight_local(params: dict, config) -> None:
    # The local executor starts every task on this machine; a mismatch with hardware.num_processes would
    # only surface inside each job.
    tasks = (params.get("tasks_per_node") or 1) * params["nodes"]
    expected = OmegaConf.select(config, "hardware.num_processes")
    if expected is not None and tasks != expected:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node x nodes = {tasks} tasks, but hardware.num_processes={expected}; "
            "make them match"
        )
