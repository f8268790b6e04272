"""data=hf: each layout researchers bring loads as the split contract and trains (SFT and GRPO, in process,
with the real TRL trainers); images stay undecoded until a row is read and reach every consumer at the
model's pixel cap; mixtures, the writer's round trip, the fingerprint cache, debug=smoke on every data
config, and bad input as one-line errors before any weights load."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
from omegaconf import open_dict
from PIL import Image

from reinforce_cot import curation, data, evaluation, generation, images, recipes, sampling, sources, training
from reinforce_cot.errors import ConfigError
from tests import layouts
from tests.helpers import CONF, assert_every_tensor_moved, changed_tensors, compose_cfg

QA = {"question": "problem", "answer": "solution"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Every layout, written once for the module (~2 s)."""
    root = tmp_path_factory.mktemp("layouts")
    layouts.hub_folder(root)
    layouts.saved_folder(root)
    layouts.sharegpt_json(root)
    layouts.problem_solution_parquet(root)
    return root


# layout -> (path under root, data=hf overrides, image rows?)
LAYOUTS = {
    "hub_folder": (
        "hub_shapes",
        ["data.fields.question=problem", "data.fields.answer=solution", "data.fields.reasoning=solution"],
        True,
    ),  # fmt: skip
    "save_to_disk": ("saved_shapes", [], True),
    "sharegpt": ("sharegpt/data.json", ["data.test_size=0.25"], True),
    "problem_solution": (
        "math.parquet",
        [
            "data.fields.question=problem",
            "data.fields.answer=solution",
            "data.fields.reasoning=solution",
            "data.fields.difficulty=level",
            "data.test_size=8",
            "model=tiny_lm",
        ],
        False,
    ),  # fmt: skip
}


def layout_cfg(root: Path, layout: str, *overrides: str):
    path, own, _ = LAYOUTS[layout]
    return compose_cfg("recipe=single", "data=hf", f"data.path={root / path}", *own, *overrides)


def test_final_answers_come_out_of_full_solutions():
    assert sources.final_answer("so the area is $\\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
    assert sources.final_answer("<think>2+2</think> <answer> 4 </answer>") == "4"
    assert sources.final_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"  # GSM8K
    assert sources.final_answer(" B ") == "B" and sources.final_answer(12) == "12"
    assert sources.chain_of("<think>count: 1, 2</think><answer>2</answer>") == "count: 1, 2"
    conv = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"from": "human", "value": "<image>How many?"},
            {"from": "gpt", "value": [{"type": "text", "text": "<answer>3</answer>"}]}]  # fmt: skip
    parts = sources.split_conversation(conv)
    assert parts == {
        "system": "Be exact.",
        "history": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "question": "<image>How many?",
        "solution": "<answer>3</answer>",
    }


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_loads_as_the_split_contract(root, layout):
    cfg = layout_cfg(root, layout)
    splits = recipes.stage_data(cfg)
    train, test = splits["train"], splits["test"]
    assert cfg.data.modality == ("image" if LAYOUTS[layout][2] else "text")  # auto, settled at load
    assert {"question", "answer", "reasoning", "id"} <= set(train.column_names)
    rows = data.text_rows(train)
    assert len({r["id"] for r in rows}) == len(rows)
    if layout == "problem_solution":  # arithmetic: the boxed answer is the sum; level renamed to difficulty
        assert (len(train), len(test)) == (32, 8)
        for r in rows:
            a, b = map(int, r["question"][len("What is ") : -1].split(" + "))
            assert (
                r["answer"] == str(a + b) and r["reasoning"].startswith("Ones:") and r["difficulty"].startswith("Level")
            )
        return
    truth = data.shapes_rows(24, seed=2 if layout == "sharegpt" else 0, image_size=32)  # what layouts.py wrote
    for r in rows:  # the answer extracted from each solution is the count the image was drawn with
        i = int(r["id"].rsplit("-", 1)[1]) if layout == "sharegpt" else rows.index(r)  # sharegpt: split shuffled
        assert r["answer"] == truth[i]["answer"] and r["question"].endswith(truth[i]["question"])
    row = train[0]
    assert all(im.size == (32, 32) for im in row["images"])  # 32 px fits the tiny VLM's 4096 px: unchanged
    if layout == "hub_folder":
        assert len(train) == 24 and len(test) == 8 and row["reasoning"].startswith("I count")
        assert len(recipes.stage_data(layout_cfg(root, layout, "data.name=small"))["train"]) == 12
    if layout == "sharegpt":  # every third row shows two pictures, placed at its <image> markers
        multi = [r for r in data.text_rows(train) if r["question"].count("<image>") == 2]
        assert multi and all(len(train[i]["images"]) == 1 + (r["question"].count("<image>") == 2)
                             for i, r in enumerate(data.text_rows(train)))  # fmt: skip
        assert (len(train), len(test)) == (18, 6)


