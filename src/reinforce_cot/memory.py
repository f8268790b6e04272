"""GPU memory per process, estimated at validation from the model's config: refuse what cannot fit, name what would.

Why: a run that cannot fit fails at its first step, or when vLLM starts, after minutes of loading
(`hardware=2xa100 model=qwen2_5_vl_7b` needs ~70 GiB per GPU under ZeRO-2 before vLLM's 24 GiB). The
arithmetic needs no GPU and no weights, so it runs with every other check, before anything loads.

What is counted, in bytes per GPU (a lower bound: activations, the CUDA context and allocator slack come
on top, for which `hardware.memory_reserve_gib` is kept free):

- P parameters, counted on the meta device from the model's config (`models.model_config`: the hub id's
  config.json, from the local hub cache offline); T of them train (all but `model.freeze` parts; with
  peft only the adapters, A = r x (in + out) per adapted linear layer);
- without DeepSpeed: weights in the dtype they load in (fp32 masters for mixed-precision full
  fine-tuning, `adapters.load_dtype`), gradients and AdamW's two moments in the same dtype (16 B per
  trainable fp32 parameter);
- DeepSpeed ZeRO stage s over N processes (Rajbhandari et al. 2020): 16-bit weights (/N at stage 3), 16-bit
  gradients (/N from stage 2), fp32 master + Adam moments, 12 B per trainable parameter (/N from stage 1;
  zero on the GPU with `offload_optimizer`, and the weights too with `offload_param`);
- peft: the frozen base in `model.dtype` (qlora: NF4 + double-quantized scales, 4.127 bits per linear
  weight, QLoRA paper sec. 3), adapters in fp32 with gradients and Adam (16 B each);
- a reference model (KL term with beta > 0, DPO) without peft: the policy's dtype, /N at ZeRO-3;
- colocated vLLM: `vllm_gpu_memory_utilization` x GPU memory, which itself must hold vLLM's 16-bit weights
  and the KV cache of one sequence of `vllm_max_model_length` tokens (2 x layers x KV heads x head dim x
  2 B per token; unset, vLLM takes the model's max_position_embeddings: 128000 for Qwen2.5-VL).

GPU memory comes from the preset (`hardware.gpu_memory_gib`), never from a GPU here, so the check runs
the same on a laptop. A refusal lists the settings that would fit (peft=lora, ZeRO-3, ZeRO-3 with the
optimizer on the CPU, a shorter vLLM length), each estimated the same way.

    python train.py algo=gspo hardware=2xa100 model=qwen2_5_vl_3b      # fits: ~32 GiB + vLLM 24 GiB per GPU
    python train.py algo=grpo hardware=2xa100 model=qwen2_5_vl_7b peft=lora
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import OmegaConf, open_dict

from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)
GiB = 1024**3
QLORA_BYTES = 4.127 / 8  # NF4 weight + double-quantized block scales, per quantized parameter
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Estimate:
    """Bytes per GPU; `kv_per_token` and `max_len` describe the colocated vLLM's KV cache (0 without one)."""

    params: int
    trainable: int
    weights: float
    grads: float
    optimizer: float
    reference: float
    vllm_share: float
    vllm_weights: float
    kv_per_token: int
    max_len: int
    gpu: float
    reserve: float

    @property
    def training(self) -> float:
        return self.weights + self.grads + self.optimizer + self.reference

    @property
    def total(self) -> float:
        return self.training + self.vllm_share + self.reserve

    @property
    def vllm_needs(self) -> float:
        return self.vllm_weights + self.kv_per_token * self.max_len

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
        vllm = f" + vLLM {g(self.vllm_share)}" if self.vllm_share else ""
        ref = f" + reference model {g(self.reference)}" if self.reference else ""
        return (
            f"{g(self.total)} GiB per GPU of {g(self.gpu)}: weights {g(self.weights)} + grads {g(self.grads)} + "
            f"optimizer {g(self.optimizer)}{ref}{vllm} + reserve {g(self.reserve)} ({self.params / 1e9:.3g} B parameters, "
            f"{self.trainable / 1e9:.3g} B training)"
        )


