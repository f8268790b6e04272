"""data=hf: any 🤗 dataset a researcher already has, through `datasets.load_dataset`, as the row contract.

    python train.py data=hf data.path=<hub id | local folder | file or glob> [data.name=<config>] \\
        [data.revision=...] [data.train_split=train] [data.test_split=test | data.test_size=0.05] \\
        data.fields.question=problem data.fields.answer=solution [data.fields.image=image] \\
        [data.fields.reasoning=solution]

Where data comes from (`data.path`):
- a hub id: from the local cache when HF_HUB_OFFLINE=1 (the hub's snapshot cache, e.g. after
  `hf download <id> --repo-type dataset`, else a copy `datasets` prepared earlier); nothing is downloaded;
- a folder in hub layout (parquet/json/... shards, README.md `configs:` selected by `data.name`), or one
  `save_to_disk` wrote (`load_from_disk`);
- a parquet, arrow, json/jsonl or csv file, or a glob of them.

How rows map to the row contract (reinforce_cot.data), by layout:
- question/answer columns (`data.fields.question`, `data.fields.answer`): the answer is extracted from
  a full solution where it carries one (`<answer>...</answer>`, `\\boxed{...}`, GSM8K's `#### 42`);
  `data.fields.reasoning` (optional) gives the SFT chain (the `<think>` part, or the text before the answer);
- ShareGPT / LLaMA-Factory conversations (`messages` or `conversations`, roles as `role`/`content` or
  `from`/`value`) with an `images` column: the last user turn is the question (its `<image>` markers
  place the images), the last assistant turn the solution, earlier turns the `history`;
- TRL's own layouts (`prompt`, `completion`, `chosen`, `rejected`): used as they are;
- images: `data.fields.image` (default: TRL's `images` or `image` column if there is one) holding
  `datasets.Image` cells (bytes or paths), a list of them per row (one placeholder each), or file paths
  (relative to `data.image_folder`, else to the data files). They stay where they are: decoded when a
  row is read (reinforce_cot.images.capped). Each cell's header is checked once, with the markers;
- any other column travels with the row; `data.fields.<name>=<column>` renames one (e.g. difficulty=level).

Rows without a question or (where an answer column is mapped) an answer are dropped and counted in the log.
Mixtures: `data.mixture=[{path, weight, fields, ...}, ...]`, each source with its own mapping (merged over
`data.fields`), interleaved by weight with the data seed (`datasets.interleave_datasets`). Every step is a
`datasets` operation cached by fingerprint (a second run reuses it); `data.num_proc` parallelises them.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
from pathlib import Path

from reinforce_cot.data import IMAGE_COLUMNS, IMAGE_MARKER
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
CONVERSATION_COLUMNS = ("messages", "conversations")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}  # fmt: skip
SOURCE_KEYS = ("path", "name", "revision", "data_dir", "data_files", "fields", "image_folder", "train_split",
               "test_split", "test_size", "weight")  # fmt: skip
GSM8K_RE = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


# --------------------------------------------------------------------------- answers, chains
def final_answer(text) -> str:
    r"""The gold answer a solution carries: in `<answer>`, else the last `\boxed{}`, else after GSM8K's
    `####`, else the whole text (stripped).

    >>> final_answer(r"so x = \boxed{\frac{1}{2}}"), final_answer("<think>..</think><answer> 7 </answer>")
    ('\\frac{1}{2}', '7')
    >>> final_answer("48/2 = 24 ... 48+24 = 72\n#### 72"), final_answer(3)
    ('72', '3')
    """
    from reinforce_cot.rewards import extract_answer

    text = "" if text is None else str(text)
    found = extract_answer(text)
    if found is not None:
        return found
    m = GSM8K_RE.search(text)
    return m.group(1).strip() if m else text.strip()


def chain_of(text) -> str:
    r"""The reasoning in a solution: the `<think>` part, else the text before `<answer>` or `####`.

    >>> chain_of("Half of 48 is 24.\n#### 24"), chain_of("<think>a</think><answer>b</answer>")
    ('Half of 48 is 24.', 'a')
    """
    from reinforce_cot.reasoning import chain

    return GSM8K_RE.sub("", chain("" if text is None else str(text))).strip()


def _text(content) -> str:
    """A message's content as text; image blocks of OpenAI-style content become `<image>` markers."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(block.get("text") or "")
        elif kind in ("image", "image_url"):
            parts.append(IMAGE_MARKER)
    return "".join(parts)


