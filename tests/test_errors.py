"""Bad input ends in one line that names the key (or row) and the fix, exit code 2, before any
weights load."""

from __future__ import annotations

import json

import pytest
from PIL import Image

LOADED = "loaded Qwen"  # logged when weights load: none of these may get that far


def _check(run, *needles):
    assert run.returncode != 0, run
    err = [line for line in run.stderr.splitlines() if line.strip()]
    assert err, run
    for needle in needles:
        assert needle in run.stderr, run
    assert LOADED not in run.stdout + run.stderr
    return err


def test_unknown_group_option(train):
    err = _check(train("algo=ppo"), "Could not find 'algo/ppo'", "Available options in 'algo'")
    assert any("grpo" in line for line in err)


def test_unknown_key(train):
    _check(train("algo.args.no_such_field=1"), "no_such_field")


def test_num_generations_must_divide_the_generation_batch(train):
    err = _check(train("recipe=single", "algo=grpo", "algo.args.num_generations=3"), "algo.args.num_generations=3")
    assert err[-1].startswith("error: ") and "use one of" in err[-1]


def test_gspo_needs_off_policy_steps(train):
    _check(train("recipe=single", "algo=gspo", "algo.args.steps_per_generation=1"), "steps_per_generation")


def test_model_path_that_does_not_exist(train, tmp_path):
    _check(train(f"model.path={tmp_path}/nope"), f"model.path={tmp_path}/nope does not exist")


def test_resume_of_a_folder_that_is_not_a_run_dir(train, tmp_path):
    (tmp_path / "notarun").mkdir()
    _check(train(f"resume={tmp_path}/notarun"), "not a run dir")


def test_empty_dataset(train):
    _check(train("data.train.n=0"), "the train split is empty")


def test_image_data_with_a_text_model(train):
    _check(train("model=tiny_lm"), "data=shapes_count has images but model=tiny_lm is text-only")


def _jsonl(tmp_path, rows):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"garbage")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    return ["data=jsonl", f"data.train.path={path}", f"data.test.path={path}", f"data.image_folder={tmp_path}/img"]


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"image": "ok.png", "question": "Q?"}, "d.jsonl:2: no 'answer' field"),
        ({"image": "gone.png", "question": "Q?", "answer": "1"}, "gone.png does not exist"),
        ({"image": "bad.png", "question": "Q?", "answer": "1"}, "bad.png is not an image"),
    ],
)
def test_jsonl_rows(train, tmp_path, bad, needle):
    good = {"image": "ok.png", "question": "Q?", "answer": "1"}
    _check(train(*_jsonl(tmp_path, [good, bad])), needle)


def test_jsonl_path_is_required(train):
    _check(train("data=jsonl"), "data.test.path, data.train.path: required")
