"""Reward functions: one contract, `fn(completions, **columns) -> list[float | None]`.

`completions` are TRL's (conversational: a list of messages per completion, or plain strings); every
other dataset column (`answer`, `difficulty`, ...) arrives as a keyword list, plus `trainer_state`.
None means "cannot be verified" and TRL leaves it out of the mean. Each configured component is
logged on its own as `rewards/<name>/mean`.

Wiring lives in `conf/reward/`: each component file is `{name: {fn: {_target_, _partial_}, weight}}`
and a composite (`r1`) is a defaults list of components. `build(cfg.reward)` returns the functions
(named after their config key, which is what TRL logs) and their weights.

>>> accuracy_reward(["<think>1, 2</think><answer>2</answer>", "<answer>3</answer>"], answer=["2", "2"])
[1.0, 0.0]
>>> format_reward(["<think>a</think><answer>2</answer>", "2"])
[1.0, 0.0]
"""

from __future__ import annotations

import re
from typing import Any

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of one completion, conversational (list of messages) or plain."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] if isinstance(m["content"], str) else "" for m in completion)


def extract_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer>, stripped; None if there is none."""
    found = ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def answers_match(predicted: str | None, gold: str) -> bool:
    """Exact match after whitespace normalisation; numbers compare by value ('3.0' == '3')."""
    if predicted is None:
        return False
    p, g = " ".join(predicted.split()), " ".join(str(gold).split())
    if p == g:
        return True
    try:
        return float(p) == float(g)
    except ValueError:
        return False


def accuracy_reward(completions: list, answer: list[str], **_: Any) -> list[float | None]:
    """1.0 when the <answer> matches the `answer` column, else 0.0; None when there is no gold answer."""
    out: list[float | None] = []
    for c, gold in zip(completions, answer):
        if gold is None or gold == "":
            out.append(None)
        else:
            out.append(float(answers_match(extract_answer(completion_text(c)), gold)))
    return out


def format_reward(completions: list, **_: Any) -> list[float | None]:
    """1.0 for exactly `<think>...</think><answer>...</answer>`, else 0.0 (DeepSeek-R1's format reward)."""
    return [float(bool(FORMAT_RE.match(completion_text(c)))) for c in completions]


def build(reward_cfg) -> tuple[list, list[float]]:
    """Instantiate the configured components: (functions named after their keys, weights)."""
    from hydra.utils import instantiate

    funcs, weights = [], []
    for name, spec in (reward_cfg or {}).items():
        fn = instantiate(spec.fn)

        def named(*args, _fn=fn, **kwargs):
            return _fn(*args, **kwargs)

        named.__name__ = named.__qualname__ = name
        funcs.append(named)
        weights.append(float(spec.weight))
    return funcs, weights