def test_images_are_decoded_only_when_a_row_is_read(tmp_path, monkeypatch):
    decoded = []
    fit = images.fit
    monkeypatch.setattr(images, "fit", lambda im, *a, **k: decoded.append(im.size) or fit(im, *a, **k))
    big = Image.new("RGB", (300, 200), (200, 10, 10))
    path = tmp_path / "big.parquet"
    data.from_rows([{"question": f"Q{i}?", "answer": "1", "image": big} for i in range(50)]).to_parquet(str(path))
    cfg = compose_cfg("recipe=single", "data=hf", f"data.path={path}", "data.test_size=10")
    splits = recipes.stage_data(cfg)  # also runs the reward and sampler column checks
    grpo_rows = training.build_dataset(cfg, splits["train"])
    assert len(sampling._column(grpo_rows, "id")) == 40  # what the curriculum sampler reads from the trainer's data
    assert decoded == []  # loading, mapping, checking, splitting and column reads decode nothing
    assert splits["train"][3]["images"][0].size == (64, 48)  # read: fitted to 4096 px, sides multiples of 16
    assert decoded == [(300, 200)]  # one row read, one image decoded
    (tmp_path / "img").mkdir()
    big.save(tmp_path / "img" / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "question": "Q?", "answer": "1"}) + "\n")
    jsonl = data.jsonl_rows(str(tmp_path / "d.jsonl"), str(tmp_path / "img"), {"image": "image", "question": "question",
                                                                                 "answer": "answer"})  # fmt: skip
    assert len(decoded) == 1 and images.capped(jsonl, 4096, 16)[0]["images"][0].size == (64, 48)


def test_an_image_that_cannot_be_decoded_names_its_row():
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    feats = Features({"id": Value("string"), "image": ImageFeature()})
    cell = {"bytes": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "path": None}  # a PNG signature, then garbage
    view = images.capped(Dataset.from_dict({"id": ["r7"], "image": [cell]}, features=feats), 4096, 16)
    with pytest.raises(ConfigError, match=r"^row r7: column 'image' holds an image that cannot be decoded \("):
        view[0]


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    Image.new("RGB", (4000, 3000), (10, 200, 10)).save(tmp_path / "big.jpg", quality=80)
    img = Image.open(tmp_path / "big.jpg")
    img.draft("RGB", images.target_size(4000, 3000, 4096, 16))
    assert img.size == (500, 375)  # what `decode` reads: 1/8 of the pixels per side, not 12 M pixels
    cell = {"bytes": (tmp_path / "big.jpg").read_bytes(), "path": None}
    assert images.decode(cell, 4096, 16).size == (64, 48)


class Recorder(generation.Backend):
    """A generation backend that records the image sizes it is handed and answers "1"."""

    sizes: list

    def generate(self, rows, n=1, temperature=0.0, template=None):
        self.sizes += [im.size for i in range(len(rows)) for im in rows[i].get("images") or []]
        return [["<think>one</think><answer>1</answer>"] * n for _ in range(len(rows))]


