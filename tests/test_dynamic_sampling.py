"""DAPO's dynamic sampling (reinforce_cot.dynamic_sampling): with a reward that makes half the groups uniform,
every micro-batch trains only mixed groups, on one process and on two; a short batch after the last extra
round; a SIGKILLed run resumes its counts and stops at the same generation budget; extra prompts follow the
configured sampler; bad settings fail in validation. The algo files (dapo, dr_grpo) and the overlong reward."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from datasets import Dataset
from hydra.utils import instantiate

from reinforce_cot import config, rewards, sampling
from reinforce_cot.errors import ConfigError
from tests import ds_helpers
from tests.helpers import ROOT, compose_cfg, free_port, kill_at_checkpoint, run_train

# 4 completions per prompt, 8 per micro-batch x 2 micro-batches = 4 groups per generation batch: small, and
# per-process batches of whole groups (what the half_uniform reward needs)
SMALL = ["algo.args.num_generations=4", "algo.args.steps_per_generation=2", "eval.k=0"]


def _logged(result: dict, key: str) -> list:
    return [h[key] for h in result["log_history"] if key in h and "train_runtime" not in h]


@pytest.mark.slow  # 4 DAPO steps in process: ~3 s each, after the sft_checkpoint fixture
@pytest.mark.parametrize("extra_rounds", [3, 0], ids=["refilled", "short"])
def test_every_micro_batch_trains_only_mixed_groups(tmp_path, sft_checkpoint, extra_rounds):
    """The reward leaves half of each round's groups uniform (zero advantage). Refilled: one extra round
    brings the batch back to 8 mixed groups. Short (no extra round allowed): it trains the 4 there are."""
    got = ds_helpers.run_stage(
        sft_checkpoint,
        tmp_path / "run",
        *SMALL,
        "algo.args.per_device_train_batch_size=16",
        "algo.args.max_steps=4",  # two generation batches of 8 groups x 4 completions
        f"algo.dynamic_sampling.max_extra_rounds={extra_rounds}",
    )
    batches, result = got["batches"], got["result"]
    assert len(batches) == 4
    rows = 16 if extra_rounds else 8
    assert [b["rows"] for b in batches] == [rows] * 4
    assert [b["nonzero"] for b in batches] == [rows] * 4  # no row of a uniform group was trained
    assert _logged(result, "dynamic_sampling/filtered_fraction") == [0.5, 0.5]
    assert _logged(result, "dynamic_sampling/extra_rounds") == ([1, 1] if extra_rounds else [0, 0])
    assert _logged(result, "dynamic_sampling/kept_groups") == ([8, 8] if extra_rounds else [4, 4])
    assert _logged(result, "dynamic_sampling/short") == ([0, 0] if extra_rounds else [1, 1])
    rounds = 4 if extra_rounds else 2
    assert _logged(result, "dynamic_sampling/prompts")[-1] == rounds * 8
    assert _logged(result, "dynamic_sampling/completions")[-1] == rounds * 32
    assert set(_logged(result, "frac_reward_zero_std")) == {0.0}  # TRL's own view of the trained batches


@pytest.mark.slow  # torchrun, 2 processes: ~15 s
def test_two_processes_train_the_same_number_of_groups(tmp_path, sft_checkpoint):
    """torchrun, 2 gloo processes, each generating half of every round: both train the same rows per
    micro-batch, all from mixed groups, and together exactly the 8 groups of each generation batch."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "tests.ds_helpers", str(sft_checkpoint), str(tmp_path), "hardware.num_processes=2",
        *SMALL, "algo.args.per_device_train_batch_size=8", "algo.args.max_steps=4",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["global_step"] == 4
        assert [b["rows"] for b in rank["batches"]] == [8] * 4  # 2 processes x 2 micro-batches x 8 = 8 groups of 4
        assert [b["nonzero"] for b in rank["batches"]] == [8] * 4
    history = {"log_history": ranks[0]["log_history"]}
    assert _logged(history, "dynamic_sampling/kept_groups") == [8, 8]
    assert _logged(history, "dynamic_sampling/extra_rounds") == [1, 1]
    assert _logged(history, "dynamic_sampling/completions")[-1] == 4 * 32  # both processes' rounds, counted once


