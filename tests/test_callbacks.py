"""The console during a stage (one bar on a terminal, a line every ~5 % elsewhere, every metric in output.log,
rank 0 only) and evaluation during training (eval/* scalars equal to a direct evaluation of the same weights).

The console tests drive `StageProgress` with transformers' own TrainerState, as the Trainer does; the
evaluation test trains the tiny text model in process for a few real GRPO steps (GRPO samples from the global
RNG, so it also shows that evaluating leaves training's random numbers alone)."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from reinforce_cot import callbacks, config, data, evaluation, generation, models, runs, training
from tests.helpers import compose_cfg

# one GRPO stage of the tiny text model, at debug=smoke sizes
GRPO_LM = ("recipe=single", "algo=grpo", "model=tiny_lm", "data=arithmetic", "debug=smoke")
RL_KEYS = {"reward": "reward", "acc": "rewards/accuracy/mean", "len": "completions/mean_length", "loss": "loss"}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _drive(progress, steps=100, logging_steps=5, rank0=True, disable_tqdm=False):
    """What the Trainer calls, in its order: begin, then per step step_end and (every logging_steps) log."""
    args, control = SimpleNamespace(disable_tqdm=disable_tqdm), TrainerControl()
    state = TrainerState(max_steps=steps, is_world_process_zero=rank0)
    progress.on_train_begin(args, state, control)
    for step in range(1, steps + 1):
        state.global_step = step
        progress.on_step_end(args, state, control)
        if step % logging_steps == 0:
            logs = {"loss": 1 / step, "reward": step / 100, "completions/mean_length": 30.0, "grad_norm": 0.5}
            state.log_history.append({**logs, "step": step})
            progress.on_log(args, state, control, logs=logs)
    progress.on_train_end(args, state, control)
    return state


def test_without_a_terminal_a_line_every_5_percent_and_every_metric_to_the_metrics_log(caplog):
    stream = io.StringIO()  # a Slurm log, a pipe, pytest's capture
    with caplog.at_level(logging.INFO):
        _drive(callbacks.StageProgress("02_rl", RL_KEYS, stream=stream))
    lines = [r.getMessage() for r in caplog.records if r.name == "reinforce_cot.callbacks"]
    assert [int(re.search(r"step (\d+)/100", m).group(1)) for m in lines] == list(range(5, 100, 5))
    assert lines[1].startswith("[02_rl] step 10/100 (10%), ") and "ETA " in lines[1]
    assert lines[1].endswith("| reward 0.1 | len 30 | loss 0.1")  # in algo.progress order; acc never logged
    assert stream.getvalue() == ""  # no bar, so no carriage return anywhere
    metrics = [r.getMessage() for r in caplog.records if r.name == "reinforce_cot.metrics"]
    assert len(metrics) == 20 and metrics[0].startswith("[02_rl] step 5/100 {")
    assert json.loads(metrics[0].split(" ", 3)[3]) == {
        "loss": 0.2,
        "reward": 0.05,
        "completions/mean_length": 30.0,
        "grad_norm": 0.5,
    }


def test_on_a_terminal_one_bar_with_the_numbers_and_no_lines(caplog):
    stream = Terminal()
    with caplog.at_level(logging.INFO):
        _drive(callbacks.StageProgress("02_rl", RL_KEYS, stream=stream))
    bar = stream.getvalue()
    assert "[02_rl]" in bar and "100/100" in bar and "reward 1 | len 30 | loss 0.01" in bar
    assert not [r for r in caplog.records if r.name == "reinforce_cot.callbacks"]
    assert len([r for r in caplog.records if r.name == "reinforce_cot.metrics"]) == 20  # the file gets all


def test_disable_tqdm_gives_lines_on_a_terminal_and_other_ranks_stay_silent(caplog):
    stream = Terminal()
    with caplog.at_level(logging.INFO):
        _drive(callbacks.StageProgress("01_sft", {"loss": "loss"}, stream=stream), disable_tqdm=True)
    assert stream.getvalue() == "" and len([r for r in caplog.records if r.name == "reinforce_cot.callbacks"]) == 19
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _drive(callbacks.StageProgress("01_sft", {"loss": "loss"}, stream=Terminal()), rank0=False)
    assert not caplog.records


def test_summary_takes_the_newest_value_of_each_number():
    state = TrainerState(global_step=300)
    state.log_history = [
        {"loss": 0.5, "reward": 0.2, "step": 5},
        {"eval_greedy_accuracy": 0.7125, "step": 300},
        {"loss": 0.0123, "step": 300},
        {"train_runtime": 280.0, "train_loss": 0.1, "step": 300},
    ]
    keys = {"reward": "reward", "loss": "loss", "len": "completions/mean_length", "eval": "eval_greedy_accuracy"}
    assert callbacks.summary(state, keys, 281.4) == "300 steps in 281 s | reward 0.2 | loss 0.0123 | eval 0.713"


@pytest.mark.parametrize("bad", ["eval.every_steps=0", "eval.every_steps=2 eval.during_train_prompts=0"])
def test_bad_eval_during_training_settings_are_config_errors(bad):
    from reinforce_cot.errors import ConfigError

    with pytest.raises(ConfigError, match=bad.split()[-1].split("=")[0].replace(".", r"\.")):
        config.validate(compose_cfg(*GRPO_LM, *bad.split()))


# ------------------------------------------------------------------------------ evaluation during training
def _train(cfg, run_dir: Path, monkeypatch) -> dict:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "")  # train_stage sets it: restored after the test
    return training.train_stage(cfg, run_dir, "01_grpo", data.load_splits(cfg.data))


@pytest.mark.slow  # two 4-step GRPO stages in process, 3 evaluations: ~10 s
def test_eval_during_training_logs_what_a_direct_evaluation_of_the_same_weights_gives(
    tmp_path, monkeypatch, sft_text_checkpoint
):
    # From an SFT checkpoint (some right answers, so GRPO has a signal) at a high learning rate, so that the
    # outputs change between evaluations and a stale model would be caught; 4 steps, 6 prompts (k=2).
    over = [f"model.init_from={sft_text_checkpoint}", "algo.args.learning_rate=0.02", "eval.during_train_prompts=6"]
    cfg = compose_cfg(*GRPO_LM, "eval.every_steps=2", *over)
    seen = {}  # the weights each evaluation saw: the real evaluate_live runs, this only records
    live = callbacks.evaluate_live

    def recording(trainer, rows, ecfg):
        seen[trainer.state.global_step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        return live(trainer, rows, ecfg)

    monkeypatch.setattr(callbacks, "evaluate_live", recording)
    res = _train(cfg, tmp_path / "on", monkeypatch)
    logged = {h["step"]: h for h in res["log_history"] if "eval_greedy_accuracy" in h}
    assert sorted(logged) == sorted(seen) == [0, 2, 4]  # before training, then every 2 steps
    assert [h["step"] for h in res["log_history"] if "loss" in h] == [1, 2, 3, 4]  # the trainer's own logs too

    path = models.resolve_path(cfg.model)
    processing_class = models.load_processing_class(path, cfg.model)
    model = models.load_model(path, cfg.model)
    test = data.load_splits(cfg.data)["test"]
    rows = [test[i] for i in range(6)]
    ecfg = OmegaConf.merge(cfg, {"eval": {"max_prompts": 6, "answer_only_template": None, "consistency": False}})
    direct = {}
    for step, weights in seen.items():
        model.load_state_dict(weights)
        backend = generation.HFBackend(
            model=model,
            processing_class=processing_class,
            data_cfg=cfg.data,
            batch_size=cfg.generation.batch_size,
            max_new_tokens=cfg.generation.max_new_tokens,
        )
        direct[step] = evaluation.evaluate_backend(backend, rows, ecfg)
    names = "greedy_accuracy sampled_accuracy format_rate mean_completion_tokens pass@1 pass@2 maj@2".split()
    for step in seen:
        assert {n: logged[step][f"eval_{n}"] for n in names} == {n: direct[step][n] for n in names}, step
    assert any(direct[0][n] != direct[4][n] for n in names)  # the model moved: the test can see a stale one

    tb = runs.scalars(tmp_path / "on", "eval/greedy_accuracy")  # TensorBoard, at the trainer's global step
    assert tb == {"01_grpo": [(s, pytest.approx(logged[s]["eval_greedy_accuracy"])) for s in (0, 2, 4)]}

    # Training itself is the same with evaluation on or off: the RNG and the train mode are restored.
    monkeypatch.undo()
    _train(compose_cfg(*GRPO_LM, *over), tmp_path / "off", monkeypatch)
    on, off = (load_file(tmp_path / d / "ckpt/01_grpo/final/model.safetensors") for d in ("on", "off"))
    assert all(torch.equal(on[k], off[k]) for k in on)
