"""Synthetic generators are deterministic and correct; JSONL loading names bad rows and decodes no image;
TRL formatting of the split contract (prompts, image placeholders, `<image>` markers)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from reinforce_cot import data, images
from reinforce_cot.errors import ConfigError


def test_shapes_are_deterministic_per_seed():
    a, b, c = data.shapes_rows(20, seed=3), data.shapes_rows(20, seed=3), data.shapes_rows(20, seed=4)
    assert [r["question"] for r in a] == [r["question"] for r in b]
    assert all(x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, b))
    assert [r["layout"] for r in a] != [r["layout"] for r in c]


def _blobs(image, colour) -> list[set]:
    """The 4-connected sets of pixels of exactly `colour`."""
    w, h = image.size
    todo = {(x, y) for y in range(h) for x in range(w) if image.getpixel((x, y)) == colour}
    blobs = []
    while todo:
        blob, stack = set(), [todo.pop()]
        while stack:
            x, y = stack.pop()
            blob.add((x, y))
            for nxt in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if nxt in todo:
                    todo.remove(nxt)
                    stack.append(nxt)
        blobs.append(blob)
    return blobs


def _fills_its_box(blob: set) -> bool:
    xs, ys = [x for x, _ in blob], [y for _, y in blob]
    return len(blob) == (max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1)


def test_shapes_answers_match_what_is_drawn():
    for row in data.shapes_rows(50, seed=0, targets=["red square"]):
        kinds = [tuple(k) for _, k in json.loads(row["layout"])]
        assert kinds.count(("red", "square")) == int(row["answer"]) == row["count"]
        assert len(kinds) - row["count"] == row["distractors"]
        assert row["question"] == "How many red squares are there?"
        assert f"So there are {row['answer']}." in row["reasoning"]
        assert row["difficulty"] in (0, 1, 2)
        # the image really holds `count` red squares: each red shape is one blob of pixels in its own cell, a
        # square fills its bounding box and a circle does not (red circles may be among the distractors)
        blobs = _blobs(row["image"], data.COLOURS["red"])
        squares = sum(map(_fills_its_box, blobs))
        assert (squares, len(blobs) - squares) == (row["count"], kinds.count(("red", "circle")))


def test_splits_are_disjoint():
    train = data.shapes_rows(500, seed=0, max_count=1, max_distractors=0)  # few layouts: many collisions
    test = data.disjoint(train, data.shapes_rows(200, seed=1, max_count=1, max_distractors=0))
    train_layouts = {r["layout"] for r in train}
    assert test and all(r["layout"] not in train_layouts for r in test)


def test_arithmetic_reasoning_is_right():
    for row in data.arithmetic_rows(100, seed=0):
        a, b = map(int, row["question"][len("What is ") : -1].split(" + "))
        assert row["answer"] == str(a + b) and row["reasoning"].endswith(f"= {a + b}.")


def _jsonl(tmp_path, rows, images=()):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in images:
        Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / name)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path), str(folder)


FIELDS = {"image": "image", "question": "question", "answer": "answer", "reasoning": "reasoning"}


def test_jsonl_loads_the_seeds_format(tmp_path):
    path, folder = _jsonl(
        tmp_path,
        [{"image": "a.png", "question": "Q?", "answer": 2, "reasoning": ["Step 1", "Step 2"]}],
        images=["a.png"],
    )
    ds = data.jsonl_rows(path, folder, FIELDS)
    assert ds.features["image"].__class__.__name__ == "Image" and ds.data.column("image")[0]["bytes"].as_py() is None
    (row,) = images.capped(ds, None)  # the stored path is decoded only here, when the row is read
    assert row["answer"] == "2" and row["reasoning"] == "Step 1\nStep 2" and row["images"][0].size == (16, 16)


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([{"question": "Q?", "answer": "1"}, {"question": "Q2?"}], "data.jsonl:2: no 'answer' field"),
        ([{"image": "missing.png", "question": "Q?", "answer": "1"}], "missing.png does not exist"),
        ([{"image": "bad.png", "question": "Q?", "answer": "1"}], "bad.png is not an image"),
    ],
)
def test_jsonl_bad_rows_name_the_line_and_file(tmp_path, rows, needle):
    path, folder = _jsonl(tmp_path, rows)
    (tmp_path / "images" / "bad.png").write_text("not a png")
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        data.jsonl_rows(path, folder, FIELDS)


def test_format_for_trl():
    rows = data.from_rows(data.shapes_rows(2, seed=0))
    cfg = OmegaConf.create({"prompt_template": data.DEFAULT_TEMPLATE, "system_prompt": None})
    sft = data.format_split(rows, cfg, "sft", max_pixels=1024, factor=16)
    rl = data.format_split(rows, cfg, "rl", max_pixels=1024, factor=16)
    assert sft[0]["prompt"][0]["content"][0]["type"] == "image"
    assert sft[0]["completion"][0]["content"] == data.target(sft.with_format(None)[0])
    assert set(sft[0]) == {"prompt", "completion", "images"} and sft[0]["images"][0].size == (32, 32)  # capped
    assert "completion" not in rl[0] and {"answer", "difficulty", "images", "id"} <= set(rl[0])
    text = data.format_split(data.from_rows(data.arithmetic_rows(1, seed=0)), cfg, "rl")
    assert isinstance(text[0]["prompt"][0]["content"], str) and text.format["type"] is None  # mapped, no view


def test_image_markers_place_the_images():
    row = {"question": "Left: <image> right: <image> Which has more?", "images": [object(), object()]}
    (msg,) = data.prompt_messages(row, "{question}")
    assert [b["type"] for b in msg["content"]] == ["text", "image", "text", "image", "text"]
    row = {"question": "How many?", "images": [object(), object()], "system": "Be brief."}
    sys_msg, user = data.prompt_messages(row, "{question}")
    assert sys_msg["content"] == [{"type": "text", "text": "Be brief."}]
    assert [b["type"] for b in user["content"]] == ["image", "image", "text"]  # no markers: TRL's place, first
    own = {"prompt": [{"role": "user", "content": "2+2?"}], "question": "2+2?"}
    assert data.prompt_messages(own, "{question} Think.") == own["prompt"]  # TRL's layout: as it is
    assert data.prompt_messages(own, "{question} Answer.", own_prompt=False)[0]["content"] == "2+2? Answer."
