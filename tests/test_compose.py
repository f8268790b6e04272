"""Every config file composes, and the algo files really are TRL's config dataclasses."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from reinforce_cot import recipes
from reinforce_cot.errors import ConfigError
from tests.helpers import CONF, compose_cfg

# Where an option needs a value the user must give (`???`), the value the composition test gives it.
REQUIRED = {
    "data=jsonl": ["data.train.path=x.jsonl", "data.test.path=y.jsonl"],
    # the earlier stages whose models a stage uses: recipes.compose_stages fills them in
    "stage=evaluate": ["stage.targets=[01_sft]"],
    "stage=merge": ["stage.targets=[01_sft]"],
}


def _listing() -> list[tuple[str, str]]:
    """(group, option) for every option of every config group, from conf/'s own listing through Hydra's config
    loader: each folder of conf/ (experiment=dapo_ablation/grpo for a nested one) and what the package registers
    in Hydra's ConfigStore (key_check). Left out: Hydra's own groups where conf/ adds nothing, and conf/algo/base/,
    the fields the algo files share (composed with every algo, never chosen on its own)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()

        def walk(parent: str):
            for name in loader.list_groups(parent):
                group = f"{parent}/{name}" if parent else name
                yield group
                yield from walk(group)

        out = []
        for group in walk(""):
            if group.startswith("hydra/") and not (CONF / group).is_dir() or group == "hydra" or group == "algo/base":
                continue
            top, _, nested = group.partition("/")
            top = group if group.startswith("hydra/") else top
            for option in loader.get_group_options(group):
                if group.startswith("hydra/") and not (CONF / group / f"{option}.yaml").is_file():
                    continue  # Hydra's and its plugins' own options (basic, submitit_slurm, ...)
                out.append((top, f"{nested}/{option}" if nested and top != group else option))
        return out


CHOICES = _listing()
DEFAULTS = set(compose_cfg(return_hydra_config=True).hydra.runtime.choices)  # the groups conf/train.yaml lists


