"""A GRPO stage of a run replayed as a plain TRL script: the yardstick for the framework's overhead.

    python benchmarks/plain_trl_grpo.py <quickstart run dir> <out.json>            # its stage 02_rl
    python benchmarks/plain_trl_grpo.py <run dir> <out.json> 01_grpo               # any GRPO stage

Reads the stage's resolved config (backup/stages/<stage>.yaml) only for its numbers, then does what a
TRL example script does: load the model the stage started from (its init_from checkpoint, else
model.path) and its processor, make the dataset, define the two rewards, build GRPOConfig +
GRPOTrainer and train. It reuses the project's data generator and the image-only processor class only
because the data and the model must be identical. Writes train_runtime, global_step (and on a GPU the
peak memory) to out.json.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForImageTextToText
from trl import GRPOConfig, GRPOTrainer

from reinforce_cot.data import shapes_rows
from reinforce_cot.processing import ImageOnlyQwen2_5_VLProcessor


def accuracy(completions, answer, **_):
    out = []
    for c, gold in zip(completions, answer):
        m = re.findall(r"<answer>(.*?)</answer>", c[0]["content"], re.DOTALL)
        out.append(float(bool(m) and m[-1].strip() == gold))
    return out


def format_(completions, **_):
    pat = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
    return [float(bool(pat.match(c[0]["content"]))) for c in completions]


def main(run_dir: Path, out: Path, stage: str = "02_rl") -> None:
    cfg = yaml.safe_load((run_dir / "backup" / "stages" / f"{stage}.yaml").read_text())
    d = cfg["data"]
    rows = shapes_rows(**{k: v for k, v in d["train"].items() if k != "_target_"})
    ds = Dataset.from_list(
        [
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image"},
                            {"type": "text", "text": d["prompt_template"].format(question=r["question"])},
                        ],
                    }
                ],
                "image": r["image"],
                "answer": r["answer"],
            }
            for r in rows
        ]
    )
    m = cfg["model"]
    start = Path(m["init_from"]) / "final" if m.get("init_from") else Path(m["path"])
    processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(start)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(
        start, dtype=m["dtype"], attn_implementation=m["attn_implementation"]
    )
    args = {k: v for k, v in cfg["algo"]["args"].items() if k != "_target_" and k != "_convert_"}
    args.update(
        output_dir=str(out.parent / "plain_ckpt"),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,  # transformers' PrinterCallback: a TRL script's plain console
        reward_weights=[cfg["reward"][k]["weight"] for k in ("accuracy", "format")],
    )
    trainer = GRPOTrainer(
        model=model,
        args=GRPOConfig(**args),
        train_dataset=ds,
        processing_class=processor,
        reward_funcs=[accuracy, format_],
    )
    metrics = trainer.train().metrics
    report = {"train_runtime": metrics["train_runtime"], "global_step": trainer.state.global_step}
    if torch.cuda.is_available():
        report["peak_gpu_mib"] = torch.cuda.max_memory_allocated() // (1 << 20)
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
