"""Named parts of a model (vision, projector, language_model): freezing and per-part learning rates.

What: each model file maps part names to a regex on parameter names (`model.parts`; `re.match`, i.e. a
prefix), written once per model family: Qwen2.5-VL has `vision` (the ViT), `projector` (the patch merger)
and `language_model`; Qwen2 (text) only `language_model`. Two settings use them:

- `model.freeze: [vision, language_model]` sets requires_grad=False on every parameter of those parts
  before the trainer is built (LLaMA-Factory's freeze_vision_tower / ms-swift's freeze_vit, by name);
- `optim.lr_multipliers: {vision: 0.1, language_model: 0.5, default: 1.0}` builds the optimizer with one
  parameter group per part (x weight decay / no decay) at learning_rate x multiplier; `default` covers
  every parameter no listed part matches. The LR scheduler scales every group alike, so the ratios hold
  for the whole run.

How: the optimizer is built by transformers' own `Trainer.create_optimizer` through its optimizer
factory hook (`trainer.optimizer_cls_and_kwargs`): the optimizer class and arguments still come from
`algo.args.optim`, only the parameter groups are ours, so no TRL trainer is subclassed. Both settings are
checked against a meta-device copy of the model (no weights) at validation: an unknown part, a part the
model family lacks, or a part that matches no parameter is a ConfigError before anything loads.

    python train.py recipe=single algo=sft reward=none "model.freeze=[vision]"
    python train.py recipe=single algo=sft reward=none "optim.lr_multipliers={vision: 0.1, default: 1.0}"
    python train.py recipe=two_phase       # phase 1 frozen backbone, phase 2 all parts at per-part LRs
"""

from __future__ import annotations

import functools
import logging
import re

from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)
PEFT_PREFIX = "base_model.model."  # names inside a peft-wrapped model carry this prefix


