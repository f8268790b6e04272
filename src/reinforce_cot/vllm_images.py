"""Image prompts for vLLM rollouts in GRPO/RLOO: one placeholder per image, the image at the trainer's size.

Why: TRL 1.16 tokenizes a VLM prompt with the processor, which expands each image placeholder
(`<|image_pad|>`) into N image tokens, and hands those ids plus the image to vLLM. A colocated vLLM runs
its own multimodal processor on them and expands the first placeholder again (M tokens), leaving N-1
stray pads as text: the rollouts are conditioned on a corrupted prompt and nothing fails (trl#6294;
the fix, trl PR #6718, is not in 1.16). Server mode is different: the server processes the images on
their own (`/v1/chat/completions/render`) and TRL points the returned features at the runs of image
tokens in the trainer's expanded ids (`VLLMGeneration._place_features`), so there the expanded ids are
right, provided each run is as long as the server's count for that image, which 1.16 does not check.

What `VLLMImagePromptsMixin` does, composed onto the configured trainer class (`with_vllm_images`, the
pattern of `sampling.with_sampler`):

- colocate: each run of image tokens in the ids sent to vLLM becomes one placeholder, which is exactly
  the tokenizer-only render of the chat template (the processor replaces the one special token by N
  copies and leaves the rest of the text alone); the trainer keeps its expanded ids for the loss;
- server: the expanded ids stay, and each run's length is checked against the server's per-image token
  count; a mismatch (a server started with another pixel budget or model) stops the run with the fix;
- both: images go to vLLM resized by `images.fit` to `model.image_max_pixels`, the size the trainer's
  processor gives them, so vLLM (hub default budget, 12.8 M pixels) cuts them into the same number of
  tokens. Data loading already fits images; this guards any path that did not.

This applies to processors that expand one image token into a run (Qwen2-VL, Qwen2.5-VL: the families
in conf/model/). Checked at the token level on CPU with a recording stand-in for `vllm.LLM` and for
TRL's server client (tests/test_vllm_images.py); vLLM itself has not run here.

    python train.py algo=gspo hardware=2xa100 model=qwen2_5_vl_3b
"""

from __future__ import annotations

import functools
import logging

from reinforce_cot import images as images_lib

log = logging.getLogger(__name__)


def unexpand(ids: list[int], token_id: int) -> list[int]:
    """`ids` with every run of `token_id` shortened to one token.

    >>> unexpand([1, 9, 9, 9, 2, 9, 9, 3], 9)
    [1, 9, 2, 9, 3]
    """
    return [t for i, t in enumerate(ids) if t != token_id or i == 0 or ids[i - 1] != token_id]


def runs(ids: list[int], token_id: int) -> list[int]:
    """Lengths of the runs of `token_id` in `ids`, in order.

    >>> runs([1, 9, 9, 9, 2, 9, 9, 3], 9)
    [3, 2]
    """
    out: list[int] = []
    for i, t in enumerate(ids):
        if t == token_id:
            if i and ids[i - 1] == token_id:
                out[-1] += 1
            else:
                out.append(1)
    return out


class ServerImageTokenMismatch(ValueError):
    """The vLLM server cut an image into another number of tokens than the trainer's processor did."""


class VLLMImagePromptsMixin:
    """Unexpanded image prompts for a colocated vLLM, checked image runs for a vLLM server (module doc)."""

    def __init__(self, *args, image_max_pixels=None, image_factor=28, **kwargs):
        self._rc_image_fit = (image_max_pixels, image_factor)
        super().__init__(*args, **kwargs)
        if self.use_vllm and self.vllm_mode == "server":
            gen = self.vllm_generation
            # the one hook TRL offers between the server's features and the request: wrapped on this instance
            gen._place_features = functools.partial(_checked_place_features, gen._place_features)

    def _generate_single_turn(self, prompt_ids, images, *args, **kwargs):
        if self.use_vllm and images is not None:
            max_pixels, factor = self._rc_image_fit
            images = [
                None if imgs is None else [images_lib.fit(im, max_pixels, factor) for im in imgs] for imgs in images
            ]
            if self.vllm_mode == "colocate":
                token = self.processing_class.image_token_id
                prompt_ids = [unexpand(list(ids), token) for ids in prompt_ids]
        return super()._generate_single_turn(prompt_ids, images, *args, **kwargs)


def _checked_place_features(place, features, prompt_ids):
    """TRL's `_place_features`, then: every run of image tokens as long as the server's count for its image."""
    placed = place(features, prompt_ids)
    if features is None:
        return placed
    server = [p["length"] for p in features["mm_placeholders"]["image"]]
    trainer = [p["length"] for p in placed["mm_placeholders"]["image"]]
    if server != trainer:
        raise ServerImageTokenMismatch(
            f"the vLLM server cut the images of a prompt into {server} tokens, the trainer's processor into "
            f"{trainer}: serve the trainer's own model folder with --mm-processor-kwargs "
            "'{\"max_pixels\": <model.image_max_pixels>}' (README: vLLM server mode)"
        )
    return placed


def with_vllm_images(trainer_factory, model_cfg):
    """`trainer_factory` (a partial of a TRL GRPO/RLOO trainer class) with `VLLMImagePromptsMixin` on top."""
    func = trainer_factory.func if isinstance(trainer_factory, functools.partial) else trainer_factory
    bound = trainer_factory.keywords if isinstance(trainer_factory, functools.partial) else {}
    cls = type(f"{func.__name__}VLLMImages", (VLLMImagePromptsMixin, func), {})
    fit = {"image_max_pixels": model_cfg.get("image_max_pixels"), "image_factor": model_cfg.get("image_factor", 28)}
    return functools.partial(cls, **bound, **fit)


def needed(cfg) -> bool:
    """GRPO/RLOO generating with vLLM on image data."""
    return cfg.algo.kind == "rl" and bool(cfg.algo.args.get("use_vllm")) and cfg.data.modality == "image"
