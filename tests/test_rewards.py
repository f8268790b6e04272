"""The reward contract: batched, pure, None when the answer cannot be verified."""

from reinforce_cot import rewards


def test_accuracy_reads_the_last_answer_tag_and_compares_values():
    completions = [
        "<think>1, 2, 3</think><answer>3</answer>",
        "<think>...</think><answer> 3.0 </answer>",
        "<answer>2</answer><answer>3</answer>",  # the last answer counts
        "<think>3</think>",  # no answer tag
        "<answer>4</answer>",
    ]
    assert rewards.accuracy_reward(completions, answer=["3"] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_accuracy_is_none_without_a_gold_answer():
    assert rewards.accuracy_reward(["<answer>1</answer>"] * 2, answer=["", None]) == [None, None]


def test_conversational_completions():
    completion = [{"role": "assistant", "content": "<think>a</think><answer>2</answer>"}]
    assert rewards.accuracy_reward([completion], answer=["2"]) == [1.0]
    assert rewards.format_reward([completion]) == [1.0]


def test_format_requires_think_then_answer_and_nothing_else():
    cases = {
        "<think>x</think><answer>1</answer>": 1.0,
        "<think>x</think>\n<answer>1</answer>\n": 1.0,
        "<answer>1</answer><think>x</think>": 0.0,
        "<think>x</think><answer>1</answer> trailing": 0.0,
        "1": 0.0,
    }
    assert rewards.format_reward(list(cases)) == list(cases.values())


def test_build_names_functions_after_their_config_keys():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"acc": {"fn": {"_target_": "reinforce_cot.rewards.accuracy_reward", "_partial_": True}, "weight": 2}}
    )
    (fn,), weights = rewards.build(cfg)
    assert fn.__name__ == "acc" and weights == [2.0]
    assert fn(["<answer>5</answer>"], answer=["5"], trainer_state=None) == [1.0]
