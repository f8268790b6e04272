"""What an evaluation leaves for people to look at: PNG plots, an HTML page of samples, a comparison.

- plots(metrics, records, folder): accuracy_by_difficulty.png, length_hist.png,
  reasoning_vs_answer_only.png, steps_per_answer.png (matplotlib, Agg: no display needed).
- html(records, rows, path): the best samples (correct, most complete chains, shortest first) and the
  failures, each with the image inline (base64 PNG thumbnail), question, reasoning, answer, verdict.
- compare(rows, path): one grouped bar chart over several checkpoints (`evaluate` over run dirs).
- format_table(rows): the Markdown table the evaluate stage, the evaluate CLI and a sweep's end print.

Open samples.html in any browser; it needs no network (images are inline).
"""

from __future__ import annotations

import html as html_lib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from reinforce_cot import images, reasoning  # noqa: E402

GREEN, RED, GREY = "#2e8b57", "#c0392b", "#7f8c8d"


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plots(metrics: dict, records: list[dict], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []

    # accuracy by difficulty, with the number of prompts in each bar
    fig, ax = plt.subplots(figsize=(5, 3.5))
    diffs = list(metrics["accuracy_by_difficulty"])
    accs = [metrics["accuracy_by_difficulty"][d] for d in diffs]
    bars = ax.bar(range(len(diffs)), accs, color=GREEN, tick_label=diffs)
    for b, d in zip(bars, diffs):
        ax.annotate(f"n={metrics['count_by_difficulty'][d]}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set(xlabel="difficulty", ylabel="greedy accuracy", ylim=(0, 1.1), title="Accuracy by difficulty")
    out.append(_save(fig, folder / "accuracy_by_difficulty.png"))

    # completion length, correct and wrong stacked
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ok = [r["length"] for r in records if r["correct"]]
    bad = [r["length"] for r in records if not r["correct"]]
    ax.hist([ok, bad], bins=20, stacked=True, color=[GREEN, RED], label=["correct", "wrong"])
    for q, style in (("p50", "--"), ("p90", ":")):
        ax.axvline(metrics[f"{q}_completion_tokens"], color="k", linestyle=style, label=q)
    ax.set(xlabel=f"greedy completion length ({metrics['length_unit']})", ylabel="prompts", title="Completion length")
    ax.legend(fontsize=8)
    out.append(_save(fig, folder / "length_hist.png"))

    # with vs without reasoning (and the sampled views when there are samples)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names, vals, colours = ["with reasoning\n(greedy)"], [metrics["greedy_accuracy"]], [GREEN]
    if "accuracy_answer_only" in metrics:
        names.append("answer only\n(greedy)")
        vals.append(metrics["accuracy_answer_only"])
        colours.append(GREY)
    k = metrics.get("k")
    if k:
        names += [f"pass@{k}", f"maj@{k}"]
        vals += [metrics[f"pass@{k}"], metrics[f"maj@{k}"]]
        colours += ["#5d9cec", "#8e6cc4"]
    bars = ax.bar(range(len(names)), vals, color=colours, tick_label=names)
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1.1), title="With vs without reasoning")
    ax.tick_params(axis="x", labelsize=8)
    out.append(_save(fig, folder / "reasoning_vs_answer_only.png"))

    # steps per answer, correct and wrong stacked
    fig, ax = plt.subplots(figsize=(5, 3.5))
    top = max([r["steps"] for r in records] + [1])
    bins = [x - 0.5 for x in range(top + 2)]
    ax.hist([[r["steps"] for r in records if r["correct"]], [r["steps"] for r in records if not r["correct"]]],
            bins=bins, stacked=True, color=[GREEN, RED], label=["correct", "wrong"])  # fmt: skip
    ax.set(xlabel="reasoning steps per answer", ylabel="prompts", title="Steps per answer")
    ax.legend(fontsize=8)
    out.append(_save(fig, folder / "steps_per_answer.png"))
    return out


