"""Recipes: ordered stages in one run dir, each composed from the base config plus its own overrides.

A recipe file (conf/recipe/) lists stages:

    stages:
      - {name: sft, kind: train, overrides: [algo=sft, reward=none]}
      - {name: rl, kind: train, init_from: sft, algo_kind: rl}
      - {name: evaluate, kind: evaluate}

Each stage's config is `compose(train, <your overrides> + <stage overrides>)`. Where a stage selects a
group itself (algo=sft), your overrides of that group's keys (algo.args.*) are left out of that stage:
they were written for the algo you chose. `init_from: <stage>` starts from that stage's merged/ or
final/ checkpoint. All stage configs are composed and validated, and the data loaded, before any
weights load; they are saved to backup/stages/ so that `resume=<run dir>` replays exactly them.

Stage kinds: train (any algo), evaluate (every earlier train or merge stage's model on the test split),
merge (LoRA merge or weight averaging of earlier stages; reinforce_cot.merge).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from reinforce_cot import config as config_lib
from reinforce_cot import data as data_lib
from reinforce_cot import hardware, merge, parts, preference, rundir  # noqa: F401  (parts registers rc.mul)
from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)


def _group_of(override: str) -> str | None:
    key = override.lstrip("+~").split("=", 1)[0]
    return key if "." not in key and "=" in override else None


def compose_stages(cfg: DictConfig, overrides: list[str], run_dir: Path) -> dict[str, DictConfig]:
    """Compose, check and return every stage's config, keyed by stage id (01_sft, ...)."""
    from hydra import compose

    stages = cfg.recipe.stages
    ids = [rundir.stage_id(i, s.name) for i, s in enumerate(stages)]
    by_name = {s.name: sid for s, sid in zip(stages, ids)}
    user = [o for o in overrides if not o.startswith(("hydra.", "hydra/", "resume="))]
    out: dict[str, DictConfig] = {}
    for stage, sid in zip(stages, ids):
        own = list(stage.get("overrides") or [])
        chosen = {g for g in map(_group_of, own) if g}
        keep = [o for o in user if o.lstrip("+~").split("=", 1)[0].split(".")[0] not in chosen]
        scfg = compose(config_name="train", overrides=keep + own) if own else cfg.copy()
        with open_dict(scfg):
            scfg.stage = {"id": sid, "name": stage.name, "kind": stage.kind}
            if stage.get("init_from"):
                if stage.init_from not in by_name or ids.index(by_name[stage.init_from]) >= ids.index(sid):
                    raise ConfigError(
                        f"recipe.stages[{stage.name}].init_from={stage.init_from}: not an earlier stage; "
                        f"use one of {list(by_name)[: ids.index(sid)]}"
                    )
                scfg.model.init_from = str(run_dir / "ckpt" / by_name[stage.init_from])
                scfg.stage.init_from = stage.init_from
            if stage.kind == "evaluate":
                scfg.stage.targets = [i for i, s in zip(ids, stages) if s.kind in ("train", "merge") and i < sid]
        if stage.get("algo_kind") and scfg.algo.kind != stage.algo_kind:
            raise ConfigError(
                f"recipe={cfg.recipe.name}: stage '{stage.name}' needs an algo of kind {stage.algo_kind}, "
                f"got algo={scfg.algo.name}; pick an {stage.algo_kind} algo or use recipe=single"
            )
        dropped = [o for o in user if o not in keep]
        if dropped:
            log.info("[%s] selects %s itself; not applied there: %s", sid, sorted(chosen), dropped)
        out[sid] = scfg
    return out


def load_splits(data_cfg) -> dict[str, list[dict]]:
    """Instantiate the train and test rows of a data config; test rows seen in train are dropped."""
    train = instantiate(data_cfg.train)
    test = instantiate(data_cfg.test)
    if "layout" in (train[0] if train else {}):
        test = data_lib.disjoint(train, test)
    for split, rows in (("train", train), ("test", test)):
        if not rows:
            raise ConfigError(
                f"data={data_cfg.name}: the {split} split is empty; raise data.{split}.n or fix the source"
            )
    return {"train": train, "test": test}


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict:
    """Run (or resume) every stage of the recipe; returns each stage's result.

    A run dir that already holds backup/config.yaml is resumed: `resume=<dir>`, or a Slurm job
    requeued into its own folder."""
    resuming = bool(cfg.resume) or (run_dir / "backup" / "config.yaml").is_file()
    if resuming:
        rundir.check_resumable(run_dir)
        stage_cfgs = {p.stem: OmegaConf.load(p) for p in sorted((run_dir / "backup" / "stages").glob("*.yaml"))}
        if hardware.is_main():
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
        key = OmegaConf.to_yaml(scfg.data)
        if key not in splits:
            splits[key] = load_splits(scfg.data)
        if scfg.algo.kind == "preference":  # DPO on data without pairs fails here, before any weights load
            preference.check_pairs(splits[key]["train"], scfg.data.name, scfg.algo.name)
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
        stage_fn = stage_kinds()[scfg.stage.kind]
        if scfg.stage.kind in ALL_RANKS:
            results[sid] = stage_fn(scfg, run_dir, sid, splits[OmegaConf.to_yaml(scfg.data)], results)
        elif hardware.is_main():
            with hardware.local_loading():  # no ZeRO-3 partitioning of models loaded by rank 0 alone
                results[sid] = stage_fn(scfg, run_dir, sid, splits[OmegaConf.to_yaml(scfg.data)], results)
        else:  # evaluate, merge, ...: rank 0 alone; the others wait below
            results[sid] = {"stage": sid, "ran_on_rank": 0}
        hardware.barrier()  # later stages read what this one wrote (merged/, result/)
    return results


ALL_RANKS = {"train"}  # stage kinds every process runs (multi-process training); the rest run on rank 0 only


def stage_kinds() -> dict:
    """What each recipe stage `kind` runs: fn(cfg, run_dir, stage_id, splits, earlier_results) -> dict."""
    from reinforce_cot import training

    return {
        "train": training.train_stage,
        "evaluate": evaluate_stage,
        "merge": merge.merge_stage,
    }


def evaluate_stage(cfg, run_dir: Path, sid: str, splits: dict, results: dict) -> dict:
    """Evaluate each earlier train stage's final model; write result/summary.{json,md} and print it."""
    from reinforce_cot import evaluation, models

    rows = []
    for target in cfg.stage.targets:
        t0 = time.time()
        path = str(models.checkpoint_folder(str(run_dir / "ckpt" / target)))
        processing_class = models.load_processing_class(path, cfg.model)
        model = models.load_model(path, cfg.model)
        metrics = evaluation.evaluate(model, processing_class, splits["test"], cfg)
        rundir.write_json(run_dir / "result" / f"eval_{target}.json", {"checkpoint": path, **metrics})
        train = results.get(target) or {}
        rows.append(
            {
                "stage": target,
                "greedy_acc": metrics["greedy_accuracy"],
                "sampled_acc": metrics.get("sampled_accuracy"),
                "format_rate": metrics["format_rate"],
                "mean_len": metrics["mean_completion_tokens"],
                "train_s": train.get("wall_seconds"),
                "eval_s": round(time.time() - t0, 1),
            }
        )
    table = format_table(rows)
    log.info("results on %d held-out prompts:\n%s", min(len(splits["test"]), cfg.eval.max_prompts), table)
    summary = {"stage": sid, "rows": rows}
    (run_dir / "result" / "summary.md").write_text(table + "\n")
    rundir.write_json(run_dir / "result" / "summary.json", summary)
    rundir.write_json(run_dir / "result" / f"{sid}.json", summary)
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
