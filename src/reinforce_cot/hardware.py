"""Hardware: one command for one or many processes, rank-0-only writes, and checks of GPU-only settings.

    python train.py recipe=single algo=sft reward=none hardware=cpu_ddp2     # 2 processes on the CPU
    python train.py recipe=single algo=sft reward=none hardware=cpu_zero2    # the same under DeepSpeed ZeRO-2
    python train.py algo=gspo hardware=2xa100 model=qwen2_5_vl_3b

How `hardware=cpu_ddp2` becomes two processes: when `hardware.num_processes` > 1 and no torch.distributed
environment is set (`needs_launch`: not already under torchrun, accelerate launch, deepspeed or a Slurm task
per GPU), reinforce_cot.main prepares the recipe (compose, validate, data: bad input fails once, before any
process starts) and `launch` re-executes the command under torchrun into the SAME run dir (passed
explicitly: `${now:}` would differ); the parent only waits and passes on the exit code. torchrun, not
`accelerate launch` (whose `--cpu --num_processes 2` silently runs one process): it ships with torch, gives
gloo on CPU and NCCL on GPUs, picks a free port; DeepSpeed needs no launcher of its own
(`algo.args.deepspeed=<json>` makes transformers build accelerate's DeepSpeed plugin in each process).

Only rank 0 writes to the run dir; evaluate, curate, rejection_sample and merge stages run on rank 0 while
the other ranks generate their share of its prompts (reinforce_cot.sharded) and otherwise wait on a gloo
group with a long timeout, never at an NCCL barrier (whose watchdog fires after 30 min). Each stage runs in
`stage_scope`, so nothing it made outlives it. CPU threads: `default_threads`. DeepSpeed's JIT-compiled ops
are kept in TORCH_EXTENSIONS_DIR (~/.cache/reinforce_cot/torch_extensions): compiled once (1-3 min on a CPU).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import glob
import importlib.util
import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from omegaconf import OmegaConf

from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible to this process, decided without importing torch (importing it
    first would size its thread pool before OMP_NUM_THREADS is set)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def default_threads(num_processes: int = 1, gpu: bool | None = None) -> int:
    """CPU threads per process when the user did not set OMP_NUM_THREADS (reinforce_cot/__init__.py applies it).

    CPU-only: 1. With 2 threads and a busy neighbour a tiny step went from 0.06 s to 5 s on the 2-core
    machines this project is tested on. With a GPU the CPU threads do other work (image preprocessing,
    DeepSpeed's CPU Adam when the optimizer is offloaded, tokenizing): the cores are shared out among
    the processes instead.

    >>> default_threads(8, gpu=False), default_threads(1, gpu=True) >= 1
    (1, True)
    """
    if not (gpu_visible() if gpu is None else gpu):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, num_processes))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process), however long: on the gloo group of
    `wait_group`, not on NCCL, whose watchdog kills a rank that waits 30 min (ddp_timeout)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier(group=wait_group())


WAIT_TIMEOUT = timedelta(days=7)  # rank 0 alone may evaluate with vllm/openai or merge a big model for hours


@functools.cache
def wait_group():
    """A gloo process group over every rank with a long timeout, for waiting and for small messages
    (reinforce_cot.sharded). Created on first use, which every rank reaches at the same point (the
    first barrier of recipes.run); the default group is initialized first if needed (accelerate)."""
    import torch.distributed as dist
    from accelerate import PartialState

    if not dist.is_initialized():
        PartialState()
    return dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)


def device():
    """Where this process runs models it generates with: cuda:LOCAL_RANK when CUDA is available, else
    the CPU. LOCAL_RANK is what torchrun, accelerate and reinforce_cot.cluster (Slurm) set."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def ranks_that_ran() -> list[int]:
    """Every process' rank, gathered to all (a collective: call it on every rank)."""
    if world_size() <= 1:
        return [rank()]
    from accelerate.utils import gather_object

    return sorted(gather_object([rank()]))


@contextlib.contextmanager
def local_loading():
    """Load models on this process alone, even inside a DeepSpeed ZeRO-3 run.

    While a ZeRO-3 TrainingArguments lives, transformers' from_pretrained partitions every new model
    across all ranks (zero.Init), a collective: rank 0 loading a model for evaluation or merging while
    the others wait at a barrier would hang forever. The ZeRO-3 marker is lifted for the block."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


_NO_CUDA_CONTEXT = False


@contextlib.contextmanager
def no_cuda_context():
    """Validation inside builds TrainingArguments with use_cpu=True, so that they set up no CUDA device:
    outside torchrun they call `torch.cuda.set_device(cuda:0)`, which creates a context holding ~0.5 GB of
    GPU 0. For the launching parent, which validates and then only waits on its children (they validate
    again on their own GPUs, bf16 support included)."""
    global _NO_CUDA_CONTEXT
    saved, _NO_CUDA_CONTEXT = _NO_CUDA_CONTEXT, True
    try:
        yield
    finally:
        _NO_CUDA_CONTEXT = saved


def validation_args() -> dict:
    """Extra TrainingArguments for validation: use_cpu=True inside `no_cuda_context`."""
    return {"use_cpu": True} if _NO_CUDA_CONTEXT else {}


def needs_launch(cfg) -> bool:
    return int(cfg.hardware.num_processes) > 1 and not any(v in os.environ for v in DISTRIBUTED_ENV)


def default_env() -> None:
    """Environment every process shares: a persistent cache for DeepSpeed's compiled ops."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "reinforce_cot" / "torch_extensions"))


def launch_command(cfg, run_dir: Path, overrides: list[str]) -> list[str]:
    keep = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(int(cfg.hardware.num_processes)),
        "-m",
        "reinforce_cot.main",
        *keep,
        f"hydra.run.dir={run_dir}",
    ]


