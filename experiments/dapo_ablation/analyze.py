"""Held-out accuracy against completions generated and against training time for the DAPO ablation.

    python experiments/dapo_ablation/analyze.py --sft <sft run dir> experiments/dapo_ablation/runs/ablation [--evaluate]

`--evaluate` first scores what is not scored yet, as each run's evaluate stage scored its final model (its
config, greedy + 4 samples on the same held-out prompts; results in the run's result/): every
checkpoint-<step> the runs saved, and the SFT start with 8 samples per prompt, whose per-prompt counts give
the share of uniform groups (all 8 right or all 8 wrong) at the start. Then writes experiments/dapo_ablation/results/{runs.json,results.md} and
plots/{heldout.png,dynamic_sampling.png}. Everything is read through reinforce_cot.runs (labels, tables,
TensorBoard scalars with their wall times).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reinforce_cot import rundir, runs

HERE = Path(__file__).resolve().parent
SFT_K8 = "01_sft_k8"  # label of the SFT start's evaluation with 8 samples per prompt
ARMS = {"grpo": "tab:gray", "dapo_no_ds": "tab:blue", "dapo": "tab:red"}


def arm_of(label: dict) -> str:
    return label.get("experiment", "-").rsplit("/", 1)[-1]


def evaluate(run_dir: Path, ckpts: list[Path], label=lambda ck: ck.name, **eval_overrides) -> None:
    """Score checkpoints of a run the way its evaluate stage scored final/ (same config, the same held-out
    rows, i.e. test rows whose layout also occurs in training dropped): result/eval_<label>.json."""
    from omegaconf import OmegaConf

    from reinforce_cot import data, evaluation, generation

    cfg = OmegaConf.load(run_dir / "backup" / "stages" / "02_evaluate.yaml")
    cfg.eval.update(eval_overrides)
    rows = data.load_splits(cfg.data)["test"]
    for ck in ckpts:
        with generation.load(cfg, str(ck)) as backend:
            evaluation.evaluate_backend(backend, rows, cfg, run_dir / "result", label=label(ck))
        print(f"evaluated {ck}", flush=True)


def eval_file(run_dir: Path, label: str) -> Path:
    return run_dir / "result" / f"eval_{label}.json"


def curve(run_dir: Path, sft_point: dict) -> tuple[str, list[dict]]:
    """The run's train stage and its points: (step, completions, train seconds, greedy, sampled) at the start,
    at every evaluated checkpoint, and at the end (the recipe's own evaluation of final/). Completions come from
    each checkpoint's dynamic_sampling.json; seconds from the TensorBoard log times (interpolated between
    logged steps), counted back from the stage's train_runtime at its last log."""
    import numpy as np

    stage, train = next(iter(runs.train_results(run_dir).items()))
    logged = runs.scalars(run_dir, "train/dynamic_sampling/completions", wall_time=True)[stage]
    steps, walls = [s for s, _, _ in logged], [w for _, _, w in logged]
    runtime = train["train_metrics"]["train_runtime"]

    def seconds(step: int) -> float:
        return runtime - (walls[-1] - float(np.interp(step, steps, walls)))

    points = [sft_point]
    for ck in sorted((run_dir / "ckpt" / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step, f = int(ck.name.split("-")[1]), eval_file(run_dir, ck.name)
        done = json.loads((ck / "dynamic_sampling.json").read_text())["completions"]
        if step < train["global_step"] and f.is_file():
            m = json.loads(f.read_text())["metrics"]
            points.append({"step": step, "completions": done, "train_s": seconds(step),
                           "greedy": m["greedy_accuracy"], "sampled": m["sampled_accuracy"]})  # fmt: skip
    final = next(
        r for r in json.loads((run_dir / "result" / "summary.json").read_text())["rows"] if r["stage"] == stage
    )
    points.append({"step": train["global_step"], "completions": logged[-1][1], "train_s": runtime,
                   "greedy": final["greedy_acc"], "sampled": final["sampled_acc"]})  # fmt: skip
    return stage, points


def final_row(run_dir: Path, stage: str) -> dict:
    """The run's own evaluation of its final model (result/summary.json)."""
    return next(r for r in json.loads((run_dir / "result" / "summary.json").read_text())["rows"] if r["stage"] == stage)


def dynamic_stats(run_dir: Path, stage: str) -> dict:
    """Per generation batch: filtered fraction, extra rounds, kept groups (dynamic sampling arms), and TRL's
    share of zero-spread groups in the trained batch (every arm)."""
    out = {}
    for key in ("dynamic_sampling/filtered_fraction", "dynamic_sampling/extra_rounds", "frac_reward_zero_std"):
        out[key] = [v for _, v in runs.scalars(run_dir, f"train/{key}").get(stage, [])]
    return out


def uniform_share(sft_dir: Path) -> dict:
    rows = [json.loads(x) for x in (sft_dir / "result" / f"eval_{SFT_K8}" / "samples.jsonl").open()]
    k = json.loads(eval_file(sft_dir, SFT_K8).read_text())["metrics"]["k"]
    right = sum(r["sampled_correct"] == k for r in rows) / len(rows)
    wrong = sum(r["sampled_correct"] == 0 for r in rows) / len(rows)
    return {"k": k, "prompts": len(rows), "all_right": right, "all_wrong": wrong, "uniform": right + wrong}


def plot(curves: dict, stats: dict, plots: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    for (arm, seed), pts in curves.items():
        for row, metric in enumerate(("greedy", "sampled")):
            for col, x in enumerate(("completions", "train_s")):
                ax = axes[row][col]
                ax.plot([p[x] for p in pts], [p[metric] for p in pts], "-o", ms=3, lw=1, color=ARMS.get(arm),
                        label=arm if seed == "0" else None, alpha=0.8)  # fmt: skip
                ax.set_xlabel(
                    {"completions": "completions generated", "train_s": "training seconds (loaded machine)"}[x]
                )
                ax.set_ylabel(f"held-out {metric} accuracy")
                ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("DAPO ablation on shapes_count: held-out accuracy, 3 seeds per arm (one line each)")
    fig.tight_layout()
    fig.savefig(plots / "heldout.png", dpi=110)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for (arm, seed), st in stats.items():
        if st["dynamic_sampling/filtered_fraction"]:
            kw = {"color": ARMS.get(arm), "alpha": 0.8, "label": f"seed {seed}"}
            axes[0].plot(st["dynamic_sampling/filtered_fraction"], "-", **kw)
            axes[1].plot(st["dynamic_sampling/extra_rounds"], "-", **kw)
    axes[0].set_ylabel("groups filtered (zero accuracy spread)")
    axes[1].set_ylabel("extra generation rounds")
    for ax in axes:
        ax.set_xlabel("generation batch (logged)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("dapo arm: dynamic sampling per generation batch")
    fig.tight_layout()
    fig.savefig(plots / "dynamic_sampling.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", type=Path, help="sweep folders of the ablation")
    ap.add_argument("--sft", type=Path, required=True, help="run dir of the SFT start")
    ap.add_argument("--evaluate", action="store_true", help="score checkpoints and the SFT start first")
    args = ap.parse_args()
    dirs = [d for s in args.sweeps for d in runs.run_dirs(s) if rundir.status(d) == "ok"]
    if args.evaluate:
        if not eval_file(args.sft, SFT_K8).is_file():  # 8 samples per prompt, as each training group
            evaluate(args.sft, [args.sft / "ckpt" / "01_sft" / "final"], label=lambda ck: SFT_K8, k=8)
        for d in dirs:
            evaluate(d, [c for c in sorted(d.glob("ckpt/*/checkpoint-*")) if not eval_file(d, c.name).is_file()])

    sft = next(r for r in json.loads((args.sft / "result" / "summary.json").read_text())["rows"])
    start = {"step": 0, "completions": 0, "train_s": 0.0, "greedy": sft["greedy_acc"], "sampled": sft["sampled_acc"]}
    labels = runs.labels(dirs)
    curves, stats, rows = {}, {}, []
    for d in dirs:
        key = (arm_of(labels[d]), labels[d].get("seed", "0"))
        stage, curves[key] = curve(d, start)
        stats[key] = dynamic_stats(d, stage)
        end, st = curves[key][-1], stats[key]
        ff = st["dynamic_sampling/filtered_fraction"]
        rows.append({
            "arm": key[0], "seed": key[1], "run": d.name, "steps": end["step"], "completions": end["completions"],
            "train_s": round(end["train_s"]), "greedy": end["greedy"], "sampled": end["sampled"],
            "filtered_first": ff[0] if ff else None, "filtered_mean": sum(ff) / len(ff) if ff else None,
            "extra_rounds_mean": sum(st["dynamic_sampling/extra_rounds"]) / len(ff) if ff else None,
            "zero_std_trained_mean": sum(st["frac_reward_zero_std"]) / len(st["frac_reward_zero_std"]),
            "mean_len": final_row(d, stage)["mean_len"],
        })  # fmt: skip
    share = uniform_share(args.sft)
    results, plots = HERE / "results", HERE / "plots"
    results.mkdir(exist_ok=True)
    out = {"sft": {**sft, "uniform_groups": share}, "runs": rows, "mean": runs.aggregate(rows),
           "curves": {f"{a}/seed{s}": pts for (a, s), pts in curves.items()}}  # fmt: skip
    (results / "runs.json").write_text(json.dumps(out, indent=1))
    cols = ["arm", "seed", "steps", "completions", "train_s", "greedy", "sampled", "mean_len", "zero_std_trained_mean",
            "filtered_mean", "extra_rounds_mean"]  # fmt: skip
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [
        "| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in sorted(rows, key=lambda r: (r["arm"], r["seed"]))
    ]
    (results / "results.md").write_text("\n".join(lines) + "\n")
    plot(curves, stats, plots)
    print("\n".join(lines))
    print(
        f"uniform groups at the start (SFT, {share['prompts']} held-out prompts, k={share['k']}): "
        f"{share['uniform']:.3f} (all right {share['all_right']:.3f}, all wrong {share['all_wrong']:.3f})"
    )
    for m in out["mean"]:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()})


if __name__ == "__main__":
    main()
