"""Held-out evaluation: greedy and sampled accuracy, pass@k, maj@k, format rate, completion length.

Generation goes through the configured backend (reinforce_cot.generation). Sampled metrics draw `k`
completions per prompt at `temperature`; pass@k uses the unbiased estimator of Chen et al. (2021),
1 - C(n-c, k) / C(n, k), which with n = k samples reduces to "any of the k was correct".

Run on a checkpoint: `python -m reinforce_cot.evaluate ckpt=<folder or run dir> data=shapes_count`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict

from reinforce_cot import rewards

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(5, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, processing_class, rows, cfg) -> dict:
    """All metrics on `rows` (the first eval.max_prompts of the test split)."""
    import torch
    from hydra.utils import instantiate

    rows = rows[: cfg.eval.max_prompts]
    k = cfg.eval.k
    torch.manual_seed(cfg.seed)
    backend = instantiate(cfg.generation)(model=model, processing_class=processing_class, data_cfg=cfg.data)
    greedy = [c[0] for c in backend.generate(rows, n=1, temperature=0.0)]
    sampled = backend.generate(rows, n=k, temperature=cfg.eval.temperature) if k > 0 else [[] for _ in rows]
    answers = [r["answer"] for r in rows]
    g_acc = rewards.accuracy_reward(greedy, answer=answers)
    tok = getattr(processing_class, "tokenizer", processing_class)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in greedy]
    by_diff: dict = defaultdict(list)
    for r, a in zip(rows, g_acc):
        by_diff[str(r.get("difficulty", 0))].append(a)
    s_correct = [rewards.accuracy_reward(s, answer=[r["answer"]] * len(s)) for s, r in zip(sampled, rows)]
    maj = []
    for s, r in zip(sampled, rows):
        votes = Counter(a for a in (rewards.extract_answer(t) for t in s) if a is not None)
        maj.append(float(bool(votes) and rewards.answers_match(votes.most_common(1)[0][0], r["answer"])))
    sorted_len = sorted(lengths)
    metrics = {
        "n_prompts": len(rows),
        "greedy_accuracy": _mean(g_acc),
        "format_rate": _mean(rewards.format_reward(greedy)),
        "mean_completion_tokens": _mean(lengths),
        "p50_completion_tokens": sorted_len[len(sorted_len) // 2] if sorted_len else 0,
        "p90_completion_tokens": sorted_len[int(0.9 * (len(sorted_len) - 1))] if sorted_len else 0,
        "accuracy_by_difficulty": {d: _mean(v) for d, v in sorted(by_diff.items())},
    }
    if k > 0:
        metrics |= {
            "k": k,
            "sampled_accuracy": _mean([x for c in s_correct for x in c]),
            f"pass@{k}": _mean([pass_at_k(len(c), int(sum(c)), k) for c in s_correct]),
            f"maj@{k}": _mean(maj),
        }
    metrics["samples"] = [
        {"id": r.get("id"), "question": r["question"], "answer": r["answer"], "completion": g, "correct": bool(a)}
        for r, g, a in list(zip(rows, greedy, g_acc))[:20]
    ]
    return metrics


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else float("nan")