def _turns(conversation) -> list[dict]:
    out = []
    for m in conversation or []:
        role = ROLES.get(str(m.get("role") or m.get("from")).lower())
        if role is None:
            raise ValueError(f"unknown role {m.get('role') or m.get('from')!r}")
        out.append({"role": role, "content": _text(m.get("content", m.get("value")))})
    return out


def split_conversation(conversation) -> dict:
    """A ShareGPT / OpenAI conversation -> system, history, question and the final solution (or None).

    >>> c = [{"from": "human", "value": "<image>How many?"}, {"from": "gpt", "value": "<answer>2</answer>"}]
    >>> split_conversation(c)
    {'system': None, 'history': [], 'question': '<image>How many?', 'solution': '<answer>2</answer>'}
    """
    turns = _turns(conversation)
    system = "\n".join(t["content"] for t in turns if t["role"] == "system") or None
    turns = [t for t in turns if t["role"] != "system"]
    solution = turns.pop()["content"] if turns and turns[-1]["role"] == "assistant" else None
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    if not users:
        return {"system": system, "history": turns, "question": "", "solution": solution}
    last = users[-1]
    return {"system": system, "history": turns[:last], "question": turns[last]["content"], "solution": solution}


# ------------------------------------------------------------------------------- opening data
def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _no_network():
    """Offline for `datasets` and `huggingface_hub` even when HF_HUB_OFFLINE was set after they were
    imported (they read it once, at import)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _cache_dir(folder: Path) -> str:
    """Where `datasets` prepares a local folder: one place per folder and content. `datasets` (5.2) keys a
    folder with README `configs:` by its name alone, so two run dirs' data/02_curate would share (and
    silently reuse) one cache entry; this keys it by the absolute path and every file's size and mtime."""
    import hashlib

    import datasets

    h = hashlib.sha1(str(folder.resolve()).encode())
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts):
            st = f.stat()
            h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "reinforce_cot_folders" / h.hexdigest()[:16])


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).suffix in BUILDERS or any(c in path for c in "*?[")


def _open(spec: dict, where: str) -> tuple[dict, Path | None]:
    """All splits of a source, as {split: Dataset}, and the folder relative image paths start from."""
    import datasets

    path, num_proc = str(spec["path"]), spec.get("num_proc")
    p = Path(path).expanduser()
    kwargs = {k: spec.get(k) for k in ("name", "data_dir", "data_files") if spec.get(k) is not None}
    try:
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            out = datasets.load_from_disk(str(p))  # what save_to_disk wrote
            return (dict(out) if isinstance(out, datasets.DatasetDict) else {"train": out}), p
        if p.is_dir():
            return dict(datasets.load_dataset(str(p), num_proc=num_proc, cache_dir=_cache_dir(p), **kwargs)), p
        if p.is_file() or any(c in path for c in "*?["):
            files = sorted(glob.glob(str(p))) if not p.is_file() else [str(p)]
            if not files:
                raise ConfigError(f"{where}: no file matches; check the path or glob")
            builder = BUILDERS.get(Path(files[0]).suffix.lower())
            if builder is None:
                raise ConfigError(f"{where}: cannot read {Path(files[0]).suffix} files; use one of {sorted(BUILDERS)}")
            return dict(datasets.load_dataset(builder, data_files=files, num_proc=num_proc)), Path(files[0]).parent
        if _looks_local(path):
            raise ConfigError(f"{where}: no such file or folder; give a hub id, a folder, or a file or glob")
        return _hub(path, spec, kwargs, where)
    except ValueError as e:
        found = re.search(r"BuilderConfig '(.*?)' not found\. Available: (\[.*?\])", str(e))
        if found:
            raise ConfigError(
                f"{where}: no config '{found.group(1)}'; set data.name to one of {found.group(2)}"
            ) from None
        empty = re.search(r'Instruction "(.*?)" corresponds to no data', str(e))
        if empty:
            raise ConfigError(
                f"{where}: the '{empty.group(1)}' split holds no rows (a recipe stage that kept none writes such a "
                "split: see its report); use other data"
            ) from None
        raise


