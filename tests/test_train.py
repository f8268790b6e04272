"""Each algorithm trains for a few steps through the real CLI and TRL, changes the weights, and leaves
a complete run dir."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from reinforce_cot import runs, tiny, training


def _changed(before, after) -> list[str]:
    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert a.keys() == b.keys()
    return [k for k in a if not (a[k] == b[k]).all()]


def _assert_run_dir(run, sid):
    d = run.dir
    assert d.name.endswith("_" + run.recipe) if hasattr(run, "recipe") else True
    for f in ["backup/config.yaml", "backup/overrides.yaml", "backup/git.txt", "backup/pip_freeze.txt", "output.log"]:
        assert (d / f).is_file(), f
    assert "torch==2.13.0" in (d / "backup/pip_freeze.txt").read_text()
    assert (d / "backup/git.txt").read_text().startswith("commit: ")
    final = d / "ckpt" / sid / "final"
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))
    assert list((d / "tensorboard" / sid).glob("events.out.tfevents.*"))
    assert (d / "result" / f"{sid}.json").is_file() and (d / "result" / "summary.json").is_file()
    log = (d / "output.log").read_text()
    assert re.search(rf"\[{sid}\] done: \d+ steps in \d+ s \|.* loss [-\d.e]+ ", log)  # the summary line
    assert f"[reinforce_cot.metrics][INFO] - [{sid}] step 4/4 {{" in log  # every logged dict, as JSON
    _assert_quiet_console(run.stdout + run.stderr)
    return final


def _assert_quiet_console(console: str):
    """Progress lines only: no raw metric dicts, no per-save/per-load bars, no special-token warning."""
    assert "{'loss'" not in console and '"loss":' not in console  # the dicts go to output.log only
    assert "[reinforce_cot.callbacks][INFO]" in console  # the progress lines (no terminal here: lines, no bar)
    for noise in ("Writing model shards", "Loading weights", "new PAD/BOS/EOS tokens", "\r"):
        assert noise not in console, noise


def test_sft_smoke(train):
    run = train("recipe=single", "algo=sft", "reward=none", "debug=smoke")
    assert run.returncode == 0, run
    final = _assert_run_dir(run, "01_sft")
    from omegaconf import OmegaConf

    start = tiny.build(OmegaConf.load(run.dir / "backup/config.yaml").model)
    assert len(_changed(start, final)) > 10  # every trainable tensor moved, vision tower included
    res = run.result("01_sft.json")
    assert res["global_step"] == 4
    assert [h["loss"] for h in res["log_history"] if "loss" in h]  # per-step losses were logged


@pytest.mark.parametrize("algo", ["grpo", "gspo"])
def test_rl_smoke_from_sft(train, sft_checkpoint, algo):
    run = train(
        "recipe=single",
        f"algo={algo}",
        "debug=smoke",
        f"model.init_from={sft_checkpoint}",
        "algo.args.max_steps=4",
        "eval.every_steps=2",
    )
    assert run.returncode == 0, run
    final = _assert_run_dir(run, f"01_{algo}")
    assert _changed(sft_checkpoint, final)
    history = run.result(f"01_{algo}.json")["log_history"]
    logged = {k for h in history for k in h}
    assert {"rewards/accuracy/mean", "rewards/format/mean"} <= logged  # each component on its own
    # evaluation during RL (tests/test_callbacks.py checks its values): at step 0, 2 and 4, in TensorBoard too
    assert [h["step"] for h in history if "eval_pass@2" in h] == [0, 2, 4]
    assert [s for s, _ in runs.scalars(run.dir, "eval/pass@2")[f"01_{algo}"]] == [0, 2, 4]
    trl_args = json.loads((final / "training_args.json").read_text())  # what TRL really ran with
    assert trl_args["importance_sampling_level"] == ("sequence" if algo == "gspo" else "token")


def test_text_model_on_text_data(train):
    run = train("recipe=single", "algo=sft", "reward=none", "model=tiny_lm", "data=arithmetic", "debug=smoke")
    assert run.returncode == 0, run
    _assert_run_dir(run, "01_sft")
    assert "Qwen2ForCausalLM" in (run.dir / "output.log").read_text()


def test_wandb_offline_logs_into_the_run_dir(train):
    run = train(
        "recipe=single", "algo=sft", "reward=none", "debug=smoke", "logger=wandb", env={"WANDB_MODE": "offline"}
    )
    assert run.returncode == 0, run
    offline = list((run.dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0
    # its id is the stage's own, so a requeued or resumed stage continues this W&B run
    assert offline[0].name == f"run-{training.wandb_run_id(run.dir, '01_sft')}.wandb"
    assert list((run.dir / "tensorboard" / "01_sft").glob("events.out.tfevents.*"))  # both loggers


def test_multirun_gives_each_job_its_own_run_dir(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "seed=0,1", "recipe=single", "algo=sft", "reward=none"]
    cmd += ["debug=smoke", "eval.k=0", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, seed in (("0", 0), ("1", 1)):
        d = tmp_path / "sweep" / job
        assert (d / "ckpt/01_sft/final/model.safetensors").is_file() and (d / "output.log").is_file()
        assert f"seed: {seed}" in (d / "backup/config.yaml").read_text()
        assert (d / "result/summary.json").is_file()


def test_runs_started_in_the_same_second_get_their_own_dirs(tmp_path):
    from reinforce_cot.errors import ConfigError
    from reinforce_cot.rundir import resolve_run_dir

    fresh = str(tmp_path / "outputs" / "20260101_120000_quickstart")
    first, second = resolve_run_dir(None, fresh), resolve_run_dir(None, fresh)
    assert (first, second) == (fresh, fresh + "_2")
    with pytest.raises(ConfigError):  # a resume of a folder that is not (yet) a run dir (cli: exit code 2)
        resolve_run_dir(first, "ignored")
    (Path(first) / "backup").mkdir()
    (Path(first) / "backup" / "config.yaml").write_text("seed: 0\n")
    assert resolve_run_dir(first, "ignored") == first  # resume reuses the folder
