"""Kimi k1.5 rewards: answer extraction and math equivalence (in any thread), the all-zero warning, and the
length penalty per prompt group, warm-up and gathering over two real gloo processes included."""

from __future__ import annotations

import logging
import os
import threading
import time
from types import SimpleNamespace

import pytest

from reinforce_cot import rewards
from reinforce_cot.errors import ConfigError
from tests.helpers import compose_cfg, free_port

CASES = [  # (completion, gold, correct)
    ("<think>x</think><answer>3</answer>", "3", True),
    ("<answer>3.0</answer>", "3", True),
    ("<answer>1,000</answer>", "1000", True),
    ("<answer>4</answer>", "3", False),
    ("<answer>e2</answer>", "3", False),  # a tiny model wrote this: not a number, and no crash
    ("<answer>,</answer>", "3", False),
    ("<answer>(B)</answer>", "B", True),
    ("<answer>b</answer>", "B", True),
    ("<answer>C</answer>", "B", False),
    ("<answer>(a+2)(a-2)</answer>", "a^2-4", True),
    ("<answer>(a+2)(a+2)</answer>", "a^2-4", False),
    ("<answer>\\frac{1}{2}</answer>", "0.5", True),
    ("We get \\boxed{1} first, finally \\boxed{\\sqrt{2}}.", "2^{1/2}", True),  # no tag: the last \boxed
    ("<answer>\\boxed{7}</answer>", "7", True),
    ("<think>3</think>", "3", False),  # neither tag nor box
    ("<answer></answer>", "a^2-4", False),
]


def test_accuracy_extracts_and_compares():
    got = rewards.accuracy_reward([c for c, _, _ in CASES], answer=[g for _, g, _ in CASES])
    assert got == [float(ok) for _, _, ok in CASES]


def test_accuracy_is_the_same_in_a_worker_thread():
    # math-verify's own timeout needs SIGALRM, which raises outside the main thread
    out = {}
    t = threading.Thread(
        target=lambda: out.update(r=rewards.accuracy_reward([c for c, _, _ in CASES], answer=[g for _, g, _ in CASES]))
    )
    t.start()
    t.join(120)
    assert out["r"] == [float(ok) for _, _, ok in CASES]


# sympy needs about a minute on this comparison: the timeout must cut it short in any thread
SLOW = ("(x+1)^{200}", "\\sum_{k=0}^{200} \\binom{200}{k} x^k")


def test_math_verify_timeout_holds_in_main_and_worker_threads():
    t0 = time.time()
    assert rewards.math_equal(*SLOW, timeout=1) is False
    assert time.time() - t0 < 15
    out = {}

    def worker():
        t1 = time.time()
        out["slow"] = rewards.math_equal(*SLOW, timeout=1)
        out["slow_s"] = time.time() - t1
        out["after"] = rewards.math_equal("x^2-1", "(x-1)(x+1)")  # the killed helper is replaced

    t = threading.Thread(target=worker)
    t.start()
    t.join(120)
    assert out["slow"] is False and out["slow_s"] < 15
    assert out["after"] is True


def test_all_zero_batch_with_good_format_is_a_warning(caplog):
    wrong = ["<think>a</think><answer>9</answer>"] * 4
    state = SimpleNamespace(global_step=3)  # TRL passes its state: a training batch
    with caplog.at_level(logging.WARNING, logger="reinforce_cot.rewards"):
        assert rewards.accuracy_reward(wrong, answer=["3"] * 4, trainer_state=state) == [0.0] * 4
    assert "every reward in the batch of step 3 is 0 although 4/4 completions are well formatted" in caplog.text
    assert "'3'" in caplog.text and "'9'" in caplog.text  # the example names gold and extracted answer
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reinforce_cot.rewards"):
        rewards.accuracy_reward(["9", "nonsense"], answer=["3", "3"], trainer_state=state)  # a weak model, not a bug
        rewards.accuracy_reward(wrong[:3] + ["<answer>3</answer>"], answer=["3"] * 4, trainer_state=state)
        rewards.accuracy_reward(wrong, answer=["3"] * 4)  # evaluation: one prompt's samples, all wrong is common
    assert caplog.text == ""


def _ids(*lengths):
    return [[0] * n for n in lengths]


def test_length_reward_follows_the_definition_per_group():
    # two prompts x 3 samples; lengths 10/20/30 and 5/5/5
    comps = ["<answer>1</answer>", "<answer>1</answer>", "<answer>2</answer>"] + ["<answer>1</answer>"] * 3
    got = rewards.kimi_length_reward(
        comps, answer=["1"] * 6, completion_ids=_ids(10, 20, 30, 5, 5, 5), id=["p", "p", "p", "q", "q", "q"]
    )
    # lambda = 0.5 - (len - 10)/20: 0.5, 0, -0.5 -> correct keeps it, the wrong one gets min(0, -0.5); q: max == min
    assert got == [0.5, 0.0, -0.5, 0.0, 0.0, 0.0]
    # a wrong short answer is never rewarded: min(0, 0.5) = 0
    got = rewards.kimi_length_reward(
        ["<answer>2</answer>", "<answer>1</answer>"], answer=["1", "1"], completion_ids=_ids(4, 8), id=["p", "p"]
    )
    assert got == [0.0, -0.5]


