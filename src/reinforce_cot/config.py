"""Validation of a composed stage config: cross-field rules checked before any weights load.

Each rule raises `ConfigError` with one line that names the key and the fix (verl's `???` fields and
`__post_init__` checks, applied to Hydra configs). TRL's own config checks run too, because the
trainer config is instantiated here once.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from reinforce_cot import adapters, hardware, parts  # hardware and parts also register rc.conf / rc.mul
from reinforce_cot.errors import ConfigError


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def validate(cfg) -> None:
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        keys = sorted(missing)
        raise ConfigError(
            f"{', '.join(keys)}: required (???) but not set; add {keys[0]}=<value> ... to the command line"
        )
    m, d, a = cfg.model, cfg.data, cfg.algo
    if d.modality == "image" and m.kind != "vlm":
        raise ConfigError(
            f"data={d.name} has images but model={m.name} is text-only; pick a VLM (model=tiny_vlm) or text data"
        )
    if m.get("path") and _looks_local(str(m.path)) and not Path(str(m.path)).expanduser().exists():
        raise ConfigError(
            f"model.path={m.path} does not exist; give a saved model folder or a hub id like Qwen/Qwen2.5-VL-3B-Instruct"
        )
    from_stage = (cfg.get("stage") or {}).get("init_from")  # made by an earlier stage of this run
    if m.get("init_from") and not from_stage and not Path(str(m.init_from)).expanduser().exists():
        raise ConfigError(f"model.init_from={m.init_from} does not exist; point it at a checkpoint folder or run dir")
    from reinforce_cot import generation

    generation.validate(cfg)  # the backend's packages (vllm) and server settings
    if (cfg.get("stage") or {}).get("kind") == "rejection_sample":
        from reinforce_cot import rejection

        rejection.validate(cfg)
    if cfg.eval.k < 0:
        raise ConfigError(f"eval.k={cfg.eval.k} must be >= 0 (samples per prompt; 0 skips sampled metrics)")
    from reinforce_cot import callbacks

    callbacks.validate(cfg)  # eval.every_steps, eval.during_train_prompts
    if a.kind == "rl":
        _validate_rl(cfg)
    hardware.validate(cfg)  # GPU-only settings (CUDA, vLLM, qlora + vLLM, DeepSpeed), before TRL's bf16 check
    instantiate(a.args, output_dir="/tmp/reinforce_cot_validate", _convert_="all")  # TRL's own checks
    adapters.validate(cfg)  # peft targets match modules; qlora needs CUDA + bitsandbytes
    parts.validate(cfg)  # model.freeze / optim.lr_multipliers name existing parts


def _validate_rl(cfg) -> None:
    args, hw = cfg.algo.args, cfg.hardware
    if not cfg.reward:
        raise ConfigError(f"algo={cfg.algo.name} needs rewards but reward is empty; use reward=r1 (or accuracy)")
    if "steps_per_generation" in args and args.get("generation_batch_size") is None:
        gen = (
            args.per_device_train_batch_size
            * hw.num_processes
            * (args.steps_per_generation or args.gradient_accumulation_steps)
        )
        source = (
            f"per_device_train_batch_size {args.per_device_train_batch_size} x processes {hw.num_processes}"
            f" x steps_per_generation {args.steps_per_generation}"
        )
    else:
        gen = args.get("generation_batch_size") or args.per_device_train_batch_size * hw.num_processes
        source = f"generation_batch_size {gen}"
    if args.num_generations < 2:
        raise ConfigError(f"algo.args.num_generations={args.num_generations}: group methods need at least 2")
    if gen % args.num_generations:
        divisors = [x for x in range(2, gen + 1) if gen % x == 0]
        raise ConfigError(
            f"algo.args.num_generations={args.num_generations} must divide the generation batch ({source} = {gen}); "
            f"use one of {divisors} or change the batch"
        )
    if (
        args.get("importance_sampling_level") == "sequence"
        and args.get("steps_per_generation", 1) <= args.gradient_accumulation_steps
    ):
        raise ConfigError(
            f"algo={cfg.algo.name}: the sequence-level ratio is 1 on-policy; set algo.args.steps_per_generation "
            f"> gradient_accumulation_steps ({args.gradient_accumulation_steps})"
        )
