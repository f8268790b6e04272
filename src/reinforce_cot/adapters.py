"""Adapters (the `peft` group): LoRA and QLoRA on the parts of a model you choose, merged after training.

What: `peft=lora` hands TRL a `peft.LoraConfig` (TRL wraps the model, trains only the adapter, and uses
the adapter-disabled model as the reference for DPO / RLOO / GRPO with beta > 0, so no second copy is
loaded). `peft=qlora` also loads the base in 4-bit NF4 through bitsandbytes (CUDA only).

Which layers: with `peft.config.target_modules: null` every nn.Linear inside `peft.target_parts`
(named parts from `model.parts`, default `[language_model]`) gets an adapter: ms-swift's "all-linear",
restricted to the language model, because plain names (`gate_proj`) would also catch the vision tower's
MLP. `peft.target_parts=[language_model,vision]` adapts the vision tower too. An explicit
`peft.config.target_modules` (a regex, full match, or a list of names, as peft reads them) wins; a
target that matches no module is a ConfigError at validation (checked on a meta-device copy).

After training the stage writes ckpt/<stage>/final (the adapter) and ckpt/<stage>/merged (full
safetensors + processor; reinforce_cot.merge), which later stages and `model.init_from` pick first.

    python train.py recipe=single algo=sft reward=none peft=lora
    python train.py recipe=single algo=sft reward=none peft=lora "peft.target_parts=[language_model,vision]"
    python train.py algo=grpo peft=qlora hardware=1xa100 model=qwen2_5_vl_3b hardware.vllm.use_vllm=false
"""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import OmegaConf

from reinforce_cot import parts
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)


def enabled(cfg) -> bool:
    return bool(cfg.get("peft")) and cfg.peft.get("config") is not None


def quantized(cfg) -> bool:
    return enabled(cfg) and cfg.peft.get("quantization") is not None


def target_regex(model, cfg) -> str:
    """A peft target regex (full match) for every nn.Linear inside peft.target_parts, output head excluded."""
    import torch

    pats = parts.part_patterns(
        cfg.model, list(cfg.peft.target_parts), f"peft.target_parts={list(cfg.peft.target_parts)}"
    )
    out_head = {n for n, m in model.named_modules() if m is model.get_output_embeddings()}
    leaves: dict[str, set[str]] = {p: set() for p in pats}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in out_head:
            for part, rx in pats.items():
                if rx.match(name):
                    leaves[part].add(name.rsplit(".", 1)[-1])
    for part, found in leaves.items():
        if not found:
            raise ConfigError(
                f"peft.target_parts: part '{part}' ({cfg.model.parts[part]}) holds no nn.Linear in "
                f"{type(model).__name__}; pick other parts or set peft.config.target_modules"
            )
    alts = [f"(?:{pats[p].pattern}).*\\.(?:{'|'.join(sorted(found))})" for p, found in leaves.items()]
    return "|".join(alts)


def lora_config(cfg, model):
    """The peft config TRL gets, with target_modules resolved against `model` (real or meta)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_cfg = instantiate(cfg.peft.config, _convert_="all")
    explicit = peft_cfg.target_modules is not None
    if not explicit:
        peft_cfg.target_modules = target_regex(model, cfg)
    hits = [n for n, _ in model.named_modules() if n and check_target_module_exists(peft_cfg, n)]
    if not hits:
        shown = OmegaConf.to_container(cfg.peft.config).get("target_modules") if explicit else peft_cfg.target_modules
        raise ConfigError(
            f"peft.config.target_modules={shown} matches no module of {type(model).__name__} (model={cfg.model.name}); "
            f"give module names such as {_examples(model)} or a regex, or leave it null to use peft.target_parts"
        )
    return peft_cfg, hits


def _examples(model) -> list[str]:
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})[:8]


def validate(cfg) -> None:
    if not enabled(cfg):
        return
    if quantized(cfg):
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"peft={cfg.peft.name}: 4-bit QLoRA (bitsandbytes) needs a CUDA GPU and this machine has none; "
                "use peft=lora here, or run on a GPU hardware preset"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"peft={cfg.peft.name} needs bitsandbytes: pip install -e '.[gpu]' (or bitsandbytes)")
    if cfg.peft.get("target_parts"):
        parts.part_patterns(cfg.model, list(cfg.peft.target_parts), f"peft.target_parts={list(cfg.peft.target_parts)}")
    model = parts.skeleton(cfg.model)
    if model is not None:
        _, hits = lora_config(cfg, model)
        log.info("peft=%s adapts %d modules, e.g. %s", cfg.peft.name, len(hits), hits[:3])


def load_dtype(cfg) -> str:
    """The dtype weights load in for training: fp32 when the config asks for bf16/fp16 full fine-tuning
    with mixed precision and no DeepSpeed, else `model.dtype`.

    Why: AdamW stepping 16-bit weights loses every update below half a bf16 ulp: at lr 1e-6 nearly all of
    them. Mixed precision keeps fp32 master weights and computes in bf16 under autocast; DeepSpeed keeps its
    own fp32 master copy, and peft trains fp32 adapters on a 16-bit base, so those load `model.dtype`."""
    args = cfg.algo.args
    mixed = bool(args.get("bf16") or args.get("fp16"))
    if cfg.model.dtype in ("bfloat16", "float16") and mixed and not args.get("deepspeed") and not enabled(cfg):
        return "float32"
    return cfg.model.dtype


def load_kwargs(cfg) -> dict:
    """Extra from_pretrained kwargs: the 4-bit quantization config for QLoRA, placed on this process' GPU."""
    if not quantized(cfg):
        return {}
    import torch
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    q = OmegaConf.to_container(cfg.peft.quantization, resolve=True)
    if isinstance(q.get("bnb_4bit_compute_dtype"), str):
        q["bnb_4bit_compute_dtype"] = getattr(torch, q["bnb_4bit_compute_dtype"])
    return {"quantization_config": BitsAndBytesConfig(**q), "device_map": {"": PartialState().local_process_index}}


def trainer_kwargs(cfg, model) -> dict:
    """`peft_config=` for the TRL trainer (TRL wraps the model), or nothing."""
    if not enabled(cfg):
        return {}
    peft_cfg, hits = lora_config(cfg, model)
    log.info("peft=%s on %d modules (target_modules=%s)", cfg.peft.name, len(hits), peft_cfg.target_modules)
    return {"peft_config": peft_cfg}


def describe_trainable(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable / 1e6:.3f} M of {total / 1e6:.3f} M parameters train ({100 * trainable / max(total, 1):.1f}%)"
