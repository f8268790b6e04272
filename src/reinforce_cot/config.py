"""Validation of a composed stage config: cross-field rules checked before any weights load.

`validate(cfg)` holds the checks every stage gets, whatever its kind (recipes.validate_stage runs it, then
the kind's own `validate` from conf/stage/<kind>.yaml). Each rule raises `ConfigError` with one line that
names the key and the fix (verl's `???` fields and `__post_init__` checks, applied to Hydra configs), e.g.
`error: algo.args.num_generations=3 must divide the generation batch (...); use one of [2, 4, 8, ...]`.
TRL's own config checks run too, because the trainer config is instantiated here once, and so do the
optimizer's (lr, betas, eps, weight decay), by building the configured optimizer on a dummy parameter:
torch checks them only after the model loads.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from reinforce_cot import adapters, hardware, memory, models, parts
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
    if m.get("path") and not _looks_local(str(m.path)) and not m.get("init_from"):
        models.model_config(m)  # an unknown hub id (offline: not in the cache) is one line here
    from_stage = (cfg.get("stage") or {}).get("init_from")  # made by an earlier stage of this run
    if m.get("init_from") and not from_stage and not Path(str(m.init_from)).expanduser().exists():
        raise ConfigError(f"model.init_from={m.init_from} does not exist; point it at a checkpoint folder or run dir")
    from reinforce_cot import generation

    generation.validate(cfg)  # the backend's packages (vllm) and server settings
    if cfg.eval.k < 0:
        raise ConfigError(f"eval.k={cfg.eval.k} must be >= 0 (samples per prompt; 0 skips sampled metrics)")
    from reinforce_cot import callbacks

    callbacks.validate(cfg)  # eval.every_steps, eval.during_train_prompts
    if a.kind == "rl":
        _validate_rl(cfg)
        from reinforce_cot import dynamic_sampling

        dynamic_sampling.validate(cfg)  # algo.dynamic_sampling: GRPO-based trainer, metric names a reward
    # GPU-only settings (CUDA, vLLM, DeepSpeed, what 4-bit weights rule out), before TRL's bf16 check
    hardware.validate(cfg, quantized=adapters.quantized(cfg))
    _validate_trainer(a)  # TRL's own checks (in the launching parent without a CUDA device: no_cuda_context)
    adapters.validate(cfg)  # peft targets match modules; qlora needs CUDA + bitsandbytes
    parts.validate(cfg)  # model.freeze / optim.lr_multipliers name existing parts
    memory.validate(cfg)  # GPU presets: memory per GPU from the model's config; refuses what cannot fit


def _validate_trainer(algo) -> None:
    """What the TRL trainer would refuse from its config alone, found before any weights load: TRL's and
    transformers' own config checks (by building the config object), the trainer class, batch sizes, and
    the optimizer's checks of lr, betas, eps and weight decay, which torch runs only when the optimizer is
    made (after the model loaded): the configured optimizer is built here on one dummy parameter."""
    import torch
    from hydra.errors import InstantiationException
    from transformers import Trainer

    try:
        instantiate(algo.trainer)  # a partial: the class must import
        args = instantiate(
            algo.args, output_dir="/tmp/reinforce_cot_validate", _convert_="all", **hardware.validation_args()
        )
    except InstantiationException as e:  # TRL's / transformers' own words, its `--field`s named as our keys
        if e.__cause__ is not None and not isinstance(e.__cause__, (ValueError, TypeError, ImportError)):
            raise e.__cause__ from None  # not the config's fault (a rendezvous port taken, ...): not bad input
        cause = re.sub(r"--(\w+)", r"algo.args.\1", " ".join(str(e.__cause__ or e).split()))
        raise ConfigError(f"algo={algo.name}: {cause}") from None
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            raise ConfigError(f"algo.args.{key}={getattr(args, key)}: must be >= 1")
    optim = getattr(args.optim, "value", args.optim)
    try:
        opt_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    except ImportError as e:  # its package is missing here (bitsandbytes, torchao, ...)
        raise ConfigError(f"algo.args.optim={optim}: {' '.join(str(e).split())}") from None
    except ValueError:  # optimizers built around the model (GaLore, APOLLO, LOMO): checked when they are made
        return
    if isinstance(opt_cls, type) and issubclass(opt_cls, torch.optim.Optimizer) and "params" not in kwargs:
        dummy = [{"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": args.weight_decay}]
        try:
            opt_cls(dummy, **kwargs)
        except ValueError as e:  # torch: "Invalid learning rate: -1.0", "Invalid beta parameter at index 0: 2.0"
            keys = [k for k, words in OPTIMIZER_KEYS.items() if any(w in str(e).lower() for w in words)]
            fields = ", ".join(f"algo.args.{k}={getattr(args, k)}" for k in keys or ["optim"])
            raise ConfigError(f"{fields}: the optimizer ({optim}) refuses it: {e}") from None


# torch optimizers name the argument they refuse; these are the TrainingArguments fields behind each
OPTIMIZER_KEYS = {
    "learning_rate": ("learning rate",),
    "adam_beta1": ("index 0",),
    "adam_beta2": ("index 1",),
    "adam_epsilon": ("epsilon",),
    "weight_decay": ("weight_decay", "weight decay"),
}


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
