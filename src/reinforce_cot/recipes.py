"""Recipes: ordered stages in one run dir, each composed from the base config plus its own overrides.

    recipe = recipes.prepare(cfg, run_dir, overrides)   # compose (or reload), validate, tiny model, data checks
    results = recipes.run(recipe)                        # every stage in order, resumable; result/<stage>.json

reinforce_cot.main calls `prepare` before it either runs the stages here or launches N processes under
torchrun (each of which prepares and runs again), so bad input fails once, before any process starts and
before anything is written to the run dir. A recipe file (conf/recipe/) lists stages:

    stages:
      - {name: sft, kind: train, overrides: [algo=sft, reward=none]}
      - {name: rl, kind: train, init_from: sft, algo_kind: rl}
      - {name: evaluate, kind: evaluate}

Each stage's config is composed from conf/train.yaml with your group choices (except groups the stage
chooses itself: the SFT stage keeps algo=sft), then the stage's overrides, then your other overrides in
every stage whose config has that key (so they win there), then your `stages.<name>.<override>` for that
stage alone; an override that reaches no stage is an error (the rule: reinforce_cot.overrides).
`init_from: <stage>` starts from that stage's merged/ or final/ checkpoint. All stage configs are
composed and validated, and the data loaded, before any weights load; they are saved to backup/stages/
so that `resume=<run dir>` replays exactly them.

Stage kinds are conf/stage/<kind>.yaml, composed into each stage's config as `stage` (the registry: its
`run` and `validate` targets, whether every process runs it, whether it makes a model). `run` returns the
stage's summary and this module alone writes it, on rank 0, to result/<stage id>.json: the stage is done,
and a resume skips it. The kinds: train (reinforce_cot.training), curate (reinforce_cot.curation),
rejection_sample (reinforce_cot.rejection), merge (reinforce_cot.merge), evaluate
(reinforce_cot.evaluation.evaluate_stage: every earlier stage that made a model, on the test split).

A stage trains on data an earlier stage made with `data_from: <stage name>[/<config>]`: it is composed
with data=hf on the hub-layout folder run_dir/data/<that stage id>/ (reinforce_cot.data.write_dataset),
config <config> (default: `default` after a curate stage; else dpo for preference algos, sft otherwise),
keeping the source stage's prompt template, modality and reasoning settings. Such data is loaded when
the stage starts, since it does not exist before the run:

      - {name: rs, kind: rejection_sample, init_from: sft}
      - {name: dpo, kind: train, init_from: sft, data_from: rs, overrides: [algo=dpo]}
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from reinforce_cot import config as config_lib
from reinforce_cot import data as data_lib
from reinforce_cot import hardware, preference, rundir, sharded
from reinforce_cot import overrides as overrides_lib
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)
KINDS = "stage"  # the config group of stage kinds: conf/stage/<kind>.yaml


@dataclass
class Recipe:
    """A recipe ready to run: every stage's config, validated, and the data it was checked against."""

    cfg: DictConfig
    run_dir: Path
    overrides: list[str]
    stages: dict[str, DictConfig]  # by stage id (01_sft, ...), in run order
    resuming: bool
    splits: dict = field(default_factory=dict, repr=False)  # loaded data, one entry per distinct data config


