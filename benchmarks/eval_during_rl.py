"""Cost of evaluation during RL (`eval.every_steps`) on the quickstart's RL stage: A/B, interleaved.

    python benchmarks/eval_during_rl.py                          # the quickstart's SFT once, then 2 pairs of RL runs
    python benchmarks/eval_during_rl.py --sft DIR --pairs 3      # reuse an SFT checkpoint (a quickstart's ckpt/01_sft/final)
    python benchmarks/eval_during_rl.py --on eval.every_steps=100 eval.during_train_prompts=128   # another setting

The RL stage is the quickstart's (`python train.py` runs it as 02_rl: GRPO, 300 steps, from the SFT checkpoint)
run alone. Each pair runs it with evaluation off (eval.every_steps=null) and on (the quickstart's setting,
eval.every_steps=50, or --on), in alternating order (off/on, on/off, ...) so that a change in machine load hits
both arms alike. Per run: the stage's train_runtime (the evaluations run inside train()) and the sum of its
eval_seconds; per pair: overhead = on / off - 1. The load average is printed beside each run, since these
machines are shared: put it next to the figures in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SFT = ["recipe=single", "algo=sft", "reward=none", "algo.args.num_train_epochs=3"]  # the quickstart's SFT stage
RL_ONLY = ["recipe=single", "algo=grpo", "recipe.stages=[{name:rl,kind:train}]"]  # its RL stage, no evaluate stage


def train(out: Path, overrides: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "train.py", f"output_root={out}", *overrides]
    with (out / "console.log").open("w") as f:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True, env=env)
    return sorted(p.parent for p in out.glob("*/backup"))[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", type=Path, help="an SFT checkpoint (default: train the quickstart's SFT stage first)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--on", nargs="*", default=["eval.every_steps=50"], help="overrides of the 'on' arm")
    ap.add_argument("--both", nargs="*", default=[], help="overrides of both arms, e.g. algo.args.max_steps=10")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_eval_during_rl")
    a = ap.parse_args()
    if a.sft is None:
        a.sft = train(a.out / "sft", SFT) / "ckpt" / "01_sft" / "final"
    arms = {"off": ["eval.every_steps=null"], "on": a.on}
    runs = []
    for i in range(a.pairs):
        for arm in ("off", "on") if i % 2 == 0 else ("on", "off"):
            load = os.getloadavg()[0]
            t0 = time.time()
            run_dir = train(a.out / f"{i}_{arm}", [*RL_ONLY, f"model.init_from={a.sft}", *a.both, *arms[arm]])
            res = json.loads((run_dir / "result" / "01_rl.json").read_text())
            evals = [h for h in res["log_history"] if "eval_seconds" in h]
            row = {
                "pair": i,
                "arm": arm,
                "train_runtime_s": round(res["train_metrics"]["train_runtime"], 1),
                "eval_s": round(sum(h["eval_seconds"] for h in evals), 1),
                "evals": len(evals),
                "last_eval": {k: v for k, v in (evals[-1] if evals else {}).items() if k != "step"},
                "process_wall_s": round(time.time() - t0, 1),
                "load_before": round(load, 1),
                "load_after": round(os.getloadavg()[0], 1),
            }
            runs.append(row)
            print(json.dumps(row), flush=True)
    pairs = []
    for i in range(a.pairs):
        off, on = (next(r for r in runs if r["pair"] == i and r["arm"] == arm) for arm in ("off", "on"))
        pairs.append(round(on["train_runtime_s"] / off["train_runtime_s"] - 1, 3))
    on_runs = [r for r in runs if r["arm"] == "on"]
    summary = {
        "on": a.on,
        "overhead_per_pair": pairs,
        "eval_share_of_on_runtime": [round(r["eval_s"] / r["train_runtime_s"], 3) for r in on_runs],
    }
    print(json.dumps(summary, indent=2))
    (a.out / "summary.json").write_text(json.dumps({"runs": runs, **summary}, indent=2))


if __name__ == "__main__":
    main()
