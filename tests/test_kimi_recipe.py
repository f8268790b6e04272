"""recipe=kimi end to end on the tiny VLM (reduced sizes): SFT -> curate -> RL with curriculum+prioritized
sampling and the length reward after warm-up -> long2short (shortest rejection sampling -> SFT, length/
wrong pairs -> DPO, averaging of the long and short models) -> evaluation of every model."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from reinforce_cot import data, models, rewards, sources
from tests.helpers import compose_cfg, read_jsonl, run_in_process


def _written(folder, config):  # as the later stages load it: data=hf on the folder
    return data.text_rows(sources.load_split(str(folder), name=config))


@pytest.mark.slow  # 8 stages in process: ~25 s
def test_kimi_recipe_end_to_end(tmp_path, sft_checkpoint):
    run = run_in_process(
        tmp_path,
        "recipe=kimi",
        "debug=smoke",
        f"model.init_from={sft_checkpoint}",  # a model that answers some prompts right: long2short needs correct chains
        "curate.k=4",  # reduced from 10 / 8 samples to keep the test near a minute
        "curate.hack_tries=2",
        "rejection.k=4",
        "rejection.max_prompts=32",
        "eval.k=2",
        "algo.args.steps_per_generation=1",  # RL: a generation round (and reward log) every step, not every 4th
    )
    d = run.dir
    ids = ["01_sft", "02_curate", "03_rl", "04_shortest", "05_short_sft", "06_short_dpo", "07_merge", "08_evaluate"]
    for sid in ids:
        assert (d / "result" / f"{sid}.json").is_file(), sid

    # RL trained on the curated prompts, with the configured sampler and the length reward after warm-up
    rl_cfg = (d / "backup" / "stages" / "03_rl.yaml").read_text()
    assert f"path: {d / 'data' / '02_curate'}\n" in rl_cfg
    history = run.result("03_rl.json")["log_history"]
    steps = {h["step"]: h for h in history if "rewards/length/mean" in h}
    assert sorted(steps) == [1, 2, 3, 4]
    assert steps[1]["rewards/length/mean"] == steps[2]["rewards/length/mean"] == 0.0  # warm-up: half of 4 steps
    assert steps[1]["rewards/length/std"] == steps[2]["rewards/length/std"] == 0.0
    assert any(steps[s]["rewards/length/std"] > 0 for s in (3, 4))  # then it ranks completions by length
    assert all("sampler/mean_success" in h for h in steps.values())

    # long2short data: SFT rows are each prompt's shortest correct chain; DPO chosen is that chain too
    out = d / "data" / "04_shortest"
    gens = {g["id"]: g["completions"] for g in read_jsonl(out / "generations.jsonl")}
    sft_rows = _written(out, "sft")
    assert sft_rows
    processor = models.load_processing_class(str(sft_checkpoint), compose_cfg().model)  # the stage's tokenizer
    tokens = lambda text: len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for row in sft_rows:
        samples = gens[row["source_id"]]
        correct = [s for s in samples if rewards.answers_match(rewards.extract_answer(s), row["answer"])]
        assert row["completion"] in correct
        assert len({r["source_id"] for r in sft_rows if r["source_id"] == row["source_id"]}) == 1  # one per prompt
        assert row["length"] == tokens(row["completion"]) == min(map(tokens, correct))  # the shortest, in tokens
    shortest = {r["source_id"]: r["completion"] for r in sft_rows}
    pairs = _written(out, "dpo")
    assert pairs
    for p in pairs:
        assert p["chosen"] == shortest[p["source_id"]]
        wrong = not rewards.answers_match(rewards.extract_answer(p["rejected"]), p["answer"])
        assert wrong == (p["pair_type"] == "wrong")
        if not wrong:
            assert p["pair_type"] == "length" and p["rejected"] != p["chosen"]

    # the merged model is the mean of the long (RL) and short (SFT) models
    rl = load_file(d / "ckpt" / "03_rl" / "final" / "model.safetensors")
    short = load_file(d / "ckpt" / "05_short_sft" / "final" / "model.safetensors")
    merged = load_file(d / "ckpt" / "07_merge" / "merged" / "model.safetensors")
    key = next(k for k in rl if (rl[k] != short[k]).any())
    assert ((rl[key] + short[key]) / 2 - merged[key]).abs().max() < 1e-5

    summary = run.result("summary.json")
    assert [r["stage"] for r in summary["rows"]] == ["01_sft", "03_rl", "05_short_sft", "06_short_dpo", "07_merge"]
    assert all(r["mean_len"] > 0 for r in summary["rows"])