def _hub(path: str, spec: dict, kwargs: dict, where: str) -> tuple[dict, Path | None]:
    """A hub id. Offline (HF_HUB_OFFLINE=1): the hub's snapshot cache, else the copy `datasets` prepared
    on an earlier online load; nothing is downloaded."""
    import datasets
    from huggingface_hub import snapshot_download

    offline = _offline()
    if offline:
        try:
            local = snapshot_download(path, repo_type="dataset", revision=spec.get("revision"), local_files_only=True)
        except Exception:  # not in the snapshot cache: try the datasets cache below
            local = None
        if local:
            log.info("data: %s from the hub cache at %s", path, local)
            out = datasets.load_dataset(
                local, num_proc=spec.get("num_proc"), cache_dir=_cache_dir(Path(local)), **kwargs
            )
            return dict(out), Path(local)
    try:
        with _no_network() if offline else contextlib.nullcontext():
            out = datasets.load_dataset(path, revision=spec.get("revision"), num_proc=spec.get("num_proc"), **kwargs)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        if offline:
            raise ConfigError(
                f"{where}: not in the local cache, and HF_HUB_OFFLINE=1 allows no download; download it where "
                f"there is network (hf download {path} --repo-type dataset) or point data.path at a local folder "
                "or file"
            ) from None
        raise ConfigError(f"{where}: {e}; check the hub id (and data.revision) or your network") from None
    return dict(out), None


# ------------------------------------------------------------------------------------ mapping
def _layout(cols: list[str], fields: dict, where: str) -> str:
    if fields["question"] in cols:
        return "qa"
    if "prompt" in cols:
        return "trl"
    if any(c in cols for c in CONVERSATION_COLUMNS):
        return "chat"
    raise ConfigError(
        f"{where}: data.fields.question={fields['question']}: no such column (columns: {cols}); "
        "map it with data.fields.question=<column>"
    )


def _resolve(path, base: str | None):
    if path is None or not isinstance(path, str) or "://" in path or os.path.isabs(path) or base is None:
        return path
    return os.path.join(base, path)


def _to_contract(batch, indices, layout, f, prefix, image_col, base):
    """One batch of source columns -> the contract's text columns (and resolved image paths)."""
    n = len(indices)
    out = {"question": [], "answer": [], "reasoning": [], "id": []}
    if layout == "chat":
        out |= {"system": [], "history": []}
    conv = next((c for c in CONVERSATION_COLUMNS if c in batch), None)
    for j in range(n):
        answer_cell = batch[f["answer"]][j] if f["answer"] in batch else None
        chain_cell = batch[f["reasoning"]][j] if f.get("reasoning") else None
        if layout == "qa":
            question = batch[f["question"]][j]
        elif layout == "trl":
            prompt = batch["prompt"][j]
            question = prompt if isinstance(prompt, str) else _text(next(
                (m["content"] for m in reversed(prompt) if m.get("role") == "user"), ""))  # fmt: skip
        else:
            parts = split_conversation(batch[conv][j])
            question = parts["question"]
            out["system"].append(parts["system"])
            out["history"].append(parts["history"])
            if answer_cell is None and parts["solution"] is not None:
                answer_cell = parts["solution"]
            if chain_cell is None:
                chain_cell = parts["solution"]
        out["question"].append("" if question is None else str(question))
        out["answer"].append("" if answer_cell is None else final_answer(answer_cell))
        out["reasoning"].append(chain_of(chain_cell) if chain_cell is not None else "")
        out["id"].append(str(batch[f["id"]][j]) if f.get("id") else f"{prefix}-{indices[j]}")
    if image_col is not None:
        cells = batch[image_col]
        out[image_col] = [[_resolve(c, base) for c in cell] if isinstance(cell, list) else _resolve(cell, base)
                          for cell in cells]  # fmt: skip
    return out


def _image_kind(feature) -> str | None:
    """'one' or 'list' for an image column `datasets` can decode (Image, or paths/bytes/structs cast to
    it); None when the column cannot hold images."""
    from datasets import Image, Value

    inner = getattr(feature, "feature", None)
    if isinstance(feature, (list, tuple)) or inner is not None:  # a list per row
        inner = feature[0] if isinstance(feature, (list, tuple)) else inner
        return "list" if _image_kind(inner) == "one" else None
    if isinstance(feature, Image) or (
        isinstance(feature, Value) and feature.dtype in ("string", "large_string", "binary", "large_binary")
    ):
        return "one"
    if isinstance(feature, dict) and set(feature) <= {"bytes", "path"}:
        return "one"
    return None