def prepare(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Recipe:
    """Compose every stage (or, resuming, reload them from backup/stages/), validate each, build the tiny
    model once, and load and check each stage's data; writes nothing. A run dir that already holds
    backup/config.yaml is resumed: `resume=<dir>`, or a Slurm job requeued into its own folder."""
    resuming = bool(cfg.resume) or rundir.is_run_dir(run_dir)
    if resuming:
        rundir.check_resumable(run_dir)
        _check_resume_overrides(run_dir, overrides)
        stages = rundir.stage_configs(run_dir)
        log.info("resuming %s: stages %s", run_dir, list(stages))
    else:
        stages = compose_stages(cfg, overrides, run_dir)
    # a parent that launches N processes only waits: no CUDA context (~0.5 GB of GPU 0) for the whole run
    with hardware.no_cuda_context() if hardware.needs_launch(cfg) else contextlib.nullcontext():
        for scfg in stages.values():
            validate_stage(scfg)
    for scfg in stages.values():
        if not scfg.model.get("path") and scfg.model.get("tiny"):
            from reinforce_cot import tiny

            tiny.build(scfg.model)  # once, here: not raced by N processes
    recipe = Recipe(cfg, Path(run_dir), list(overrides), stages, resuming)
    for scfg in stages.values():  # every stage's config was checked first: a bad one fails before any data loads
        if not scfg.stage.get("data_from"):  # data_from: made by an earlier stage, loaded when it starts
            _load_checked(scfg, recipe.splits)
    return recipe


def validate_stage(scfg: DictConfig) -> None:
    """The checks every stage gets (reinforce_cot.config), then its kind's own (conf/stage/<kind>.yaml)."""
    config_lib.validate(scfg)
    if scfg.stage.get("validate"):
        instantiate(scfg.stage.validate)(scfg)


def run(recipe: Recipe) -> dict:
    """Run (or resume) every stage of a prepared recipe; returns each stage's result."""
    from reinforce_cot import preemption

    run_dir, stages = recipe.run_dir, recipe.stages
    hardware.barrier()  # every rank has decided `resuming` before rank 0 writes backup/
    if hardware.is_main():  # other ranks write nothing to the run dir
        if recipe.resuming:
            rundir.note_resume(run_dir, recipe.overrides)
        else:
            rundir.write_provenance(run_dir, recipe.cfg, recipe.overrides, stages)

    results: dict[str, dict] = {}
    for sid, scfg in stages.items():
        done = rundir.stage_result(run_dir, sid)
        if done is not None:
            log.info("[%s] already done (%s), skipping", sid, rundir.result(run_dir, sid))
            results[sid] = done
            continue
        kind = scfg.stage  # conf/stage/<kind>.yaml, with this stage's id and name
        log.info("[%s] start: %s%s", sid, kind.kind, "" if kind.all_ranks else " (on rank 0)")
        splits = _load_checked(scfg, recipe.splits)
        stage_fn = instantiate(kind.run)
        with hardware.stage_scope(sid):  # nothing the stage made outlives it: GPU memory, env, accelerate state
            if kind.all_ranks:
                results[sid] = stage_fn(scfg, run_dir, sid, splits, results)
            elif hardware.is_main():
                with hardware.local_loading(), sharded.leading():  # no ZeRO-3 partitioning; the others generate
                    results[sid] = stage_fn(scfg, run_dir, sid, splits, results)
            else:  # evaluate, curate, ...: rank 0 runs the stage, this rank generates its share of the prompts
                with hardware.local_loading():
                    sharded.follow()  # each `load` message names its loader
                results[sid] = {"stage": sid, "ran_on_rank": 0}
        if hardware.is_main():
            rundir.write_json(rundir.result(run_dir, sid), results[sid])  # the stage is done
        preemption.stage_done()  # in a Slurm job: a signal after a train stage's last step is acted on now
        hardware.barrier()  # later stages read what this one wrote (merged/, result/)
    return results


def _check_resume_overrides(run_dir: Path, overrides: list[str]) -> None:
    """A resume replays the stage configs in backup/stages/: an override the run was not started with would
    be ignored, so it is refused (a requeued Slurm job repeats its own overrides, which pass)."""
    started = set(rundir.overrides(run_dir))
    new = [o for o in overrides if o not in started and overrides_lib.keys([o])[0] != "resume"]
    new = [o for o in new if not o.startswith(("hydra.", "hydra/"))]
    if new:
        raise ConfigError(
            f"resume={run_dir} replays the run's own config, so {' '.join(new)} would be ignored; drop it, or start "
            f"a new run from this one's weights (model.init_from={run_dir})"
        )


# ----------------------------------------------------------------------------- composing the stages
def compose_stages(cfg: DictConfig, overrides: list[str], run_dir: Path) -> dict[str, DictConfig]:
    """Compose, check and return every stage's config, keyed by stage id (01_sft, ...); which of your
    overrides each stage gets is reinforce_cot.overrides' rule, its kind is conf/stage/<kind>.yaml."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    stages = cfg.recipe.stages
    ids = [rundir.stage_id(i, s.name) for i, s in enumerate(stages)]
    by_name = {s.name: sid for s, sid in zip(stages, ids)}
    loader = GlobalHydra.instance().config_loader()
    kinds = loader.get_group_options(KINDS)
    groups = set(loader.list_groups("")) - {"hydra"}
    plan = overrides_lib.Plan(overrides, groups, [str(s.name) for s in stages], cfg.recipe.name)
    composed: dict[tuple, DictConfig] = {}  # stages with the same list share one composition

    def compose_once(lines: list[str]) -> DictConfig:
        if tuple(lines) not in composed:
            composed[tuple(lines)] = compose(config_name="train", overrides=lines)
        return composed[tuple(lines)].copy()

    out: dict[str, DictConfig] = {}
    for stage, sid in zip(stages, ids):
        if stage.kind not in kinds:
            raise ConfigError(f"recipe stage {sid}: unknown kind '{stage.kind}'; use one of {kinds} (conf/stage/)")
        own = [f"+{KINDS}={stage.kind}", *(stage.get("overrides") or [])]
        if stage.get("data_from"):  # data an earlier stage writes: data=hf, its folder filled in below
            own.append("data=hf")
        scfg = compose_once(plan.for_stage(str(stage.name), own, compose_once))
        with open_dict(scfg):
            scfg.pop(overrides_lib.TARGET)  # {} here: a stage's targeted overrides are in its own list
            scfg.stage.id, scfg.stage.name = sid, stage.name
            earlier = ids[: ids.index(sid)]
            if OmegaConf.is_missing(scfg.stage, "targets"):  # a kind that uses earlier models (evaluate, merge)
                scfg.stage.targets = [i for i in earlier if out[i].stage.makes_model]
            if stage.get("init_from"):
                if stage.init_from not in by_name or by_name[stage.init_from] not in earlier:
                    raise ConfigError(
                        f"recipe.stages[{stage.name}].init_from={stage.init_from}: not an earlier stage; "
                        f"use one of {[rundir.stage_name(i) for i in earlier]}"
                    )
                scfg.model.init_from = str(rundir.ckpt(run_dir, by_name[stage.init_from]))
                scfg.stage.init_from = stage.init_from
            if stage.get("data_from"):
                _use_data_from(scfg, stage, by_name, earlier, run_dir, out)
        kinds_of_algo = stage.get("algo_kind") or []  # one kind or a list
        kinds_of_algo = [kinds_of_algo] if isinstance(kinds_of_algo, str) else list(kinds_of_algo)
        if kinds_of_algo and scfg.algo.kind not in kinds_of_algo:
            raise ConfigError(
                f"recipe={cfg.recipe.name}: stage '{stage.name}' needs an algo of kind {' or '.join(kinds_of_algo)}, "
                f"got algo={scfg.algo.name} ({scfg.algo.kind}); pick such an algo or use recipe=single"
            )
        out[sid] = scfg
    plan.check_reached()
    return out


DATA_FROM_KEYS = ("modality", "prompt_template", "system_prompt", "max_completion_length", "reasoning")


def _use_data_from(scfg, stage, by_name: dict, earlier: list, run_dir: Path, composed: dict) -> None:
    """Point a stage's data=hf at run_dir/data/<source stage>/ (see the module docstring)."""
    name, _, which = str(stage.data_from).partition("/")
    if name not in by_name or by_name[name] not in earlier:
        raise ConfigError(
            f"recipe.stages[{stage.name}].data_from={stage.data_from}: not an earlier stage; "
            f"use one of {[rundir.stage_name(i) for i in earlier]}"
        )
    src = by_name[name]
    if not which:  # a curate stage writes one config; a rejection_sample stage sft and dpo
        which = (
            "default" if composed[src].stage.kind == "curate" else ("dpo" if scfg.algo.kind == "preference" else "sft")
        )
    for key in DATA_FROM_KEYS:  # the prompts the source stage sampled with, and how its chains read
        if key in composed[src].data:
            scfg.data[key] = composed[src].data[key]
    scfg.data.path = str(rundir.data(run_dir, src))
    scfg.data.name = which
    scfg.stage.data_from = f"{src}/{which}"


# ----------------------------------------------------------------------------- each stage's data
def _load_checked(scfg, splits: dict) -> dict:
    """A stage's splits, loaded once per distinct data config, with the data-dependent checks (pairs for
    preference algos, reward and sampler columns) run before any weights load."""
    from reinforce_cot import rewards, sampling

    key = "".join(OmegaConf.to_yaml(scfg.data[s], resolve=True) for s in ("train", "test"))  # what gets loaded
    if key not in splits:
        splits[key] = data_lib.load_splits(scfg.data)
    loaded = data_lib.settle_modality(scfg, splits[key])
    train = loaded["train"]
    if scfg.algo.kind == "preference":
        preference.check_pairs(train, data_lib.title(scfg.data), scfg.algo.name)
    rewards.check(scfg, train)
    sampling.check(scfg, train)
    return data_lib.fit_images(loaded, scfg.model)


def stage_data(scfg) -> dict:
    """A stage's checked splits, as its trainer, evaluator, curation or rejection sampling reads them."""
    return _load_checked(scfg, {})