def launch(cfg, run_dir: Path, overrides: list[str]) -> int:
    """Run N copies of this command under torchrun (`launch_command`) and wait; returns their exit code.
    The caller has validated the recipe (reinforce_cot.recipes.prepare): this is process handling only."""
    cmd = launch_command(cfg, run_dir, overrides)
    log.info("starting %d processes: %s", cfg.hardware.num_processes, " ".join(cmd))
    # torchrun would set 1 thread per process; on GPU machines the cores are shared out instead
    threads = os.environ.get("OMP_NUM_THREADS") or str(default_threads(int(cfg.hardware.num_processes)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, **device_env(cfg)}
    return subprocess.run(cmd, env=env).returncode


def device_env(cfg) -> dict[str, str]:
    """For every process of a multi-process CPU run. On MULTI_CPU accelerate names rank r's device `cpu:r`
    (r modulo torch.cpu.device_count(), so `cpu:0`), and transformers' Trainer loads a checkpoint's optimizer
    state with map_location=<that device>, which torch.load refuses ("don't know how to restore data location
    of torch.storage.UntypedStorage (tagged with cpu:0)"): a resumed or requeued run would fail. Plain `cpu`
    is the same device."""
    return {"ACCELERATE_TORCH_DEVICE": "cpu"} if cfg.algo.args.get("use_cpu") else {}


def setup_process_logging() -> None:
    """On ranks > 0: no output.log (rank 0 owns it); every rank tags its console lines with its rank."""
    if world_size() <= 1:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and not is_main():
            root.removeHandler(h)
            h.close()
        elif h.formatter is not None and h.formatter._fmt:
            h.setFormatter(logging.Formatter(f"[rank {rank()}]" + h.formatter._fmt, h.formatter.datefmt))
    log.info("process rank %d of %d (local rank %s)", rank(), world_size(), os.environ.get("LOCAL_RANK"))


def deepspeed_config(args) -> dict | None:
    """`algo.args.deepspeed` (a JSON path or an inline mapping) as a dict; None without DeepSpeed."""
    ds = args.get("deepspeed")
    if not ds:
        return None
    if isinstance(ds, str):
        return json.loads(Path(ds).expanduser().read_text())
    return OmegaConf.to_container(ds, resolve=True) if OmegaConf.is_config(ds) else dict(ds)


def zero(args) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) of `algo.args.deepspeed`; (0, False, False) without."""
    z = (deepspeed_config(args) or {}).get("zero_optimization") or {}
    offloaded = lambda key: (z.get(key) or {}).get("device") in ("cpu", "nvme")  # noqa: E731
    return int(z.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param")


def cuda_versions() -> str:
    """What decides whether CUDA works here: the CUDA torch was built for and the NVIDIA driver installed."""
    import torch

    built = torch.version.cuda
    try:  # the kernel module's version file: no subprocess, and present whenever a driver is loaded
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        driver = next((w for w in line.split() if w.count(".") >= 1 and w.split(".")[0].isdigit()), line)
    except (OSError, IndexError):
        driver = "none found"
    need = " (needs an NVIDIA driver >= 580)" if built and built.startswith("13") else ""
    return f"torch {torch.__version__} built for CUDA {built or 'none (a CPU build)'}{need}, NVIDIA driver {driver}"


def validate(cfg, quantized: bool = False) -> None:
    """Settings that need hardware or packages this machine may lack, checked before any weights load.
    `quantized`: the model loads in 4 bits (peft=qlora: reinforce_cot.adapters.quantized), which rules out
    vLLM and ZeRO-3."""
    args, hw = cfg.algo.args, cfg.hardware
    n = int(hw.num_processes)
    if n < 1:
        raise ConfigError(f"hardware.num_processes={n}: must be >= 1")
    if not args.get("use_cpu", False):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"hardware={hw.name} trains on CUDA GPUs but none is visible here ({cuda_versions()}); "
                "use hardware=cpu (or cpu_ddp2), or see environment.yml for the driver the GPU wheels need"
            )
        if n > torch.cuda.device_count() and world_size() == 1:
            raise ConfigError(
                f"hardware.num_processes={n} but {torch.cuda.device_count()} GPUs are visible; pick a smaller preset"
            )
    if args.get("use_vllm"):
        if args.get("vllm_mode") not in ("colocate", "server"):
            raise ConfigError(
                f"algo.args.vllm_mode={args.get('vllm_mode')}: use colocate or server (hardware.vllm.vllm_mode)"
            )
        if quantized:
            raise ConfigError(
                f"peft={cfg.peft.name} with algo.args.use_vllm=true: TRL 1.16 pushes the 4-bit weights to vLLM "
                "without their quantization state (trl#4973, unfixed in 1.16); add hardware.vllm.use_vllm=false, "
                "or use peft=lora"
            )
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                f"hardware={hw.name} sets use_vllm=true but vllm is not installed; pip install -e '.[gpu]' "
                "(see environment.yml) or set hardware.vllm.use_vllm=false"
            )
    ds = args.get("deepspeed")
    if ds:
        if isinstance(ds, str) and not Path(ds).expanduser().is_file():
            raise ConfigError(
                f"algo.args.deepspeed={ds}: no such file; use deepspeed=zero2 (conf/deepspeed/) or a JSON file's path"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"hardware={hw.name} uses DeepSpeed but it is not installed: pip install deepspeed==0.19.8"
            )
        if quantized and zero(args)[0] == 3:
            raise ConfigError(
                f"peft={cfg.peft.name} with ZeRO-3 (hardware={hw.name}): the 4-bit base is loaded whole on each "
                "GPU (device_map, uint8 storage), which ZeRO-3 cannot partition; use "
                "deepspeed=zero2, or peft=lora"
            )


# ----------------------------------------------------------------------------- what a stage leaves
# A recipe runs every stage in one process (the stage loop, logging, resume and signal handling stay in
# one place, and data is loaded once). So each stage must leave nothing behind that the next one would
# trip over: GPU memory (a trainer's model, optimizer and DeepSpeed engine, a colocated vLLM, generation
# backends), accelerate's singleton state, a process group a 1-process vLLM created, and the variables
# TRL and vLLM put in os.environ (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, VLLM_*), which would
# make the next stage's accelerate think it runs distributed.
@contextlib.contextmanager
def stage_scope(name: str = "stage"):
    """Run one stage; afterwards os.environ is as it was, accelerate's state is reset, a process group
    the stage started alone (1-process colocated vLLM) is destroyed, and memory is collected and handed
    back to the GPU (tests/test_release.py checks that nothing of a stage stays referenced). On a GPU
    the log says what is left: `[<stage>] GPU memory after release: ... (stage peak ...)`."""
    env = dict(os.environ)
    dist_was_up = _dist_initialized()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        _reset_process_state(dist_was_up)
        changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
        os.environ.clear()
        os.environ.update(env)
        if changed:
            log.debug("restored environment variables set during the stage: %s", changed)
        release_memory()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            mib = 1 << 20
            log.info(
                "[%s] GPU memory after release: %d MiB allocated, %d MiB reserved (stage peak %d MiB)",
                name,
                torch.cuda.memory_allocated() // mib,
                torch.cuda.memory_reserved() // mib,
                torch.cuda.max_memory_allocated() // mib,
            )


def release_trainer(trainer) -> None:
    """Free what a finished TRL trainer holds beyond plain references: a colocated vLLM engine, and the
    DeepSpeed engine, whose hooks keep the model alive until `destroy()` (accelerate's free_memory)."""
    vllm_gen = getattr(trainer, "vllm_generation", None)
    if getattr(vllm_gen, "llm", None) is not None:
        shutdown_vllm(vllm_gen.llm)
        vllm_gen.llm = None
    trainer.accelerator.free_memory()


def shutdown_vllm(llm) -> None:
    """Stop a vLLM engine's core (a subprocess, or in-process workers) before its last reference goes."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if hasattr(core, "shutdown"):
        core.shutdown()


def release_memory() -> None:
    """Collect garbage (trainers and models sit in reference cycles) and return cached GPU blocks; no
    CUDA context is created where none exists."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _dist_initialized() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()


def _reset_process_state(dist_was_up: bool) -> None:
    state = sys.modules.get("accelerate.state")
    if state is not None:  # what transformers' TrainingArguments does itself before building its own
        state.AcceleratorState._reset_state(reset_partial_state=True)
    if not dist_was_up and _dist_initialized():  # one process, and a colocated vLLM started a group of 1
        vllm_state = sys.modules.get("vllm.distributed.parallel_state")
        if vllm_state is not None:  # vLLM's own groups over it, else a later engine reuses dead ones
            vllm_state.destroy_model_parallel()
            vllm_state.destroy_distributed_environment()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
