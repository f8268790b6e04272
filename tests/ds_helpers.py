"""Helpers of tests/test_dynamic_sampling.py: a reward that makes every other group uniform, and one real GRPO
stage run in this process (`training.train_stage`) that records what every micro-batch trained.

Run by torchrun for the 2-process test, each rank writing `<out>/rank<r>.json` (from the repository root, or
with it on PYTHONPATH: the reward's `_target_` is tests.ds_helpers.half_uniform):

    torchrun --nproc_per_node 2 -m tests.ds_helpers <sft checkpoint> <out dir> [override ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.helpers import compose_cfg

# the test reward as config overrides: every other group of each call uniform, the others mixed
HALF_UNIFORM = [
    "reward=none",
    "+reward.half.fn._target_=tests.ds_helpers.half_uniform",
    "+reward.half.fn._partial_=true",
    "+reward.half.fn.group_size=${algo.args.num_generations}",
    "+reward.half.weight=1.0",
    "algo.dynamic_sampling.metric=null",
]


def half_uniform(completions: list, group_size: int, **_) -> list[float]:
    """Per call (one process's rows of one generation round, whole groups in order): the even groups get 1.0
    everywhere (zero spread), the odd ones 1.0 for their first completion and 0.0 for the others, so that
    no completion of a mixed group has zero advantage.

    >>> half_uniform(["a"] * 8, group_size=4)
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    """
    assert len(completions) % group_size == 0, "the test needs whole groups per process"
    return [1.0 if (i // group_size) % 2 == 0 or i % group_size == 0 else 0.0 for i in range(len(completions))]


def compose(sft: Path | str, *overrides: str):
    """One DAPO stage from the SFT checkpoint `sft`, rewarded by `half_uniform`."""
    return compose_cfg("recipe=single", "algo=dapo", "debug=smoke", f"model.init_from={sft}", *HALF_UNIFORM, *overrides)


def run_stage(sft: Path | str, run_dir: Path, *overrides: str) -> dict:
    """Validate and train one stage in this process; returns {"batches": [...], "result": summary}, one
    batch per micro-step: its rows and how many of them have a non-zero advantage."""
    import trl

    from reinforce_cot import config, data, training

    cfg = compose(sft, *overrides)
    config.validate(cfg)
    batches: list[dict] = []
    original = trl.GRPOTrainer._compute_loss

    def recording(self, model, inputs):
        adv = inputs["advantages"]
        batches.append({"rows": int(adv.shape[0]), "nonzero": int((adv != 0).sum()), "step": self.state.global_step})
        return original(self, model, inputs)

    trl.GRPOTrainer._compute_loss = recording
    try:
        result = training.train_stage(cfg, run_dir, "01_dapo", data.load_splits(cfg.data))
    finally:
        trl.GRPOTrainer._compute_loss = original
    return {"batches": batches, "result": result}


if __name__ == "__main__":
    import os

    sft, out, *extra = sys.argv[1:]
    got = run_stage(sft, Path(out) / "run", *extra)
    rank = int(os.environ.get("RANK", "0"))
    summary = {k: got["result"][k] for k in ("global_step", "log_history")}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"batches": got["batches"], **summary}))