def _plain(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def part_patterns(model_cfg, names, key: str) -> dict[str, re.Pattern]:
    """`names` (part names from the config key `key`) -> compiled regexes; unknown or absent parts raise."""
    parts = dict(model_cfg.get("parts") or {})
    known = [p for p, rx in parts.items() if rx]
    out = {}
    for name in names:
        if name not in parts:
            raise ConfigError(f"{key}: unknown part '{name}' for model={model_cfg.name}; known parts: {known}")
        if not parts[name]:
            raise ConfigError(
                f"{key}: model={model_cfg.name} has no '{name}' part (a {model_cfg.kind} model); use one of {known}"
            )
        out[name] = re.compile(parts[name])
    return out


def names_of(patterns: dict[str, re.Pattern], param_names) -> dict[str, list[str]]:
    """Which parameter names each part matches (names inside a peft wrapper are matched without its prefix)."""
    return {p: [n for n in param_names if rx.match(_plain(n))] for p, rx in patterns.items()}


def multipliers(cfg) -> dict[str, float]:
    return {str(k): float(v) for k, v in ((cfg.get("optim") or {}).get("lr_multipliers") or {}).items()}


@functools.lru_cache(maxsize=8)
def _skeleton_cached(path: str, kind: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if kind == "vlm" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(AutoConfig.from_pretrained(path))


def skeleton(model_cfg):
    """The model's module tree on the meta device (config only, no weights), or None when the config
    cannot be read here (a hub id offline, a stage's checkpoint not made yet is replaced by its base)."""
    from reinforce_cot import models

    try:
        return _skeleton_cached(models.config_path(model_cfg), model_cfg.kind)
    except (OSError, ValueError) as e:
        log.warning("cannot check model parts before loading (%s); checked at load instead", e)
        return None


def validate(cfg, model=None) -> None:
    """model.freeze and optim.lr_multipliers name existing parts, each matching some parameter."""
    freeze = list(cfg.model.get("freeze") or [])
    mults = multipliers(cfg)
    if not freeze and not mults:
        return
    for part, m in mults.items():
        if m < 0:
            raise ConfigError(f"optim.lr_multipliers.{part}={m}: must be >= 0 (0 trains nothing there; or freeze it)")
    frozen = part_patterns(cfg.model, freeze, f"model.freeze={freeze}")
    scaled = part_patterns(cfg.model, [p for p in mults if p != "default"], f"optim.lr_multipliers={mults}")
    model = model if model is not None else skeleton(cfg.model)
    if model is None:
        return
    names = [n for n, _ in model.named_parameters()]
    for key, pats in (("model.freeze", frozen), ("optim.lr_multipliers", scaled)):
        for part, hits in names_of(pats, names).items():
            if not hits:
                raise ConfigError(
                    f"{key}: part '{part}' (model.parts.{part}={cfg.model.parts[part]}) matches no parameter of "
                    f"{type(model).__name__}; fix the regex in the model file (names look like {names[0]})"
                )


def freeze(model, cfg) -> list[str]:
    """requires_grad=False on the parts in model.freeze; returns the frozen parameter names."""
    parts = list(cfg.model.get("freeze") or [])
    if not parts:
        return []
    validate(cfg, model)
    hits = names_of(part_patterns(cfg.model, parts, "model.freeze"), [n for n, _ in model.named_parameters()])
    frozen = sorted({n for names in hits.values() for n in names})
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "froze %s (%d tensors): %.2f M of %.2f M parameters still train",
        parts,
        len(frozen),
        trainable / 1e6,
        total / 1e6,
    )
    return frozen


def param_groups(model, cfg, base_lr: float, weight_decay: float, decay_names) -> list[dict]:
    """One optimizer group per (part, decay/no-decay) at base_lr x multiplier; empty groups are left out.
    A parameter matched by several parts goes to the first part listed in optim.lr_multipliers."""
    mults = multipliers(cfg)
    pats = part_patterns(cfg.model, [p for p in mults if p != "default"], "optim.lr_multipliers")
    default = mults.get("default", 1.0)
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = next((part for part, rx in pats.items() if rx.match(_plain(name))), "default")
        groups.setdefault((part, name in decay_names), []).append(p)
    idle = sorted(set(pats) - {part for part, _ in groups})
    if idle:
        log.warning("optim.lr_multipliers: no trainable parameter in %s (frozen, or not adapted by peft)", idle)
    return [
        {
            "params": params,
            "lr": base_lr * (mults[part] if part != "default" else default),
            "weight_decay": weight_decay if decay else 0.0,
            "part": part,  # extra keys ride along in torch's param_groups: logged and tested
        }
        for (part, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != "default", kv[0]))
    ]


def install_lr_multipliers(trainer, cfg) -> None:
    """Make `trainer.create_optimizer` build per-part groups (no-op without optim.lr_multipliers).

    transformers calls `factory()(model, **kwargs)` for a non-Optimizer `optimizer_cls`; we still take the
    optimizer class and its arguments from `args.optim` via `get_optimizer_cls_and_kwargs`."""
    if not multipliers(cfg):
        return

    def build(model, **_):
        opt_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
        if any(k in kwargs for k in ("params", "model", "optimizer_dict")):
            raise ConfigError(
                f"optim.lr_multipliers: algo.args.optim={trainer.args.optim} builds its own parameter groups; "
                "use an AdamW/SGD-style optim or drop the multipliers"
            )
        base = kwargs.pop("lr", trainer.args.learning_rate)
        groups = param_groups(
            model, cfg, base, trainer.args.weight_decay, set(trainer.get_decay_parameter_names(model))
        )
        optimizer = opt_cls(groups, lr=base, **kwargs)
        trainer.rc_param_groups = [
            {"part": g["part"], "lr": g["lr"], "weight_decay": g["weight_decay"], "tensors": len(g["params"])}
            for g in optimizer.param_groups
        ]
        log.info("optimizer groups (base lr %g): %s", base, trainer.rc_param_groups)
        return optimizer

    trainer.optimizer_cls_and_kwargs = (lambda: build, {})
