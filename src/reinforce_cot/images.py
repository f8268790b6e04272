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
`data_url` is how an image leaves as text: to an OpenAI-compatible server, or inline in samples.html.

    >>> from PIL import Image
    >>> fit(Image.new("RGB", (8000, 8000)), max_pixels=401408, factor=28).size
    (616, 616)
    >>> fit(Image.new("RGB", (64, 64)), max_pixels=4096, factor=16).size   # already fits: unchanged
    (64, 64)
"""

from __future__ import annotations

import io
import os

# First bytes of the formats PIL reads (WEBP: RIFF....WEBP); what the load-time check recognises.
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def looks_like_image(head: bytes) -> bool:
    r"""Whether a file or cell starts like an image (PNG, JPEG, GIF, BMP, TIFF, WEBP).

    >>> looks_like_image(b"\x89PNG\r\n\x1a\n..."), looks_like_image(b"not a png")
    (True, False)
    """
    return head.startswith(SIGNATURES) and (not head.startswith(b"RIFF") or head[8:12] == b"WEBP")


def target_size(w: int, h: int, max_pixels: int | None, factor: int = 28) -> tuple[int, int]:
    """(width, height) that `fit` gives a w x h image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    if not max_pixels:
        return w, h
    new_h, new_w = smart_resize(h, w, factor=factor, min_pixels=factor * factor, max_pixels=int(max_pixels))
    return new_w, new_h


def fit(img, max_pixels: int | None, factor: int = 28):
    """`img` as RGB, resized (bicubic, as Qwen's processors do) to the size smart_resize would give it."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    size = target_size(*img.size, max_pixels, factor)
    if size == img.size:
        return img
    from PIL import Image

    return img.resize(size, Image.Resampling.BICUBIC)


def decode(cell, max_pixels: int | None, factor: int = 28):
    """One stored image cell (`datasets.Image` storage: bytes and/or a path; or a PIL image) decoded and
    fitted. A JPEG is decoded straight at the nearest reduced scale (PIL's draft mode): an 8000x8000 photo
    never exists at full size in memory."""
    from PIL import Image

    if isinstance(cell, Image.Image):
        img = cell
    elif cell.get("bytes"):
        img = Image.open(io.BytesIO(cell["bytes"]))
    elif cell.get("path") and os.path.isfile(cell["path"]):
        img = Image.open(cell["path"])
    else:  # a remote or repo-relative path: datasets knows how to fetch it
        from datasets import Image as ImageFeature

        img = ImageFeature().decode_example(cell)
    if img.format == "JPEG" and max_pixels:
        img.draft("RGB", target_size(*img.size, max_pixels, factor))
    img.load()
    return fit(img, max_pixels, factor)


def decode_view(batch: dict, max_pixels: int | None, factor: int, row_fn=None) -> dict:
    """The `datasets` transform behind `capped`: it runs on each batch read from the dataset (a trainer's
    batch, a row an evaluator indexes), never on the whole dataset. Every stored image is decoded and
    fitted to the pixel budget here, and the rows get TRL's `images` list (one entry per image, [] for
    none), whichever column stored them. `row_fn(batch) -> batch` then builds what the consumer reads
    (TRL's columns). An image that cannot be decoded stops with the row's id."""
    from reinforce_cot.errors import ConfigError

    found = [(col, batch.pop(col)) for col in ("image", "images") if col in batch]
    if found:
        ids = batch.get("id") or list(range(len(found[0][1])))
        per_row: list[list] = [[] for _ in found[0][1]]
        for col, cells in found:
            for row_id, imgs, cell in zip(ids, per_row, cells):
                for item in cell if isinstance(cell, list) else [cell]:
                    if item is None:
                        continue
                    try:
                        imgs.append(decode(item, max_pixels, factor))
                    except (OSError, ValueError) as e:
                        raise ConfigError(
                            f"row {row_id}: column '{col}' holds an image that cannot be decoded ({e}); fix or drop "
                            "the row"
                        ) from None
        batch["images"] = per_row
    return row_fn(batch) if row_fn is not None else batch


def capped(ds, max_pixels: int | None, factor: int = 28, row_fn=None):
    """A view of `ds` whose images are decoded when a row is read and fitted to `max_pixels` (see `fit`).

    Storage is untouched (bytes or paths stay in the memory-mapped arrow files: `datasets` is told not to
    decode them, `decode` does); `select`, `shard`, `filter` and `remove_columns` keep the view. A
    dataset without images comes back as it is."""
    import functools

    from datasets import Image, List

    for col, undecoded in (("image", Image(decode=False)), ("images", List(Image(decode=False)))):
        if col in ds.column_names and ds.features[col] != undecoded:
            ds = ds.cast_column(col, undecoded)
    if not {"image", "images"} & set(ds.column_names):
        return ds
    return ds.with_transform(functools.partial(decode_view, max_pixels=max_pixels, factor=factor, row_fn=row_fn))


def data_url(image, side: int | None = None) -> str:
    """A PIL image as a `data:image/png;base64,...` URL: what OpenAI-style servers accept (the exact
    pixels) and what an HTML page shows inline. `side` rescales it first so that its longer side is `side`
    pixels (nearest neighbour: drawn shapes stay crisp).

    >>> from PIL import Image
    >>> data_url(Image.new("RGB", (2, 1)), side=4)[:30]
    'data:image/png;base64,iVBORw0K'
    """
    import base64

    if side:
        from PIL import Image

        scale = side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
