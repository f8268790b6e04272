"""Datasets: one kind of split for every source, and its formatting for TRL.

Every loader yields a lazy `datasets.Dataset` with the same columns (the row contract):

- `question` (str; `<image>` markers say where images go), `answer` (str: the gold final answer),
  `reasoning` (str: a step-by-step chain, may be ""), `id` (str, unique within the split);
- images, when the data has any: `ds[i]["images"]` is the row's list of PIL images, decoded from the
  stored bytes or paths only when the row is read and fitted to the model's pixel budget
  (`images.capped`); storage keeps TRL's `image` (one per row) or `images` (a list) column untouched;
- optionally `system` and `history` (earlier turns of a conversation), TRL's own `prompt` /
  `completion` / `chosen` / `rejected` (used as they are), and any other column (`difficulty`,
  `pass_rate`, ...), which reaches reward functions, samplers and evaluation.

Consumers use `len(ds)`, `ds[i]`, iteration, `ds.select(...)` and `ds.shard(...)` (never `ds[a:b]`,
which returns columns), and read a column without decoding any image with `ds[name]`.

Sources (conf/data/): the synthetic generators below (`shapes_rows`, `arithmetic_rows`: lists of rows,
turned into a Dataset by `load_split`), local JSONL files (`jsonl_rows`), and any 🤗 dataset: hub ids,
hub-layout folders, parquet/arrow/json/csv files, `save_to_disk` folders and weighted mixtures
(`reinforce_cot.sources`, data=hf). `write_dataset` is the inverse: what the curate and rejection_sample
stages write, data=hf reads back.

`format_split` turns a split into TRL's conversational columns for the chosen algorithm:

- sft: `prompt` + `completion` (the `<think>reasoning</think><answer>answer</answer>` target)
- grpo/rloo: `prompt` (+ every other column, which TRL hands to reward functions)
- preference (dpo): `prompt`, `chosen`, `rejected`

and TRL's `images` column. With images, rows are built when a batch is read (nothing is decoded or
copied up front); text splits are mapped once and cached by `datasets`' fingerprints.

Try it: `python -c "from reinforce_cot import data; print(data.from_rows(data.shapes_rows(2, seed=0))[0])"`.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any

from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{question} Think step by step in <think></think>, then answer in <answer></answer>."
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 60)}
SHAPES = ("square", "circle")
IMAGE_COLUMNS = ("image", "images")  # TRL's names: one image per row, or a list
IMAGE_MARKER = "<image>"  # LLaMA-Factory / ShareGPT: where an image goes in the text


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


# ------------------------------------------------------------------------- rows -> a Dataset
def from_rows(rows: list[dict]):
    """Rows made in code (PIL images in `image`/`images`) as a Dataset of the row contract: images are
    encoded once (PNG) into an `Image` column and decoded again only when a row is read.

    >>> ds = from_rows(arithmetic_rows(2, seed=0))
    >>> len(ds), ds[1]["question"]
    (2, 'What is 53 + 5?')
    """
    from datasets import Dataset

    if not rows:
        return Dataset.from_dict({})
    for i, row in enumerate(rows):
        row.setdefault("reasoning", "")
        row.setdefault("id", str(i))
    return Dataset.from_list(rows)  # `datasets` infers Image() for PIL values


def load_split(node, split: str, data_name: str = ""):
    """A split config node (`_target_` + arguments) instantiated as a Dataset of the row contract; a
    loader's ConfigError comes out as itself (one line), not wrapped by Hydra."""
    from datasets import Dataset
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        out = instantiate(node, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        if isinstance(e.__cause__, TypeError) and "unexpected keyword" in str(e.__cause__):
            raise ConfigError(f"data.{split}: {e.__cause__}; remove that key (data.{split}.<key>)") from None
        raise
    if isinstance(out, list):
        out = from_rows(out)
    if not isinstance(out, Dataset):
        raise ConfigError(f"data.{split}._target_={node.get('_target_')} returned {type(out).__name__}, not rows")
    if len(out) == 0:
        raise ConfigError(f"data={data_name}: the {split} split is empty; raise data.{split}.n or fix the source")
    from reinforce_cot import images

    return images.capped(out, None)  # rows show `images` (full size here; a stage's view fits them)


def disjoint(train, test):
    """Test rows whose content (`layout`) also occurs in train dropped, so held-out accuracy is really
    held out. Works on Datasets (a filter: no image is decoded) and on lists of rows."""
    seen = set(column(train, "layout")) if not isinstance(train, list) else {r["layout"] for r in train}
    if isinstance(test, list):
        return [r for r in test if r["layout"] not in seen]
    return test.filter(lambda layouts: [x not in seen for x in layouts], input_columns="layout", batched=True)


def load_splits(data_cfg) -> dict:
    """The train and test splits of a data config (`load_split`); test rows whose content occurs in train
    are dropped. Images stay undecoded (`fit_images`)."""
    name = title(data_cfg)
    train = load_split(data_cfg.train, "train", name)
    test = load_split(data_cfg.test, "test", name)
    if "layout" in train.column_names and "layout" in test.column_names:
        test = disjoint(train, test)
        if not len(test):
            raise ConfigError(f"data={name}: every test row also occurs in train; raise data.test.n or fix the source")
    return {"train": train, "test": test}


def fit_images(splits: dict, model_cfg) -> dict:
    """What a stage's trainer, evaluator, curation or rejection sampling reads: views whose images are
    decoded when a row is read, at the model's `image_max_pixels` (reinforce_cot.images.capped)."""
    from reinforce_cot import images

    m = model_cfg
    return {k: images.capped(ds, m.get("image_max_pixels"), m.get("image_factor", 28)) for k, ds in splits.items()}


def head(ds, n: int | None):
    """The first `n` rows (all for None), as the same kind of split (a Dataset view, or a list)."""
    if n is None or n >= len(ds):
        return ds
    return ds[:n] if isinstance(ds, list) else ds.select(range(n))


def text_rows(ds) -> list[dict]:
    """The rows without their images, as dicts (what scoring and reports read; nothing is decoded)."""
    if isinstance(ds, list):
        return [{k: v for k, v in r.items() if k not in IMAGE_COLUMNS} for r in ds]
    return ds.remove_columns([c for c in IMAGE_COLUMNS if c in ds.column_names]).to_list()


def has_images(ds) -> bool:
    return bool(set(IMAGE_COLUMNS) & set(ds.column_names))


def column(ds, name: str) -> list | None:
    """A column's values (None when the split has no such column), read from the arrow storage: no image
    is decoded (`ds[name]` on a view would decode every row's images)."""
    if isinstance(ds, list):  # rows made in code
        return [r.get(name) for r in ds] if any(name in r for r in ds) else None
    if name not in ds.column_names:
        return None
    return ds.select_columns([name]).with_format("arrow")[:][name].to_pylist()


def columns(ds) -> list[str]:
    """The column names of a split (or of rows made in code)."""
    return sorted({k for r in ds for k in r}) if isinstance(ds, list) else list(ds.column_names)


def settle_modality(cfg, splits: dict) -> dict:
    """`data.modality` made definite and checked against the model, before any weights load: `auto` is
    image when the splits have images, else text; `text` on image data leaves the images out."""
    from omegaconf import open_dict

    d, name = cfg.data, title(cfg.data)
    found = any(has_images(ds) for ds in splits.values())
    mode = d.get("modality") or "auto"
    if mode == "auto":
        mode = "image" if found else "text"
        with open_dict(d):
            d.modality = mode
    if mode == "text" and found:
        log.info("data=%s: data.modality=text: the images are left out", name)
        splits = {k: ds.remove_columns([c for c in IMAGE_COLUMNS if c in ds.column_names]) for k, ds in splits.items()}
    if mode == "image" and not found:
        raise ConfigError(f"data={name}: data.modality=image but the rows have no images; set data.modality=text")
    if mode == "image" and cfg.model.kind != "vlm":
        raise ConfigError(
            f"data={name} has images but model={cfg.model.name} is text-only; pick a VLM (model=tiny_vlm), or set "
            "data.modality=text to train on the text alone"
        )
    return splits


def title(data_cfg) -> str:
    """What error messages call the data: the config's name, or for data=hf the dataset's path."""
    if "mixture" not in data_cfg:
        return str(data_cfg.name)
    base = "mixture" if data_cfg.get("mixture") else Path(str(data_cfg.get("path"))).name
    return f"{base}/{data_cfg.name}" if data_cfg.get("name") else base


# ---------------------------------------------------------------------------- local JSONL files
def jsonl_rows(path: str, image_folder: str | None, fields: dict[str, str], n: int | None = None, split: str = "train"):
    """Rows of a JSONL file in the seeds' format: image (relative to `image_folder`), question, answer,
    reasoning; any other key (id, difficulty, pass_rate, ...) is kept as a column; `n` keeps the first n.

    A row without a question or answer, or whose image is missing or not an image, stops the load with
    an error that names the file, the line and the fix. Images are checked by their header only and
    stay on disk: they are decoded when a row is read."""
    from datasets import Image as ImageFeature
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data.{split}.path={path}: no such file; point data.{split}.path at a .jsonl file")
    rows = []
    with p.open() as f:
        for lineno, line in enumerate(f, start=1):
            if n is not None and len(rows) >= n:
                break
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
                    with Image.open(img_path):  # the header only: pixels are decoded when the row is read
                        pass
                except FileNotFoundError:
                    raise ConfigError(
                        f"{where}: image {img_path} does not exist; fix the path or data.image_folder"
                    ) from None
                except (UnidentifiedImageError, OSError):
                    raise ConfigError(
                        f"{where}: {img_path} is not an image; replace the file or drop the row"
                    ) from None
                row["image"] = str(img_path.resolve())
            else:
                row.pop("image", None)
            for key in ("chosen", "rejected"):  # optional preference pair (for algo=dpo), as TRL's messages
                if key in row and row[key] is None:
                    del row[key]
                elif key in row:
                    row[key] = as_messages(row[key])
            for key, value in rec.items():  # other columns (id, difficulty, pass_rate, ...) travel with the row
                if key not in fields.values():
                    row.setdefault(key, value)
            row.setdefault("id", f"{p.stem}-{lineno}")
            rows.append(row)
    if not rows:
        raise ConfigError(f"data.{split}.path={path}: the file holds no rows; add rows or pick another dataset")
    ds = _from_records(rows, f"data.{split}.path={path}")
    return ds.cast_column("image", ImageFeature()) if "image" in ds.column_names else ds


def _from_records(rows: list[dict], where: str):
    """`Dataset.from_list`, or a one-line error naming the column whose values differ in type across rows."""
    import pyarrow as pa
    from datasets import Dataset

    try:
        return Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        for key in dict.fromkeys(k for r in rows for k in r):
            kinds = {type(r[key]).__name__ for r in rows if r.get(key) is not None}
            if len(kinds) > 1 and kinds != {"int", "float"}:
                raise ConfigError(
                    f"{where}: column '{key}' holds {' and '.join(sorted(kinds))} values; make it one type"
                ) from None
        raise


# --------------------------------------------------------------------------------- formatting
def _blocks(text: str) -> list[dict]:
    """Text with `<image>` markers as content blocks, an image placeholder at each marker.

    >>> _blocks("<image>How many? And <image>")
    [{'type': 'image'}, {'type': 'text', 'text': 'How many? And '}, {'type': 'image'}]
    """
    out: list[dict] = []
    for i, part in enumerate(text.split(IMAGE_MARKER)):
        if i:
            out.append({"type": "image"})
        if part:
            out.append({"type": "text", "text": part})
    return out


def image_blocks(messages: list[dict], n_images: int) -> list[dict]:
    """Messages with one image placeholder block per image: at the `<image>` markers when the text has
    them, else before the first user turn's text (TRL's convention). Text-only messages stay strings."""
    if not n_images:
        return messages
    text = lambda c: c if isinstance(c, str) else ""  # noqa: E731
    if any(IMAGE_MARKER in text(m.get("content")) for m in messages):
        return [{**m, "content": _blocks(m["content"])} if isinstance(m.get("content"), str) else m for m in messages]
    out, placed = [], False
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            c = [{"type": "text", "text": c}]
            if m["role"] == "user" and not placed:
                c = [{"type": "image"}] * n_images + c
                placed = True
        out.append({**m, "content": c})
    return out


def prompt_messages(
    row: dict, template: str, system: str | None = None, n_images: int | None = None, own_prompt: bool = True
) -> list[dict]:
    """The chat prompt of a row: its own `prompt` (TRL layout) as it is, else the system turn, any earlier
    turns (`history`) and the question in `template`; with one image block per image (`n_images`,
    default: the row's `images`). `own_prompt=False` (an answer-only or easy-to-hack template) always
    builds the prompt from the question."""
    n = len(row.get("images") or []) if n_images is None else int(n_images)
    if own_prompt and row.get("prompt") is not None:
        own = row["prompt"]
        messages = [{"role": "user", "content": own}] if isinstance(own, str) else list(own)
    else:
        sys_text = row.get("system") or system
        messages = [{"role": "system", "content": sys_text}] if sys_text else []
        messages += list(row.get("history") or []) + [
            {"role": "user", "content": template.format(question=row["question"])}
        ]
    return image_blocks(messages, n)


def target(row: dict) -> str:
    """The SFT target: the reasoning chain inside <think>, the answer inside <answer>."""
    return f"<think>{row['reasoning']}</think><answer>{row['answer']}</answer>"


def as_messages(side) -> list[dict]:
    """A completion as TRL's conversational form: a list of assistant messages."""
    return side if isinstance(side, list) else [{"role": "assistant", "content": str(side)}]


DROP_FOR_RL = ("layout", "system", "history")  # not reward inputs: formatting only


def trl_row(row: dict, template: str, system: str | None, algo_kind: str) -> dict:
    """One row of the contract as the TRL trainer of `algo_kind` reads it."""
    prompt = prompt_messages(row, template, system)
    if algo_kind == "preference":  # DPO takes only the pair (other columns would be dropped anyway)
        out = {"prompt": prompt, "chosen": as_messages(row["chosen"]), "rejected": as_messages(row["rejected"])}
    elif algo_kind == "sft":
        own = row.get("completion") if row.get("prompt") is not None else None
        out = {"prompt": prompt, "completion": as_messages(own if own is not None else target(row))}
    else:
        out = {k: v for k, v in row.items() if k not in DROP_FOR_RL} | {"prompt": prompt}
    if "images" in row:
        out["images"] = row["images"]
    return out


def _trl_batch(batch: dict, template: str, system: str | None, algo_kind: str) -> dict:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out = [trl_row(r, template, system, algo_kind) for r in rows]
    return {k: [r[k] for r in out] for k in out[0]} if out else {}


def format_split(ds, data_cfg, algo_kind: str, max_pixels: int | None = None, factor: int = 28):
    """A split -> the Dataset TRL's trainer for `algo_kind` reads (see the module docstring).

    With images: a view that builds each row when a batch is read (images decoded and fitted to
    `max_pixels` then); storage is not copied. Text: one `map`, cached by fingerprint."""
    import functools

    from reinforce_cot import images

    build = functools.partial(
        _trl_batch, template=data_cfg.prompt_template, system=data_cfg.get("system_prompt"), algo_kind=algo_kind
    )
    if has_images(ds):
        return images.capped(ds, max_pixels, factor, row_fn=build)
    if algo_kind in ("sft", "preference"):  # only what the trainer reads, in TRL's order
        out = ds.map(build, batched=True, remove_columns=ds.column_names, desc="prompts")
        return out.select_columns(
            ["prompt", *(c for c in ("completion", "chosen", "rejected") if c in out.column_names)]
        )
    return ds.map(build, batched=True, remove_columns=[c for c in DROP_FOR_RL if c in ds.column_names], desc="prompts")


# ------------------------------------------------------------------------------------ writing
def _readme(configs: dict[str, dict[str, str]]) -> str:
    """A hub dataset card whose YAML lists each config's splits and files (what `load_dataset` reads)."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {file}" for split, file in splits.items()]
    return "\n".join([*lines, "---", "", "Written by reinforce-cot; load with `data=hf data.path=<this folder>`.", ""])


def _features(ds, columns: dict | None):
    """The features `write_split` writes for `ds` + `columns` (same-named columns replaced)."""
    from datasets import Dataset, Features, Image, List

    columns = columns or {}
    keep = {c: ds.features[c] for c in (ds.column_names if ds is not None else []) if c not in columns}
    for c in set(keep) & set(IMAGE_COLUMNS):  # a view stores images undecoded; the file says decode them
        keep[c] = Image() if c == "image" else List(Image())
    return Features({**keep, **(Dataset.from_dict(columns).features if columns else {})})


def write_split(path: Path, ds=None, columns: dict[str, list] | None = None, features=None, batch_size: int = 1000):
    """`ds` (+ `columns`, one value per row, replacing same-named ones) as one parquet file, images
    embedded as bytes the way hub parquet stores them (the stored bytes, not a decoded view), batch by
    batch. `features` (a superset) adds the columns other splits of the config have, empty here. Written
    under a temporary name first, so a file that exists is complete. Returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset
    from datasets.table import embed_table_storage

    columns = columns or {}
    features = features or _features(ds, columns)
    keep = [c for c in (ds.column_names if ds is not None else []) if c not in columns]
    extra = Dataset.from_dict(columns) if columns else None
    n = len(ds) if ds is not None else len(extra)
    base = ds.select_columns(keep).with_format("arrow") if keep else None
    schema = features.arrow_schema
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            cols = dict(zip(keep, base[start:stop].columns)) if base is not None else {}
            if extra is not None:
                cols |= {c: extra.data.column(c).slice(start, stop - start) for c in extra.column_names}
            arrays = [cols[f.name].cast(f.type) if f.name in cols else pa.nulls(stop - start, f.type) for f in schema]
            writer.write_table(embed_table_storage(pa.Table.from_arrays(arrays, schema=schema)))
    tmp.replace(path)
    return n


def write_dataset(folder: Path, configs: dict[str, dict[str, tuple]]) -> Path:
    """A hub-layout folder that `data=hf data.path=<folder> data.name=<config>` loads back: one parquet file
    per config and split, `<config>/<split>.parquet`, from `configs[config][split] = (Dataset or None,
    extra columns or None)` (see `write_split`), and a README.md whose `configs:` list them. The splits of
    a config share one schema (as the hub requires): a column one split lacks is empty there. The one
    writer for the datasets recipe stages make (curate, rejection_sample), the inverse of the loader."""
    from datasets import Features, Value

    files: dict[str, dict[str, str]] = {}
    for config, splits in configs.items():
        union: dict = {}
        for ds, columns in splits.values():
            for name, feature in _features(ds, columns).items():
                if name not in union or union[name] == Value("null"):
                    union[name] = feature
        for split, (ds, columns) in splits.items():
            write_split(folder / config / f"{split}.parquet", ds, columns, Features(union))
            files.setdefault(config, {})[split] = f"{config}/{split}.parquet"
    (folder / "README.md").write_text(_readme(files))
    return folder


def records_columns(records: list[dict], keys: tuple[str, ...] = ()) -> dict[str, list]:
    """Records (dicts) as columns, every key any record has (plus `keys`, so an empty split keeps them)."""
    names = dict.fromkeys([*keys, *(k for r in records for k in r)])
    return {k: [r.get(k) for r in records] for k in names}


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", str(name))
