"""Held-out evaluation: greedy and sampled accuracy, pass@k, maj@k, format rate, completion length.

Generation is batched HF `generate` on the local model (left padding). Sampled metrics draw `k`
completions per prompt at `temperature`; pass@k uses the unbiased estimator of Chen et al. (2021),
1 - C(n-c, k) / C(n, k), which with n = k samples reduces to "any of the k was correct".

Run on a checkpoint: `python -m reinforce_cot.evaluate ckpt=<folder or run dir> data=shapes_count`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict

from reinforce_cot import data as data_lib
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


def generate(model, processing_class, rows, cfg, *, sample: bool, n: int) -> list[list[str]]:
    """`n` completions for each row (greedy if not `sample`), as decoded text."""
    import torch

    with_image = cfg.data.modality == "image"
    tok = getattr(processing_class, "tokenizer", processing_class)
    model.eval()
    out: list[list[str]] = []
    bs = max(1, cfg.eval.batch_size // n)
    for start in range(0, len(rows), bs):
        batch = rows[start : start + bs]
        prompts = [
            processing_class.apply_chat_template(
                data_lib.prompt_messages(r, cfg.data.prompt_template, cfg.data.system_prompt, with_image),
                add_generation_prompt=True,
                tokenize=False,
            )
            for r in batch
        ]
        prompts = [p for p in prompts for _ in range(n)]
        if with_image:
            images = [r["image"] for r in batch for _ in range(n)]
            enc = processing_class(text=prompts, images=images, padding=True, return_tensors="pt")
        else:
            enc = processing_class(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        enc = enc.to(model.device)
        gen_kwargs = dict(max_new_tokens=cfg.eval.max_new_tokens, pad_token_id=tok.pad_token_id)
        gen_kwargs |= dict(do_sample=True, temperature=cfg.eval.temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        with torch.no_grad():
            ids = model.generate(**enc, **gen_kwargs)
        texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out += [texts[i * n : (i + 1) * n] for i in range(len(batch))]
    return out


def evaluate(model, processing_class, rows, cfg) -> dict:
    """All metrics on `rows` (the first eval.max_prompts of the test split)."""
    import torch

    rows = rows[: cfg.eval.max_prompts]
    k = cfg.eval.k
    torch.manual_seed(cfg.seed)
    greedy = [c[0] for c in generate(model, processing_class, rows, cfg, sample=False, n=1)]
    sampled = generate(model, processing_class, rows, cfg, sample=True, n=k) if k > 0 else [[] for _ in rows]
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
