"""Compare many run dirs: what each run was asked (its overrides), what it measured (result JSON), and its
TensorBoard curves. notebooks/compare_runs.ipynb draws a sweep's plots from these.

    from reinforce_cot import runs
    dirs = runs.run_dirs("multirun/2026-01-01/12-00-00")     # the sweep's jobs, in job order
    rows = runs.table(dirs)                                   # one row per (run, evaluated stage)
    curves = runs.scalars(dirs[0], "train/loss")             # {stage: [(step, value), ...]}

A run is labelled by the overrides that differ between the runs compared (`reward=kimi_length seed=1`);
`aggregate` averages rows over seeds. What one run dir holds, and its status, is reinforce_cot.rundir's
(this module reads through it). Rows are plain dicts: `pandas.DataFrame(rows)` makes a frame (pandas is a
declared dependency, which the notebook uses).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from reinforce_cot import rundir
from reinforce_cot.overrides import parse


def run_dirs(folder: str | Path) -> list[Path]:
    """Run dirs under a sweep folder (multirun/<date>/<time>/) or any folder of run dirs (outputs/): every
    sub-folder holding backup/ or result/, numbered jobs in job order."""
    folder = Path(folder)
    if rundir.backup(folder).is_dir():
        return [folder]
    found = [p for p in folder.iterdir() if p.is_dir() and (rundir.backup(p).is_dir() or rundir.results(p).is_dir())]
    return sorted(found, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def labels(dirs: list[Path], ignore: tuple[str, ...] = ("output_root", "hydra.", "resume")) -> dict[Path, dict]:
    """For each run, the overrides whose value is not the same in every run: {key: value}.

    Two runs of `-m seed=0,1 algo=sft` are told apart by seed alone."""
    parsed = {
        d: {o.key_or_group: o.get_value_string() for o in parse(rundir.overrides(d)) if o.value_type} for d in dirs
    }
    parsed = {d: {k: v for k, v in kv.items() if not k.startswith(ignore)} for d, kv in parsed.items()}
    keys = sorted({k for kv in parsed.values() for k in kv})
    varying = [k for k in keys if len({kv.get(k) for kv in parsed.values()}) > 1]
    return {d: {k: parsed[d].get(k, "-") for k in varying} for d in dirs}


def train_results(run_dir: Path) -> dict[str, dict]:
    """result/<stage>.json of every train stage (the ones with a log_history), by stage id."""
    return {sid: r for sid, r in rundir.stage_results(run_dir).items() if "log_history" in r}


def table(dirs: list[Path]) -> list[dict]:
    """One row per (run, evaluated stage) from result/summary.json, with the run's labels, job and status
    (rundir.status); a run without a summary still gets a row, so that nothing silently drops out."""
    rows = []
    for d, label in labels(dirs).items():
        base = {"run": d.name, **label, "status": rundir.status(d)}
        summary = rundir.summary(d)
        stages = json.loads(summary.read_text())["rows"] if summary.exists() else [{}]
        trained = train_results(d)
        for stage in stages:
            train = trained.get(stage.get("stage", ""), {})
            rows.append({**base, **stage, "steps": train.get("global_step")})
    return rows


def aggregate(rows: list[dict], over: str = "seed") -> list[dict]:
    """Mean and standard deviation of every numeric column across runs that differ only in `over`.

    >>> rows = [{"seed": "0", "reward": "r1", "acc": 0.5}, {"seed": "1", "reward": "r1", "acc": 0.7}]
    >>> [(r["reward"], r["n"], round(r["acc"], 2), round(r["acc_std"], 2)) for r in aggregate(rows)]
    [('r1', 2, 0.6, 0.14)]
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = tuple((k, v) for k, v in row.items() if k not in (over, "run") and not _is_number(v))
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        agg = dict(key) | {"n": len(members)}
        for col in members[0]:
            values = [m[col] for m in members if _is_number(m.get(col))]
            if col in (over, "run") or not values:
                continue
            mean = sum(values) / len(values)
            agg[col] = mean
            agg[f"{col}_std"] = (
                math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            )
        out.append(agg)
    return out


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def scalars(run_dir: Path, tag: str, wall_time: bool = False) -> dict[str, list[tuple]]:
    """A TensorBoard scalar (train/loss, train/reward, train/completions/mean_length, ...) per train stage:
    {stage: [(step, value), ...]}, from every event file of tensorboard/<stage>/ (a resumed run adds files;
    a step logged twice keeps its last value). `wall_time=True` adds when each was logged:
    (step, value, seconds since the epoch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for stage_dir in sorted(rundir.tensorboard(run_dir).glob("*")):
        acc = EventAccumulator(str(stage_dir), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points = {e.step: (e.value, e.wall_time) for e in acc.Scalars(tag)}
            out[stage_dir.name] = [(s, *v) if wall_time else (s, v[0]) for s, v in sorted(points.items())]
    return out
