"""The default recipe end to end (SFT -> GRPO -> evaluate) at reduced size."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_quickstart_end_to_end(train):
    run = train(
        "data.train.n=800",  # a quarter of the default data and steps: the test checks the wiring
        "algo.args.max_steps=8",  # RL steps; the SFT stage keeps its 3 epochs (150 steps of 16)
        "algo.args.per_device_train_batch_size=16",
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
    assert run.result("02_rl.json")["global_step"] == 8
    table = (run.dir / "result" / "summary.md").read_text()
    assert "| 02_rl " in table and "greedy_acc" in table
    assert "02_rl" in run.stdout + run.stderr  # the table is printed
