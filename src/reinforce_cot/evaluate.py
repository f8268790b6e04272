"""`python -m reinforce_cot.evaluate ckpt=<checkpoint folder or run dir> [data=...] [generation=...]`

Evaluates checkpoints outside a recipe with the same config tree as training (conf/evaluate.yaml =
conf/train.yaml + `ckpt`), so every `eval.*`, `data=`, `model=` and `generation=` choice works here too:

    python -m reinforce_cot.evaluate ckpt=outputs/20260101_120000_quickstart       # the run's last stage
    python -m reinforce_cot.evaluate ckpt=outputs/<run>/ckpt/01_sft/final data=shapes_count eval.k=8
    python -m reinforce_cot.evaluate ckpt=[outputs/runA,outputs/runB]              # one table, one plot
    python -m reinforce_cot.evaluate ckpt=<folder> generation=openai generation.base_url=http://127.0.0.1:8000/v1

For a run dir (or a checkpoint inside one) model and data default to that run's (backup/config.yaml)
unless given on the command line, and results go to the run's result/ as eval_<stage>_<data>.json +
eval_<stage>_<data>/ (plots, samples.html, generations). A bare folder's results go to this call's own
folder, outputs/<date>_evaluate/result/. Every call prints one table and writes result/compare.{md,json}
(+ compare.png for several checkpoints) in its own folder. Metric definitions: reinforce_cot.evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from reinforce_cot import cli, data, evaluation, generation, models, report, rundir
from reinforce_cot.errors import ConfigError
from reinforce_cot.overrides import keys

log = logging.getLogger("reinforce_cot")


def _kind_of(path: Path) -> str:
    cfg = path / "config.json"
    if cfg.is_file():
        return "vlm" if "vision_config" in json.loads(cfg.read_text()) else "lm"
    return "vlm"


def plan(cfg: DictConfig, ckpt: str, user_groups: set[str], own_result: Path) -> dict:
    """Resolve one checkpoint to (weights folder, config, output folder, rows); fails before any weights."""
    p = Path(str(ckpt)).expanduser()
    if not p.exists():
        raise ConfigError(f"ckpt={ckpt} does not exist; give a checkpoint folder or a run dir (outputs/<date>_<name>)")
    try:
        path = models.checkpoint_folder(str(p))
    except ConfigError:
        raise ConfigError(
            f"ckpt={ckpt}: no weights (*.safetensors) there nor in its ckpt/*/final; point it at a checkpoint "
            "folder (ckpt/<stage>/final) or a finished run dir"
        ) from None
    run_dir = rundir.run_dir_of(path)
    ecfg = cfg.copy()
    with open_dict(ecfg):
        if run_dir is not None:
            run_cfg = OmegaConf.load(rundir.run_config(run_dir))
            if "model" not in user_groups:
                ecfg.model = run_cfg.model
            if "data" not in user_groups:
                ecfg.data = run_cfg.data
        elif "model" not in user_groups:
            ecfg.model.kind = _kind_of(path)
        ecfg.model.path, ecfg.model.init_from = str(path), None
    evaluation.validate(ecfg)
    stage = path.parent.name if path.name in (rundir.FINAL, rundir.MERGED) else path.name
    if run_dir is not None:
        out, name = rundir.results(run_dir), f"{run_dir.name}/{stage}"
    else:
        out, name = own_result, stage
    rows = data.load_split(ecfg.data.test, "test", data.title(ecfg.data))
    rows = data.fit_images(data.settle_modality(ecfg, {"test": rows}), ecfg.model)["test"]  # at the model's cap
    evaluation.check_rows(rows, ecfg.data)
    return {
        "path": str(path),
        "cfg": ecfg,
        "out": out,
        "label": f"{stage}_{data.safe_name(data.title(ecfg.data))}",
        "name": name,
        "rows": rows,
    }


def run(cfg: DictConfig, out_root: Path, overrides: list[str]) -> list[dict]:
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("ckpt is required; add ckpt=<checkpoint folder or run dir> (or ckpt=[runA,runB])")
    ckpts = list(cfg.ckpt) if OmegaConf.is_list(cfg.ckpt) else [cfg.ckpt]
    if not ckpts:
        raise ConfigError("ckpt=[]: give at least one checkpoint folder or run dir")
    user_groups = {key.split(".")[0] for key in keys(overrides)}
    plans = [plan(cfg, c, user_groups, rundir.results(out_root)) for c in ckpts]  # every check before any weights
    rundir.write_provenance(out_root, cfg, overrides, {})
    rows = []
    for pl in plans:
        log.info("evaluating %s on data=%s (%d test rows)", pl["path"], data.title(pl["cfg"].data), len(pl["rows"]))
        with generation.load(pl["cfg"], pl["path"], cache_dir=pl["out"] / f"eval_{pl['label']}") as backend:
            metrics = evaluation.evaluate_backend(backend, pl["rows"], pl["cfg"], pl["out"], pl["label"])
        log.info("wrote %s", pl["out"] / f"eval_{pl['label']}.json")
        rows.append(evaluation.table_row(pl["name"], metrics))
    table = report.format_table(rows)
    result = rundir.results(out_root)
    result.mkdir(parents=True, exist_ok=True)
    (result / "compare.md").write_text(table + "\n")
    summary: dict = {"rows": rows, "checkpoints": [pl["path"] for pl in plans]}
    if len(rows) > 1:
        summary["plot"] = report.compare(rows, result / "compare.png")
    rundir.write_json(result / "compare.json", summary)
    print(table, flush=True)
    log.info("table: %s", result / "compare.md")
    return rows


@hydra.main(version_base="1.3", config_path=str(cli.CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig):
    hc = HydraConfig.get()
    cli.route_library_logs()
    with cli.exit_on_user_error():
        return run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))


if __name__ == "__main__":
    main()
