"""Collect the kimi_ablation sweep into a results table, plots and small per-arm JSON files.

Reads every job folder of a multirun dir (its backup/overrides.yaml says which arm it is, result/ holds
the GRPO stage's log history and the held-out evaluation), plus the SFT starting point's evaluation:

    python experiments/kimi_ablation/analyze.py <multirun dir> <sft run dir> [--out experiments/kimi_ablation]

Writes results.md (the table), results/<arm>.json (metrics + training curves), curves.png (training
accuracy reward, completion length and length reward per step) and heldout.png (held-out accuracy and
completion length per arm).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def _metrics(path: Path) -> dict:
    d = json.loads(path.read_text())
    return d.get("metrics", d)  # newer evaluation nests them under "metrics"


def arm_of(job: Path) -> dict:
    overrides = yaml.safe_load((job / "backup" / "overrides.yaml").read_text())
    kv = dict(o.split("=", 1) for o in overrides if "=" in o)
    return {"reward": kv.get("reward", "r1"), "sampler": kv.get("sampler", "uniform"), "seed": kv.get("seed", "0")}


def collect(multirun: Path) -> list[dict]:
    rows = []
    for job in sorted(p for p in multirun.iterdir() if (p / "backup" / "overrides.yaml").is_file()):
        train = next(iter(sorted((job / "result").glob("01_*.json"))), None)
        ev = next(iter(sorted((job / "result").glob("eval_01_*.json"))), None)
        if train is None or ev is None:
            rows.append(arm_of(job) | {"job": job.name, "status": "missing (failed or running)"})
            continue
        t, m = json.loads(train.read_text()), _metrics(ev)
        hist = [h for h in t["log_history"] if "rewards/accuracy/mean" in h]
        rows.append(
            arm_of(job)
            | {
                "job": job.name,
                "status": "ok",
                "greedy_acc": m["greedy_accuracy"],
                "sampled_acc": m.get("sampled_accuracy"),
                "pass@4": m.get("pass@4"),
                "format_rate": m["format_rate"],
                "mean_len": m["mean_completion_tokens"],
                "p90_len": m.get("p90_completion_tokens"),
                "acc_by_difficulty": m.get("accuracy_by_difficulty"),
                "n_prompts": m.get("n_prompts"),
                "train_s": t["wall_seconds"],
                "steps": t["global_step"],
                "curves": {
                    "step": [h["step"] for h in hist],
                    "accuracy": [h["rewards/accuracy/mean"] for h in hist],
                    "length": [h.get("completions/mean_length") for h in hist],
                    "length_reward": [h.get("rewards/length/mean") for h in hist],
                    "mean_success": [h.get("sampler/mean_success") for h in hist],
                },
            }
        )
    return rows


def table(rows: list[dict], sft: dict | None) -> str:
    head = "| arm (reward / sampler) | greedy acc | sampled acc | pass@4 | mean len (tokens) | p90 len | train s |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    if sft:
        lines.append(
            f"| SFT start (no RL) | {sft['greedy_accuracy']:.3f} | {sft.get('sampled_accuracy', 0):.3f} | "
            f"{sft.get('pass@4', 0):.3f} | {sft['mean_completion_tokens']:.1f} | {sft.get('p90_completion_tokens')} | - |"
        )
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['reward']} / {r['sampler']} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['reward']} / {r['sampler']} | {r['greedy_acc']:.3f} | {r['sampled_acc']:.3f} | {r['pass@4']:.3f} | "
            f"{r['mean_len']:.1f} | {r['p90_len']} | {r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def plots(rows: list[dict], sft: dict | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in ok:
        c = r["curves"]
        style = "-" if r["reward"] == "r1" else "--"
        label = f"{r['reward']} / {r['sampler']}"
        axes[0].plot(c["step"], c["accuracy"], style, label=label)
        axes[1].plot(c["step"], c["length"], style, label=label)
        if any(v is not None for v in c["length_reward"]):
            axes[2].plot(c["step"], c["length_reward"], style, label=label)
    for ax, title in zip(axes, ["training accuracy reward", "completion length (tokens)", "length reward (kimi_length)"]):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = (["SFT"] if sft else []) + [f"{r['reward']}\n{r['sampler']}" for r in ok]
    greedy = ([sft["greedy_accuracy"]] if sft else []) + [r["greedy_acc"] for r in ok]
    sampled = ([sft.get("sampled_accuracy")] if sft else []) + [r["sampled_acc"] for r in ok]
    length = ([sft["mean_completion_tokens"]] if sft else []) + [r["mean_len"] for r in ok]
    x = range(len(labels))
    axes[0].bar([i - 0.2 for i in x], greedy, 0.4, label="greedy")
    axes[0].bar([i + 0.2 for i in x], sampled, 0.4, label="sampled (T=1)")
    axes[0].set_title("held-out accuracy")
    axes[0].legend()
    axes[1].bar(list(x), length)
    axes[1].set_title("held-out mean completion length (greedy, tokens)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "heldout.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("multirun", type=Path)
    ap.add_argument("sft_run", type=Path, nargs="?")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    a = ap.parse_args()
    rows = collect(a.multirun)
    sft = None
    if a.sft_run:
        sft = _metrics(next(iter(sorted((a.sft_run / "result").glob("eval_01_*.json")))))
    (a.out / "results").mkdir(parents=True, exist_ok=True)
    for r in rows:
        (a.out / "results" / f"{r['reward']}_{r['sampler']}.json").write_text(json.dumps(r, indent=1))
    if sft:
        keep = {k: v for k, v in sft.items() if k != "samples"}
        (a.out / "results" / "sft_start.json").write_text(json.dumps(keep, indent=1))
    md = table(rows, sft)
    (a.out / "results.md").write_text(md + "\n")
    print(md)
    plots(rows, sft, a.out)


if __name__ == "__main__":
    main()