def _field(args, key):
    """`algo.args.<key>`, else the TRL config dataclass' default (e.g. RLOOConfig.beta = 0.05)."""
    from hydra.utils import get_class

    return args[key] if key in args else getattr(get_class(args._target_), key, None)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token: 2 x layers x KV heads x head dim x bytes."""
    t = _text_config(config)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    kv_heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    return 2 * t.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def estimate(cfg, model, config) -> Estimate:
    """Bytes per GPU for `cfg` on `model` (a meta-device skeleton) with transformers config `config`."""
    import torch

    from reinforce_cot import adapters, hardware, parts

    args, hw = cfg.algo.args, cfg.hardware
    n = int(hw.num_processes)
    params = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(params.values())
    stage, off_opt, off_param = hardware.zero(args)
    half = 2 if (args.get("bf16") or args.get("fp16")) else 4
    base_bytes = BYTES.get(str(cfg.model.dtype), 2)

    if adapters.enabled(cfg):
        peft_cfg, hits = adapters.lora_config(cfg, model)
        trainable = sum(peft_cfg.r * (m.in_features + m.out_features) for m in map(model.get_submodule, hits))
        frozen_bytes = base_bytes * total
        if adapters.quantized(cfg):
            head = model.get_output_embeddings()
            linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
            frozen_bytes = QLORA_BYTES * linear + base_bytes * (total - linear)
        weights = frozen_bytes / (n if stage == 3 else 1) + 4 * trainable
        grads, optimizer = 4 * trainable, 8 * trainable
        if stage:  # DeepSpeed partitions the adapters' optimizer state (and, at stage 2+, their grads)
            grads /= n if stage >= 2 else 1
            optimizer = 0 if off_opt else optimizer / n
    else:
        frozen = 0
        if cfg.model.get("freeze"):
            names = list(cfg.model.freeze)
            hit = parts.names_of(parts.part_patterns(cfg.model, names, f"model.freeze={names}"), params)
            frozen = sum(params[k] for k in {k for ks in hit.values() for k in ks})
        trainable = total - frozen
        if stage:
            weights = 0 if off_param else half * total / (n if stage == 3 else 1)
            grads = half * trainable / (n if stage >= 2 else 1)
            optimizer = 0 if off_opt else (12 if half == 2 else 8) * trainable / n
        else:
            b = BYTES.get(adapters.load_dtype(cfg), 4)
            weights, grads, optimizer = b * total, b * trainable, 2 * b * trainable

    # a frozen copy of the starting model for the KL term / DPO, in the policy's dtype (peft: the adapter is
    # disabled instead); TRL hands it to DeepSpeed, which partitions it at stage 3
    reference = 0.0
    uses_ref = float(_field(args, "beta") or 0) > 0 if cfg.algo.kind == "rl" else cfg.algo.kind == "preference"
    if uses_ref and not adapters.enabled(cfg) and not args.get("precompute_ref_log_probs"):
        reference = (half if stage else BYTES.get(adapters.load_dtype(cfg), 4)) * total / (n if stage == 3 else 1)

    gpu = float(hw.gpu_memory_gib) * GiB
    colocate = bool(args.get("use_vllm")) and args.get("vllm_mode") == "colocate"
    length = args.get("vllm_max_model_length") or _text_config(config).max_position_embeddings
    return Estimate(
        params=total,
        trainable=trainable,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        reference=reference,
        vllm_share=float(args.get("vllm_gpu_memory_utilization") or 0) * gpu if colocate else 0.0,
        vllm_weights=min(base_bytes, 2) * total if colocate else 0.0,
        kv_per_token=kv_bytes_per_token(config) if colocate else 0,
        max_len=int(length) if colocate else 0,
        gpu=gpu,
        reserve=float(hw.get("memory_reserve_gib") or 0) * GiB,
    )


def _variants(cfg) -> list[tuple[str, object]]:
    """(the override a user would type, the config with it) for each setting that lowers memory per GPU."""
    from reinforce_cot import adapters, cli, hardware

    out = []
    n = int(cfg.hardware.num_processes)
    if not adapters.enabled(cfg):
        c = cfg.copy()
        with open_dict(c):
            c.peft = OmegaConf.load(cli.CONF_DIR / "peft" / "lora.yaml")
        out.append(("peft=lora", c))
    stage, off_opt, _ = hardware.zero(cfg.algo.args)
    if n > 1:  # one process does not start DeepSpeed here (no launcher): ZeRO needs a multi-GPU preset
        for name in (["zero3"] if stage < 3 else []) + ([] if off_opt else ["zero3_offload"]):
            c = cfg.copy()
            with open_dict(c):
                c.algo.args.deepspeed = OmegaConf.load(cli.CONF_DIR / "deepspeed" / f"{name}.yaml").config
            out.append((f"deepspeed={name}", c))
    return out


def validate(cfg) -> None:
    """Refuse a GPU run whose estimate exceeds `hardware.gpu_memory_gib`, naming the settings that fit."""
    from reinforce_cot import models, parts

    args, hw = cfg.algo.args, cfg.hardware
    if args.get("use_cpu") or not hw.get("gpu_memory_gib") or (cfg.get("stage") or {}).get("kind", "train") != "train":
        return
    config = models.model_config(cfg.model)  # ConfigError when it cannot be read (offline, not cached)
    model = parts.skeleton(cfg.model)
    if model is None:
        return
    est = estimate(cfg, model, config)
    if est.vllm_share and est.vllm_needs > est.vllm_share:
        fit_len = max_len_fitting(est)
        fix = (
            f"set algo.args.vllm_max_model_length to at most {fit_len} (longest prompt + max_completion_length)"
            if fit_len >= int(cfg.data.get("max_completion_length") or 1) * 2
            else "raise hardware.vllm.vllm_gpu_memory_utilization"
        )
        length = args.get("vllm_max_model_length") or f"null (the model's {est.max_len})"
        raise ConfigError(
            f"algo.args.vllm_max_model_length={length}: vLLM's share "
            f"({args.vllm_gpu_memory_utilization} x {hw.gpu_memory_gib} GiB = {est.vllm_share / GiB:.1f} GiB) cannot "
            f"hold its weights ({est.vllm_weights / GiB:.1f} GiB) and the KV cache of one {est.max_len}-token "
            f"sequence ({est.kv_per_token * est.max_len / GiB:.1f} GiB); {fix}"
        )
    if est.total > est.gpu:
        fits = [label for label, c in _variants(cfg) if estimate(c, model, config).total <= est.gpu]
        fix = "fits with " + " or ".join(fits) if fits else "none of peft=lora, ZeRO-3, offload fits: use more GPUs"
        raise ConfigError(
            f"hardware={hw.name} model={cfg.model.name}: does not fit, needs at least {est.describe()}; {fix}"
        )
    log.info("memory estimate (lower bound): %s", est.describe())


def max_len_fitting(est: Estimate) -> int:
    """The longest vLLM context whose KV cache fits next to vLLM's weights in its share."""
    return max(0, int((est.vllm_share - est.vllm_weights) // max(est.kv_per_token, 1)))