def compare(rows: list[dict], path: Path, keys=("greedy_acc", "pass@k", "maj@k", "answer_only", "format_rate")) -> str:
    """Grouped bars: one group per metric, one bar per checkpoint (rows from evaluation.table_row)."""
    import numpy as np

    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(keys) + 0.4 * len(rows)), 3.8))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(keys))
    for i, r in enumerate(rows):
        vals = [r.get(k) if r.get(k) is not None else 0.0 for k in keys]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=str(r["model"]))
    ax.set_xticks(x, keys)
    ax.set(ylim=(0, 1.1), ylabel="score", title="Checkpoint comparison")
    ax.legend(fontsize=7)
    return _save(fig, path)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1100px}
.card{display:flex;gap:1em;border:1px solid #ccc;border-radius:6px;padding:.8em;margin:.6em 0}
.card.ok{border-left:6px solid #2e8b57}.card.bad{border-left:6px solid #c0392b}
pre{white-space:pre-wrap;margin:.3em 0;background:#f6f6f6;padding:.4em}
.verdict{font-weight:bold}.meta{color:#555;font-size:.85em}
"""


def _card(rec: dict, row: dict) -> str:
    esc = html_lib.escape
    img = "".join(
        f'<img src="{images.data_url(im, side=128)}" alt="input image" width="128">' for im in row.get("images") or []
    )
    verdict = "correct" if rec["correct"] else "wrong"
    stats = [f"steps {rec['steps']}", f"length {rec['length']}", f"format {'ok' if rec['format'] else 'broken'}"]
    if rec.get("completeness") is not None:
        stats.append(f"completeness {rec['completeness']:.2f}")
    if rec.get("consistency") is not None:
        stats.append(f"consistency {rec['consistency']:.2f}")
    return (
        f'<div class="card {"ok" if rec["correct"] else "bad"}">{img}<div>'
        f"<div><b>Question</b> ({esc(str(rec['id']))}, difficulty {esc(str(rec['difficulty']))}): "
        f"{esc(rec['question'])}</div>"
        f"<div><b>Reasoning</b><pre>{esc(reasoning.chain(rec['completion'])) or '(none)'}</pre></div>"
        f"<div><b>Answer</b>: {esc(str(rec['predicted']))} &nbsp; <b>Gold</b>: {esc(str(rec['answer']))} &nbsp; "
        f'<span class="verdict">{verdict}</span></div>'
        f"<details><summary>raw completion</summary><pre>{esc(rec['completion'])}</pre></details>"
        f'<div class="meta">{" · ".join(stats)}</div></div></div>'
    )


def html(records: list[dict], rows, path: Path, label: str, n: int = 12) -> Path:
    """samples.html: `n` best samples and `n` failures (records and rows aligned by index; only the rows
    shown are read, so only their images are decoded)."""
    pairs = [(rec, i) for i, rec in enumerate(records)]
    best = sorted(
        (p for p in pairs if p[0]["correct"]),
        key=lambda p: (-(p[0]["completeness"] or 0), -(p[0].get("consistency") or 0), p[0]["length"]),
    )[:n]
    failures = sorted((p for p in pairs if not p[0]["correct"]), key=lambda p: (p[0]["format"], p[0]["difficulty"]))[:n]
    n_ok = sum(r["correct"] for r in records)
    body = [
        f"<h1>Samples: {html_lib.escape(label)}</h1>",
        f"<p>{n_ok} of {len(records)} greedy answers correct.</p>",
        f'<h2 id="best">Best samples ({len(best)})</h2>',
        *(_card(r, rows[i]) for r, i in best),
        f'<h2 id="failures">Failures ({len(failures)})</h2>',
        *(_card(r, rows[i]) for r, i in failures),
    ]
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>Samples: {html_lib.escape(label)}</title>'
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def format_table(rows: list[dict]) -> str:
    """A Markdown table of rows that share their keys (evaluation tables, a sweep's jobs, the notebook's runs).

    >>> print(format_table([{"stage": "01_sft", "acc": 0.5}, {"stage": "02_rl", "acc": 0.75}]))
    | stage  | acc   |
    |--------|-------|
    | 01_sft | 0.500 |
    | 02_rl  | 0.750 |
    """
    if not rows:
        return "(no stages evaluated)"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
