"""Every config file composes, and the algo files really are TRL's config dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from reinforce_cot import recipes

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "data", "algo", "reward", "hardware", "logger", "recipe", "experiment", "debug"]
CHOICES = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.fixture
def hydra_ctx():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


@pytest.mark.parametrize(("group", "choice"), CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_every_preset_composes(hydra_ctx, group, choice):
    overrides = [f"{group}={choice}"]
    if group == "data" and choice == "jsonl":
        overrides += ["data.train.path=x.jsonl", "data.test.path=y.jsonl"]
    cfg = compose(config_name="train", overrides=overrides)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group not in ("experiment", "debug"):  # global presets: no key of their own
        assert cfg[group] is not None
    assert container["model"]["kind"] in ("vlm", "lm")
    assert container["algo"]["args"]["_target_"].startswith("trl.")


def test_every_experiment_has_its_command_in_the_header():
    for p in sorted((CONF / "experiment").glob("*.yaml")):
        head = p.read_text().splitlines()[:6]
        assert head[0] == "# @package _global_", p
        assert any("python train.py" in line and f"experiment={p.stem}" in line for line in head), p


@pytest.mark.parametrize("algo", ["sft", "grpo", "gspo"])
def test_algo_args_instantiate_trl_configs(hydra_ctx, algo, tmp_path):
    cfg = compose(config_name="train", overrides=[f"algo={algo}", "algo.args.max_steps=7"])
    args = instantiate(cfg.algo.args, output_dir=str(tmp_path))
    assert type(args).__module__.startswith("trl.")
    assert args.max_steps == 7  # a command-line override reaches TRL's dataclass
    assert args.bf16 is False and args.gradient_checkpointing is False  # hardware=cpu
    if algo == "gspo":
        assert (args.importance_sampling_level, args.loss_type, args.beta) == ("sequence", "grpo", 0.0)
        assert (args.epsilon, args.epsilon_high) == (3e-4, 4e-4)
        assert args.steps_per_generation > args.gradient_accumulation_steps
    if algo == "grpo":
        assert args.importance_sampling_level == "token"


def test_reward_composite_is_a_defaults_list(hydra_ctx):
    from reinforce_cot import rewards

    cfg = compose(config_name="train", overrides=["reward=r1"])
    funcs, weights = rewards.build(cfg.reward)
    assert [f.__name__ for f in funcs] == ["accuracy", "format"]
    assert weights == [1.0, 0.5]


def test_quickstart_stages_keep_your_overrides_for_your_algo_only(hydra_ctx, tmp_path):
    user = ["algo=gspo", "algo.args.learning_rate=0.0005", "seed=3"]
    cfg = compose(config_name="train", overrides=user)
    stages = recipes.compose_stages(cfg, user, tmp_path)
    assert list(stages) == ["01_sft", "02_rl", "03_evaluate"]
    sft, rl = stages["01_sft"], stages["02_rl"]
    assert sft.algo.name == "sft" and sft.algo.args.learning_rate == sft.model.lr.sft  # not the RL override
    assert rl.algo.name == "gspo" and rl.algo.args.learning_rate == 0.0005
    assert sft.seed == rl.seed == 3  # overrides outside the replaced group reach every stage
    assert rl.model.init_from == str(tmp_path / "ckpt" / "01_sft")
    assert list(stages["03_evaluate"].stage.targets) == ["01_sft", "02_rl"]
