"""Held-out evaluation: accuracy (greedy, sampled, pass@k, maj@k), format, length, difficulty, the value
of reasoning (answer-only prompts), and reasoning-chain metrics (reinforce_cot.reasoning).

    python -m reinforce_cot.evaluate ckpt=<checkpoint folder or run dir> data=shapes_count
    python -m reinforce_cot.evaluate ckpt=[outputs/runA,outputs/runB]      # one table, one plot

and the `evaluate` stage of every recipe (`evaluate_stage`, at the end of this module). Generation goes through the configured backend
(reinforce_cot.generation); with an output folder every generation is kept as JSONL there, so an
interrupted evaluation (a server that died) resumes where it stopped.

Definitions (per prompt, then averaged over prompts; `eval.*` keys in conf/train.yaml):
- greedy_accuracy: one greedy completion (temperature 0) whose <answer> matches the gold answer.
- sampled_accuracy, pass@j, maj@k: from k = `eval.k` samples at `eval.temperature`. pass@j is the
  unbiased estimator of Chen et al. (2021), 1 - C(k-c, j) / C(k, j) with c correct of k, reported for
  j = 1, 2, 4, ... up to k; maj@k is the accuracy of the most frequent extracted answer (ties: the one
  sampled first), the self-consistency vote of Wang et al. (2023).
- format_rate: greedy completions of exactly <think>...</think><answer>...</answer>; answer_rate: those
  with any <answer>.
- completion length (greedy): mean, p50, p90 (numpy's linear interpolation), in tokens of the
  model's tokenizer (words where no tokenizer is at hand: `length_unit` says which).
- accuracy_by_difficulty: greedy accuracy per value of the `difficulty` column (counts beside it).
- accuracy_answer_only: greedy accuracy with `eval.answer_only_template` (no request to reason);
  reasoning_gain = greedy_accuracy - accuracy_answer_only.
- reasoning metrics on the greedy chains: see reinforce_cot.reasoning.

Outputs (`evaluate_backend(..., out_dir=result/, label=...)`): eval_<label>.json (every metric and the
config that produced it) and eval_<label>/ with samples.jsonl (every prompt's verdict), samples.html
(best samples and failures), four plots (reinforce_cot.report) and generations/*.jsonl.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from reinforce_cot import data, reasoning, rewards
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(5, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if k < 1 or k > n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(completions: list[str], gold: str) -> float:
    """1.0 when the most frequent extracted answer matches `gold` (ties: the first sampled).

    >>> majority(["<answer>2</answer>", "<answer>3</answer>", "<answer>2</answer>"], "2")
    1.0
    """
    votes = Counter(a for a in (rewards.extract_answer(t) for t in completions) if a is not None)
    return float(bool(votes) and rewards.answers_match(votes.most_common(1)[0][0], gold))


def pass_ks(k: int) -> list[int]:
    """The j of pass@j reported for k samples: powers of two below k, and k.

    >>> pass_ks(4), pass_ks(6), pass_ks(1)
    ([1, 2, 4], [1, 2, 4, 6], [1])
    """
    out = [j for j in (2**i for i in range(k.bit_length())) if j < k]
    return out + [k]


def validate(cfg) -> None:
    """What evaluation alone needs, checked before any weights load (no trainer config: evaluating
    does not import TRL): required keys, data vs model, the generation backend, eval.*."""
    from reinforce_cot import generation

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required (???) but not set; add {missing[0]}=<value> to the command line")
    if cfg.data.modality == "image" and cfg.model.kind != "vlm":
        raise ConfigError(
            f"data={cfg.data.name} has images but model {cfg.model.path} is text-only; evaluate it on text data"
        )
    generation.validate(cfg)
    if cfg.eval.k < 0:
        raise ConfigError(f"eval.k={cfg.eval.k} must be >= 0 (samples per prompt; 0 skips sampled metrics)")
    if cfg.eval.max_prompts < 1:
        raise ConfigError(f"eval.max_prompts={cfg.eval.max_prompts} must be >= 1")


def check_rows(rows, data_cfg) -> None:
    """A test split evaluation can score: not empty, a gold answer in every row."""
    name = data.title(data_cfg)
    if not len(rows):
        raise ConfigError(f"data={name}: the test split is empty; raise data.test.n or fix the source")
    answers = data.column(rows, "answer") or [None] * len(rows)
    ids = data.column(rows, "id") or list(range(len(rows)))
    missing = [i for i, a in zip(ids, answers) if a in (None, "")]
    if missing:
        raise ConfigError(
            f"data={name}: {len(missing)} test rows have no answer column (first: {missing[0]}); "
            "evaluation needs a gold `answer` per row (map it with data.fields.answer=<column>)"
        )


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else float("nan")


def _pct(xs, q) -> float:
    import numpy as np

    return round(float(np.percentile(xs, q)), 2) if len(xs) else float("nan")


def score(
    rows: list[dict],
    greedy: list[str],
    sampled: list[list[str]] | None,
    answer_only: list[str] | None,
    eval_cfg,
    data_cfg,
    tokenizer=None,
) -> tuple[dict, list[dict]]:
    """Metrics and per-prompt records from finished generations (no model needed: testable by hand).

    `sampled[i]` holds prompt i's k samples (None skips sampled metrics); `answer_only[i]` its greedy
    answer-only completion (None skips it)."""
    answers = [r["answer"] for r in rows]
    correct = rewards.accuracy_reward(greedy, answer=answers)
    formatted = rewards.format_reward(greedy)
    if tokenizer is not None:
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in greedy]
    else:
        lengths = [len(t.split()) for t in greedy]
    rcfg = data_cfg.get("reasoning") or {}
    split = rcfg.get("step_split") or reasoning.DEFAULT_SPLIT
    types = rcfg.get("step_types") or []
    types = OmegaConf.to_container(types, resolve=True) if OmegaConf.is_config(types) else list(types)
    chains = [reasoning.steps(reasoning.chain(t), split) for t in greedy]
    refs = [reasoning.steps(r.get("reasoning") or "", split) for r in rows]
    records = []
    for i, (r, text) in enumerate(zip(rows, greedy)):
        pred = rewards.extract_answer(text)
        rec = {
            "id": r.get("id"),
            "question": r["question"],
            "answer": r["answer"],
            "difficulty": r.get("difficulty", 0),
            "completion": text,
            "predicted": pred,
            "correct": bool(correct[i]),
            "format": bool(formatted[i]),
            "length": lengths[i],
            "steps": len(chains[i]),
            "completeness": reasoning.completeness(chains[i], types, r),
            "answer_in_last_step": reasoning.answer_in_last_step(chains[i], pred),
        }
        records.append(rec)

    by_diff: dict = defaultdict(list)
    for rec in records:
        by_diff[str(rec["difficulty"])].append(float(rec["correct"]))
    acc = _mean(correct)
    m: dict = {
        "n_prompts": len(rows),
        "greedy_accuracy": acc,
        "format_rate": _mean(formatted),
        "answer_rate": _mean([float(r["predicted"] is not None) for r in records]),
        "length_unit": "tokens" if tokenizer is not None else "words",
        "mean_completion_tokens": _mean(lengths),
        "p50_completion_tokens": _pct(lengths, 50),
        "p90_completion_tokens": _pct(lengths, 90),
        "mean_tokens_correct": _mean([r["length"] for r in records if r["correct"]]),
        "mean_tokens_wrong": _mean([r["length"] for r in records if not r["correct"]]),
        "accuracy_by_difficulty": {d: _mean(v) for d, v in sorted(by_diff.items())},
        "count_by_difficulty": {d: len(v) for d, v in sorted(by_diff.items())},
    }
    if sampled is not None:
        k = eval_cfg.k
        s_correct = [rewards.accuracy_reward(s, answer=[a] * len(s)) for s, a in zip(sampled, answers)]
        have = [c for c in s_correct if len(c) == k]  # a failed generation has no samples: left out
        m["k"] = k
        m["sampled_accuracy"] = _mean([x for c in have for x in c])
        for j in pass_ks(k):
            m[f"pass@{j}"] = _mean([pass_at_k(k, int(sum(c)), j) for c in have])
        m[f"maj@{k}"] = _mean([majority(s, a) for s, a in zip(sampled, answers) if len(s) == k])
        for rec, c in zip(records, s_correct):
            rec["sampled_correct"] = int(sum(c))
    if answer_only is not None:
        ao = rewards.accuracy_reward(answer_only, answer=answers)
        m["accuracy_answer_only"] = _mean(ao)
        m["reasoning_gain"] = round(acc - m["accuracy_answer_only"], 4)
        for rec, text, c in zip(records, answer_only, ao):
            rec["answer_only"], rec["answer_only_correct"] = text, bool(c)

    m["reasoning"] = _reasoning_metrics(records, chains, refs, types, rows, eval_cfg)
    return m, records


def _reasoning_metrics(records, chains, refs, types, rows, eval_cfg) -> dict:
    n_steps = [r["steps"] for r in records]
    out: dict = {
        "mean_steps": _mean(n_steps),
        "p50_steps": _pct(n_steps, 50),
        "mean_steps_reference": _mean([len(s) for s in refs if s]),
        "answer_in_last_step": _mean([float(r["answer_in_last_step"]) for r in records]),
        "unavailable": {},
    }
    comp = [r["completeness"] for r in records]
    if any(c is not None for c in comp):
        out["step_completeness"] = _mean(comp)
        ref_comp = [reasoning.completeness(s, types, r) for s, r in zip(refs, rows) if s]
        out["step_completeness_reference"] = _mean(ref_comp)
    else:
        out["step_completeness"] = None
        out["unavailable"]["step_completeness"] = "data.reasoning.step_types defines no expected steps for this data"
    model_path = eval_cfg.get("embedding_model")
    why = None if eval_cfg.get("consistency", True) else "eval.consistency=false"
    why = why or reasoning.embedding_unavailable(model_path)
    if why:
        out["step_consistency"] = None
        out["unavailable"]["step_consistency"] = why
    else:
        cons = reasoning.consistency(chains, model_path)
        for rec, c in zip(records, cons):
            rec["consistency"] = None if c is None else round(c, 4)
        out["step_consistency"] = _mean(cons)
        out["step_consistency_reference"] = _mean(reasoning.consistency([s for s in refs if s], model_path))
        out["chains_with_2plus_steps"] = sum(c is not None for c in cons)
    return out


def _generator(backend, rows, out_dir: Path | None):
    if out_dir is None:
        return lambda name, n, t, template=None: backend.generate(rows, n=n, temperature=t, template=template)
    return lambda name, n, t, template=None: backend.generate_to_jsonl(
        rows, out_dir / "generations" / f"{name}.jsonl", n=n, temperature=t, template=template
    )


def evaluate_backend(backend, rows: list[dict], cfg, out_dir: str | Path | None = None, label: str = "model") -> dict:
    """Generate, score and (with `out_dir`) write eval_<label>.json + eval_<label>/ (plots, HTML, JSONL)."""
    import torch

    e = cfg.eval
    check_rows(rows, cfg.data)
    rows = data.head(rows, e.max_prompts)
    folder = Path(out_dir) / f"eval_{label}" if out_dir is not None else None
    gen = _generator(backend, rows, folder)
    torch.manual_seed(cfg.seed)
    greedy_n = gen("greedy", 1, 0.0)
    failed = sum(not c for c in greedy_n)
    greedy = [c[0] if c else "" for c in greedy_n]
    sampled = gen(f"sampled_k{e.k}", e.k, e.temperature) if e.k > 0 else None
    answer_only = None
    if e.get("answer_only_template"):
        answer_only = [c[0] if c else "" for c in gen("answer_only", 1, 0.0, e.answer_only_template)]
    metrics, records = score(data.text_rows(rows), greedy, sampled, answer_only, e, cfg.data, backend.tokenizer)
    metrics["failed_generations"] = failed
    metrics["samples"] = [
        {k: r[k] for k in ("id", "question", "answer", "completion", "correct")} for r in records[:20]
    ]
    if folder is not None:
        from reinforce_cot import generation, report, rundir

        folder.mkdir(parents=True, exist_ok=True)
        generation.write_jsonl(folder / "samples.jsonl", records)
        metrics["plots"] = report.plots(metrics, records, folder)
        metrics["html"] = str(report.html(records, rows, folder / "samples.html", label, e.get("html_samples", 12)))
        full = {"label": label, "metrics": metrics, "config": OmegaConf.to_container(cfg, resolve=True)}
        rundir.write_json(Path(out_dir) / f"eval_{label}.json", full)
    return metrics


def table_row(label: str, m: dict) -> dict:
    """One line of a comparison table."""
    k = m.get("k")
    r = m.get("reasoning", {})
    row = {
        "model": label,
        "greedy_acc": m["greedy_accuracy"],
        "sampled_acc": m.get("sampled_accuracy"),
        "k": k,
        "pass@k": m.get(f"pass@{k}") if k else None,
        "maj@k": m.get(f"maj@{k}") if k else None,
        "answer_only": m.get("accuracy_answer_only"),
        "format_rate": m["format_rate"],
        "mean_len": m["mean_completion_tokens"],
        "steps": r.get("mean_steps"),
        "complete": r.get("step_completeness"),
        "consist": r.get("step_consistency"),
    }
    return row


# ----------------------------------------------------------------------------- the `evaluate` recipe stage
def evaluate_stage(cfg, run_dir: Path, sid: str, splits: dict, results: dict) -> dict:
    """The `evaluate` stage kind (conf/stage/evaluate.yaml): each earlier stage's model (`stage.targets`) on
    the test split -> result/eval_<stage>.json + eval_<stage>/ (plots, samples.html), then one table
    (result/summary.{json,md}, logged) and one plot (result/compare.png); returns the table."""
    from reinforce_cot import generation, models, report, rundir

    out = rundir.results(run_dir)
    rows = []
    for target in cfg.stage.targets:
        t0 = time.time()
        path = str(models.checkpoint_folder(str(rundir.ckpt(run_dir, target))))
        with generation.load(cfg, path, cache_dir=out / f"eval_{target}") as backend:
            metrics = evaluate_backend(backend, splits["test"], cfg, out, label=target)
        train = results.get(target) or {}
        row = {"stage": target} | table_row(target, metrics)
        row.pop("model")
        rows.append(row | {"train_s": train.get("wall_seconds"), "eval_s": round(time.time() - t0, 1)})
    table = report.format_table(rows)
    log.info("results on %d held-out prompts:\n%s", min(len(splits["test"]), cfg.eval.max_prompts), table)
    summary = {"stage": sid, "rows": rows}
    if rows:
        summary["plot"] = report.compare([r | {"model": r["stage"]} for r in rows], out / "compare.png")
    rundir.summary(run_dir, ".md").write_text(table + "\n")
    rundir.write_json(rundir.summary(run_dir), summary)
    return summary
