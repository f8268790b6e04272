"""Rejection sampling: pairs by hand, datasets from a real model checked sample by sample, data_from
composition, and recipe=unified_reward_think end to end (cold start -> rs -> SFT -> DPO -> evaluate)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf, open_dict

from reinforce_cot import data, generation, preference, recipes, rejection, rewards, sources
from reinforce_cot.errors import ConfigError
from tests.helpers import assert_every_tensor_moved, compose_cfg, read_jsonl, run_in_process


def _rcfg(**kw):
    return OmegaConf.create({"dpo_pairs": "wrong", "max_pairs_per_prompt": 2, "length_ratio": 1.5} | kw)


def test_pairs_by_hand():
    correct = [("c10", 10), ("c14", 14), ("c20", 20)]  # shortest first, as sample() orders them
    wrong = [("w1", 12), ("w2", 30), ("w3", 5)]
    assert rejection._pairs(correct, wrong, _rcfg()) == [("c10", "w1", "wrong"), ("c14", "w2", "wrong")]
    # long2short: only c20 is >= 1.5 x 10 tokens; c14 is not
    assert rejection._pairs(correct, wrong, _rcfg(dpo_pairs="length")) == [("c10", "c20", "length")]
    assert len(rejection._pairs(correct, wrong, _rcfg(dpo_pairs="both", max_pairs_per_prompt=1))) == 2
    assert rejection._pairs([], wrong, _rcfg(dpo_pairs="both")) == []  # no correct chain: no pair
    assert rejection._pairs(correct[:1], wrong, _rcfg(max_pairs_per_prompt=5)) == [
        ("c10", w, "wrong") for w in ("w1", "w2", "w3")
    ]


def _written(folder: Path, config: str) -> list[dict]:
    """What the stage wrote, loaded the way a later stage loads it (data=hf on the folder)."""
    return data.text_rows(sources.load_split(str(folder), name=config))


@pytest.mark.slow  # the sft_checkpoint fixture, then 24 prompts x 4 samples: ~5 s
def test_sample_writes_verified_sft_and_dpo_data(sft_checkpoint, tmp_path):
    cfg = compose_cfg("reward=r1", "rejection.k=4", "data.train.n=24", "data.test.n=8")
    splits = recipes.stage_data(cfg)
    rows = splits["train"]
    backend = generation.load(cfg, str(sft_checkpoint))
    out = tmp_path / "all"
    rep = rejection.sample(backend, rows, cfg, out, tokenizer=backend.tokenizer, test=splits["test"])

    gens = {r["id"]: r["completions"] for r in read_jsonl(out / "generations.jsonl")}
    by_id = {r["id"]: r for r in data.text_rows(rows)}
    assert len(gens) == 24 and all(len(c) == 4 for c in gens.values())
    # the report agrees with re-scoring every sample
    right = {i: rewards.accuracy_reward(c, answer=[by_id[i]["answer"]] * 4) for i, c in gens.items()}
    assert [p["correct"] for p in rep["per_prompt"]] == [int(sum(right[i])) for i in by_id]
    assert rep["samples"] == 96 and rep["correct_samples"] == sum(sum(v) for v in right.values()) > 0
    assert all(Path(f).exists() for f in rep["files"].values())  # what the report points at was written
    assert rep["sft"]["prompts_dropped_no_correct_chain"] == sum(sum(v) == 0 for v in right.values())

    sft = _written(out, "sft")
    distinct = sum(len({t for t, ok in zip(gens[i], right[i]) if ok}) for i in gens)
    assert len(sft) == rep["sft"]["rows"] == distinct  # keep=all: every distinct correct chain
    for rec in sft:
        src = by_id[rec["source_id"]]
        assert rec["completion"] in gens[src["id"]]
        assert rewards.accuracy_reward([data.target(rec)], answer=[src["answer"]]) == [1.0]

    dpo = _written(out, "dpo")
    assert dpo and len(dpo) == rep["dpo"]["rows"]
    for rec in dpo:
        src = by_id[rec["source_id"]]
        assert {rec["chosen"], rec["rejected"]} <= set(gens[src["id"]])  # same prompt
        assert rewards.accuracy_reward([rec["chosen"], rec["rejected"]], answer=[src["answer"]] * 2) == [1.0, 0.0]
        assert rec["question"] == src["question"] and rec["pair_type"] == "wrong"

    # data=hf loads it back: pairs a DPO stage accepts, each with its prompt's own image, and the test split
    loaded = sources.load_split(str(out), name="dpo")
    preference.check_pairs(loaded, "hf", "dpo")
    source_row = list(by_id).index(dpo[0]["source_id"])
    assert loaded[0]["images"][0].tobytes() == rows[source_row]["images"][0].tobytes()
    assert len(sources.load_split(str(out), name="sft", role="test")) == len(splits["test"])

    # keep=shortest + long2short pairs from the same samples (the copied generations are reused, not redone)
    short = tmp_path / "short"
    short.mkdir()
    shutil.copy(out / "generations.jsonl", short / "generations.jsonl")
    with open_dict(cfg):
        cfg.rejection.keep, cfg.rejection.dpo_pairs, cfg.rejection.length_ratio = "shortest", "length", 1.0
    rep2 = rejection.sample(backend, rows, cfg, short, tokenizer=backend.tokenizer)
    assert read_jsonl(short / "generations.jsonl") == read_jsonl(out / "generations.jsonl")
    kept = _written(short, "sft")
    assert len(kept) == rep["prompts_with_a_correct_chain"] == len({r["source_id"] for r in kept})
    tok = lambda t: len(backend.tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    for rec in kept:
        i = rec["source_id"]
        assert tok(rec["completion"]) == min(tok(t) for t, ok in zip(gens[i], right[i]) if ok)
    for rec in _written(short, "dpo"):
        assert rec["pair_type"] == "length" and tok(rec["rejected"]) >= tok(rec["chosen"])
        assert rewards.accuracy_reward([rec["rejected"]], answer=[by_id[rec["source_id"]]["answer"]]) == [1.0]
    assert rep2["sft"]["dropped_not_shortest"] == distinct - len(kept)


def test_data_from_points_a_stage_at_an_earlier_stages_data(hydra_ctx, tmp_path):
    user = ["recipe=unified_reward_think", "data.train.n=100"]
    stages = recipes.compose_stages(compose(config_name="train", overrides=user), user, tmp_path)
    assert list(stages) == ["01_cold_start", "02_rs", "03_sft", "04_dpo", "05_evaluate"]
    cold, rs, sft, dpo = (stages[s] for s in ["01_cold_start", "02_rs", "03_sft", "04_dpo"])
    assert cold.data.train.n == rs.data.train.n == 100  # your data overrides reach the stages on your data
    assert rs.stage.kind == "rejection_sample" and rs.model.init_from == str(tmp_path / "ckpt" / "01_cold_start")
    folder = str(tmp_path / "data" / "02_rs")
    assert (sft.data.name, sft.algo.name, sft.stage.data_from) == ("sft", "sft", "02_rs/sft")
    assert sft.data.train._target_ == "reinforce_cot.sources.load_split"  # data=hf on the folder it writes
    assert sft.data.train.path == sft.data.test.path == folder and sft.data.train.name == "sft"
    assert (dpo.algo.name, dpo.data.train.path, dpo.data.train.name) == ("dpo", folder, "dpo")
    assert dpo.model.init_from == str(tmp_path / "ckpt" / "03_sft")
    for key in recipes.DATA_FROM_KEYS:  # the prompts the samples were drawn with
        assert sft.data[key] == rs.data[key], key
    assert list(stages["05_evaluate"].stage.targets) == ["01_cold_start", "03_sft", "04_dpo"]


def test_debug_smoke_reaches_the_stages_on_written_data(hydra_ctx, tmp_path):
    user = ["recipe=unified_reward_think", "debug=smoke"]  # smoke sets data.train.n: every loader takes it
    stages = recipes.compose_stages(compose(config_name="train", overrides=user), user, tmp_path)
    assert stages["02_rs"].data.train.n == stages["03_sft"].data.train.n == 96


def test_data_from_a_later_stage_is_refused(hydra_ctx, tmp_path):
    cfg = compose(config_name="train", overrides=["recipe=unified_reward_think"])
    with open_dict(cfg):
        cfg.recipe.stages[2].data_from = "dpo"
    with pytest.raises(ConfigError, match=r"data_from=dpo: not an earlier stage; use one of \['cold_start', 'rs'\]"):
        recipes.compose_stages(cfg, [], tmp_path)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("rejection.k=0", "rejection.k=0: rejection sampling needs at least 1 sample per prompt"),
        ("generation=vllm", "generation=vllm: the 'vllm' package is not installed"),
    ],
)
def test_bad_rejection_settings_stop_before_weights(tmp_path, override, needle):
    with pytest.raises(ConfigError) as e:
        run_in_process(tmp_path, "recipe=unified_reward_think", override)
    assert needle in str(e.value) and "\n" not in str(e.value)  # one line
    assert not (tmp_path / "run").exists()  # before provenance, so before any weights


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("rejection.keep=longest", "rejection.keep=longest: use all or shortest"),
        ("rejection.dpo_pairs=random", "rejection.dpo_pairs=random: use wrong, length, both or none"),
        ("rejection.length_ratio=0.5", "rejection.length_ratio=0.5 must be >= 1"),
        ("rejection.temperature=0", "rejection.temperature=0: k=8 greedy samples are identical"),
        ("reward=format", "rejection sampling decides correctness with an `accuracy` reward"),
    ],
)
def test_rejection_settings_are_validated(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        rejection.validate(compose_cfg(override))


@pytest.mark.slow  # 5 stages in process: ~30 s
def test_unified_reward_think_end_to_end(tmp_path):
    run = run_in_process(
        tmp_path,
        "recipe=unified_reward_think",
        "data.train.n=800",  # cold start: 3 epochs of 800 (75 steps of 32), as the quickstart test
        "data.test.n=48",
        "rejection.k=4",  # 96 prompts x 4 samples instead of the whole split x 8
        "rejection.max_prompts=96",
        "eval.max_prompts=24",
        "eval.k=2",
    )
    rs = run.result("02_rs.json")
    assert (rs["prompts"], rs["samples"]) == (96, 384)
    assert rs["correct_samples"] > 0 and rs["sft"]["rows"] > 0 and rs["dpo"]["rows"] > 0
    data_dir = run.dir / "data" / "02_rs"
    assert len(sources.load_split(str(data_dir), name="sft")) == rs["sft"]["rows"]
    assert len(sources.load_split(str(data_dir), name="dpo", role="test")) == rs["test_rows"] > 40  # 48 minus repeats

    sft = run.result("03_sft.json")  # trained on the correct chains: 1 epoch in batches of 32
    assert sft["global_step"] == math.ceil(rs["sft"]["rows"] / 32)
    stage = OmegaConf.load(run.dir / "backup" / "stages" / "03_sft.yaml")
    assert (stage.data.train.path, stage.data.train.name) == (str(data_dir), "sft")
    dpo = run.result("04_dpo.json")  # DPO on the pairs, from the SFT model
    assert dpo["global_step"] == math.ceil(rs["dpo"]["rows"] / 16) and "train_loss" in dpo["train_metrics"]
    assert_every_tensor_moved(run.dir / "ckpt" / "03_sft" / "final", run.dir / "ckpt" / "04_dpo" / "final")

    summary = run.result("summary.json")
    assert [r["stage"] for r in summary["rows"]] == ["01_cold_start", "03_sft", "04_dpo"]
    for r in summary["rows"]:
        assert 0 <= r["greedy_acc"] <= 1 and r["k"] == 2
        ev = run.result(f"eval_{r['stage']}.json")
        assert ev["config"]["stage"]["id"] == "05_evaluate" and ev["metrics"]["n_prompts"] == 24
        folder = run.dir / "result" / f"eval_{r['stage']}"
        for f in ["accuracy_by_difficulty.png", "length_hist.png", "reasoning_vs_answer_only.png",
                  "steps_per_answer.png", "samples.html"]:  # fmt: skip
            assert (folder / f).stat().st_size > 1000, f
    assert (run.dir / "result" / "compare.png").stat().st_size > 1000
    assert "| 04_dpo" in (run.dir / "result" / "summary.md").read_text()
