"""The quickstart's GRPO stage as a plain TRL script: the yardstick for the framework's overhead.

    python benchmarks/plain_trl_grpo.py <quickstart run dir> <out.json>

Reads the stage's resolved config (backup/stages/02_rl.yaml) only for its numbers, then does what a
TRL example script does: load the SFT checkpoint and processor, make the dataset, define the two
rewards, build GRPOConfig + GRPOTrainer and train. It reuses the project's data generator and the
image-only processor class only because the data and the model must be identical.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

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


def main(run_dir: Path, out: Path) -> None:
    cfg = yaml.safe_load((run_dir / "backup" / "stages" / "02_rl.yaml").read_text())
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
    sft = run_dir / "ckpt" / "01_sft" / "final"
    processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(sft)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(sft, dtype="float32")
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
    out.write_text(json.dumps({"train_runtime": metrics["train_runtime"], "global_step": trainer.state.global_step}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
