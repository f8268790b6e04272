"""Load the model and its processor: tiny ones built in code, hub ids and local folders alike.

The path a model takes is the same for all three: `resolve_path(cfg.model)` gives a hub id or a folder
(building the tiny model first when `model.path` is null), then `load_processing_class` and
`load_model` call `from_pretrained` on it. `model.init_from` swaps in the weights of an earlier
checkpoint (a stage's `final/` or `merged/`, or a run dir, whose newest stage is taken).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from reinforce_cot import rundir
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_path(model_cfg) -> str:
    """The folder or hub id weights come from: init_from, else path, else the built tiny model."""
    if model_cfg.get("init_from"):
        return str(checkpoint_folder(model_cfg.init_from))
    if model_cfg.get("path"):
        return str(model_cfg.path)
    from reinforce_cot import tiny

    return str(tiny.build(model_cfg))


def checkpoint_folder(path: str) -> Path:
    """A folder with weights: itself, or for a run dir the last stage's merged/ or final/ folder."""
    p = Path(path).expanduser()
    if _has_weights(p):
        return p
    # a stage's ckpt dir (merged/ before final/), or a run dir (its newest stage)
    candidates = [c for c in rundir.saved_models(p) if _has_weights(c)]
    if not candidates:
        raise ConfigError(
            f"model.init_from={path}: no weights (*.safetensors) there nor in its ckpt/*/final; "
            "point it at a checkpoint folder or a finished run dir"
        )
    return max(candidates, key=lambda c: (c.parent.name, c.name == rundir.MERGED))


def _has_weights(p: Path) -> bool:
    return p.is_dir() and (any(p.glob("*.safetensors")) or (p / "adapter_config.json").exists())


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def config_path(model_cfg) -> str:
    """Where the model's config.json is read from: as `resolve_path`, except that an `init_from` an earlier
    stage of this run has not made yet is read from its base (same architecture)."""
    if model_cfg.get("init_from"):
        try:
            return str(checkpoint_folder(model_cfg.init_from))
        except ConfigError:
            from omegaconf import open_dict

            base = model_cfg.copy()
            with open_dict(base):
                base.init_from = None
            return resolve_path(base)
    return resolve_path(model_cfg)


def model_config(model_cfg):
    """The model's transformers config (config.json only, no weights), read the way `load_model` reads it.

    A hub id is read from the hub or, offline, from the local hub cache; what cannot be read is a
    ConfigError naming `model.path` and the fix, raised before anything loads."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    path = config_path(model_cfg)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        key = "model.init_from" if model_cfg.get("init_from") else "model.path"
        if not is_local(path) and constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"{key}={path}: not in the local hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1; "
                f"download it first (hf download {path}) or set {key} to a local folder"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}={path}: cannot read its config.json ({first}); give a hub id or a folder holding config.json"
        ) from None


def load_processing_class(path: str, model_cfg):
    """Processor for VLMs, tokenizer for LMs, loaded from `path` (folder or hub id).

    Folders saved by this project name `ImageOnlyQwen2_5_VLProcessor`; AutoProcessor does not know that
    class and would silently return the bare tokenizer, so it is loaded explicitly.
    """
    from transformers import AutoProcessor, AutoTokenizer

    if model_cfg.kind == "lm":
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        return tok
    cfg_file = Path(path) / "processor_config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()).get("processor_class") == "ImageOnlyQwen2_5_VLProcessor":
        from reinforce_cot.processing import ImageOnlyQwen2_5_VLProcessor

        processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(path)
    else:
        kwargs = {"max_pixels": model_cfg.image_max_pixels} if model_cfg.get("image_max_pixels") else {}
        processor = AutoProcessor.from_pretrained(path, **kwargs)
    processor.tokenizer.padding_side = "left"  # generation pads on the left
    return processor


def load_model(path: str, model_cfg, dtype: str | None = None, **kwargs):
    """`from_pretrained` with the configured dtype (or `dtype`: `adapters.load_dtype` for training) and attention;
    VLMs via AutoModelForImageTextToText. `kwargs` go to from_pretrained too (QLoRA's quantization_config
    and device_map)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if model_cfg.kind == "vlm" else AutoModelForCausalLM
    dtype = dtype or model_cfg.dtype
    dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    model = auto.from_pretrained(path, dtype=dtype, attn_implementation=model_cfg.attn_implementation, **kwargs)
    _special_tokens_at_top(model.config)
    n = sum(p.numel() for p in model.parameters())
    log.info("loaded %s from %s: %.2f M parameters", type(model).__name__, path, n / 1e6)
    return model


def _special_tokens_at_top(config) -> None:
    """Give a composite (VLM) config the eos/pad/bos ids of its text config at the top level.

    transformers 5's Qwen2.5-VL config keeps them only in `text_config` (a saved top-level value is dropped
    on load), while the Trainer compares the top level with the tokenizer: every VLM stage warned "The
    tokenizer has new PAD/BOS/EOS tokens ..." and appended the EOS id to generation_config once more."""
    text = config.get_text_config()
    if text is config:
        return
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key, None) is None and getattr(text, key, None) is not None:
            setattr(config, key, getattr(text, key))
