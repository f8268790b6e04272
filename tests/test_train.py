"""Each algorithm trains for a few steps through TRL, moves every weight, and leaves a complete run dir:
through the real CLI where the console and output.log are under test, in process elsewhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reinforce_cot import rundir, runs, tiny, training
from tests.helpers import ROOT, Run, assert_every_tensor_moved, run_in_process


def _assert_run_dir(run: Run, sid: str, cli: bool = True) -> Path:
    d = run.dir
    if cli:  # the CLI names it <date>_<time>_<recipe name>; recipe=single's name is the algo's (in process: tmp/run)
        assert re.fullmatch(rf"\d{{8}}_\d{{6}}_{rundir.stage_name(sid)}", d.name), d.name
    for f in ["backup/config.yaml", "backup/overrides.yaml", "backup/git.txt", "backup/pip_freeze.txt"]:
        assert (d / f).is_file(), f
    assert "torch==2.13.0" in (d / "backup/pip_freeze.txt").read_text()
    assert (d / "backup/git.txt").read_text().startswith("commit: ")
    final = d / "ckpt" / sid / "final"
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))
    assert list((d / "tensorboard" / sid).glob("events.out.tfevents.*"))
    assert (d / "result" / f"{sid}.json").is_file() and (d / "result" / "summary.json").is_file()
    if cli:  # Hydra's logging: output.log and the console
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


@pytest.mark.slow  # ~10 s: the CLI, 4 SFT steps and an evaluation
def test_sft_smoke(train):
    run = train("recipe=single", "algo=sft", "reward=none", "debug=smoke")
    assert run.returncode == 0, run
    final = _assert_run_dir(run, "01_sft")
    start = tiny.build(OmegaConf.load(run.dir / "backup/config.yaml").model)
    assert_every_tensor_moved(start, final)  # vision tower included
    res = run.result("01_sft.json")
    assert res["global_step"] == 4
    assert len([h["loss"] for h in res["log_history"] if "loss" in h]) == 4  # logging_steps=1: every step's loss


@pytest.mark.slow  # ~10 s each: 4 RL steps with evaluation at steps 0, 2 and 4, after the sft_checkpoint fixture
@pytest.mark.parametrize("algo", ["grpo", "gspo"])
def test_rl_smoke_from_sft(train, tmp_path, sft_checkpoint, algo):
    overrides = ["recipe=single", f"algo={algo}", "debug=smoke", f"model.init_from={sft_checkpoint}",
                 "algo.args.max_steps=4", "eval.every_steps=2"]  # fmt: skip
    cli = algo == "grpo"  # the CLI's own output is checked once; gspo differs only in its config
    run = train(*overrides) if cli else run_in_process(tmp_path, *overrides)
    assert run.returncode == 0, run
    final = _assert_run_dir(run, f"01_{algo}", cli=cli)
    assert_every_tensor_moved(sft_checkpoint, final)
    history = run.result(f"01_{algo}.json")["log_history"]
    logged = {k for h in history for k in h}
    assert {"rewards/accuracy/mean", "rewards/format/mean"} <= logged  # each component on its own
    # evaluation during RL (tests/test_callbacks.py checks its values): at step 0, 2 and 4, in TensorBoard too
    assert [h["step"] for h in history if "eval_pass@2" in h] == [0, 2, 4]
    assert [s for s, _ in runs.scalars(run.dir, "eval/pass@2")[f"01_{algo}"]] == [0, 2, 4]
    trl_args = json.loads((final / "training_args.json").read_text())  # what TRL really ran with
    assert trl_args["importance_sampling_level"] == ("sequence" if algo == "gspo" else "token")


@pytest.mark.slow  # ~5 s in process: 4 SFT steps of the tiny text model and an evaluation
def test_text_model_on_text_data(tmp_path, caplog):
    caplog.set_level("INFO")
    run = run_in_process(
        tmp_path, "recipe=single", "algo=sft", "reward=none", "model=tiny_lm", "data=arithmetic", "debug=smoke"
    )
    final = _assert_run_dir(run, "01_sft", cli=False)
    assert_every_tensor_moved(tiny.build(OmegaConf.load(run.dir / "backup/config.yaml").model), final)
    assert "loaded Qwen2ForCausalLM" in caplog.text


@pytest.mark.slow  # ~10 s: the CLI with W&B offline
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


@pytest.mark.slow  # ~12 s: a 2-job sweep through the default launcher, each job training 4 steps
def test_multirun_gives_each_job_its_own_run_dir(tmp_path):
    import subprocess
    import sys

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
