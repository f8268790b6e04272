"""Datasets: synthetic tasks made in code, local JSONL + image folders, and formatting for TRL.

Every source yields the same raw rows: `question`, `answer` (a string), `reasoning` (a step-by-step
chain, may be empty), optionally `image` (PIL), and per-row metadata (`difficulty`, counts ...) that
curriculum sampling and per-difficulty evaluation read. `format_split` then turns raw rows into TRL's
conversational columns for the chosen algorithm:

- sft: `prompt` + `completion` (the `<think>reasoning</think><answer>answer</answer>` target)
- grpo/rloo: `prompt` (+ every other column, which TRL hands to reward functions)
- preference (dpo): `prompt`, `chosen`, `rejected` (rows must carry the pair; see reinforce_cot.preference)

Images travel as a single-image `image` column, which TRL's SFT, GRPO and RLOO trainers all accept.

Try it: `python -c "from reinforce_cot import data; print(data.shapes_rows(2, seed=0)[0])"`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from reinforce_cot.errors import ConfigError

DEFAULT_TEMPLATE = "{question} Think step by step in <think></think>, then answer in <answer></answer>."
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 60)}
SHAPES = ("square", "circle")


# --------------------------------------------------------------------------- shapes_count (VLM)
def _draw(img, shape: str, colour: str, cell: tuple[int, int], cell_px: int, rng: random.Random):
    from PIL import ImageDraw

    size = rng.randint(cell_px // 2, cell_px - 3)
    x0 = cell[0] * cell_px + rng.randint(1, cell_px - size - 1)
    y0 = cell[1] * cell_px + rng.randint(1, cell_px - size - 1)
    box = (x0, y0, x0 + size, y0 + size)
    draw = ImageDraw.Draw(img)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])


def shapes_rows(
    n: int,
    seed: int,
    image_size: int = 64,
    max_count: int = 5,
    max_distractors: int = 4,
    grid: int = 4,
    targets: list[str] | None = None,
) -> list[dict[str, Any]]:
    """`n` images of coloured squares and circles with "How many <colour> <shape>s are there?".

    Shapes sit in distinct cells of a `grid` x `grid` layout so that none overlap. The reasoning target
    counts the targets one by one, then names the distractors it ignored. `targets` ("red square", ...)
    limits what is asked about (default: every colour and shape); distractors use the other kinds.
    `difficulty` (0-2) grows with the count and the number of distractors.

    >>> row = shapes_rows(1, seed=0, targets=["red square"])[0]
    >>> row["question"], row["answer"] == str(row["count"]), row["image"].size
    ('How many red squares are there?', True, (64, 64))
    """
    from PIL import Image

    rng = random.Random(seed)
    cell_px = image_size // grid
    kinds_asked = [tuple(t.split()) for t in targets] if targets else [(c, s) for c in COLOURS for s in SHAPES]
    rows = []
    for i in range(n):
        colour, shape = rng.choice(kinds_asked)
        count = rng.randint(1, max_count)
        distractors = rng.randint(0, min(max_distractors, grid * grid - count))
        others = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != (colour, shape)]
        cells = rng.sample([(x, y) for x in range(grid) for y in range(grid)], count + distractors)
        img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
        kinds = [(colour, shape)] * count + [rng.choice(others) for _ in range(distractors)]
        for (c, s), cell in zip(kinds, cells):
            _draw(img, s, c, cell, cell_px, rng)
        steps = ", ".join(str(k) for k in range(1, count + 1))
        ignored = f" I ignore {distractors} other shapes." if distractors else ""
        rows.append(
            {
                "id": f"shapes-{seed}-{i}",
                "image": img,
                "question": f"How many {colour} {shape}s are there?",
                "reasoning": f"I count the {colour} {shape}s: {steps}.{ignored} So there are {count}.",
                "answer": str(count),
                "count": count,
                "distractors": distractors,
                "difficulty": min(2, (count - 1) // 2 + (distractors >= 3)),
                "layout": json.dumps(sorted(zip(cells, kinds))),
            }
        )
    return rows


# ----------------------------------------------------------------------- arithmetic (text only)
def arithmetic_rows(n: int, seed: int, max_value: int = 99) -> list[dict[str, Any]]:
    """`n` additions "What is a + b?" with a digit-by-digit reasoning chain; difficulty = carries.

    >>> arithmetic_rows(1, seed=0)[0]["question"]
    'What is 49 + 97?'
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, max_value), rng.randint(0, max_value)
        ones = a % 10 + b % 10
        carry = ones // 10
        tens = a // 10 + b // 10 + carry
        reasoning = (
            f"Ones: {a % 10} + {b % 10} = {ones}, write {ones % 10} carry {carry}. "
            f"Tens: {a // 10} + {b // 10} + {carry} = {tens}. So {a} + {b} = {a + b}."
        )
        rows.append(
            {
                "id": f"arith-{seed}-{i}",
                "question": f"What is {a} + {b}?",
                "reasoning": reasoning,
                "answer": str(a + b),
                "difficulty": carry + (tens >= 10),
                "layout": f"{a}+{b}",
            }
        )
    return rows


