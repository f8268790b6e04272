"""A Qwen2.5-VL processor without the video half, on the PIL image processor.

Why: the stock `Qwen2_5_VLProcessor` builds a video processor that needs torchvision, and PyPI's
torchvision does not import beside the CPU torch wheel. Images are all this project sends, so the
processor keeps the image processor and the tokenizer only. Saved folders name this class in
`processor_config.json`; `models.load_processing_class` reads that name and loads it explicitly,
because AutoProcessor silently falls back to the bare tokenizer for an unknown processor class.
"""

from __future__ import annotations

from transformers import ProcessorMixin
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` minus video: same prompt expansion, same outputs for images."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def tiny_image_processor(patch_size: int, max_pixels: int):
    """Qwen2-VL's image processing with the PIL backend (no torchvision), sized for tiny images."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch_size * 2  # one merged token covers 2x2 patches
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": factor * factor, "longest_edge": max_pixels},
    )
