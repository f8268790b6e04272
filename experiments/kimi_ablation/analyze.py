"""Collect the kimi_ablation sweep into a results table, plots and small per-arm JSON files.

Reads every job folder of one or more multirun dirs (its backup/overrides.yaml says which arm and seed
it is, result/ holds the GRPO stage's log history and the held-out evaluation), plus the SFT starting
point's evaluation:

    python experiments/kimi_ablation/analyze.py --sft <sft run dir> <multirun dir> [<multirun dir> ...]

Writes results.md (one row per run, then the mean over seeds per arm), results/<arm>_seed<s>.json
(metrics + training curves) and plots/curves_seed<s>.png (training accuracy reward, completion length and
length reward per step) and plots/heldout.png (held-out accuracy and completion length per arm, mean and
per-seed points).
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
    reward = kv.get("reward", "r1")
    if "reward.length.fn.warmup_steps" in kv:
        reward += f" (on from step {kv['reward.length.fn.warmup_steps']})"
    return {"reward": reward, "sampler": kv.get("sampler", "uniform"), "seed": kv.get("seed", "0")}


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


def _mean(xs):
    return sum(xs) / len(xs)


def _cell(rs: list[dict], key: str, fmt: str) -> str:
    vals = [r[key] for r in rs]
    return f"{_mean(vals):{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"


def arms(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        if r["status"] == "ok":
            out.setdefault((r["reward"], r["sampler"]), []).append(r)
    return out


def table(rows: list[dict], sft: dict | None) -> str:
    head = (
        "| arm (reward / sampler) | seed | greedy acc | sampled acc | pass@4 | mean len (tokens) | p90 len | train s |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    if sft:
        lines.append(
            f"| SFT start (no RL) | - | {sft['greedy_accuracy']:.3f} | {sft.get('sampled_accuracy', 0):.3f} | "
            f"{sft.get('pass@4', 0):.3f} | {sft['mean_completion_tokens']:.1f} | {sft.get('p90_completion_tokens')} | - |"
        )
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['reward']} / {r['sampler']} | {r['seed']} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['reward']} / {r['sampler']} | {r['seed']} | {r['greedy_acc']:.3f} | {r['sampled_acc']:.3f} | "
            f"{r['pass@4']:.3f} | {r['mean_len']:.1f} | {r['p90_len']} | {r['train_s']:.0f} |"
        )
    lines += ["", "Mean over seeds (min-max):", "", "| arm | seeds | greedy acc | sampled acc | mean len | train s |"]
    lines.append("|---|---|---|---|---|---|")
    for (reward, sampler), rs in arms(rows).items():
        lines.append(
            f"| {reward} / {sampler} | {len(rs)} | {_cell(rs, 'greedy_acc', '.3f')} | {_cell(rs, 'sampled_acc', '.3f')} | "
            f"{_cell(rs, 'mean_len', '.1f')} | {_cell(rs, 'train_s', '.0f')} |"
        )
    return "\n".join(lines)


def plots(rows: list[dict], sft: dict | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    colour = {arm: f"C{i}" for i, arm in enumerate(arms(rows))}  # one colour per arm in every panel
    for seed in sorted({r["seed"] for r in ok}):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for r in (r for r in ok if r["seed"] == seed):
            c = r["curves"]
            kw = dict(ls="-" if r["reward"] == "r1" else "--", color=colour[(r["reward"], r["sampler"])])
            label = f"{r['reward']} / {r['sampler']}"
            axes[0].plot(c["step"], c["accuracy"], label=label, **kw)
            axes[1].plot(c["step"], c["length"], label=label, **kw)
            if any(v is not None for v in c["length_reward"]):
                axes[2].plot(c["step"], c["length_reward"], label=label, **kw)
        titles = ["training accuracy reward", "completion length (tokens)", "length reward (kimi_length arms)"]
        for ax, title in zip(axes, titles):
            ax.set_title(f"{title}, seed {seed}")
            ax.set_xlabel("GRPO step")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"curves_seed{seed}.png", dpi=110)
        plt.close(fig)

    groups = arms(rows)
    labels = (["SFT start"] if sft else []) + [f"{rw.replace(' (', chr(10) + '(')}\n{sp}" for rw, sp in groups]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5))
    for ax, key, skey, title in [
        (axes[0], "greedy_acc", "greedy_accuracy", "held-out greedy accuracy"),
        (axes[1], "mean_len", "mean_completion_tokens", "held-out mean completion length (greedy, tokens)"),
    ]:
        means = ([sft[skey]] if sft else []) + [_mean([r[key] for r in rs]) for rs in groups.values()]
        ax.bar(range(len(labels)), means, color="lightsteelblue")
        for i, rs in enumerate(groups.values(), start=1 if sft else 0):
            ax.plot([i] * len(rs), [r[key] for r in rs], "k.", markersize=8)
        ax.set_title(title + " (bar: mean, dots: seeds)")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "heldout.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("multiruns", type=Path, nargs="+")
    ap.add_argument("--sft", type=Path, help="the SFT run every arm started from")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    a = ap.parse_args()
    rows = [r for m in a.multiruns for r in collect(m)]
    done = {(r["reward"], r["sampler"], r["seed"]) for r in rows if r["status"] == "ok"}
    rows = [r for r in rows if r["status"] == "ok" or (r["reward"], r["sampler"], r["seed"]) not in done]  # reruns
    sft = _metrics(next(iter(sorted((a.sft / "result").glob("eval_01_*.json"))))) if a.sft else None
    (a.out / "results").mkdir(parents=True, exist_ok=True)
    (a.out / "plots").mkdir(parents=True, exist_ok=True)
    for r in rows:
        name = f"{r['reward'].split()[0]}{'_warmup' if '(' in r['reward'] else ''}_{r['sampler']}_seed{r['seed']}"
        (a.out / "results" / f"{name}.json").write_text(json.dumps(r, indent=1))
    if sft:
        keep = {k: v for k, v in sft.items() if k != "samples"}
        (a.out / "results" / "sft_start.json").write_text(json.dumps(keep, indent=1))
    md = table(rows, sft)
    (a.out / "results.md").write_text(md + "\n")
    print(md)
    plots(rows, sft, a.out / "plots")


if __name__ == "__main__":
    main()