def canonical(ds, fields: dict, where: str, prefix: str, base: Path | None, image_folder, num_proc):
    """A source split in the row contract, and the columns a row must not leave empty. Text columns go
    through one `map` (cached by fingerprint); image columns are renamed and cast, never copied."""
    from datasets import Features, Image, List, Value, concatenate_datasets

    cols = ds.column_names
    f = {"question": "question", "answer": "answer", "reasoning": None, "image": None, "id": None, **fields}
    layout = _layout(cols, f, where)
    if f["answer"] not in cols and layout == "qa":
        raise ConfigError(
            f"{where}: data.fields.answer={f['answer']}: no such column (columns: {cols}); "
            "map it with data.fields.answer=<column>"
        )
    for key in ("reasoning", "id", "image"):  # explicit mappings must exist; null: a column of that name, if any
        if f[key] is not None and f[key] not in cols:
            raise ConfigError(
                f"{where}: data.fields.{key}={f[key]}: no such column (columns: {cols}); map it to one or set null"
            )
        if f[key] is None and key != "image" and key in cols:
            f[key] = key
    image_col = f["image"] or next((c for c in ("images", "image") if c in cols), None)
    if image_col and image_col in (f["question"], f["answer"], f["reasoning"]):
        raise ConfigError(f"{where}: data.fields.image={image_col} is also a text field; map it to an image column")
    kind = _image_kind(ds.features[image_col]) if image_col else None
    if image_col and kind is None:
        raise ConfigError(
            f"{where}: column '{image_col}' holds {ds.features[image_col]}, not images; map data.fields.image to an "
            "image column (or to paths of image files)"
        )
    stored = ds.features[image_col] if image_col else None
    paths = image_col is not None and not isinstance(stored.feature if kind == "list" else stored, Image)
    conv = [c for c in CONVERSATION_COLUMNS if c in cols] if layout == "chat" else []
    used = [c for c in dict.fromkeys([f["question"], f["answer"], f["reasoning"], f["id"], *conv]) if c in cols]
    inputs = used + (["prompt"] if layout == "trl" else []) + ([image_col] if paths else [])
    text = Features({k: Value("string") for k in ("question", "answer", "reasoning", "id")})
    if layout == "chat":
        text |= {"system": Value("string"), "history": List({"role": Value("string"), "content": Value("string")})}
    if paths:
        text[image_col] = List(Value("string")) if kind == "list" else Value("string")
    base_dir = str(Path(image_folder).expanduser()) if image_folder else (str(base) if base else None)
    mapped = ds.select_columns(inputs).map(
        _to_contract,
        batched=True,
        with_indices=True,
        remove_columns=inputs,
        features=text,
        fn_kwargs={
            "layout": layout,
            "f": f,
            "prefix": prefix,
            "image_col": image_col if paths else None,
            "base": base_dir,
        },  # fmt: skip
        num_proc=num_proc if num_proc and len(ds) > 1000 else None,
        desc="mapping fields",
    )
    contract = set(mapped.column_names) | set(IMAGE_COLUMNS)
    rest = [c for c in cols if c not in used and c != image_col and c not in contract]  # travels untouched
    if image_col and not paths:
        rest.append(image_col)
    out = concatenate_datasets([ds.select_columns(rest), mapped], axis=1) if rest else mapped
    canon_image = "images" if kind == "list" else "image"
    renames = {image_col: canon_image} if image_col else {}
    renames |= {src: key for key, src in f.items() if key not in ("question", "answer", "reasoning", "id", "image")
                and src in out.column_names}  # fmt: skip
    for src, dst in renames.items():
        if src != dst:
            out = (
                out.rename_column(src, dst)
                if dst not in out.column_names
                else out.remove_columns(dst).rename_column(src, dst)
            )
    if image_col:
        img = Image() if kind == "one" else List(Image())
        if out.features[canon_image] != img:
            out = out.cast_column(canon_image, img)
    required = ["question"] if layout != "trl" else []
    if layout != "trl" or f["answer"] in cols:
        required.append("answer")
    return out, required


def _cells(column) -> list[list[tuple]]:
    """Per row, (first bytes, path) of each image cell, read from the arrow buffers without copying the
    images: only the page holding each image's first bytes is touched, so a pass over a large dataset stays
    light in memory (a memory-mapped file read whole would count in full in the process's RSS)."""
    import pyarrow as pa

    out = []
    for chunk in column.chunks:
        lists = pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)
        cells = chunk.flatten() if lists else chunk
        data, paths = cells.field("bytes"), cells.field("path").to_pylist()
        heads = [data[i].as_buffer()[:16].to_pybytes() if data[i].is_valid else None for i in range(len(cells))]
        items = list(zip(heads, paths))
        if lists:
            offsets = chunk.offsets.to_pylist()
            out += [items[a - offsets[0] : b - offsets[0]] for a, b in zip(offsets, offsets[1:])]
        else:
            out += [[item] if chunk[i].is_valid else [] for i, item in enumerate(items)]
    return out


