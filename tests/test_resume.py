"""A run killed mid-way and resumed ends at the planned step with every logged metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import kill_at_checkpoint, run_train

STEPS = 12


@pytest.mark.slow  # a CLI run killed at its checkpoint, then resumed: ~15 s
def test_kill_then_resume_reaches_the_same_final_step(tmp_path):
    run_dir = kill_at_checkpoint(
        tmp_path, "01_sft/checkpoint-4", "recipe=single", "algo=sft", "reward=none", "debug=smoke",
        f"algo.args.max_steps={STEPS}", "algo.args.save_steps=4", "eval.k=0", "algo.args.save_total_limit=null",
    )  # fmt: skip

    resumed = run_train(tmp_path, f"resume={run_dir}")
    assert resumed.returncode == 0, resumed
    result = json.loads((run_dir / "result" / "01_sft.json").read_text())
    assert result["global_step"] == STEPS
    assert Path(result["resumed_from"]).name.startswith("checkpoint-")
    logged_steps = sorted({h["step"] for h in result["log_history"] if "loss" in h})
    assert logged_steps == list(range(1, STEPS + 1))  # logging_steps=1: no step's loss is missing
    assert list(run_dir.glob("backup/resume-*/overrides.yaml"))
    assert (run_dir / "result" / "summary.json").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard" / "01_sft"))
    acc.Reload()
    assert {e.step for e in acc.Scalars("train/loss")} == set(range(1, STEPS + 1))
