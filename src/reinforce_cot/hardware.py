"""Hardware: one command for one or many processes, rank-0-only writes, and checks of GPU-only settings.

How `python train.py hardware=cpu_ddp2` becomes two processes: `main` composes the config as usual; when
`hardware.num_processes` > 1 and no torch.distributed environment is set (no RANK / LOCAL_RANK, i.e. not
already under torchrun, accelerate launch, deepspeed or a Slurm task per GPU), it validates every stage
(so bad input fails once, before any process starts) and re-executes itself under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node N -m reinforce_cot.main <overrides> \
        hydra.run.dir=<this run dir>

Every child composes the same config into the SAME run dir (passed explicitly: `${now:}` would differ).
Why torchrun and not `accelerate launch`: `accelerate launch --cpu --num_processes 2` silently runs one
process; torchrun ships with torch, gives gloo on CPU and NCCL on GPUs, picks a free port (--standalone),
and DeepSpeed needs no launcher of its own here: `algo.args.deepspeed=<json>` (conf/deepspeed/) makes
transformers build accelerate's DeepSpeed plugin inside each process. The parent only waits and passes
on the exit code.

Only rank 0 writes: output.log (other ranks log to the console only, each line tagged with its rank),
provenance (backup/), result JSON, final/ and merged/ (Trainer saves checkpoints on rank 0 itself),
TensorBoard. Evaluate and merge stages run on rank 0 while the others wait at a barrier.

DeepSpeed JIT-compiles its ops on first use (1-3 min on a CPU): they are kept in TORCH_EXTENSIONS_DIR,
by default ~/.cache/reinforce_cot/torch_extensions, so later runs and the tests reuse them.

    python train.py recipe=single algo=sft reward=none hardware=cpu_ddp2
    python train.py recipe=single algo=sft reward=none hardware=cpu_zero2
    python train.py algo=grpo hardware=2xa100 model=qwen2_5_vl_7b
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")

# `${rc.conf:deepspeed/zero2.json}`: an absolute path to a file under conf/, whatever the working dir
OmegaConf.register_new_resolver("rc.conf", lambda rel: str(CONF_DIR / rel), replace=True)


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


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
    """Validate every stage here, then run N copies of this command under torchrun; returns their exit code."""
    from reinforce_cot import config as config_lib
    from reinforce_cot import recipes

    if not cfg.resume and not (run_dir / "backup" / "config.yaml").is_file():
        from reinforce_cot import tiny

        for scfg in recipes.compose_stages(cfg, overrides, run_dir).values():
            config_lib.validate(scfg)
            if scfg.stage.kind == "train" and not scfg.model.get("path"):
                tiny.build(scfg.model)  # built once here, not raced by N processes
    cmd = launch_command(cfg, run_dir, overrides)
    log.info("starting %d processes: %s", cfg.hardware.num_processes, " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **device_env(cfg)}
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


def validate(cfg) -> None:
    """Settings that need hardware or packages this machine may lack, checked before any weights load."""
    args, hw = cfg.algo.args, cfg.hardware
    n = int(hw.num_processes)
    if n < 1:
        raise ConfigError(f"hardware.num_processes={n}: must be >= 1")
    if not args.get("use_cpu", False):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"hardware={hw.name} trains on CUDA GPUs but none is visible here; use hardware=cpu (or cpu_ddp2)"
            )
        if n > torch.cuda.device_count() and world_size() == 1:
            raise ConfigError(
                f"hardware.num_processes={n} but {torch.cuda.device_count()} GPUs are visible; pick a smaller preset"
            )
    if args.get("use_vllm"):
        from reinforce_cot import adapters

        if args.get("vllm_mode") not in ("colocate", "server"):
            raise ConfigError(
                f"algo.args.vllm_mode={args.get('vllm_mode')}: use colocate or server (hardware.vllm.vllm_mode)"
            )
        if adapters.quantized(cfg):
            raise ConfigError(
                f"peft={cfg.peft.name} with algo.args.use_vllm=true: vLLM cannot load the 4-bit bitsandbytes "
                "weights TRL syncs; use peft=lora, or hardware.vllm.use_vllm=false"
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
                f"algo.args.deepspeed={ds}: no such file; use ${{rc.conf:deepspeed/zero2.json}} or a path"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"hardware={hw.name} uses DeepSpeed but it is not installed: pip install deepspeed==0.19.8"
            )
