"""Sweep plumbing that needs no cluster: the launcher presets compose, the torch.distributed variables a
Slurm task exports (GPU layouts this CPU machine cannot run), and the preflight against a GPU cluster's
sinfo. The real thing runs in tests/test_sweeps.py (Slurm) and tests/test_sweeps_local.py."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from reinforce_cot.cluster import Tasks, torch_distributed_env
from reinforce_cot.errors import ConfigError
from reinforce_cot.launcher import Node, check_request
from tests.helpers import compose_cfg


def launcher(*overrides: str) -> dict:
    cfg = compose_cfg(*overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    return {**launcher, "num_processes": cfg.hardware.num_processes}


def test_slurm_launcher_preset():
    got = launcher("hydra/launcher=slurm", "+cluster.partition=gpu", "+cluster.account=lab", "+cluster.qos=high")
    assert got["_target_"] == "hydra_plugins.reinforce_cot_launcher.launcher.SlurmLauncher"
    assert (got["partition"], got["account"], got["qos"], got["constraint"]) == ("gpu", "lab", "high", None)
    assert got["max_num_timeout"] > 0 and got["signal_delay_s"] == 300  # tests/test_sweeps.py: requeue tests
    assert got["submitit_folder"].endswith("/.submitit/%j") and got["name"] == "train"
    assert got["additional_parameters"] == {}


@pytest.mark.parametrize(
    ("hardware", "nodes", "tasks", "gpus", "processes"),
    [("slurm_cpu", 1, 1, None, 1), ("slurm_1node_8gpu", 1, 8, 8, 8), ("slurm_2node_8gpu", 2, 8, 8, 16)],
)
def test_slurm_hardware_presets_size_the_launcher(hardware, nodes, tasks, gpus, processes):
    got = launcher(f"hardware={hardware}")  # selects hydra/launcher=slurm itself
    assert got["_target_"].endswith(".SlurmLauncher")
    assert (got["nodes"], got["tasks_per_node"], got["gpus_per_node"]) == (nodes, tasks, gpus)
    assert got["num_processes"] == processes == nodes * tasks  # one task per GPU
    assert got["cpus_per_task"] >= 1 and got["mem_gb"] and got["timeout_min"]


def test_local_launcher_keeps_the_hardware_sizes():
    got = launcher("hardware=slurm_cpu", "hydra/launcher=local")  # the command line wins over the preset
    assert got["_target_"] == "hydra_plugins.reinforce_cot_launcher.launcher.LocalLauncher"
    assert (got["tasks_per_node"], got["cpus_per_task"], got["mem_gb"]) == (1, 1, 4)


TASK = dict(job="70_3", job_id="77", hostnames=("gpu-a", "gpu-b"), num_tasks=16, num_nodes=2)


def test_distributed_env_for_a_task_on_the_second_node():
    env = torch_distributed_env(Tasks(**TASK, global_rank=13, local_rank=5), "0,1,2,3,4,5,6,7")
    assert env["MASTER_ADDR"] == "gpu-a"  # the job's first node hosts rank 0
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("13", "16", "5", "8")
    other = torch_distributed_env(Tasks(**TASK, global_rank=0, local_rank=0), "0,1,2,3,4,5,6,7")
    assert other["MASTER_PORT"] == env["MASTER_PORT"]  # every task derives the same port
    next_job = torch_distributed_env(Tasks(**{**TASK, "job_id": "78"}, global_rank=0, local_rank=0), None)
    assert next_job["MASTER_PORT"] != env["MASTER_PORT"]  # jobs sharing a node do not collide


def test_distributed_env_with_one_gpu_bound_per_task():
    # gpus_per_task=1 / --gpu-bind: the task's only device is cuda:0 whatever its local rank
    env = torch_distributed_env(Tasks(**TASK, global_rank=13, local_rank=5), "5")
    assert env["LOCAL_RANK"] == "0" and env["RANK"] == "13"


def test_distributed_env_refuses_an_ambiguous_gpu_split():
    with pytest.raises(ConfigError, match=r"tasks_per_node=8: each task sees 2 GPUs .*gpus_per_task=1"):
        torch_distributed_env(Tasks(**TASK, global_rank=1, local_rank=1), "2,3")


def test_distributed_env_on_cpu_keeps_the_local_rank():
    env = torch_distributed_env(Tasks("5", "5", ("vm",), num_tasks=2, num_nodes=1, global_rank=1, local_rank=1), None)
    assert (env["MASTER_ADDR"], env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("vm", "1", "1", "2")


GPU_CLUSTER = [Node(f"h{i}", 96, 1_000_000, 8, 2880, "gpu") for i in range(2)] + [Node("c0", 64, 256_000, 0, 60, "cpu")]
BASE = dict(nodes=1, tasks_per_node=8, gpus_per_node=8, cpus_per_task=8, mem_gb=480, timeout_min=1440)


def test_preflight_accepts_what_a_gpu_cluster_holds():
    check_request({**BASE, "partition": "gpu"}, GPU_CLUSTER, "cpu", 8)
    check_request({**BASE, "partition": "gpu", "nodes": 2}, GPU_CLUSTER, "cpu", 16)


@pytest.mark.parametrize(
    ("change", "processes", "message"),
    [
        ({"nodes": 3}, 24, "hydra.launcher.nodes=3: partition gpu has 2 node(s)"),
        ({"gpus_per_node": 16}, 8, "gpus_per_node=16: nodes of partition gpu have at most 8 GPUs"),
        (
            {"cpus_per_task": 16},
            8,
            "cpus_per_task=16 x tasks_per_node=8 = 128 CPUs per node, but nodes of partition gpu have at most 96",
        ),
        ({"mem_gb": 2000}, 8, "mem_gb=2000: nodes of partition gpu have at most 976 GB"),
        ({"timeout_min": 5000}, 8, "timeout_min=5000: partition gpu allows at most 2880 min"),
        ({"partition": "a100"}, 8, "partition=a100: no such partition on this cluster (sinfo lists ['cpu', 'gpu'])"),
        ({"partition": None}, 8, "gpus_per_node=8: partition cpu has no GPUs"),  # the default partition
        ({}, 16, "nodes=1 x tasks_per_node=8 = 8 tasks, but hardware.num_processes=16"),
    ],
)
def test_preflight_refuses_what_no_node_holds(change, processes, message):
    with pytest.raises(ConfigError) as info:
        check_request({**BASE, "partition": "gpu", **change}, GPU_CLUSTER, "cpu", processes)
    assert message in str(info.value)
