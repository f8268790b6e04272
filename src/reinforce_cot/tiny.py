"""Tiny models built locally, so the whole pipeline runs on a laptop CPU with no model hub.

What: a byte-level BPE tokenizer trained on the project's own synthetic text (Qwen special tokens, the
reasoning tags `<think>`/`<answer>` as ordinary tokens, a Qwen-style chat template), a random-init
Qwen2.5-VL (`tiny_vlm`) or Qwen2 (`tiny_lm`) built from a small config, and for the VLM a processor
without the video half (the stock one needs torchvision, which does not import beside the CPU torch).

Why: real architectures, real `save_pretrained` folders, real TRL trainers: the loading code that runs
for `Qwen/Qwen2.5-VL-3B-Instruct` is the code that runs here, only the folder differs.

How: `build(cfg.model) -> folder`. The folder is keyed by a hash of the tiny config and reused; the
same seed gives the same weights. `python -m reinforce_cot.tiny` builds the default tiny VLM and prints
where it went.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Qwen2-VL's control tokens: kept so the chat template, the processor and the model config line up
# exactly as they do for the real checkpoints.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Ordinary (non-special) tokens: GRPO decodes with skip_special_tokens=True, so special tags would
# vanish from completions and the format reward could never fire.
REASONING_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen2-VL's template, reduced to what this project sends: string or list content, image parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_root() -> Path:
    """Where tiny models live: $RCOT_CACHE, else ~/.cache/reinforce_cot (outside git, shared by runs)."""
    return Path(os.environ.get("RCOT_CACHE", Path.home() / ".cache" / "reinforce_cot")).expanduser()


def tokenizer_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Text the tokenizer learns from: every synthetic task's prompts and reasoning targets."""
    from reinforce_cot import data

    rows = data.shapes_rows(n, seed=seed, image_size=32) + data.arithmetic_rows(n, seed=seed)
    return [f"{data.DEFAULT_TEMPLATE.format(question=r['question'])}\n{data.target(r)}" for r in rows]


def build_tokenizer(vocab_size: int, seed: int = 0):
    """Train a byte-level BPE with Qwen2's own pre-tokenizer, wrapped as a `Qwen2Tokenizer`.

    transformers 5 rebuilds the Qwen2 pre-tokenizer from its class on load, so the BPE is trained with
    exactly those rules (taken from a blank Qwen2Tokenizer) and `encode` agrees before and after reload.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    blank = Qwen2Tokenizer()  # carries Qwen2's normalizer, pre-tokenizer and decoder
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = blank.backend_tokenizer.normalizer
    bpe.pre_tokenizer = blank.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    spec = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Qwen2Tokenizer(vocab=spec["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TAGS])
    tok.chat_template = CHAT_TEMPLATE
    tok.eos_token = "<|im_end|>"  # generation stops at the end of the assistant turn
    tok.pad_token = "<|endoftext|>"
    return tok


def build(model_cfg) -> Path:
    """Build (or reuse) the tiny model described by `model_cfg.tiny`; return its folder."""
    tiny = dict(model_cfg.tiny)
    kind = model_cfg.kind
    folder = cache_root() / "tiny" / f"{kind}-{_digest({'kind': kind, **tiny})}"
    if (folder / "config.json").exists():
        return folder
    from reinforce_cot import hardware

    if hardware.world_size() > 1 and not hardware.is_main():
        # rank 0 of this job builds it: once torch.distributed is up, save_pretrained writes weights on rank 0
        # only, so a copy built here would lack them
        return _wait_for(folder)
    import torch

    log.info("building tiny %s in %s", kind, folder)
    torch.manual_seed(tiny["seed"])
    tok = build_tokenizer(tiny["vocab_size"], seed=tiny["seed"])
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    if kind == "vlm":
        model, processor = _tiny_vlm(tok, tiny)
        processor.save_pretrained(tmp)
    else:
        model = _tiny_lm(tok, tiny)
        tok.save_pretrained(tmp)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp)
    try:
        tmp.rename(folder)  # atomic: a half-written folder is never taken for a built one
    except OSError:
        if not (folder / "config.json").exists():
            raise
        shutil.rmtree(tmp)  # a parallel job of a sweep, or another rank of this job, built it first
    return folder


def _wait_for(folder: Path, timeout_s: float = 600) -> Path:
    import time

    deadline = time.monotonic() + timeout_s
    while not (folder / "config.json").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 did not build the tiny model in {folder} within {timeout_s:.0f} s; see its log")
        time.sleep(0.2)
    return folder


def _text_config(tok, tiny: dict) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=tiny["hidden_size"],
        intermediate_size=tiny["intermediate_size"],
        num_hidden_layers=tiny["num_layers"],
        num_attention_heads=tiny["num_heads"],
        num_key_value_heads=tiny["num_heads"],
        max_position_embeddings=tiny["max_positions"],
        bos_token_id=None,  # Qwen prompts carry no BOS
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )


def _tiny_lm(tok, tiny: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_text_config(tok, tiny)))


def _tiny_vlm(tok, tiny: dict):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from reinforce_cot.processing import ImageOnlyQwen2_5_VLProcessor, tiny_image_processor

    head_dim = tiny["hidden_size"] // tiny["num_heads"]
    quarter = head_dim // 4  # mrope_section must sum to head_dim / 2 (temporal, height, width)
    text = _text_config(tok, tiny)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
    }
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=tiny["vision_depth"],
            hidden_size=tiny["vision_hidden_size"],
            intermediate_size=tiny["vision_hidden_size"] * 2,
            num_heads=tiny["vision_heads"],
            patch_size=tiny["patch_size"],
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=tiny["patch_size"] * 4,
            fullatt_block_indexes=[tiny["vision_depth"] - 1],
            out_hidden_size=tiny["hidden_size"],  # must equal the text hidden size
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = tiny_image_processor(tiny["patch_size"], tiny["image_pixels"])
    processor = ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE
    )
    return model, processor


if __name__ == "__main__":
    from omegaconf import OmegaConf

    from reinforce_cot.cli import CONF_DIR

    print(build(OmegaConf.load(CONF_DIR / "model" / "tiny_vlm.yaml")))