def test_length_groups_are_num_generations_chunks_when_given():
    # the same prompt twice in a row (two groups of 2): chunks of group_size keep them apart
    comps = ["<answer>1</answer>"] * 4
    kw = dict(answer=["1"] * 4, completion_ids=_ids(10, 20, 100, 200), id=["p"] * 4)
    assert rewards.kimi_length_reward(comps, group_size=2, **kw) == [0.5, -0.5, 0.5, -0.5]
    by_runs = rewards.kimi_length_reward(comps, **kw)  # one run of 4 without it
    assert by_runs == pytest.approx([0.5, 0.5 - 10 / 190, 0.5 - 90 / 190, -0.5])


def test_length_warmup_is_zero_until_the_configured_step():
    kw = dict(answer=["1"] * 2, completion_ids=_ids(1, 9), id=["p", "p"], warmup_steps=5)
    comps = ["<answer>1</answer>"] * 2
    assert rewards.kimi_length_reward(comps, trainer_state=SimpleNamespace(global_step=4), **kw) == [0.0, 0.0]
    assert rewards.kimi_length_reward(comps, trainer_state=SimpleNamespace(global_step=5), **kw) == [0.5, -0.5]
    kw["warmup_steps"] = 0.5  # a fraction of the run: on from step 10 of 20
    before, after = SimpleNamespace(global_step=9, max_steps=20), SimpleNamespace(global_step=10, max_steps=20)
    assert rewards.kimi_length_reward(comps, trainer_state=before, **kw) == [0.0, 0.0]
    assert rewards.kimi_length_reward(comps, trainer_state=after, **kw) == [0.5, -0.5]


# ------------------------------------------------------------------ two processes (gloo, CPU)
GROUP = 4
COMPS = [f"<answer>{a}</answer>" for a in "112111211112"]  # 3 prompts x 4 samples, some wrong
LENGTHS = [3, 9, 5, 7, 4, 6, 2, 8, 10, 30, 20, 40]
IDS = [p for p in "abc" for _ in range(GROUP)]


def _rank_main(rank: int, world: int, port: int, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    per = len(COMPS) // world  # TRL gives each process an equal contiguous slice: group b straddles both
    sl = slice(rank * per, (rank + 1) * per)
    vals = rewards.kimi_length_reward(
        COMPS[sl], answer=["1"] * per, completion_ids=_ids(*LENGTHS[sl]), id=IDS[sl], group_size=GROUP
    )
    out[rank] = vals
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes over torch.distributed: ~3 s, ~10 s on a busy machine
def test_length_reward_gathers_groups_split_over_two_processes():
    import torch.multiprocessing as mp

    whole = rewards.kimi_length_reward(
        COMPS, answer=["1"] * 12, completion_ids=_ids(*LENGTHS), id=IDS, group_size=GROUP
    )
    # per process without gathering, group b would be judged on half its samples: different values
    alone = rewards.kimi_length_reward(COMPS[:6], answer=["1"] * 6, completion_ids=_ids(*LENGTHS[:6]), id=IDS[:6])
    assert alone[4:] != whole[4:6]
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.spawn(_rank_main, args=(2, port, out), nprocs=2, join=True)
    assert out[0] + out[1] == whole


# ----------------------------------------------------------------------------- wiring, errors
def test_kimi_length_composite(tmp_path):
    cfg = compose_cfg("reward=kimi_length", "reward.length.fn.warmup_steps=7")
    funcs, weights = rewards.build(cfg.reward)
    assert [f.__name__ for f in funcs] == ["accuracy", "format", "length"]  # logged as rewards/<name>/mean
    assert weights == [1.0, 0.5, 1.0]
    assert cfg.reward.length.fn.group_size == cfg.algo.args.num_generations == 8
    state = SimpleNamespace(global_step=6)
    assert funcs[2](["<answer>1</answer>"] * 2, answer=["1", "1"], trainer_state=state) == [0.0, 0.0]


def test_reward_check_names_the_missing_column_and_function():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "algo": {"kind": "rl"},
            "data": {"name": "mine"},
            "reward": {
                "accuracy": {"fn": {"_target_": "reinforce_cot.rewards.accuracy_reward"}, "columns": ["answer"]}
            },
        }
    )
    with pytest.raises(ConfigError, match="reward.accuracy reads the 'answer' column, which data=mine lacks"):
        rewards.check(cfg, [{"question": "q", "solution": "3"}])
    rewards.check(cfg, [{"question": "q", "answer": "3"}])
    cfg.reward.accuracy.fn._target_ = "reinforce_cot.rewards.no_such_reward"
    with pytest.raises(ConfigError, match="reward.accuracy.fn._target_=reinforce_cot.rewards.no_such_reward"):
        rewards.check(cfg, [{"question": "q", "answer": "3"}])


def test_unknown_reward_and_a_composite_naming_a_missing_component(train, tmp_path):
    run = train("reward=nope")
    assert run.returncode != 0 and "Could not find 'reward/nope'" in run.stderr, run
    extra = tmp_path / "extra_conf" / "reward"
    extra.mkdir(parents=True)
    (extra / "broken.yaml").write_text("defaults:\n  - accuracy\n  - lenght\n  - _self_\n")
    run = train(f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]", "reward=broken")
    assert run.returncode != 0 and "In 'reward/broken': Could not load 'reward/lenght'" in run.stderr, run
