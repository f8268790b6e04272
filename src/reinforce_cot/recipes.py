"""Recipes: ordered stages in one run dir, each composed from the base config plus its own overrides.

A recipe file (conf/recipe/) lists stages:

    stages:
      - {name: sft, kind: train, overrides: [algo=sft, reward=none]}
      - {name: rl, kind: train, init_from: sft, algo_kind: rl}
      - {name: evaluate, kind: evaluate}

Each stage's config is composed from conf/train.yaml with your group choices (except groups the stage
chooses itself: the SFT stage keeps algo=sft), then the stage's overrides, then your other overrides in
every stage whose config has that key (so they win there), then your `stages.<name>.<override>` for that
stage alone; an override that reaches no stage is an error (the rule: reinforce_cot.overrides).
`init_from: <stage>` starts from that stage's merged/ or final/ checkpoint. All stage configs are composed and validated, and the data loaded, before any
weights load; they are saved to backup/stages/ so that `resume=<run dir>` replays exactly them.

Stage kinds: train (any algo), curate (pass rates, difficulty buckets and the easy-to-hack filter:
reinforce_cot.curation), rejection_sample (k chains per prompt from the stage's model, verified,
written as SFT/DPO datasets: reinforce_cot.rejection), merge (LoRA merge or weight averaging of earlier
stages; reinforce_cot.merge), evaluate (every earlier train or merge stage's model on the test split:
metrics JSON, plots, samples.html, a comparison table and plot).

A stage trains on data an earlier stage made with `data_from: <stage name>[/<config>]`: it is composed
with data=hf on the hub-layout folder run_dir/data/<that stage id>/ (reinforce_cot.data.write_dataset),
config <config> (default: `default` after a curate stage; else dpo for preference algos, sft otherwise),
keeping the source stage's prompt template, modality and reasoning settings. Such data is loaded when
the stage starts, since it does not exist before the run:

      - {name: rs, kind: rejection_sample, init_from: sft}
      - {name: dpo, kind: train, init_from: sft, data_from: rs, overrides: [algo=dpo]}
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from reinforce_cot import config as config_lib
from reinforce_cot import data as data_lib
from reinforce_cot import hardware, merge, parts, preference, rundir, sharded  # noqa: F401  (parts registers rc.mul)
from reinforce_cot import overrides as overrides_lib
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)


def compose_stages(cfg: DictConfig, overrides: list[str], run_dir: Path) -> dict[str, DictConfig]:
    """Compose, check and return every stage's config, keyed by stage id (01_sft, ...); which of your
    overrides each stage gets is reinforce_cot.overrides' rule."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    stages = cfg.recipe.stages
    ids = [rundir.stage_id(i, s.name) for i, s in enumerate(stages)]
    by_name = {s.name: sid for s, sid in zip(stages, ids)}
    groups = set(GlobalHydra.instance().config_loader().list_groups("")) - {"hydra"}
    plan = overrides_lib.Plan(overrides, groups, [str(s.name) for s in stages], cfg.recipe.name)
    composed: dict[tuple, DictConfig] = {}  # stages with the same list share one composition

    def compose_once(lines: list[str]) -> DictConfig:
        if tuple(lines) not in composed:
            composed[tuple(lines)] = compose(config_name="train", overrides=lines)
        return composed[tuple(lines)].copy()

    out: dict[str, DictConfig] = {}
    for stage, sid in zip(stages, ids):
        own = list(stage.get("overrides") or [])
        if stage.get("data_from"):  # data an earlier stage writes: data=hf, its folder filled in below
            own.append("data=hf")
        scfg = compose_once(plan.for_stage(str(stage.name), own, compose_once))
        with open_dict(scfg):
            scfg.pop(overrides_lib.TARGET)  # {} here: a stage's targeted overrides are in its own list
            scfg.stage = {"id": sid, "name": stage.name, "kind": stage.kind}
            if stage.get("init_from"):
                if stage.init_from not in by_name or ids.index(by_name[stage.init_from]) >= ids.index(sid):
                    raise ConfigError(
                        f"recipe.stages[{stage.name}].init_from={stage.init_from}: not an earlier stage; "
                        f"use one of {list(by_name)[: ids.index(sid)]}"
                    )
                scfg.model.init_from = str(run_dir / "ckpt" / by_name[stage.init_from])
                scfg.stage.init_from = stage.init_from
            if stage.get("data_from"):
                _use_data_from(scfg, stage, by_name, ids, sid, run_dir, out)
            if stage.kind == "evaluate":
                scfg.stage.targets = [i for i, s in zip(ids, stages) if s.kind in ("train", "merge") and i < sid]
        kinds = stage.get("algo_kind") or []  # one kind or a list
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if kinds and scfg.algo.kind not in kinds:
            raise ConfigError(
                f"recipe={cfg.recipe.name}: stage '{stage.name}' needs an algo of kind {' or '.join(kinds)}, "
                f"got algo={scfg.algo.name} ({scfg.algo.kind}); pick such an algo or use recipe=single"
            )
        out[sid] = scfg
    plan.check_reached()
    return out


