"""Inside a submitit job (Slurm or local): torch.distributed from the job's tasks, and rank-0-only run dirs.

    python train.py -m seed=0,1 hardware=slurm_2node_8gpu        # 2 nodes x 8 tasks, one task per GPU

A Slurm job of N tasks (`hydra.launcher.nodes` x `tasks_per_node`) starts N copies of the same Hydra job,
one per task (srun). Each copy calls `quiet_other_ranks` and `setup_job` first thing in main: with more than one task it exports
the env:// variables torch.distributed reads (MASTER_ADDR = the job's first node, MASTER_PORT derived
from the Slurm job id, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) before accelerate/TRL start, so
TRL's trainers run distributed exactly as under `torchrun`. Only rank 0 writes run-dir files; the other
ranks log to their own submitit log files (<sweep dir>/.submitit/<job>/<job>_<task>_log.{out,err}).

CUDA_VISIBLE_DEVICES is left as Slurm set it. accelerate puts rank r on device cuda:LOCAL_RANK, indexed
within the GPUs the task can see, so:
- each task sees all of the node's GPUs (`gpus_per_node: 8`, the presets' choice): LOCAL_RANK = the task's
  index on the node (0-7), and task r uses the r-th visible GPU;
- each task sees exactly one GPU (`gpus_per_task: 1`, `--gpu-bind=single:1` or cgroup device binding):
  LOCAL_RANK = 0 in every task, since cuda:0 is the only device it has; accelerate's "local main process"
  is then true on every task (harmless here: datasets are built in memory, no shared cache files);
- any other split (2 visible GPUs for 4 tasks) is ambiguous and refused with a ConfigError.
submitit's own TorchDistributedEnvironment.export() instead rewrites CUDA_VISIBLE_DEVICES to the local
rank, which picks the wrong GPU when Slurm gave the job GPUs 4-7 of a node; it is not used.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from reinforce_cot import hardware, rundir
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tasks:
    """What a job's tasks know about themselves (from submitit.JobEnvironment)."""

    job: str  # submitit's job id: <array job>_<index> for a sweep's jobs
    job_id: str  # SLURM_JOB_ID: unique per array element, kept across requeues
    hostnames: tuple[str, ...]
    num_tasks: int
    num_nodes: int
    global_rank: int
    local_rank: int


def master_port(job_id: str) -> int:
    """A port every task of a job derives alike, different for jobs sharing a node, and below Linux's
    ephemeral range (32768-60999 by default), where any outgoing connection on the node may hold it: a
    rendezvous port taken that way failed with EADDRINUSE.

    >>> master_port("1234") == master_port("1234"), 20000 <= master_port("1234") < 32000
    (True, True)
    """
    return 20000 + zlib.crc32(job_id.encode()) % 12000


def torch_distributed_env(tasks: Tasks, cuda_visible_devices: str | None) -> dict[str, str]:
    """The env:// variables for torch.distributed (see the module docstring for LOCAL_RANK and GPUs).

    >>> t = Tasks("70_7", "77", ("gpu-a", "gpu-b"), num_tasks=16, num_nodes=2, global_rank=9, local_rank=1)
    >>> env = torch_distributed_env(t, "0,1,2,3,4,5,6,7")
    >>> env["MASTER_ADDR"], env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]
    ('gpu-a', '9', '16', '1', '8')
    >>> torch_distributed_env(t, "5")["LOCAL_RANK"]   # one GPU bound to this task: it is cuda:0
    '0'
    """
    per_node = tasks.num_tasks // max(tasks.num_nodes, 1)
    local_rank = tasks.local_rank
    visible = [d for d in (cuda_visible_devices or "").split(",") if d.strip()]
    if visible and len(visible) < per_node:
        if len(visible) != 1:
            raise ConfigError(
                f"hydra.launcher.tasks_per_node={per_node}: each task sees {len(visible)} GPUs "
                f"(CUDA_VISIBLE_DEVICES={cuda_visible_devices}); give each task all of the node's GPUs "
                "(gpus_per_node) or exactly one (gpus_per_task=1)"
            )
        local_rank = 0
    return {
        "MASTER_ADDR": tasks.hostnames[0],
        "MASTER_PORT": str(master_port(tasks.job_id)),
        "RANK": str(tasks.global_rank),
        "WORLD_SIZE": str(tasks.num_tasks),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(per_node),
    }


def current_tasks() -> Tasks | None:
    """The running submitit job's tasks, or None outside submitit."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    env = submitit.JobEnvironment()
    return Tasks(
        job=env.job_id,
        job_id=env.raw_job_id,
        hostnames=tuple(env.hostnames),
        num_tasks=env.num_tasks,
        num_nodes=env.num_nodes,
        global_rank=env.global_rank,
        local_rank=env.local_rank,
    )


def setup_job(cfg, run_dir: Path) -> None:
    """Call first in main. Outside submitit it does nothing."""
    tasks = current_tasks()
    if tasks is None:
        return
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from reinforce_cot import preemption  # imports transformers: only inside submitit jobs

    # USR2 (time-limit warning) and SIGTERM (preemption): checkpoint at the next step, then requeue
    preemption.install(run_dir, OmegaConf.select(HydraConfig.get(), "launcher.signal_delay_s", default=30))
    expected = cfg.hardware.num_processes
    if tasks.num_tasks != expected:
        raise ConfigError(
            f"hardware.num_processes={expected} but this job runs {tasks.num_tasks} tasks "
            f"(hydra.launcher.nodes x tasks_per_node); set hardware.num_processes={tasks.num_tasks} "
            "or use a hardware=slurm_* preset, which sets both"
        )
    if tasks.num_tasks > 1:
        env = torch_distributed_env(tasks, os.environ.get("CUDA_VISIBLE_DEVICES"))
        os.environ.update(env | hardware.device_env(cfg))
        log.info("rank %s of %s on %s (master %s:%s)", env["RANK"], tasks.num_tasks, tasks.hostnames,
                 env["MASTER_ADDR"], env["MASTER_PORT"])  # fmt: skip
    if tasks.global_rank == 0:
        _record_start(run_dir, tasks)


def quiet_other_ranks(run_dir: Path) -> None:
    """In a submitit task other than the first, stop logging into the run dir: the other ranks keep their
    console log (submitit's per-task files) and leave output.log to rank 0. Call before the first log line."""
    tasks = current_tasks()
    if tasks is None or tasks.global_rank == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(run_dir):
            root.removeHandler(handler)
            handler.close()


def _record_start(run_dir: Path, tasks: Tasks) -> None:
    """One line per start of this job in backup/jobs.txt: a requeued job adds a line, with its restart count
    and where its submitit logs are."""
    stdout = ""
    try:
        import submitit

        stdout = str(submitit.JobEnvironment().paths.stdout)
    except (KeyError, RuntimeError):  # SUBMITIT_FOLDER unset (job started by hand)
        pass
    fields = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "executor": os.environ.get("SUBMITIT_EXECUTOR", ""),
        "job": tasks.job,
        "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "tasks": tasks.num_tasks,
        "nodes": ",".join(tasks.hostnames),
        "log": stdout,
    }
    rundir.append_line(rundir.jobs_log(run_dir), " ".join(f"{k}={v}" for k, v in fields.items()))