@pytest.mark.slow  # a run killed at its checkpoint, then resumed: two CLI runs, ~25 s
def test_sigkill_then_resume_stops_at_the_same_generation_budget(tmp_path, sft_checkpoint):
    """max_completions=192 with 2 rounds of 16 completions per step (spg 1) ends the run at step 6. Killed
    after checkpoint 2 and resumed, it must end there too: the counts (and the prioritized sampler's
    success rates, fed by every round) come back from the checkpoint instead of restarting."""
    overrides = [
        "recipe=single", "algo=dapo", "debug=smoke", f"model.init_from={sft_checkpoint}", *ds_helpers.HALF_UNIFORM,
        "algo.args.num_generations=4", "algo.args.steps_per_generation=1", "algo.args.max_steps=12",
        "algo.dynamic_sampling.max_completions=192", "algo.args.save_steps=2", "algo.args.save_total_limit=null",
        "sampler=prioritized", "sampler.success_reward=half", "eval.k=0",
    ]  # fmt: skip
    # the reward's _target_ (tests.ds_helpers) imports in the child: train.py's folder, the root, is on its path
    run_dir = kill_at_checkpoint(tmp_path, "01_dapo/checkpoint-2", *overrides)
    saved = json.loads((run_dir / "ckpt" / "01_dapo" / "checkpoint-2" / "dynamic_sampling.json").read_text())
    assert (saved["completions"], saved["extra_rounds"]) == (64, 2)

    resumed = run_train(tmp_path, f"resume={run_dir}")
    assert resumed.returncode == 0, resumed
    result = json.loads((run_dir / "result" / "01_dapo.json").read_text())
    assert result["global_step"] == 6  # stopped by the budget, as the uninterrupted run does
    assert sorted({h["step"] for h in result["log_history"] if "loss" in h}) == list(range(1, 7))
    final = json.loads((run_dir / "ckpt" / "01_dapo" / "checkpoint-6" / "dynamic_sampling.json").read_text())
    assert final == {**final, "completions": 192, "prompts": 48, "extra_rounds": 6, "groups": 48, "filtered": 24}
    rates = json.loads((run_dir / "ckpt" / "01_dapo" / "checkpoint-6" / sampling.STATE_FILE).read_text())
    assert sum(rates["attempts"]) == 192  # every generated completion, extra rounds included, once
    assert "dynamic sampling state restored" in (run_dir / "output.log").read_text()


