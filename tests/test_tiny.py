"""Tiny models: built offline, deterministic, and reloaded through the same from_pretrained path."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file

from reinforce_cot import data, models, tiny

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def _cfg(name="tiny_vlm"):
    base = OmegaConf.load(CONF / "tiny_vlm.yaml")
    return OmegaConf.merge(base, {"name": "tiny_lm", "kind": "lm"}) if name == "tiny_lm" else base


def test_build_is_cached_and_deterministic(tmp_path, monkeypatch):
    first = tiny.build(_cfg())
    assert tiny.build(_cfg()) == first  # same config -> same folder, not rebuilt
    monkeypatch.setenv("RCOT_CACHE", str(tmp_path))
    second = tiny.build(_cfg())
    assert second != first
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_tokenizer_round_trips_and_keeps_reasoning_tags():
    cfg = _cfg()
    processor = models.load_processing_class(str(tiny.build(cfg)), cfg)
    assert type(processor).__name__ == "ImageOnlyQwen2_5_VLProcessor"  # not silently the bare tokenizer
    fresh = tiny.build_tokenizer(cfg.tiny.vocab_size, seed=cfg.tiny.seed)
    text = data.DEFAULT_TEMPLATE.format(question="How many red squares are there?") + data.target(
        data.shapes_rows(1, seed=0)[0]
    )
    ids = processor.tokenizer.encode(text)
    assert ids == fresh.encode(text)
    # the tags survive skip_special_tokens, which GRPO decodes with
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_vlm_generates_from_an_image_and_lm_from_text():
    import torch

    cfg = _cfg()
    path = str(tiny.build(cfg))
    processor, model = models.load_processing_class(path, cfg), models.load_model(path, cfg)
    row = data.shapes_rows(1, seed=0)[0]
    prompt = processor.apply_chat_template(
        data.prompt_messages(row, data.DEFAULT_TEMPLATE, None, True), add_generation_prompt=True, tokenize=False
    )
    enc = processor(text=[prompt], images=[row["image"]], return_tensors="pt")
    assert enc["pixel_values"].shape[0] == 64  # 64x64 image, 8x8 patches
    assert (enc["input_ids"] == model.config.image_token_id).sum() == 16  # 2x2 patches merge into one token
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3

    lm_cfg = _cfg("tiny_lm")
    lm_path = str(tiny.build(lm_cfg))
    tok, lm = models.load_processing_class(lm_path, lm_cfg), models.load_model(lm_path, lm_cfg)
    assert type(lm).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        logits = lm(**tok(["What is 1 + 2?"], return_tensors="pt")).logits
    assert logits.shape[-1] == len(tok)


def test_trainer_finds_the_model_and_tokenizer_special_tokens_aligned():
    # transformers' Trainer aligns the model's eos/pad/bos with the tokenizer's and warns when it changed
    # something. Qwen2.5-VL's config keeps them in text_config only, so every VLM stage used to warn and
    # append the EOS id to generation_config again ([2] -> [2, 2] -> ...).
    from unittest import mock

    from transformers import trainer_utils

    for name in ("tiny_vlm", "tiny_lm"):
        cfg = _cfg(name)
        path = str(tiny.build(cfg))
        model, processing_class = models.load_model(path, cfg), models.load_processing_class(path, cfg)
        with mock.patch.object(trainer_utils.logger, "warning") as warning:
            trainer_utils.align_special_tokens(model, processing_class)
        assert not warning.called, (name, warning.call_args)
        assert model.generation_config.eos_token_id in (2, [2])
