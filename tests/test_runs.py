"""reinforce_cot.runs on run dirs written the way recipes.run writes them (backup/overrides.yaml and stages/,
result/summary.json, result/<stage>.json): labels, status, the table and the mean over seeds.
The notebook that draws from them runs on a real sweep in tests/test_sweeps_local.py."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from reinforce_cot import rundir, runs


def make_run(root, name, overrides, acc=None, failed=False):
    run = root / name
    (run / "backup" / "stages").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / "backup" / "overrides.yaml")
    for sid in ("01_grpo", "02_evaluate"):  # the recipe's stages
        OmegaConf.save(OmegaConf.create({"stage": {"id": sid}}), run / "backup" / "stages" / f"{sid}.yaml")
    (run / "result").mkdir()
    if failed:
        (run / "result" / "FAILED").write_text("see output.log\n")
    if acc is not None:
        rows = [{"stage": "01_grpo", "greedy_acc": acc, "mean_len": 10 * acc}]
        summary = {"stage": "02_evaluate", "rows": rows}
        (run / "result" / "summary.json").write_text(json.dumps(summary))
        train = {"global_step": 5, "log_history": [{"step": 5, "loss": 0.1}]}
        (run / "result" / "01_grpo.json").write_text(json.dumps(train))
        (run / "result" / "02_evaluate.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def sweep(tmp_path):
    common = ["output_root=/x", "recipe=single", "algo=grpo"]
    for i, (reward, seed, acc) in enumerate(
        [("r1", 0, 0.5), ("r1", 1, 0.7), ("kimi_length", 0, 0.6), ("kimi_length", 1, 0.8)]
    ):
        make_run(tmp_path, str(i), [*common, f"reward={reward}", f"seed={seed}"], acc)
    make_run(tmp_path, "4", [*common, "reward=r1", "seed=2"], failed=True)
    make_run(tmp_path, "5", [*common, "reward=r1", "seed=3"])  # still running, or killed
    (tmp_path / ".submitit").mkdir()
    return tmp_path


def test_run_dirs_are_the_jobs_in_order(sweep):
    assert [d.name for d in runs.run_dirs(sweep)] == ["0", "1", "2", "3", "4", "5"]
    assert runs.run_dirs(sweep / "2") == [sweep / "2"]  # a single run dir


def test_labels_keep_only_what_varies(sweep):
    labels = runs.labels(runs.run_dirs(sweep))
    assert labels[sweep / "2"] == {"reward": "kimi_length", "seed": "0"}


def test_table_has_a_row_for_every_run_with_its_status(sweep):
    rows = runs.table(runs.run_dirs(sweep))
    assert [(r["run"], r["status"]) for r in rows] == [
        ("0", "ok"), ("1", "ok"), ("2", "ok"), ("3", "ok"), ("4", "failed"), ("5", "incomplete"),
    ]  # fmt: skip
    assert rows[3] == {"run": "3", "reward": "kimi_length", "seed": "1", "status": "ok", "stage": "01_grpo",
                       "greedy_acc": 0.8, "mean_len": 8.0, "steps": 5}  # fmt: skip


def test_a_run_is_ok_when_every_stage_is_done_even_without_an_evaluate_stage(tmp_path):
    """recipe=curate or kimi end without a summary table: done is every stage of backup/stages/ having its
    result/<stage>.json (rundir.status), so a sweep rerun does not run a finished job again."""
    run = make_run(tmp_path, "curate", ["recipe=curate"])
    (run / "backup" / "stages" / "02_evaluate.yaml").unlink()  # one stage: 01_grpo
    assert rundir.status(run) == "incomplete"
    (run / "result" / "01_grpo.json").write_text("{}")
    assert rundir.status(run) == "ok" and not (run / "result" / "summary.json").exists()
    assert rundir.status(tmp_path / "never_started") == "incomplete"


def test_aggregate_averages_over_seeds(sweep):
    ok = [r for r in runs.table(runs.run_dirs(sweep)) if r["status"] == "ok"]
    by_reward = {r["reward"]: r for r in runs.aggregate(ok)}
    assert by_reward.keys() == {"r1", "kimi_length"}
    assert by_reward["r1"]["n"] == 2 and by_reward["r1"]["greedy_acc"] == pytest.approx(0.6)
    assert by_reward["kimi_length"]["greedy_acc"] == pytest.approx(0.7)
    assert by_reward["kimi_length"]["greedy_acc_std"] == pytest.approx(0.1414, abs=1e-4)
    assert "seed" not in by_reward["r1"] and "run" not in by_reward["r1"]


def test_scalars_with_wall_time(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tensorboard" / "01_grpo"))
    for step, (value, t) in enumerate([(0.5, 100.0), (0.6, 130.0)], start=1):
        writer.add_scalar("train/reward", value, step, walltime=t)
    writer.close()
    assert runs.scalars(tmp_path, "train/reward") == {"01_grpo": [(1, 0.5), (2, pytest.approx(0.6))]}
    assert runs.scalars(tmp_path, "train/reward", wall_time=True) == {
        "01_grpo": [(1, 0.5, 100.0), (2, pytest.approx(0.6), 130.0)]
    }
