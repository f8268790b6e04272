"""Load the model and its processor: tiny ones built in code, hub ids and local folders alike.

The path a model takes is the same for all three: `resolve_path(cfg.model)` gives a hub id or a folder
(building the tiny model first when `model.path` is null), then `load_processing_class` and
`load_model` call `from_pretrained` on it. `model.init_from` swaps in the weights of an earlier
checkpoint (a stage's `final/` or `merged/`, or a run dir, whose newest stage is taken).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

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
    candidates = [p / "merged", p / "final"] + sorted(p.glob("ckpt/*/merged")) + sorted(p.glob("ckpt/*/final"))
    candidates = [c for c in candidates if _has_weights(c)]
    if not candidates:
        raise ConfigError(
            f"model.init_from={path}: no weights (*.safetensors) there nor in its ckpt/*/final; "
            "point it at a checkpoint folder or a finished run dir"
        )
    return max(candidates, key=lambda c: (c.parent.name, c.name == "merged"))


def _has_weights(p: Path) -> bool:
    return p.is_dir() and (any(p.glob("*.safetensors")) or (p / "adapter_config.json").exists())


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


@functools.lru_cache(maxsize=16)
def check_hub_id(repo: str, key: str = "model.path") -> None:
    """A hub id must be readable before anything is written: its config.json from the hub, or with
    HF_HUB_OFFLINE=1 (or no network) from the local hub cache, read as from_pretrained reads it."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(repo)
    except (OSError, ValueError) as e:
        if constants.HF_HUB_OFFLINE:
            why = f"not in the local hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1"
        else:
            why = " ".join(str(e).split()[:40]) or type(e).__name__  # no such repo, no network, gated...
        raise ConfigError(
            f"{key}={repo}: {why}; download it first (hf download {repo}) or give a local folder"
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


def load_model(path: str, model_cfg, **kwargs):
    """`from_pretrained` with the configured dtype and attention; VLMs via AutoModelForImageTextToText.
    `kwargs` go to from_pretrained too (QLoRA's quantization_config and device_map)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if model_cfg.kind == "vlm" else AutoModelForCausalLM
    dtype = getattr(torch, model_cfg.dtype) if model_cfg.dtype != "auto" else "auto"
    model = auto.from_pretrained(path, dtype=dtype, attn_implementation=model_cfg.attn_implementation, **kwargs)
    n = sum(p.numel() for p in model.parameters())
    log.info("loaded %s from %s: %.2f M parameters", type(model).__name__, path, n / 1e6)
    return model