def instantiate_rows(node, split: str = "test", data_name: str = ""):
    """One split config node as a Dataset of the row contract (reinforce_cot.data.load_split)."""
    return data_lib.load_split(node, split, data_name)


def load_splits(data_cfg) -> dict:
    """The train and test splits of a data config as Datasets (reinforce_cot.data: the row contract);
    test rows whose content occurs in train are dropped. Images stay undecoded (see `stage_splits`)."""
    name = data_lib.title(data_cfg)
    train = data_lib.load_split(data_cfg.train, "train", name)
    test = data_lib.load_split(data_cfg.test, "test", name)
    if "layout" in train.column_names and "layout" in test.column_names:
        test = data_lib.disjoint(train, test)
        if not len(test):
            raise ConfigError(f"data={name}: every test row also occurs in train; raise data.test.n or fix the source")
    return {"train": train, "test": test}


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict:
    """Run (or resume) every stage of the recipe; returns each stage's result.

    A run dir that already holds backup/config.yaml is resumed: `resume=<dir>`, or a Slurm job
    requeued into its own folder."""
    resuming = bool(cfg.resume) or (run_dir / "backup" / "config.yaml").is_file()
    if resuming:
        rundir.check_resumable(run_dir)
        _check_resume_overrides(run_dir, overrides)
        stage_cfgs = {p.stem: OmegaConf.load(p) for p in sorted((run_dir / "backup" / "stages").glob("*.yaml"))}
        if hardware.is_main():  # other ranks write nothing to the run dir
            rundir.note_resume(run_dir, overrides)
        log.info("resuming %s: stages %s", run_dir, list(stage_cfgs))
    else:
        stage_cfgs = compose_stages(cfg, overrides, run_dir)
    splits: dict[str, dict] = {}  # one load per distinct data config, shared by stages
    for sid, scfg in stage_cfgs.items():
        if scfg.stage.kind not in stage_kinds():
            raise ConfigError(f"recipe stage {sid}: unknown kind '{scfg.stage.kind}'; use one of {list(stage_kinds())}")
        config_lib.validate(scfg)
        if scfg.stage.kind == "merge":
            merge.validate_stage(scfg, [s.split("_", 1)[1] for s in stage_cfgs if s < sid])
    for scfg in stage_cfgs.values():  # every stage's config was checked first: a bad one fails before any data loads
        if not scfg.stage.get("data_from"):  # data_from: made by an earlier stage, loaded when it starts
            _load_checked(scfg, splits)
    hardware.barrier()  # every rank has decided `resuming` before rank 0 writes backup/
    if not resuming and hardware.is_main():
        rundir.write_provenance(run_dir, cfg, overrides, stage_cfgs)

    results: dict[str, dict] = {}
    for sid, scfg in stage_cfgs.items():
        done = run_dir / "result" / f"{sid}.json"
        if done.exists():
            log.info("[%s] already done (%s), skipping", sid, done)
            results[sid] = OmegaConf.to_container(OmegaConf.load(done))
            continue
        log.info("[%s] start: %s%s", sid, scfg.stage.kind, "" if scfg.stage.kind in ALL_RANKS else " (on rank 0)")
        stage_splits = _load_checked(scfg, splits)
        stage_fn = stage_kinds()[scfg.stage.kind]
        with hardware.stage_scope(sid):  # nothing the stage made outlives it: GPU memory, env, accelerate state
            if scfg.stage.kind in ALL_RANKS:
                results[sid] = stage_fn(scfg, run_dir, sid, stage_splits, results)
            elif hardware.is_main():
                with hardware.local_loading(), sharded.leading():  # no ZeRO-3 partitioning; the others generate
                    results[sid] = stage_fn(scfg, run_dir, sid, stage_splits, results)
            else:  # evaluate, curate, ...: rank 0 runs the stage, this rank generates its share of the prompts
                with hardware.local_loading():
                    sharded.follow()
                results[sid] = {"stage": sid, "ran_on_rank": 0}
        hardware.barrier()  # later stages read what this one wrote (merged/, result/)
    return results


def _check_resume_overrides(run_dir: Path, overrides: list[str]) -> None:
    """A resume replays the stage configs in backup/stages/: an override the run was not started with would
    be ignored, so it is refused (a requeued Slurm job repeats its own overrides, which pass)."""
    from reinforce_cot import runs

    started = set(runs.overrides(run_dir))
    new = [o for o in overrides if o not in started and overrides_lib.keys([o])[0] != "resume"]
    new = [o for o in new if not o.startswith(("hydra.", "hydra/"))]
    if new:
        raise ConfigError(
            f"resume={run_dir} replays the run's own config, so {' '.join(new)} would be ignored; drop it, or start "
            f"a new run from this one's weights (model.init_from={run_dir})"
        )


