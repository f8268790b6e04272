"""Rejection sampling: k chains per prompt from a model, verified, turned into SFT and DPO datasets.

The UnifiedReward-Think recipe's second stage (and Kimi k1.5's "shortest rejection sampling" for
long2short): sample `rejection.k` completions per training prompt with the configured generation
backend (hf, vllm, or an OpenAI-compatible server), score each with the configured reward functions
(the `accuracy` one decides correct; `rejection.require_format` also demands the R1 format), then write
into the run's data folder, run_dir/data/<stage id>/, a hub-layout dataset (data.write_dataset) with two
configs, `sft` and `dpo`, each with the stage's test split as its test split:

    sft/train.parquet   correct chains (`rejection.keep`: all distinct ones, or the shortest per prompt)
    dpo/train.parquet   pairs for the same prompt and image (`rejection.dpo_pairs`):
                    wrong:  chosen = a correct chain, rejected = a wrong one
                    length: chosen = the shortest correct chain, rejected = a correct one at least
                            `rejection.length_ratio` x longer (in tokens): Kimi's long2short pairs
                    both:   each, up to `rejection.max_pairs_per_prompt` of each type
    */test.parquet      the stage's test split, so a stage trained on this folder keeps the same held-out set
    README.md     the configs: `data=hf data.path=<folder> data.name=sft` (or dpo) loads them
    generations.jsonl   every sample as generated (resumable: a killed stage skips prompts done)
    report.json   per-prompt pass rates, counts kept and dropped, lengths, reward means

Images are the prompt's own, stored as the source stored them. A later stage trains on them with
`data_from: <stage name>` in the recipe (recipes.compose_stages): sft for SFT and RL algos, dpo for
preference algos, or name one: `data_from: rs/dpo`.

SFT rows store the chain inside <think> as `reasoning` and the sampled answer as `answer`, so the SFT
target is rebuilt in the canonical `<think>...</think><answer>...</answer>` form; DPO rows keep the
completions verbatim (the policy's own tokens are what DPO contrasts).

    python train.py recipe=unified_reward_think            # cold-start SFT -> this -> SFT -> DPO -> evaluate
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

from reinforce_cot import data, generation, models, reasoning, rewards, rundir
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)

SKIP_COLUMNS = ("layout",)  # not handed to reward functions, not written as columns
ROW_KEYS = ("id", "source_id", "question", "answer", "reasoning", "difficulty")  # an empty split keeps them


def validate(cfg) -> None:
    r = cfg.rejection
    if r.k < 1:
        raise ConfigError(f"rejection.k={r.k}: rejection sampling needs at least 1 sample per prompt; use k >= 2")
    if r.keep not in ("all", "shortest"):
        raise ConfigError(f"rejection.keep={r.keep}: use all or shortest")
    if r.dpo_pairs not in ("wrong", "length", "both", "none"):
        raise ConfigError(f"rejection.dpo_pairs={r.dpo_pairs}: use wrong, length, both or none")
    if r.get("chosen", "cycle") not in ("cycle", "shortest"):
        raise ConfigError(f"rejection.chosen={r.chosen}: use cycle or shortest")
    if r.length_ratio < 1:
        raise ConfigError(f"rejection.length_ratio={r.length_ratio} must be >= 1 (rejected is that many x longer)")
    if r.temperature <= 0 and r.k > 1:
        raise ConfigError(f"rejection.temperature={r.temperature}: k={r.k} greedy samples are identical; use > 0")
    if "accuracy" not in (cfg.reward or {}):
        raise ConfigError(
            f"reward={list(cfg.reward or {})}: rejection sampling decides correctness with an `accuracy` reward; "
            "use reward=r1 or reward=accuracy"
        )


def _base(row: dict) -> dict:
    return {"id": row.get("id"), "question": row["question"], "difficulty": row.get("difficulty", 0)}


def _verify(row: dict, samples: list[str], funcs, require_format: bool) -> tuple[list[bool], dict]:
    """Score k samples of one prompt with every reward function; correct = accuracy 1 (+ format)."""
    cols = {k: [v] * len(samples) for k, v in row.items() if k not in SKIP_COLUMNS}
    scores = {f.__name__: f(samples, trainer_state=None, **cols) for f in funcs}
    correct = [s == 1.0 for s in scores["accuracy"]]
    if require_format:
        fmt = rewards.format_reward(samples)
        correct = [c and f == 1.0 for c, f in zip(correct, fmt)]
    return correct, scores


def _pairs(correct: list[tuple[str, int]], wrong: list[tuple[str, int]], rcfg) -> list[tuple[str, str, str]]:
    """(chosen, rejected, type) for one prompt; correct/wrong are distinct (text, length), correct shortest
    first. Deterministic: the same samples always give the same pairs."""
    out = []
    cap = rcfg.max_pairs_per_prompt
    if rcfg.dpo_pairs in ("wrong", "both") and correct:
        # chosen: the correct chains in turn, or always the shortest one (Kimi k1.5's long2short DPO)
        pick = 0 if rcfg.get("chosen") == "shortest" else None
        out += [
            (correct[i % len(correct) if pick is None else pick][0], wrong[i][0], "wrong")
            for i in range(min(cap, len(wrong)))
        ]
    if rcfg.dpo_pairs in ("length", "both") and correct:
        short_text, short_len = correct[0]
        longer = [c for c in reversed(correct[1:]) if c[1] >= rcfg.length_ratio * max(1, short_len)]
        out += [(short_text, text, "length") for text, _ in longer[:cap]]
    return out


def sample(backend, rows, cfg, out_dir: Path, tokenizer=None, test=None) -> dict:
    """Generate, verify, write the sft / dpo dataset (with `test`, a split, as its test split) and
    report.json into `out_dir`; returns the report."""
    rcfg = cfg.rejection
    out_dir.mkdir(parents=True, exist_ok=True)
    funcs, _ = rewards.build(cfg.reward)
    t0 = time.time()
    completions = backend.generate_to_jsonl(rows, out_dir / "generations.jsonl", n=rcfg.k, temperature=rcfg.temperature)
    gen_s = time.time() - t0

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer else len(text.split())

    sft, dpo, per_prompt = [], [], []
    sources = {"sft": [], "dpo": []}  # the prompt row each record came from (its images are reused)
    counts: Counter = Counter()
    reward_sums: dict = defaultdict(list)
    lengths = {"correct": [], "wrong": []}
    for i, (row, samples) in enumerate(zip(data.text_rows(rows), completions)):
        if not samples:
            counts["failed_prompts"] += 1
            per_prompt.append({"id": row.get("id"), "difficulty": row.get("difficulty", 0), "failed": True})
            continue
        ok, scores = _verify(row, samples, funcs, rcfg.require_format)
        for name, vals in scores.items():
            reward_sums[name] += [v for v in vals if v is not None]
        lens = [length(s) for s in samples]
        for good, n in zip(ok, lens):
            lengths["correct" if good else "wrong"].append(n)
        correct = sorted({(s, n) for s, n, g in zip(samples, lens, ok) if g}, key=lambda x: (x[1], samples.index(x[0])))
        # an empty sample (EOS first) is no chain to prefer against: DPO data refuses an empty `rejected`
        wrong = list(dict.fromkeys((s, n) for s, n, g in zip(samples, lens, ok) if not g and s.strip()))
        counts["samples"] += len(samples)
        counts["correct_samples"] += sum(ok)
        counts["duplicate_correct"] += sum(ok) - len(correct)
        counts["distinct_correct"] += len(correct)
        kept = correct[:1] if rcfg.keep == "shortest" else correct
        for j, (text, n) in enumerate(kept):
            rec = _base(row) | {"id": f"{row.get('id')}-c{j}", "source_id": row.get("id")}
            rec |= {"reasoning": reasoning.chain(text), "answer": rewards.extract_answer(text), "completion": text}
            sft.append(rec | {"length": n})
            sources["sft"].append(i)
        pairs = _pairs(correct, wrong, rcfg) if rcfg.dpo_pairs != "none" else []
        for j, (chosen, rejected, kind) in enumerate(pairs):
            rec = _base(row) | {"id": f"{row.get('id')}-p{j}", "source_id": row.get("id")}
            rec |= {"answer": row["answer"], "chosen": chosen, "rejected": rejected, "pair_type": kind}
            dpo.append(rec)
            sources["dpo"].append(i)
        counts[f"pairs_{'none' if not pairs else 'some'}"] += 1
        per_prompt.append(
            {
                "id": row.get("id"),
                "difficulty": row.get("difficulty", 0),
                "n": len(samples),
                "correct": sum(ok),
                "pass_rate": round(sum(ok) / len(samples), 4),
                "kept": len(kept),
                "pairs": len(pairs),
            }
        )

    images = [c for c in data.IMAGE_COLUMNS if c in rows.column_names]
    configs = {}
    for name, recs in (("sft", sft), ("dpo", dpo)):
        own = rows.select(sources[name]).select_columns(images) if images else None
        configs[name] = {"train": (own, data.records_columns(recs, ROW_KEYS))}
        if test is not None:
            configs[name]["test"] = (test, None)
    data.write_dataset(out_dir, configs)
    rep = _report(rows, per_prompt, counts, sft, dpo, lengths, reward_sums, rcfg, gen_s, out_dir)
    rundir.write_json(out_dir / "report.json", rep)
    return rep


def _report(rows, per_prompt, counts, sft, dpo, lengths, reward_sums, rcfg, gen_s, out_dir) -> dict:
    done = [p for p in per_prompt if not p.get("failed")]
    rates = [p["pass_rate"] for p in done]
    by_diff: dict = defaultdict(list)
    for p in done:
        by_diff[str(p["difficulty"])].append(p["pass_rate"])
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {
        "prompts": len(rows),
        "k": rcfg.k,
        "temperature": rcfg.temperature,
        "samples": counts["samples"],
        "correct_samples": counts["correct_samples"],
        "failed_prompts": counts["failed_prompts"],
        "mean_pass_rate": mean(rates),
        "pass_rate_by_difficulty": {d: mean(v) for d, v in sorted(by_diff.items())},
        "pass_rate_histogram": dict(sorted(Counter(f"{r:.2f}" for r in rates).items())),
        "prompts_with_a_correct_chain": sum(p["correct"] > 0 for p in done),
        "prompts_all_correct": sum(p["correct"] == p["n"] for p in done),
        "sft": {
            "keep": rcfg.keep,
            "rows": len(sft),
            "dropped_wrong_samples": counts["samples"] - counts["correct_samples"],
            "dropped_duplicate_chains": counts["duplicate_correct"],
            "dropped_not_shortest": counts["distinct_correct"] - len(sft),
            "prompts_dropped_no_correct_chain": sum(p["correct"] == 0 for p in done),
        },
        "dpo": {
            "pairs": rcfg.dpo_pairs,
            "rows": len(dpo),
            "by_type": dict(Counter(r["pair_type"] for r in dpo)),
            "prompts_without_a_pair": counts["pairs_none"],
        },
        "mean_length_correct": mean(lengths["correct"]),
        "mean_length_wrong": mean(lengths["wrong"]),
        "reward_means": {k: mean(v) for k, v in reward_sums.items()},
        "generation_seconds": round(gen_s, 1),
        "files": {name: str(out_dir / name) for name in ("sft", "dpo", "README.md", "generations.jsonl")},
        "per_prompt": per_prompt,
    }


def rejection_sample_stage(cfg, run_dir: Path, sid: str, splits: dict, earlier: dict | None = None) -> dict:
    """The `rejection_sample` stage kind: sample from the stage's model (init_from), write data/<sid>/."""
    import torch

    t0 = time.time()
    out = rundir.data(run_dir, sid)
    rows = data.head(splits["train"], cfg.rejection.max_prompts)
    path = models.resolve_path(cfg.model)
    torch.manual_seed(cfg.seed)
    log.info("[%s] rejection sampling: %d prompts x %d samples from %s", sid, len(rows), cfg.rejection.k, path)
    with generation.load(cfg, path, cache_dir=out) as backend:
        rep = sample(backend, rows, cfg, out, tokenizer=backend.tokenizer, test=splits["test"])
    summary = {"stage": sid, "kind": "rejection_sample", "model": path, "wall_seconds": round(time.time() - t0, 1)}
    summary["test_rows"] = len(splits["test"])
    summary |= {k: v for k, v in rep.items() if k != "per_prompt"}
    log.info(
        "[%s] done: pass rate %.3f; %d SFT rows (%s), %d DPO pairs (%s); %d of %d prompts had no correct chain",
        sid, rep["mean_pass_rate"] or 0.0, rep["sft"]["rows"], rep["sft"]["keep"], rep["dpo"]["rows"],
        rep["dpo"]["pairs"], rep["sft"]["prompts_dropped_no_correct_chain"], rep["prompts"],
    )  # fmt: skip
    return summary
