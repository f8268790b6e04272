"""Held-out greedy accuracy and predicted count per true count, for every arm's final model.

The answer of shapes_count is a count (1-5) and the reasoning chain counts one by one, so chain length
grows with the answer: a length penalty can buy shortness by counting less. This table shows whether it
does (mean predicted count below the true one) and which counts each sampler gains or loses on.

    python experiments/kimi_ablation/by_count.py --sft <sft run dir> <multirun dir> [...] > by_count.md
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf


def evaluate(stage_cfg: Path, ckpt: Path) -> dict:
    import torch

    from reinforce_cot import data, generation, rewards

    cfg = OmegaConf.load(stage_cfg)
    rows = data.load_splits(cfg.data)["test"][: cfg.eval.max_prompts]
    torch.manual_seed(0)
    with generation.load(cfg, str(ckpt)) as backend:
        texts = [c[0] for c in backend.generate(rows, n=1, temperature=0.0)]
    acc, pred = defaultdict(list), defaultdict(list)
    for row, text in zip(rows, texts):
        gold = int(row["answer"])
        answer = rewards.extract_answer(text)
        acc[gold].append(float(rewards.answers_match(answer, row["answer"])))
        if answer is not None and answer.strip().isdigit():
            pred[gold].append(int(answer))
    return {
        g: (sum(acc[g]) / len(acc[g]), sum(pred[g]) / len(pred[g]) if pred[g] else float("nan"), len(acc[g]))
        for g in sorted(acc)
    }


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser()
    ap.add_argument("multiruns", type=Path, nargs="+")
    ap.add_argument("--sft", type=Path)
    a = ap.parse_args()
    runs = []
    if a.sft:
        runs.append(
            ("SFT start", "-", a.sft / "backup" / "stages" / "01_sft.yaml", a.sft / "ckpt" / "01_sft" / "final")
        )
    for m in a.multiruns:
        for job in sorted(p for p in m.iterdir() if (p / "ckpt" / "01_grpo" / "final").is_dir()):
            kv = dict(o.split("=", 1) for o in yaml.safe_load((job / "backup" / "overrides.yaml").read_text()))
            arm = f"{kv.get('reward', 'r1')}{' warm-up ' + kv['reward.length.fn.warmup_steps'] if 'reward.length.fn.warmup_steps' in kv else ''} / {kv.get('sampler', 'uniform')}"
            runs.append(
                (
                    arm,
                    kv.get("seed", "0"),
                    job / "backup" / "stages" / "01_grpo.yaml",
                    job / "ckpt" / "01_grpo" / "final",
                )
            )
    print("accuracy (mean predicted count) per true count; greedy, held-out\n")
    print("| arm | seed | " + " | ".join(f"count {c}" for c in range(1, 6)) + " |")
    print("|---|---|" + "---|" * 5)
    for arm, seed, stage_cfg, ckpt in runs:
        res = evaluate(stage_cfg, ckpt)
        cells = [f"{res[c][0]:.2f} ({res[c][1]:.2f})" if c in res else "-" for c in range(1, 6)]
        print(f"| {arm} | {seed} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
