"""Small datasets written locally in the layouts researchers bring (hub parquet shards with a README config,
a save_to_disk folder, ShareGPT JSON with image files, a problem/solution parquet), for data=hf tests.

Rows come from the synthetic shapes and arithmetic tasks, so that their answers are right and checkable.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from reinforce_cot import data


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _shapes(n: int, seed: int) -> list[dict]:
    return data.shapes_rows(n, seed=seed, image_size=32)  # 32 px: the tiny VLM's smallest useful size


def hub_folder(root: Path, n_train: int = 24, n_test: int = 8) -> Path:
    """A hub-layout folder: data/train-0000{0,1}-of-00002.parquet, data/test-...parquet, README.md with
    two configs (`default`, `small`); columns problem, solution (R1-V style `<answer>`), image (bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image, Value

    features = Features({"problem": Value("string"), "solution": Value("string"), "image": Image()})
    folder = root / "hub_shapes"
    (folder / "data").mkdir(parents=True, exist_ok=True)

    def write(rows, name):
        table = pa.table(
            {
                "problem": [r["question"] for r in rows],
                "solution": [f"<think>{r['reasoning']}</think><answer>{r['answer']}</answer>" for r in rows],
                "image": [{"bytes": png(r["image"]), "path": None} for r in rows],
            },
            schema=features.arrow_schema,
        )
        pq.write_table(table, folder / "data" / name)

    train = _shapes(n_train, seed=0)
    write(train[: n_train // 2], "train-00000-of-00002.parquet")
    write(train[n_train // 2 :], "train-00001-of-00002.parquet")
    write(_shapes(n_test, seed=1), "test-00000-of-00001.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  default: true\n  data_files:\n"
        "  - split: train\n    path: data/train-*.parquet\n  - split: test\n    path: data/test-*.parquet\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: data/train-00000-of-00002.parquet\n"
        "  - split: test\n    path: data/test-*.parquet\n---\n# shapes\n"
    )
    return folder


def saved_folder(root: Path, n_train: int = 24, n_test: int = 8) -> Path:
    """A `DatasetDict.save_to_disk` folder with the contract's own column names (question, answer,
    reasoning, image, difficulty)."""
    from datasets import DatasetDict

    folder = root / "saved_shapes"
    keep = ("question", "answer", "reasoning", "image", "difficulty")
    dd = DatasetDict(
        {
            split: data.from_rows([{k: r[k] for k in keep} for r in _shapes(n, seed)])
            for split, n, seed in (("train", n_train, 0), ("test", n_test, 1))
        }
    )
    dd.save_to_disk(str(folder))
    return folder


def sharegpt_json(root: Path, n: int = 24, multi: bool = True) -> Path:
    """LLaMA-Factory's ShareGPT layout: data.json (a JSON list) of {conversations: [{from, value}],
    images: [relative paths]}; `<image>` markers in the human turn. With `multi`, every third row shows two
    images (the second a blank) and asks about the first."""
    folder = root / "sharegpt"
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    recs = []
    for i, r in enumerate(_shapes(n, seed=2)):
        r["image"].save(folder / "imgs" / f"{i}.png")
        images = [f"imgs/{i}.png"]
        human = f"<image>{r['question']}"
        if multi and i % 3 == 0:
            r["image"].copy().resize((16, 16)).save(folder / "imgs" / f"{i}b.png")
            images.append(f"imgs/{i}b.png")
            human = f"Picture 1: <image> Picture 2: <image> In picture 1: {r['question']}"
        recs.append(
            {
                "conversations": [
                    {"from": "human", "value": human},
                    {"from": "gpt", "value": f"<think>{r['reasoning']}</think><answer>{r['answer']}</answer>"},
                ],
                "images": images,
            }
        )
    (folder / "data.json").write_text(json.dumps(recs))
    return folder / "data.json"


def problem_solution_parquet(root: Path, n: int = 40) -> Path:
    """A MATH / open-r1 style text parquet: problem, solution ending in \\boxed{answer}, level."""
    from datasets import Dataset

    rows = data.arithmetic_rows(n, seed=3)
    ds = Dataset.from_dict(
        {
            "problem": [r["question"] for r in rows],
            "solution": [f"{r['reasoning']} The answer is $\\boxed{{{r['answer']}}}$." for r in rows],
            "level": [f"Level {r['difficulty'] + 1}" for r in rows],
        }
    )
    path = root / "math.parquet"
    ds.to_parquet(str(path))
    return path