# ---------------------------------------------------------------------------- local JSONL files
def jsonl_rows(path: str, image_folder: str | None, fields: dict[str, str]) -> list[dict[str, Any]]:
    """Rows of a JSONL file in the seeds' format: image (relative to `image_folder`), question, answer,
    reasoning; any other key (id, difficulty, pass_rate, ...) is kept as a column. A row without a question
    or answer, or whose image is missing or not an image, stops the load with an error that names the
    file, the line and the fix."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data.path={path}: no such file; point data.path at a .jsonl file")
    rows = []
    for lineno, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg}); fix or remove the line") from None
        row = {k: rec.get(src) for k, src in fields.items()}
        for key in ("question", "answer"):
            if row.get(key) in (None, ""):
                raise ConfigError(f"{where}: no '{fields[key]}' field; every row needs a {key}")
        row["answer"] = str(row["answer"])
        if isinstance(row.get("reasoning"), list):  # the seeds also store reasoning as a list of lines
            row["reasoning"] = "\n".join(row["reasoning"])
        row["reasoning"] = row.get("reasoning") or ""
        if row.get("image") is not None:
            if image_folder is None:
                raise ConfigError(f"{where}: row has an image but data.image_folder is not set; set it")
            img_path = Path(image_folder).expanduser() / row["image"]
            try:
                with Image.open(img_path) as im:
                    row["image"] = im.convert("RGB")
            except FileNotFoundError:
                raise ConfigError(
                    f"{where}: image {img_path} does not exist; fix the path or data.image_folder"
                ) from None
            except (UnidentifiedImageError, OSError):
                raise ConfigError(f"{where}: {img_path} is not an image; replace the file or drop the row") from None
        else:
            row.pop("image", None)
        for key in ("chosen", "rejected"):  # optional preference pair (for algo=dpo)
            if key in row and row[key] is None:
                del row[key]
        for key, value in rec.items():  # other columns (id, difficulty, pass_rate, ...) travel with the row
            if key not in fields.values():
                row.setdefault(key, value)
        row.setdefault("id", f"{p.stem}-{lineno}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"data.path={path}: the file holds no rows; add rows or pick another dataset")
    return rows


# --------------------------------------------------------------------------------- formatting
def prompt_messages(row: dict, template: str, system: str | None, with_image: bool) -> list[dict]:
    text = template.format(question=row["question"])
    content: Any = [{"type": "image"}, {"type": "text", "text": text}] if with_image else text
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def target(row: dict) -> str:
    """The SFT target: the reasoning chain inside <think>, the answer inside <answer>."""
    return f"<think>{row['reasoning']}</think><answer>{row['answer']}</answer>"


def format_split(rows: list[dict], data_cfg, algo_kind: str, with_image: bool):
    """Raw rows -> a `datasets.Dataset` in TRL's conversational format for `algo_kind`."""
    from datasets import Dataset

    out = []
    for row in rows:
        rec = {k: v for k, v in row.items() if k not in ("image", "layout")}
        rec["prompt"] = prompt_messages(row, data_cfg.prompt_template, data_cfg.system_prompt, with_image)
        if algo_kind == "sft":
            rec["completion"] = [{"role": "assistant", "content": target(row)}]
        if algo_kind == "preference":  # DPO takes only the pair (other columns would be dropped anyway)
            from reinforce_cot.preference import as_messages

            rec = {
                "prompt": rec["prompt"],
                "chosen": as_messages(row["chosen"]),
                "rejected": as_messages(row["rejected"]),
            }
        if with_image:
            rec["image"] = row["image"]
        out.append(rec)
    return Dataset.from_list(out)


def disjoint(train: list[dict], test: list[dict]) -> list[dict]:
    """Drop test rows whose content also occurs in train, so held-out accuracy is really held out."""
    seen = {r["layout"] for r in train}
    return [r for r in test if r["layout"] not in seen]
