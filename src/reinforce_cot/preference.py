"""Preference pairs for DPO: rows that carry a `chosen` and a `rejected` completion besides the prompt.

Where pairs come from:
- synthetic sets made in code (`data=shapes_count_pref`, `data=arithmetic_pref`): chosen is the correct
  reasoning target, rejected is a wrong answer with the same chain shape (a miscount; a dropped carry),
  so the pair differs only where the reasoning goes wrong;
- local JSONL files whose rows have `chosen`/`rejected` fields (`data=jsonl`), e.g. written by rejection
  sampling: a completion string each, or TRL's conversational list of assistant messages.

`data.format_split(..., algo_kind="preference")` turns them into TRL's conversational prompt/chosen/rejected
columns (+ image). `check_pairs` runs when the data loads, before any weights: DPO on data without
pairs, or with an empty side, stops there with a one-line error.

    python -c "from reinforce_cot import preference as p; r = p.shapes_count_pairs(1, seed=0)[0]; print(r['chosen'], '|', r['rejected'])"
"""

from __future__ import annotations

import random
from typing import Any

from reinforce_cot import data
from reinforce_cot.errors import ConfigError


def _completion(reasoning: str, answer: str) -> str:
    return data.target({"reasoning": reasoning, "answer": answer})


def shapes_count_pairs(n: int, seed: int, **kwargs) -> list[dict[str, Any]]:
    """`data.shapes_rows` plus a pair each: the correct count vs. a miscount told the same way.

    >>> r = shapes_count_pairs(1, seed=0, targets=["red square"])[0]
    >>> r["chosen"] == data.target(r), r["rejected"] != r["chosen"], r["rejected"].count("I count the red squares: ")
    (True, True, 1)
    """
    rows = data.shapes_rows(n, seed, **kwargs)
    rng = random.Random(f"pairs-{seed}")
    max_count = kwargs.get("max_count", 5)
    for row in rows:
        count = row["count"]
        # a plausible miscount: another count the task could have (count + 1 when the task has only one)
        wrong = rng.choice([k for k in range(1, max_count + 1) if k != count] or [count + 1])
        head, rest = row["reasoning"].split(": ", 1)  # "I count the red squares" | "1, 2. I ignore ... So there are 2."
        ignored = rest.split(".", 1)[1].rsplit(" So there are", 1)[0]  # " I ignore 2 other shapes." or ""
        steps = ", ".join(str(k) for k in range(1, wrong + 1))
        bad = f"{head}: {steps}.{ignored} So there are {wrong}."
        row["chosen"] = data.target(row)
        row["rejected"] = _completion(bad, str(wrong))
    return rows


def arithmetic_pairs(n: int, seed: int, **kwargs) -> list[dict[str, Any]]:
    """`data.arithmetic_rows` plus a pair each: the right chain vs. the same chain with the carry dropped
    (or, without a carry, a ones digit off by one).

    >>> r = arithmetic_pairs(1, seed=0)[0]
    >>> r["question"], r["chosen"].endswith("<answer>146</answer>"), r["rejected"].endswith("<answer>136</answer>")
    ('What is 49 + 97?', True, True)
    """
    rows = data.arithmetic_rows(n, seed, **kwargs)
    for row in rows:
        a, b = (int(x) for x in row["layout"].split("+"))
        ones = a % 10 + b % 10
        if ones >= 10:  # forget the carry
            tens = a // 10 + b // 10
            bad_ones, carry = ones, 0
            wrong = tens * 10 + ones % 10
        else:  # no carry to forget: slip on the ones digit
            bad_ones, carry, tens = ones + 1 if ones < 9 else ones - 1, 0, a // 10 + b // 10
            wrong = tens * 10 + bad_ones
        bad = (
            f"Ones: {a % 10} + {b % 10} = {bad_ones}, write {bad_ones % 10} carry {carry}. "
            f"Tens: {a // 10} + {b // 10} + {carry} = {tens}. So {a} + {b} = {wrong}."
        )
        row["chosen"] = data.target(row)
        row["rejected"] = _completion(bad, str(wrong))
    return rows


def _text(side) -> str:
    """A side's text: a string, or the contents of TRL's conversational [{"role": "assistant", ...}]."""
    if isinstance(side, list):
        return "".join(str(m.get("content") or "") for m in side if isinstance(m, dict))
    return "" if side is None else str(side)


def check_pairs(rows, data_name: str, algo_name: str) -> None:
    """Every row of a split has a non-empty chosen and rejected, else a ConfigError naming the row and the fix."""
    chosen, rejected = data.column(rows, "chosen"), data.column(rows, "rejected")
    if not chosen or rejected is None:
        raise ConfigError(
            f"algo={algo_name} needs preference pairs but data={data_name} rows have no chosen/rejected "
            f"(columns: {data.columns(rows)}); use data=shapes_count_pref or data=arithmetic_pref, or data=jsonl / "
            "data=hf with chosen/rejected columns"
        )
    ids = data.column(rows, "id") or list(range(len(chosen)))
    for i, pair in enumerate(zip(chosen, rejected)):
        for side, value in zip(("chosen", "rejected"), pair):
            if not _text(value).strip():
                raise ConfigError(
                    f"data={data_name}: row {ids[i]} has an empty '{side}'; every preference pair needs "
                    "both a chosen and a rejected completion: fix or drop the row"
                )
        if _text(pair[0]) == _text(pair[1]):
            raise ConfigError(
                f"data={data_name}: row {ids[i]} has chosen == rejected; a pair needs two different "
                "completions: fix or drop the row"
            )