# ------------------------------------------------------------------------------------- units
def test_extra_draws_come_from_the_samplers_pool_with_their_own_seed():
    ds = Dataset.from_list([{"id": f"p{i}", "difficulty": i % 5} for i in range(50)])
    s = sampling.CurriculumSampler(ds, mini_repeat_count=4, batch_size=5, seed=3, total_chunks=10, start=0.2)
    open_pool = set(s.pool(0))
    assert len(open_pool) == 10  # the easiest 20 %
    extra = [s.draw(0, key=k) for k in range(6)]
    assert all(set(c) <= open_pool and len(set(c)) == 5 for c in extra)  # the curriculum's pool, no repeats
    assert extra == [s.draw(0, key=k) for k in range(6)]  # seeded by key: the same after a resume
    assert len({tuple(c) for c in extra}) == 6 and s.draw(0) not in extra  # its own generator, not position 0's
    first = set(extra[0])
    assert not first & set(s.draw(0, key=1, exclude=first))  # prompts drawn earlier in the batch are left out
    assert len(s.draw(0, key=1, exclude=set(range(50)) - {0})) == 5  # too few left: the whole pool again


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algo=dapo", "reward=format"],
            "algo.dynamic_sampling.metric=accuracy: reward= has no such component (has ['format'])",
        ),
        (
            ["algo=dapo", "algo.dynamic_sampling.max_extra_rounds=-1"],
            "algo.dynamic_sampling.max_extra_rounds=-1: an integer >= 0",
        ),
        (
            ["algo=grpo", "algo.dynamic_sampling.max_completions=0"],
            "algo.dynamic_sampling.max_completions=0: a positive number",
        ),
        (
            ["algo=rloo", "+algo.dynamic_sampling.enabled=true"],
            "algo.dynamic_sampling needs a GRPOTrainer-based algo (grpo, gspo, dapo, dr_grpo), not trl.RLOOTrainer",
        ),
    ],
)
def test_bad_settings_fail_in_validation(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        config.validate(compose_cfg("recipe=single", *overrides))


def test_dapo_and_dr_grpo_are_trls_settings(tmp_path):
    dapo = instantiate(compose_cfg("recipe=single", "algo=dapo", "reward=dapo").algo.args, output_dir=str(tmp_path))
    assert (dapo.loss_type, dapo.epsilon, dapo.epsilon_high, dapo.beta) == ("dapo", 0.2, 0.28, 0.0)
    dr = instantiate(compose_cfg("recipe=single", "algo=dr_grpo").algo.args, output_dir=str(tmp_path))
    assert (dr.loss_type, dr.scale_rewards) == ("dr_grpo", "none")
    cfg = compose_cfg("recipe=single", "algo=dapo", "reward=dapo", "algo.args.max_completion_length=20")
    assert cfg.algo.dynamic_sampling.enabled and cfg.algo.dynamic_sampling.metric == "accuracy"
    funcs, weights = rewards.build(cfg.reward)
    overlong = dict(zip([f.__name__ for f in funcs], zip(funcs, weights)))["overlong"]
    assert overlong[1] == 1.0
    # L_max follows the generation cap (20), buffer 8: 0 up to 12 tokens, then down to -1 at 20
    assert overlong[0]([[0] * 12, [0] * 16, [0] * 20]) == [0.0, -0.5, -1.0]


@pytest.mark.parametrize("arm", ["grpo", "dapo", "dapo_no_ds"])
def test_ablation_arms_compose_and_differ_only_where_they_should(arm):
    """The presets of experiments/dapo_ablation (nested: test_compose covers top-level presets only)."""
    path = ROOT / "conf" / "experiment" / "dapo_ablation" / f"{arm}.yaml"
    head = path.read_text().splitlines()[:3]
    assert head[0] == "# @package _global_" and "python train.py" in head[1] and f"dapo_ablation/{arm}" in head[1]
    cfg = compose_cfg("recipe=single", f"experiment=dapo_ablation/{arm}", "model.init_from=/tmp")
    ds = cfg.algo.dynamic_sampling
    assert ds.max_completions == 10240 and cfg.algo.args.save_total_limit is None  # the shared budget
    assert (cfg.algo.name, ds.enabled) == {
        "grpo": ("grpo", False),
        "dapo": ("dapo", True),
        "dapo_no_ds": ("dapo", False),
    }[arm]
    assert list(cfg.reward) == (["accuracy", "format"] if arm == "grpo" else ["accuracy", "format", "overlong"])


@pytest.mark.slow  # the sft_checkpoint fixture; the check itself takes a second
def test_an_iterable_dataset_is_refused(sft_checkpoint):
    """Extra rounds draw prompts by index: a streaming dataset cannot serve them."""
    import functools

    import trl
    from datasets import IterableDataset

    from reinforce_cot import dynamic_sampling, models

    cfg = ds_helpers.compose(sft_checkpoint)
    rows = [{"prompt": [{"role": "user", "content": "q"}], "answer": "1"}] * 8
    make = dynamic_sampling.with_dynamic_sampling(functools.partial(trl.GRPOTrainer), cfg.algo.dynamic_sampling)
    with pytest.raises(ConfigError, match="needs a dataset with random access"):
        make(
            model=models.load_model(str(sft_checkpoint), cfg.model),
            args=trl.GRPOConfig(output_dir="/tmp/rcot_ds_iterable", per_device_train_batch_size=8, max_steps=1,
                                use_cpu=True, bf16=False, report_to=[]),
            reward_funcs=[ds_helpers.half_uniform],
            train_dataset=IterableDataset.from_generator(lambda: iter(rows)),
            processing_class=models.load_processing_class(str(sft_checkpoint), cfg.model),
        )  # fmt: skip
