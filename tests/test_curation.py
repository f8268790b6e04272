"""The curate stage: pass rates and difficulty buckets that follow from the recorded samples, the
easy-to-hack filter, a dataset data=hf reads back, and `data_from` wiring into a later stage."""

from __future__ import annotations

import json

import pytest
from hydra import compose
from omegaconf import open_dict

from reinforce_cot import curation, data, recipes, rewards, sources
from reinforce_cot.errors import ConfigError
from tests.helpers import read_jsonl, run_in_process


@pytest.mark.slow  # the sft_checkpoint fixture, then curation in process: ~10 s
def test_curate_stage_measures_filters_and_writes_a_dataset(tmp_path, sft_checkpoint):
    run = run_in_process(
        tmp_path,
        "recipe=curate",
        f"model.init_from={sft_checkpoint}",
        "debug=smoke",
        "curate.k=4",
        "curate.hack_tries=2",
        "curate.hack_max_reasoning_chars=null",  # trust the answer-only prompt: the tiny model reasons anyway
    )
    out = run.dir / "data" / "01_curate"
    report = json.loads((out / "report.json").read_text())
    tr = report["splits"]["train"]
    audit = read_jsonl(out / "train_samples.jsonl")
    kept = data.text_rows(sources.load_split(str(out)))  # as data=hf (a later stage) loads it
    assert tr["n_in"] == len(audit) == 96
    assert tr["n_out"] == len(kept) and tr["n_out"] + sum(tr["dropped"].values()) == tr["n_in"]

    for rec in audit:  # the numbers follow from the recorded samples
        assert len(rec["samples"]) == 4 and len(rec["direct"]) == 2
        acc = rewards.accuracy_reward(rec["samples"], answer=[rec["answer"]] * 4)
        assert rec["pass_rate"] == sum(acc) / 4
        hacked = any(rewards.answers_match(rewards.extract_answer(t), rec["answer"]) for t in rec["direct"])
        assert (rec["dropped"] == "easy_to_hack") == hacked
    assert tr["dropped"].get("easy_to_hack", 0) > 0  # the model guesses counts 1-5 right: Kimi's reason to filter

    by_id = {r["id"]: r for r in audit}
    for row in kept:
        assert row["pass_rate"] == by_id[row["id"]]["pass_rate"]
        assert row["difficulty"] == curation.bucket(row["pass_rate"], [0.7, 0.3])
        assert "source_difficulty" in row and "layout" in row  # every source column travels with the row
    assert tr["per_bucket"] == {str(b): sum(r["difficulty"] == b for r in kept) for b in range(3)}
    assert (out / "report.md").read_text().startswith("# Curation 01_curate")

    rows = sources.load_split(str(out))
    assert rows[0]["images"][0].size == (64, 64)  # the prompt's own image
    test = sources.load_split(str(out), role="test")
    assert report["splits"]["test"] == {"n_in": len(test), "n_out": len(test), "curated": False}


def test_answer_only_try_must_really_skip_reasoning():
    assert curation.answered_without_reasoning("<answer>3</answer>", "3", 0)
    assert curation.answered_without_reasoning("The answer is <answer>3</answer>", "3", 20)
    assert not curation.answered_without_reasoning("<think>1, 2, 3</think><answer>3</answer>", "3", 5)
    assert curation.answered_without_reasoning("<think>1, 2, 3</think><answer>3</answer>", "3", None)
    assert not curation.answered_without_reasoning("<answer>4</answer>", "3", None)


def test_kimi_recipe_trains_rl_on_the_curated_data(hydra_ctx, tmp_path):
    user = ["recipe=kimi", "data.train.n=50"]
    cfg = compose(config_name="train", overrides=user)
    stages = recipes.compose_stages(cfg, user, tmp_path)
    rl = next(s for sid, s in stages.items() if sid.endswith("_rl"))
    cur = next(sid for sid in stages if sid.endswith("_curate"))
    assert rl.data.train.path == rl.data.test.path == str(tmp_path / "data" / cur)  # data=hf on what it writes
    assert rl.data.train._target_ == "reinforce_cot.sources.load_split" and rl.data.name == "default"
    assert rl.data.prompt_template == stages[cur].data.prompt_template  # the prompts curation measured
    assert rl.data.max_completion_length == stages[cur].data.max_completion_length == 40
    assert rl.stage.data_from == f"{cur}/default"
    assert (rl.sampler.name, rl.sampler.column, rl.sampler.prioritize) == ("curriculum", "pass_rate", True)
    assert list(rl.reward) == ["accuracy", "format", "length"] and rl.reward.length.fn.warmup_steps == 0.5
    assert stages[cur].data.train.n == 50  # the user's data override reaches the stages on the source data


def test_data_from_must_name_an_earlier_stage(hydra_ctx, tmp_path):
    cfg = compose(config_name="train", overrides=["recipe=kimi"])
    with open_dict(cfg):
        cfg.recipe.stages[2].data_from = "evaluate"
    with pytest.raises(ConfigError, match=r"data_from=evaluate: not an earlier stage; use one of \['sft', 'curate'\]"):
        recipes.compose_stages(cfg, ["recipe=kimi"], tmp_path)