def _check_images(batch, indices, col, src_col, where):
    """Each image cell starts like an image (its signature; a file: its first bytes), and as many `<image>`
    markers as images; else the row (its id). Pixels are not decoded (that happens when a row is read)."""
    from reinforce_cot.images import looks_like_image

    cells = _cells(batch[col])
    questions = batch["question"].to_pylist()
    ids = batch["id"].to_pylist() if "id" in batch.column_names else indices
    histories = batch["history"].to_pylist() if "history" in batch.column_names else [None] * len(indices)
    counts = []
    for i, items, question, history in zip(ids, cells, questions, histories):
        for head, path in items:
            if head is None and path and not os.path.isfile(path):
                raise ConfigError(f"{where}: row {i}: column '{src_col}' names {path}, which does not exist")
            if head is None and path:
                with open(path, "rb") as f:
                    head = f.read(16)
            if not head or not looks_like_image(head):
                raise ConfigError(
                    f"{where}: row {i}: column '{src_col}' holds {head!r}..., which is not an image; fix or drop the row"
                )
        text = (question or "") + "".join(m["content"] or "" for m in history or [])
        markers = text.count(IMAGE_MARKER)
        if markers and markers != len(items):
            raise ConfigError(
                f"{where}: row {i}: {markers} {IMAGE_MARKER} markers but {len(items)} images; each image needs "
                "exactly one marker (or none at all: the images then go before the text)"
            )
        counts.append(len(items))
    return {"n_images": counts}


def check_images(ds, src_col: str, where: str, num_proc=None) -> None:
    """Run `_check_images` over every row of `ds` (once per fingerprint: `datasets` caches the result)."""
    col = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    if col is None:
        return
    cols = [c for c in (col, "question", "history", "id") if c in ds.column_names]
    ds.select_columns(cols).with_format("arrow").map(
        _check_images,
        batched=True,
        with_indices=True,
        remove_columns=cols,
        fn_kwargs={"col": col, "src_col": src_col, "where": where},
        num_proc=num_proc if num_proc and len(ds) > 1000 else None,
        desc="checking images",
    )


# -------------------------------------------------------------------------------------- splits
def _where(spec: dict, label: str = "data") -> str:
    name = f" (data.name={spec['name']})" if spec.get("name") else ""
    return f"{label}.path={spec['path']}{name}"


def _part(spec: dict, role: str, label: str):
    """The rows of one source for `role` (train | test): its split (or the part of it test_size carves
    out), in the contract, rows without a question or answer dropped. Returns (Dataset, where)."""
    where = _where(spec, label)
    splits, base = _open(spec, where)
    train_split, test_split, test_size = (
        spec.get("train_split", "train"),
        spec.get("test_split", "test"),
        spec.get("test_size"),
    )
    want = train_split if role == "train" or test_size else test_split
    if want not in splits:
        key = f"{label}.{role}_split"
        hint = f" (or carve a test split out of train with {label}.test_size=0.05)" if role == "test" else ""
        raise ConfigError(f"{where}: no split '{want}'; the splits are {sorted(splits)}: set {key}{hint}")
    prefix = f"{Path(str(spec['path'])).name or 'row'}-{want}"
    ds, required = canonical(
        splits[want], dict(spec.get("fields") or {}), f"{where} split '{want}'", prefix, base,
        spec.get("image_folder"), spec.get("num_proc"),
    )  # fmt: skip
    ds = _drop_empty(ds, required, f"{where} split '{want}'")
    if test_size:
        try:
            parts = ds.train_test_split(test_size=test_size, seed=spec.get("seed", 0), shuffle=True)
        except ValueError as e:
            raise ConfigError(f"{label}.test_size={test_size}: {e}; use a fraction in (0, 1) or a row count") from None
        ds = parts["train" if role == "train" else "test"]
    return ds, where


