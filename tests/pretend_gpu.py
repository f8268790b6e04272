"""This CPU machine made to look like a GPU box for validation only: GPUs, packages and hub models.

- `use_hub(monkeypatch, root)`: a local Hugging Face hub cache holding only config.json for
  Qwen2.5-VL-3B/7B-Instruct, with the published dimensions, so that validation reads model configs offline
  through the same `AutoConfig.from_pretrained(<hub id>)` that users' runs call (HF_HUB_CACHE layout:
  models--<org>--<name>/snapshots/<rev>/config.json + refs/main). No weights: the memory estimate and the
  parts/peft checks build the model on the meta device (3.75 B and 8.29 B parameters, as published).
- `gpus(monkeypatch, n)`: `torch.cuda` reports n bf16-capable GPUs, `torch.cuda.set_device` does nothing,
  and vllm / bitsandbytes look installed. Nothing may run on these "GPUs": only composition and
  validation (TrainingArguments' own checks included) are meant to go through. Call `forget()` after the
  test (an autouse fixture in each module that pretends), so that no process-wide state built while
  pretending (accelerate's shared device, cached CUDA checks) reaches the next test in this process.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REV = "0" * 40  # any commit hash: refs/main points at it

_VISION = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}
_COMMON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 128000,
    "model_type": "qwen2_5_vl",
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
CONFIGS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        **_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "max_window_layers": 70,
        "num_attention_heads": 16,
        "num_hidden_layers": 36,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
        "vision_config": {**_VISION, "out_hidden_size": 2048},
    },
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        **_COMMON,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        "vocab_size": 152064,
        "vision_config": {**_VISION, "out_hidden_size": 3584},
    },
}


def make_cache(root: Path) -> Path:
    """Write the cache under `root` (use it as HF_HUB_CACHE); returns `root`."""
    for repo, config in CONFIGS.items():
        base = root / f"models--{repo.replace('/', '--')}"
        snap = base / "snapshots" / REV
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "config.json").write_text(json.dumps(config, indent=2))
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(REV)
    return root


def use_hub(monkeypatch, root: Path) -> Path:
    """Point this process' hub client at a fresh fake cache under `root`, offline (huggingface_hub reads
    HF_HUB_CACHE / HF_HUB_OFFLINE when imported, so its constants are patched as well as the env)."""
    import huggingface_hub.constants as hc

    cache = make_cache(root)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return cache


GPU_ONLY_PACKAGES = ("vllm", "bitsandbytes")


def gpus(monkeypatch, n: int = 8) -> None:
    """`n` visible bf16 GPUs and the GPU-only packages, for validation (see the module docstring)."""
    import torch
    import transformers.training_args as ta

    # TRL imports vllm at module level where find_spec finds it (trl.generation): its trainers must be imported
    # before vllm "appears", or the first test to pretend in a process fails on `import vllm`
    for module in ("trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer"):
        importlib.import_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda: True)
    find_spec = importlib.util.find_spec

    def spec(name, *args, **kwargs):
        if name in GPU_ONLY_PACKAGES:
            return importlib.util.spec_from_loader(name, loader=None)
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", spec)


def forget() -> None:
    """Drop process-wide state that may remember the pretended GPUs."""
    from accelerate.state import AcceleratorState
    from transformers.utils import import_utils

    AcceleratorState._reset_state(reset_partial_state=True)
    import_utils.is_torch_cuda_available.cache_clear()
