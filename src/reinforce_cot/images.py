"""One pixel budget per image, applied where an image is decoded, so that every consumer sees the same image.

Why: the trainer's processor caps images at `model.image_max_pixels`, but vLLM, a served model and a
fresh hub processor use the hub default (12.8 M pixels for Qwen2.5-VL): for a larger image they would
cut it into a different number of visual tokens than the trainer did. Resizing once, when data loads,
to the size Qwen's `smart_resize` would pick (sides multiples of `model.image_factor` = patch x merge,
at most `image_max_pixels` pixels) gives an image every Qwen-VL processor leaves as it is, whatever its
own cap. It also bounds memory: an 8000x8000 image is ~64 M pixels before the cap, ~0.4 M after.

    >>> from PIL import Image
    >>> fit(Image.new("RGB", (8000, 8000)), max_pixels=401408, factor=28).size
    (616, 616)
    >>> fit(Image.new("RGB", (64, 64)), max_pixels=4096, factor=16).size   # already fits: unchanged
    (64, 64)
"""

from __future__ import annotations


def fit(img, max_pixels: int | None, factor: int = 28):
    """`img` as RGB, resized (bicubic, as Qwen's processors do) to the size smart_resize would give it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    img = img if img.mode == "RGB" else img.convert("RGB")
    if not max_pixels:
        return img
    w, h = img.size
    new_h, new_w = smart_resize(h, w, factor=factor, min_pixels=factor * factor, max_pixels=int(max_pixels))
    if (new_w, new_h) == (w, h):
        return img
    from PIL import Image

    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)
