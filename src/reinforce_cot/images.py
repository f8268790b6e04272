"""One pixel budget per image, applied where an image is decoded, so that every consumer sees the same image.

Why: the trainer's processor caps images at `model.image_max_pixels`, but vLLM, a served model and a
fresh hub processor use the hub default (12.8 M pixels for Qwen2.5-VL): for a larger image they would
cut it into a different number of visual tokens than the trainer did. Resizing where the image is
decoded to the size Qwen's `smart_resize` would pick (sides multiples of `model.image_factor` = patch x
merge, at most `image_max_pixels` pixels) gives an image every Qwen-VL processor leaves as it is,
whatever its own cap. It also bounds memory: an 8000x8000 image is ~64 M pixels before the cap, ~0.4 M
after, and only the rows being read are decoded at all.

How: `capped(ds, max_pixels, factor)` is a `datasets` view (`with_transform`) that decodes and fits the
images of each row when it is read; every split a stage hands to its trainer, evaluator, curation or
rejection sampling is such a view (reinforce_cot.recipes), so all of them see the same pixels.

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


def decode_view(batch: dict, max_pixels: int | None, factor: int, row_fn=None) -> dict:
    """The `datasets` transform behind `capped`: it runs on each batch read from the dataset (a trainer's
    batch, a row an evaluator indexes), never on the whole dataset. `datasets` has decoded the image
    column(s) to PIL by then; every image is fitted to the pixel budget and the rows get TRL's `images`
    list (one entry per image, [] for none), whichever column stored them. `row_fn(batch) -> batch` then
    builds what the consumer reads (TRL's columns)."""
    found = [batch.pop(col) for col in ("image", "images") if col in batch]
    if found:
        per_row = [[] for _ in found[0]]
        for cells in found:
            for imgs, cell in zip(per_row, cells):
                imgs += [c for c in (cell if isinstance(cell, list) else [cell]) if c is not None]
        batch["images"] = [[fit(im, max_pixels, factor) for im in imgs] for imgs in per_row]
    return row_fn(batch) if row_fn is not None else batch


def capped(ds, max_pixels: int | None, factor: int = 28, row_fn=None):
    """A view of `ds` whose images are decoded when a row is read and fitted to `max_pixels` (see `fit`).

    Storage is untouched (bytes or paths stay in the memory-mapped arrow files); `select`, `shard`,
    `filter` and `remove_columns` keep the view. A dataset without images comes back as it is."""
    import functools

    if not {"image", "images"} & set(ds.column_names):
        return ds
    return ds.with_transform(functools.partial(decode_view, max_pixels=max_pixels, factor=factor, row_fn=row_fn))