def test_oversized_images_reach_trainer_evaluator_and_curation_capped(tmp_path):
    big = [Image.new("RGB", (256, 256), (i * 20, 0, 0)) for i in range(12)]
    path = tmp_path / "big.parquet"
    data.from_rows([{"question": f"Q{i}?", "answer": "1", "image": im} for i, im in enumerate(big)]).to_parquet(
        str(path)
    )
    cfg = compose_cfg("recipe=single", "algo=grpo", "data=hf", f"data.path={path}", "data.test_size=4", "eval.k=1",
                  "algo.args.per_device_train_batch_size=8", "algo.args.num_generations=2",
                  "algo.args.steps_per_generation=1")  # fmt: skip
    splits = recipes.stage_data(cfg)
    cap = (64, 64)  # model.image_max_pixels=4096, image_factor=16

    # the trainer: the batch TRL's GRPO dataloader hands to its generation step
    from hydra.utils import instantiate

    from reinforce_cot import models, rewards

    path_ = models.resolve_path(cfg.model)
    funcs, _ = rewards.build(cfg.reward)
    trainer = instantiate(cfg.algo.trainer)(
        model=models.load_model(path_, cfg.model),
        args=instantiate(cfg.algo.args, output_dir=str(tmp_path / "ckpt")),
        train_dataset=training.build_dataset(cfg, splits["train"]),
        processing_class=models.load_processing_class(path_, cfg.model),
        reward_funcs=funcs,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch and {im.size for row in batch for im in row["images"]} == {cap}

    rec = Recorder(data_cfg=cfg.data)
    rec.sizes = []
    evaluation.evaluate_backend(rec, splits["test"], cfg)
    assert len(rec.sizes) == 4 * 3 and set(rec.sizes) == {cap}  # greedy, k=1 sampled, answer-only

    rec.sizes = []
    with open_dict(cfg):
        cfg.curate.update(k=2, hack_tries=1, hack_max_reasoning_chars=0)  # the recorder reasons: no prompt is a hack
    out = tmp_path / "curated"
    out.mkdir()
    curation._curate(cfg, cfg.curate, rec, splits, out, "01_curate", "model")
    assert len(rec.sizes) == 8 * 2 and set(rec.sizes) == {cap}  # measured on capped images ...
    written = sources.load_split(str(out))
    assert written[0]["images"][0].size == (256, 256)  # ... and written with the source's own bytes


def test_multi_image_rows_reach_the_processor_as_two_images(root):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from reinforce_cot import models

    cfg = layout_cfg(root, "sharegpt", "algo=sft")
    train = recipes.stage_data(cfg)["train"]
    multi = next(i for i, r in enumerate(data.text_rows(train)) if r["question"].count("<image>") == 2)
    ds = training.build_dataset(cfg, train)
    row = ds[multi]
    blocks = [b["type"] for b in row["prompt"][0]["content"]]
    assert blocks == ["text", "image", "text", "image", "text"] and len(row["images"]) == 2  # at the markers
    processor = models.load_processing_class(models.resolve_path(cfg.model), cfg.model)
    batch = DataCollatorForVisionLanguageModeling(processor)([row])  # what SFTTrainer collates
    assert batch["image_grid_thw"].shape[0] == 2
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = batch["input_ids"][0].tolist()
    runs = sum(1 for a, b in zip([None, *ids], ids) if b == pad and a != pad)
    assert runs == 2  # two images, each its own run of image tokens where its marker was


@pytest.mark.slow  # 2 SFT + 2 GRPO steps in process: ~5 s each, after the checkpoint fixtures
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sft_then_grpo_train_on_each_layout(root, layout, tmp_path, sft_checkpoint, sft_text_checkpoint, monkeypatch):
    """The real stage function and TRL trainers, in process, 2 steps each (sizes shrunk for time; the
    assertions are what they would be on a real run)."""
    monkeypatch.chdir(tmp_path)
    image = LAYOUTS[layout][2]
    smoke = ["debug=smoke", "algo.args.max_steps=2", "algo.args.per_device_train_batch_size=8"]
    sft_cfg = layout_cfg(root, layout, "algo=sft", "reward=none", *smoke)
    with open_dict(sft_cfg):
        sft_cfg.stage = {"id": "01_sft", "name": "sft", "kind": "train"}
    out = training.train_stage(sft_cfg, tmp_path, "01_sft", recipes.stage_data(sft_cfg))
    assert out["global_step"] == 2
    assert_every_tensor_moved(_tiny_weights(sft_cfg), out["final"])  # with images: the vision tower moved too

    # GRPO from a checkpoint that gets some answers right (from random weights every reward is 0)
    start = sft_checkpoint if image else sft_text_checkpoint
    rl_cfg = layout_cfg(root, layout, "algo=grpo", f"model.init_from={start}", *smoke, "algo.args.num_generations=4")
    with open_dict(rl_cfg):
        rl_cfg.stage = {"id": "02_rl", "name": "rl", "kind": "train"}
    out = training.train_stage(rl_cfg, tmp_path, "02_rl", recipes.stage_data(rl_cfg))
    logged = {k for h in out["log_history"] for k in h}
    assert out["global_step"] == 2 and {"rewards/accuracy/mean", "rewards/format/mean"} <= logged
    assert changed_tensors(start, out["final"])


def _tiny_weights(cfg) -> Path:
    from reinforce_cot import models

    return Path(models.resolve_path(cfg.model))


def test_mixture_interleaves_by_weight_with_each_sources_mapping(root):
    mix = (f"data.mixture=[{{path: {root / 'hub_shapes'}, weight: 3, fields: {{question: problem, answer: solution}}}},"
           f"{{path: {root / 'saved_shapes'}, weight: 1}}]")  # fmt: skip
    cfg = compose_cfg("recipe=single", "data=hf", mix, "data.stopping_strategy=all_exhausted")
    first = recipes.stage_data(cfg)
    again = recipes.stage_data(compose_cfg("recipe=single", "data=hf", mix, "data.stopping_strategy=all_exhausted"))
    ids = data.column(first["train"], "id")
    assert ids == data.column(again["train"], "id")  # the data seed fixes the order
    sources_ = data.column(first["train"], "source")
    hub = sum(s.endswith("hub_shapes") for s in sources_)
    assert {s.rsplit("/", 1)[-1] for s in sources_} == {"hub_shapes", "saved_shapes"}
    assert 2 < hub / (len(sources_) - hub) < 4.5  # ~3:1
    assert all(a.isdigit() for a in data.column(first["train"], "answer"))  # each source mapped its own way
    assert first["train"][0]["images"][0].size == (32, 32)


def test_written_datasets_load_back_with_data_hf(tmp_path):
    src = data.from_rows(
        [{"question": f"Q{i}?", "answer": str(i), "image": Image.new("RGB", (100, 40), (i, 0, 0))} for i in range(6)]
    )
    view = images.capped(src, 256, 16)  # what a stage reads; the writer must store the original instead
    out = data.write_dataset(tmp_path / "ds", {
        "sft": {"train": (view.select([4, 1]), {"pass_rate": [0.5, 1.0]}), "test": (view.select([0]), None)},
        "dpo": {"train": (None, {"question": ["Q?"], "answer": ["1"], "chosen": ["a"], "rejected": ["b"]})},
    })  # fmt: skip
    assert "config_name: sft" in (out / "README.md").read_text()
    train = sources.load_split(str(out), name="sft")
    assert data.column(train, "answer") == ["4", "1"] and data.column(train, "pass_rate") == [0.5, 1.0]
    assert view[4]["images"][0].size == (16, 16)  # the stage saw the capped image ...
    assert train[0]["images"][0].size == (100, 40)  # ... the written dataset holds the original
    assert train[0]["images"][0].tobytes() == src[4]["image"].tobytes()
    test = sources.load_split(str(out), name="sft", role="test")
    assert data.column(test, "pass_rate") == [None]  # the config's columns, empty where the split has none
    assert data.column(sources.load_split(str(out), name="dpo"), "chosen") == ["a"]


def test_a_second_load_reuses_the_cached_mapping(tmp_path):
    path = layouts.problem_solution_parquet(tmp_path, n=1200)  # > 1000 rows: num_proc applies
    kw = {"fields": {**QA, "reasoning": "solution"}}
    first = sources.load_split(str(path), **kw)
    files = sorted(f["filename"] for f in first.cache_files)
    mtimes = [Path(f).stat().st_mtime_ns for f in files]
    again = sources.load_split(str(path), **kw)
    assert sorted(f["filename"] for f in again.cache_files) == files  # same fingerprints: nothing recomputed
    assert [Path(f).stat().st_mtime_ns for f in files] == mtimes
    parallel = sources.load_split(
        str(path), num_proc=2, fields=QA
    )  # other fields: a new fingerprint, mapped in 2 processes
    maps = [Path(f["filename"]).name for f in parallel.cache_files if Path(f["filename"]).name.startswith("cache-")]
    assert any("_of_00002" in name for name in maps), maps  # datasets' shards of a 2-process map
    assert [(r["question"], r["answer"], r["id"]) for r in data.text_rows(parallel)] == [
        (r["question"], r["answer"], r["id"]) for r in data.text_rows(first)
    ]


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_debug_smoke_works_for_every_data_config(name, root, tmp_path):
    extra = {
        "jsonl": [f"data.train.path={tmp_path / 'd.jsonl'}", f"data.test.path={tmp_path / 'd.jsonl'}"],
        "hf": [f"data.path={root / 'saved_shapes'}"],
    }.get(name, [])
    lines = [json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) for i in range(200)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    splits = data.load_splits(compose_cfg(f"data={name}", "debug=smoke", *extra).data)
    assert 0 < len(splits["train"]) <= 96 and 0 < len(splits["test"]) <= 16


def test_jsonl_errors_name_the_split_key(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"^data\.train\.path=.*empty\.jsonl: the file holds no rows"):
        data.load_splits(compose_cfg("data=jsonl", f"data.train.path={tmp_path}/empty.jsonl",
                                    f"data.test.path={tmp_path}/empty.jsonl").data)  # fmt: skip
    (tmp_path / "ok.jsonl").write_text('{"question": "Q?", "answer": "1"}\n')
    with pytest.raises(ConfigError, match=r"^data\.test\.path=.*gone\.jsonl: no such file; point data\.test\.path"):
        data.load_splits(compose_cfg("data=jsonl", f"data.train.path={tmp_path}/ok.jsonl",
                                    f"data.test.path={tmp_path}/gone.jsonl").data)  # fmt: skip


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _bad(tmp_path: Path, case: str) -> list[str]:
    """data=hf overrides that make `case` happen."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    path = tmp_path / "d.parquet"
    rows = {"problem": ["A?", "B?", "C?"], "solution": ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"]}
    if case == "not_an_image":
        feats = Features({"problem": Value("string"), "solution": Value("string"), "image": ImageFeature()})
        cells = [{"bytes": _png("red"), "path": None}, {"bytes": b"not a png", "path": None}, None]
        pq.write_table(pa.table({**rows, "image": cells}, schema=feats.arrow_schema), path)
    elif case == "markers":
        rows["problem"] = ["<image><image>A?", "B?", "C?"]
        Dataset.from_dict({**rows, "image": [Image.new("RGB", (8, 8))] * 3}).to_parquet(str(path))
    elif case == "empty":
        Dataset.from_dict({"problem": ["A?", "B?", "C?"], "solution": ["", None, ""]}).to_parquet(str(path))
    else:
        Dataset.from_dict({**rows, "level": [1, 2, 3]}).to_parquet(str(path))
    base = ["data=hf", f"data.path={path}", "data.fields.question=problem", "data.fields.answer=solution",
            "data.test_size=1"]  # fmt: skip
    return {
        "missing_column": [*base, "data.fields.answer=answer_text"],
        "split": ["data=hf", f"data.path={path}", *base[2:4], "data.test_split=validation"],
        "weight": ["data=hf", f"data.mixture=[{{path: {path}, weight: 1}}, {{path: {path}, weight: 0}}]", *base[2:4]],
        "hub_offline": ["data=hf", "data.path=nobody-here/no-such-dataset"],
        "not_images": [*base, "data.fields.image=level"],
    }.get(case, base)


BAD = {
    "hub_offline": r"data\.path=nobody-here/no-such-dataset: not in the local cache, and HF_HUB_OFFLINE=1 allows no "
    r"download; download it where there is network \(hf download nobody-here/no-such-dataset --repo-type dataset\)",
    "missing_column": r"data\.fields\.answer=answer_text: no such column \(columns: \['problem', 'solution', 'level'\]\); "
    r"map it with data\.fields\.answer=<column>",
    "not_an_image": r"d\.parquet \(train\): row d\.parquet-train-1: column 'image' holds b'not a png'\.\.\., which "
    r"is not an image; fix or drop the row",
    "markers": r"row d\.parquet-train-0: 2 <image> markers but 1 images",
    "split": r"no split 'validation'; the splits are \['train'\]: set data\.test_split \(or carve a test split out "
    r"of train with data\.test_size=0\.05\)",
    "weight": r"data\.mixture\[1\]\.weight=0 must be > 0",
    "empty": r"no rows left after dropping 3 rows without a question or answer; check data\.fields\.question",
    "not_images": r"column 'level' holds Value\('int64'\), not images; map data\.fields\.image to an image column",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_one_line_naming_the_key_or_row(tmp_path, case):
    cfg = compose_cfg("recipe=single", *_bad(tmp_path, case))
    with pytest.raises(ConfigError, match=BAD[case]) as e:
        recipes.stage_data(cfg)  # what recipes.run does before any weights load
    assert "\n" not in str(e.value)


def test_a_cached_hub_dataset_loads_offline_without_the_network(tmp_path, monkeypatch, root):
    """A hub id whose snapshot is in the hub cache (what `hf download` leaves) loads with HF_HUB_OFFLINE=1,
    and no socket is opened."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "datasets--someone--shapes"
    commit = "0" * 40
    shutil.copytree(root / "hub_shapes", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("data=hf opened a socket while offline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = compose_cfg("recipe=single", "data=hf", "data.path=someone/shapes", "data.fields.question=problem",
                  "data.fields.answer=solution")  # fmt: skip
    splits = recipes.stage_data(cfg)
    assert (len(splits["train"]), len(splits["test"])) == (24, 8)


@pytest.mark.slow  # ~20 s of subprocess: the in-process test above checks the same errors before any weights
def test_bad_data_stops_the_cli_before_any_weights(train, tmp_path):
    run = train("recipe=single", *_bad(tmp_path, "missing_column"))
    assert run.returncode == 2, run
    err = [line for line in run.stderr.splitlines() if line.strip()]
    assert err[-1].startswith("error: ") and "data.fields.answer=answer_text: no such column" in err[-1], run
    assert "loaded Qwen" not in run.stdout + run.stderr
