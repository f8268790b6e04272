"""Benchmark of the default run (`python train.py`): wall time per stage, peak RSS, GRPO seconds per
step, and the framework's overhead against a plain TRL script running the same GRPO steps.

    python benchmarks/quickstart.py                 # full default run, then the plain-TRL replay
    python benchmarks/quickstart.py --run-dir DIR   # only the replay, against an existing quickstart run

The plain script (benchmarks/plain_trl_grpo.py) starts from the same SFT checkpoint with the same
resolved GRPOConfig, data and rewards, but builds everything by hand: no Hydra, no recipes, no run dir.
Overhead ratio = our GRPO train_runtime, less its evaluations during RL (eval.every_steps; their cost is
benchmarks/eval_during_rl.py's subject), / plain train_runtime (1.00 = none). Figures go to
benchmarks/README.md by hand, with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with log.open("w") as f:
        subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, help="an existing quickstart run dir: skip the full run")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides")
    a = ap.parse_args()
    out = ROOT / "outputs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    if a.run_dir is None:
        wall = run([sys.executable, "train.py", f"output_root={out}", *a.overrides], out / "quickstart.log")
        a.run_dir = sorted(p.parent for p in out.glob("*/backup"))[-1]
        report["total_wall_s"] = round(wall, 1)
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    res = a.run_dir / "result"
    for stage in sorted(res.glob("0*.json")):
        r = json.loads(stage.read_text())
        report[f"{stage.stem}_wall_s"] = r.get("wall_seconds")
    rl = json.loads((res / "02_rl.json").read_text())
    # evaluation during RL (eval.every_steps) runs inside train(); the plain replay has none: left out of the ratio
    report["grpo_eval_during_rl_s"] = round(sum(h.get("eval_seconds", 0) for h in rl["log_history"]), 1)
    ours = rl["train_metrics"]["train_runtime"] - report["grpo_eval_during_rl_s"]
    report["grpo_steps"] = rl["global_step"]
    report["grpo_s_per_step"] = round(ours / rl["global_step"], 3)

    plain_json = out / "plain.json"
    run([sys.executable, "benchmarks/plain_trl_grpo.py", str(a.run_dir), str(plain_json)], out / "plain.log")
    plain = json.loads(plain_json.read_text())
    report["plain_trl_grpo_s_per_step"] = round(plain["train_runtime"] / plain["global_step"], 3)
    report["overhead_ratio"] = round(ours / plain["train_runtime"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