def test_the_listing_has_every_group():
    groups = {g for g, _ in CHOICES}
    folders = {p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"}
    assert groups == folders | {"key_check", "hydra/launcher"}, groups ^ (folders | {"key_check", "hydra/launcher"})
    assert ("experiment", "dapo_ablation/dapo") in CHOICES and ("deepspeed", "zero3_offload") in CHOICES


@pytest.mark.parametrize(("group", "choice"), CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_every_preset_composes(hydra_ctx, group, choice):
    plus = "" if group in DEFAULTS else "+"  # stage: recipes append `+stage=<kind>` to each stage's config
    overrides = [f"{plus}{group}={choice}", *REQUIRED.get(f"{group}={choice}", [])]
    cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.runtime.choices[group] == choice  # the option itself was composed, not a default
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # its interpolations (hydra.*) resolve
    assert launcher["_target_"].startswith(("hydra.", "hydra_plugins."))
    with open_dict(cfg):
        del cfg["hydra"]
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["model"]["kind"] in ("vlm", "lm")
    assert container["algo"]["args"]["_target_"].startswith("trl.")
    assert container["deepspeed"]["name"] in {c for g, c in CHOICES if g == "deepspeed"}


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


def test_your_overrides_win_in_every_stage_that_has_the_key(hydra_ctx, tmp_path):
    user = ["algo=gspo", "algo.args.learning_rate=0.0005", "algo.args.num_train_epochs=5", "seed=3"]
    cfg = compose(config_name="train", overrides=user)
    stages = recipes.compose_stages(cfg, user, tmp_path)
    assert list(stages) == ["01_sft", "02_rl", "03_evaluate"]
    sft, rl = stages["01_sft"], stages["02_rl"]
    assert sft.algo.name == "sft" and rl.algo.name == "gspo"  # the SFT stage keeps its own choice of group
    assert sft.algo.args.num_train_epochs == 5  # beats the stage's own 3
    assert "num_train_epochs" not in rl.algo.args  # gspo's config has no such key: not added there
    assert sft.algo.args.learning_rate == rl.algo.args.learning_rate == 0.0005
    assert sft.seed == rl.seed == 3
    assert rl.model.init_from == str(tmp_path / "ckpt" / "01_sft")
    assert list(stages["03_evaluate"].stage.targets) == ["01_sft", "02_rl"]


def test_a_stage_is_targeted_by_name(hydra_ctx, tmp_path):
    user = ["stages.sft.algo.args.num_train_epochs=5", "stages.rl.algo=gspo", "stages.rl.algo.args.beta=0.04"]
    stages = recipes.compose_stages(compose(config_name="train", overrides=user), user, tmp_path)
    sft, rl, evaluate = stages.values()
    assert (sft.algo.name, sft.algo.args.num_train_epochs) == ("sft", 5)
    assert (rl.algo.name, rl.algo.args.beta) == ("gspo", 0.04)
    assert evaluate.algo.name == "grpo" and "stages" not in rl  # nothing else moved


def _leaves(cfg, prefix=""):
    node = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def test_a_sweep_over_a_key_only_one_stage_has_changes_that_stage(hydra_ctx, tmp_path):
    # python train.py -m recipe=kimi reward.length.fn.warmup_steps=0.2,0.5: the jobs Hydra's sweeper makes,
    # each composed into its stages as main would. The rl stage picks reward=kimi_length itself (the root
    # config has r1, without `length`): the swept key must reach it, and nothing else may differ.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = OverridesParser.create().parse_overrides(["recipe=kimi", "reward.length.fn.warmup_steps=0.2,0.5"])
    jobs = BasicSweeper.split_arguments(sweep, None)[0]
    stages = [recipes.compose_stages(compose(config_name="train", overrides=job), job, tmp_path) for job in jobs]
    assert [s["03_rl"].reward.length.fn.warmup_steps for s in stages] == [0.2, 0.5]
    a, b = ({sid: _leaves(cfg) for sid, cfg in s.items()} for s in stages)
    differ = {(sid, k) for sid in a for k in a[sid].keys() | b[sid].keys() if a[sid].get(k) != b[sid].get(k)}
    assert differ == {("03_rl", "reward.length.fn.warmup_steps")}


def test_recipe_kimi_sampler_alpha_reaches_the_rl_stage(hydra_ctx, tmp_path):
    user = ["recipe=kimi", "sampler.alpha=0.3"]  # the root's sampler (uniform) has no alpha; the rl stage's has
    stages = recipes.compose_stages(compose(config_name="train", overrides=user), user, tmp_path)
    assert (stages["03_rl"].sampler.name, stages["03_rl"].sampler.alpha) == ("curriculum", 0.3)


NO_STAGE = {
    "no stage has it": (
        ["sampler.alpha=0.3"],
        "sampler.alpha=0.3 reaches no stage of recipe=quickstart: none of its stages (sft, rl, evaluate) has "
        "sampler.alpha; fix the key, or pick another sampler that has it (for one stage: stages.<name>.sampler=...)",
    ),
    "typo": (
        ["algo.args.no_such_field=1"],
        "algo.args.no_such_field=1 reaches no stage of recipe=quickstart: none of its stages (sft, rl, evaluate) "
        "has algo.args.no_such_field; fix the key, or pick another algo that has it (for one stage: stages.<name>.algo=...)",
    ),
    "no such stage": (
        ["stages.grpo.seed=1"],
        "stages.grpo.seed=1: recipe=quickstart has no stage 'grpo'; use one of sft, rl, evaluate",
    ),
    "not in that stage": (
        ["stages.rl.sampler.alpah=1"],
        "stages.rl.sampler.alpah=1: stage rl's config has no sampler.alpah; fix the key",
    ),
}


@pytest.mark.parametrize("case", list(NO_STAGE))
def test_an_override_that_reaches_no_stage_stops_the_run(hydra_ctx, tmp_path, case):
    user, message = NO_STAGE[case]
    cfg = compose(config_name="train", overrides=user)
    with pytest.raises(ConfigError) as e:
        recipes.compose_stages(cfg, user, tmp_path)
    assert str(e.value) == message


def test_an_override_a_resume_would_ignore_is_refused(hydra_ctx, tmp_path):
    run_dir = tmp_path / "run"  # a run started with these overrides (what backup/ records)
    (run_dir / "backup").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["recipe=single", "seed=1"]), run_dir / "backup" / "overrides.yaml")
    OmegaConf.save(compose(config_name="train"), run_dir / "backup" / "config.yaml")
    user = [f"resume={run_dir}", "algo.args.max_steps=20"]
    with pytest.raises(ConfigError) as e:
        recipes.prepare(compose(config_name="train", overrides=user), run_dir, user)
    assert str(e.value) == (
        f"resume={run_dir} replays the run's own config, so algo.args.max_steps=20 would be ignored; drop it, or "
        f"start a new run from this one's weights (model.init_from={run_dir})"
    )
    assert not list((run_dir / "backup").glob("resume-*"))  # refused before the resume is recorded