def _drop_empty(ds, required: list[str], where: str):
    """Rows with an empty required column (no question; no answer where the data has answers) are left
    out and counted in the log; none left is an error."""
    before = len(ds)
    if required:
        ds = ds.filter(
            lambda *cols: [all(vals) for vals in zip(*cols)],
            input_columns=required,
            batched=True,
            desc="dropping rows without a question or answer",
        )
    if len(ds) < before:
        log.warning("data: %s: %d of %d rows have no %s and are left out", where, before - len(ds), before,
                    " or ".join(required))  # fmt: skip
    if not len(ds):
        raise ConfigError(
            f"{where}: no rows left after dropping {before} rows without a {' or '.join(required)}; check "
            "data.fields.question / data.fields.answer"
        )
    return ds


def load_split(
    path: str | None = None,
    role: str = "train",
    n: int | None = None,
    name: str | None = None,
    revision: str | None = None,
    data_dir: str | None = None,
    data_files=None,
    fields: dict | None = None,
    image_folder: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    test_size: float | int | None = None,
    seed: int = 0,
    num_proc: int | None = None,
    mixture: list[dict] | None = None,
    stopping_strategy: str = "first_exhausted",
):
    """The `role` (train | test) split of data=hf as the row contract (conf/data/hf.yaml passes every key);
    `n` keeps the first n rows. Images are checked (headers), not decoded."""
    top = {"path": path, "name": name, "revision": revision, "data_dir": data_dir, "data_files": data_files,
           "fields": fields or {}, "image_folder": image_folder, "train_split": train_split,
           "test_split": test_split, "test_size": test_size, "seed": seed, "num_proc": num_proc}  # fmt: skip
    if mixture:
        ds, where = _mixture(top, mixture, role, stopping_strategy), "data.mixture"
    elif not path:
        raise ConfigError("data.path is required; set data.path=<hub id | folder | file or glob> (or data.mixture)")
    else:
        ds, where = _part(top, role, "data")
    src_col = (fields or {}).get("image") or next((c for c in IMAGE_COLUMNS if c in ds.column_names), "image")
    if n is not None:
        ds = ds.select(range(min(int(n), len(ds))))
    check_images(ds, src_col, f"{where} ({role})", num_proc)
    log.info("data: %s %s: %d rows, columns %s", where, role, len(ds), ds.column_names)
    from reinforce_cot import images

    return images.capped(ds, None)  # rows show the contract's `images` (full size; a stage's view fits them)


def _mixture(top: dict, mixture: list, role: str, stopping_strategy: str):
    """Sources interleaved by weight (`datasets.interleave_datasets`, the data seed), each mapped with its
    own fields over data.fields; columns shared by all sources are kept, plus `source`."""
    from datasets import Image, List, interleave_datasets

    specs, weights = [], []
    for i, src in enumerate(mixture):  # every source checked before any loads
        label, src = f"data.mixture[{i}]", dict(src)
        unknown = sorted(set(src) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{label}: unknown keys {unknown}; a source takes {list(SOURCE_KEYS)}")
        if not src.get("path"):
            raise ConfigError(f"{label}.path is required; give each source a hub id, folder or file")
        weight = src.pop("weight", 1.0)
        if weight is None or float(weight) <= 0:
            raise ConfigError(f"{label}.weight={weight} must be > 0 (sources are drawn in proportion to their weight)")
        spec = {**top, **{k: v for k, v in src.items() if v is not None}}
        spec["fields"] = {**(top.get("fields") or {}), **(src.get("fields") or {})}
        specs.append((label, spec))
        weights.append(float(weight))
    parts = []
    for label, spec in specs:
        ds, _ = _part(spec, role, label)
        parts.append(ds.add_column("source", [str(spec["path"])] * len(ds)))
    image_cols = {c for ds in parts for c in IMAGE_COLUMNS if c in ds.column_names}
    aligned = []
    for ds in parts:
        for col in sorted(image_cols - set(ds.column_names)):  # a source without images: none per row
            feature = Image() if col == "image" else List(Image())
            ds = ds.add_column(col, [None] * len(ds), feature=feature)
        aligned.append(ds)
    shared = [c for c in aligned[0].column_names if all(c in ds.column_names and ds.features[c] == aligned[0].features[c]
                                                       for ds in aligned)]  # fmt: skip
    dropped = sorted({c for ds in aligned for c in ds.column_names} - set(shared))
    if dropped:
        log.info("data.mixture: columns not shared by every source are left out: %s", dropped)
    aligned = [ds.select_columns(shared) for ds in aligned]
    total = sum(weights)
    return interleave_datasets(
        aligned, probabilities=[w / total for w in weights], seed=top["seed"], stopping_strategy=stopping_strategy
    )
