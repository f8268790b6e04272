"""The default recipe end to end (SFT -> GRPO -> evaluate) at reduced size."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # ~40 s: the default recipe through the CLI, at reduced size
def test_quickstart_end_to_end(train):
    run = train(
        # half the default data, SFT in batches of 16 (300 steps, as many as the default's) and 8 RL steps:
        # enough for SFT to learn the format and to count above chance, in about a minute
        "data.train.n=1600",
        "algo.args.per_device_train_batch_size=16",  # both stages
        "stages.rl.algo.args.max_steps=8",  # the RL stage only
        "eval.max_prompts=48",
    )
    assert run.returncode == 0, run
    summary = run.result("summary.json")
    rows = {r["stage"]: r for r in summary["rows"]}
    assert list(rows) == ["01_sft", "02_rl"]
    # SFT on chains teaches the format outright and counting above chance (1-5 objects: 0.2)
    assert rows["01_sft"]["format_rate"] >= 0.9
    assert rows["01_sft"]["greedy_acc"] > 0.3
    assert all(0 <= r["sampled_acc"] <= 1 for r in rows.values())
    rl = run.result("02_rl.json")
    assert rl["global_step"] == 8
    # the quickstart evaluates its RL stage while it trains (every 50 steps, so here at step 0 only)
    assert [h["step"] for h in rl["log_history"] if "eval_greedy_accuracy" in h] == [0]
    table = (run.dir / "result" / "summary.md").read_text()
    assert "| 02_rl " in table and "greedy_acc" in table
    assert "02_rl" in run.stdout + run.stderr  # the table is printed