# Stage kinds every process runs (multi-process training). The others run on rank 0, while the other
# ranks generate their share of its prompts (reinforce_cot.sharded) and otherwise wait.
ALL_RANKS = {"train"}


def _load_checked(scfg, splits: dict) -> dict:
    """A stage's splits, loaded once per distinct data config, with the data-dependent checks (pairs for
    preference algos, reward and sampler columns) run before any weights load."""
    from reinforce_cot import rewards, sampling

    key = "".join(OmegaConf.to_yaml(scfg.data[s], resolve=True) for s in ("train", "test"))  # what gets loaded
    if key not in splits:
        splits[key] = load_splits(scfg.data)
    loaded = data_lib.settle_modality(scfg, splits[key])
    train = loaded["train"]
    if scfg.algo.kind == "preference":
        preference.check_pairs(train, data_lib.title(scfg.data), scfg.algo.name)
    rewards.check(scfg, train)
    sampling.check(scfg, train)
    return stage_splits(scfg, loaded)


def stage_data(scfg) -> dict:
    """A stage's checked splits, as its trainer, evaluator, curation or rejection sampling reads them."""
    return _load_checked(scfg, {})


def stage_splits(scfg, loaded: dict) -> dict:
    """What a stage's trainer, evaluator, curation or rejection sampling reads: views whose images are
    decoded when a row is read, at this stage's model.image_max_pixels (reinforce_cot.images.capped)."""
    from reinforce_cot import images

    m = scfg.model
    return {k: images.capped(ds, m.get("image_max_pixels"), m.get("image_factor", 28)) for k, ds in loaded.items()}


def stage_kinds() -> dict:
    """What each recipe stage `kind` runs: fn(cfg, run_dir, stage_id, splits, earlier_results) -> dict."""
    from reinforce_cot import curation, rejection, training

    return {
        "train": training.train_stage,
        "rejection_sample": rejection.rejection_sample_stage,
        "evaluate": evaluate_stage,
        "curate": curation.curate_stage,
        "merge": merge.merge_stage,
    }


DATA_FROM_KEYS = ("modality", "prompt_template", "system_prompt", "max_completion_length", "reasoning")


def _use_data_from(scfg, stage, by_name: dict, ids: list, sid: str, run_dir: Path, composed: dict) -> None:
    """Point a stage's data=hf at run_dir/data/<source stage>/ (see the module docstring)."""
    name, _, which = str(stage.data_from).partition("/")
    if name not in by_name or ids.index(by_name[name]) >= ids.index(sid):
        raise ConfigError(
            f"recipe.stages[{stage.name}].data_from={stage.data_from}: not an earlier stage; "
            f"use one of {list(by_name)[: ids.index(sid)]}"
        )
    src = by_name[name]
    if not which:  # a curate stage writes one config; a rejection_sample stage sft and dpo
        which = (
            "default" if composed[src].stage.kind == "curate" else ("dpo" if scfg.algo.kind == "preference" else "sft")
        )
    for key in DATA_FROM_KEYS:  # the prompts the source stage sampled with, and how its chains read
        if key in composed[src].data:
            scfg.data[key] = composed[src].data[key]
    scfg.data.path = str(run_dir / "data" / src)
    scfg.data.name = which
    scfg.stage.data_from = f"{src}/{which}"


def evaluate_stage(cfg, run_dir: Path, sid: str, splits: dict, results: dict) -> dict:
    """Evaluate each earlier train stage's final model: result/eval_<stage>.json + eval_<stage>/ (plots,
    samples.html), then one table (result/summary.{json,md}, printed) and one plot (result/compare.png)."""
    from reinforce_cot import evaluation, generation, models, report

    out = run_dir / "result"
    rows = []
    for target in cfg.stage.targets:
        t0 = time.time()
        path = str(models.checkpoint_folder(str(run_dir / "ckpt" / target)))
        with generation.load(cfg, path, cache_dir=out / f"eval_{target}") as backend:
            metrics = evaluation.evaluate_backend(backend, splits["test"], cfg, out, label=target)
        train = results.get(target) or {}
        row = {"stage": target} | evaluation.table_row(target, metrics)
        row.pop("model")
        rows.append(row | {"train_s": train.get("wall_seconds"), "eval_s": round(time.time() - t0, 1)})
    table = format_table(rows)
    log.info("results on %d held-out prompts:\n%s", min(len(splits["test"]), cfg.eval.max_prompts), table)
    summary = {"stage": sid, "rows": rows}
    if rows:
        summary["plot"] = report.compare([r | {"model": r["stage"]} for r in rows], out / "compare.png")
    (out / "summary.md").write_text(table + "\n")
    rundir.write_json(out / "summary.json", summary)
    rundir.write_json(out / f"{sid}.json", summary)
    return summary


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no stages evaluated)"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
