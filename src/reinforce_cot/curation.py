"""The `curate` stage: an RL prompt set with measured difficulty and without easy-to-hack prompts.

Kimi k1.5 (sec. 2.3.1) curates its RL prompts for balanced difficulty and accurate evaluability:

- difficulty: a model samples k answers per prompt (k=10, temperature 1.0); the fraction that is
  correct is the prompt's `pass_rate`, bucketed into a `difficulty` column (0 = easy ... by
  `curate.buckets`). The curriculum sampler reads either column.
- easy-to-hack filter: the model is asked for the answer only, without reasoning
  (`curate.hack_template`); a prompt it answers correctly within `hack_tries` (8) tries is dropped,
  since a right answer there says nothing about reasoning (guessable counts, multiple choice...). A
  try counts only when the completion really carries no reasoning (at most
  `hack_max_reasoning_chars` characters besides the answer; null trusts the template).
- optionally, prompts outside `keep_pass_rate` are dropped (e.g. [0.1, 0.9]: GRPO learns nothing from
  groups that are all right or all wrong).

Writes run_dir/data/<stage id>/: default/{train,test}.parquet + README.md, a hub-layout dataset (every
column kept, the images as the source stored them) that `data=hf data.path=<that folder>` loads;
report.{json,md} (counts per bucket, how many were dropped and why, pass rate per source difficulty)
and <split>_samples.jsonl (every sample and answer-only try, with the verdicts). A later stage trains on
it with `data_from: <this stage>`. Generation goes through the `generation` backend (hf on CPU; any
backend with `.generate(rows, n, temperature, template)`).

    python train.py recipe=kimi                               # sft -> curate -> grpo -> ...
    python train.py recipe=kimi curate.k=16 curate.keep_pass_rate=[0.1,0.9]
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

from reinforce_cot import data, generation, reasoning, rewards, rundir

log = logging.getLogger(__name__)


def bucket(pass_rate: float, edges: list[float]) -> int:
    """0 (easy) for pass_rate >= edges[0], 1 for >= edges[1], ..., len(edges) (hard) below the last.

    >>> [bucket(p, [0.7, 0.3]) for p in (1.0, 0.7, 0.5, 0.3, 0.0)]
    [0, 0, 1, 1, 2]
    """
    return sum(pass_rate < e for e in edges)


def answered_without_reasoning(text: str, gold: str, max_reasoning_chars: int | None) -> bool:
    """A correct answer that came (nearly) without reasoning: at most `max_reasoning_chars` characters of
    reasoning (reasoning.chain; None: any).

    >>> answered_without_reasoning("<answer>3</answer>", "3", 20)
    True
    >>> answered_without_reasoning("<think>1, 2, 3: so three squares</think><answer>3</answer>", "3", 20)
    False
    """
    if not rewards.answers_match(rewards.extract_answer(text), gold):
        return False
    return max_reasoning_chars is None or len(reasoning.chain(text)) <= max_reasoning_chars


def measure(backend, rows: list[dict], cc, out_dir: Path, split: str) -> list[dict]:
    """Per row: pass_rate over cc.k samples and the easy-to-hack verdict over cc.hack_tries tries.

    Generations are appended to <split>_generations.jsonl / <split>_answer_only.jsonl as they finish,
    so a stage killed mid-way skips the prompts already done when it runs again."""
    samples = backend.generate_to_jsonl(
        rows, out_dir / f"{split}_generations.jsonl", n=cc.k, temperature=cc.temperature
    )
    if cc.hack_tries > 0:
        direct = backend.generate_to_jsonl(
            rows, out_dir / f"{split}_answer_only.jsonl", cc.hack_tries, cc.temperature, cc.hack_template
        )
    else:
        direct = [[] for _ in rows]
    out = []
    for row, sampled, tries in zip(rows, samples, direct):
        correct = rewards.accuracy_reward(sampled, answer=[row["answer"]] * len(sampled))
        plain = [rewards.answers_match(rewards.extract_answer(t), row["answer"]) for t in tries]
        hacked = [answered_without_reasoning(t, row["answer"], cc.hack_max_reasoning_chars) for t in tries]
        out.append(
            {
                "pass_rate": round(sum(c for c in correct if c is not None) / max(1, len(correct)), 4),
                "hack_correct": sum(hacked),
                "direct_correct": sum(plain),  # correct with the answer-only prompt, reasoning or not
                "samples": sampled,
                "direct": tries,
            }
        )
    return out


def curate_stage(cfg, run_dir: Path, sid: str, splits: dict, results: dict | None = None) -> dict:
    """Measure, filter and write the curated dataset (data/<sid>/); returns the report."""
    import torch

    from reinforce_cot import models

    t0 = time.time()
    cc = cfg.curate
    torch.manual_seed(cfg.seed)
    path = models.resolve_path(cfg.model)
    out_dir = rundir.data(run_dir, sid)
    out_dir.mkdir(parents=True, exist_ok=True)
    with generation.load(cfg, path, cache_dir=out_dir) as backend:
        report = _curate(cfg, cc, backend, splits, out_dir, sid, path)
    report["wall_seconds"] = round(time.time() - t0, 1)
    report["data_dir"] = str(out_dir)
    rundir.write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(report_markdown(report))
    return report


def _curate(cfg, cc, backend, splits: dict, out_dir: Path, sid: str, path: str) -> dict:
    from omegaconf import OmegaConf

    lo, hi = cc.keep_pass_rate
    report: dict = {"stage": sid, "model": path, "settings": OmegaConf.to_container(cc), "splits": {}}
    files: dict[str, tuple] = {}  # split -> (rows, added columns)
    for split in ("train", "test"):
        rows = splits[split]
        if split not in cc.splits:
            files[split] = (rows, None)
            report["splits"][split] = {"n_in": len(rows), "n_out": len(rows), "curated": False}
            continue
        rows = data.head(rows, cc.get("max_prompts"))
        measured = measure(backend, rows, cc, out_dir, split)
        kept, added, dropped, examples = [], defaultdict(list), Counter(), defaultdict(list)
        by_source = defaultdict(list)
        audit = []  # every sample, to check the numbers by hand
        for i, (row, m) in enumerate(zip(data.text_rows(rows), measured)):
            by_source[str(row.get("difficulty"))].append(m["pass_rate"])
            reason = None
            if not m["samples"]:
                reason = "generation_failed"  # a server gave no answer: unmeasured, not hard
            elif m["hack_correct"] > 0:
                reason = "easy_to_hack"  # answered right without reasoning within hack_tries
            elif not lo <= m["pass_rate"] <= hi:
                reason = "pass_rate_outside_keep_range"
            audit.append({"id": row.get("id"), "answer": row["answer"], **m, "dropped": reason})
            if reason:
                dropped[reason] += 1
                if len(examples[reason]) < 5:
                    examples[reason].append(
                        {"id": row.get("id"), "question": row["question"], "answer": row["answer"]}
                        | {k: m[k] for k in ("pass_rate", "hack_correct")}
                        | {"direct_example": m["direct"][0] if m["direct"] else ""}
                    )
                continue
            kept.append(i)
            if "difficulty" in row:
                added["source_difficulty"].append(row["difficulty"])
            added["pass_rate"].append(m["pass_rate"])
            added["difficulty"].append(bucket(m["pass_rate"], list(cc.buckets)))
            added["hack_correct"].append(m["hack_correct"])
        generation.write_jsonl(out_dir / f"{split}_samples.jsonl", audit)
        files[split] = (rows.select(kept), dict(added) or {k: [] for k in ("pass_rate", "difficulty", "hack_correct")})
        counts = Counter(added["difficulty"])
        report["splits"][split] = {
            "n_in": len(rows),
            "n_out": len(kept),
            "curated": True,
            "per_bucket": {str(b): counts.get(b, 0) for b in range(len(cc.buckets) + 1)},
            "dropped": dict(dropped),
            "direct_correct_with_reasoning": sum(
                1 for m in measured if m["direct_correct"] and not m["hack_correct"]
            ),  # right under the answer-only prompt but still reasoning: not counted as a hack
            "mean_pass_rate": round(sum(m["pass_rate"] for m in measured) / max(1, len(measured)), 4),
            "pass_rate_histogram": dict(sorted(Counter(m["pass_rate"] for m in measured).items())),
            "pass_rate_by_source_difficulty": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_source.items())},
            "dropped_examples": dict(examples),
        }
        log.info(
            "[%s] %s: kept %d of %d (per bucket %s), dropped %s",
            sid,
            split,
            len(kept),
            len(rows),
            report["splits"][split]["per_bucket"],
            dict(dropped) or "none",
        )
    data.write_dataset(out_dir, {"default": files})
    return report


def report_markdown(report: dict) -> str:
    lines = [f"# Curation {report['stage']}", "", f"model: {report['model']}", ""]
    lines += ["| split | in | out | per bucket (0 = easy) | dropped | mean pass rate |", "|---|---|---|---|---|---|"]
    for split, r in report["splits"].items():
        if not r["curated"]:
            lines.append(f"| {split} | {r['n_in']} | {r['n_out']} | (copied) | | |")
            continue
        lines.append(
            f"| {split} | {r['n_in']} | {r['n_out']} | {r['per_bucket']} | {r['dropped'] or 'none'} "
            f"| {r['mean_pass_rate']} |"
        )
    return "\n".join(lines) + "\n"
