"""The run directory and its provenance.

    outputs/<YYYYmmdd_HHMMSS>_<recipe>/     (multirun: multirun/<date>/<time>/<job>/)
      backup/       config.yaml (resolved), overrides.yaml, stages/NN_name.yaml, git.txt + git_diff.patch,
                    pip_freeze.txt; resume-<time>/ for every resume
      ckpt/NN_name/ checkpoint-<step>/ (resumable), final/ (safetensors + processor), merged/ (peft)
      data/NN_name/ datasets a curate or rejection_sample stage wrote (JSONL + images/, report.json)
      result/       NN_name.json per stage, summary.json + summary.md (the table), plots
      tensorboard/NN_name/   event files
      output.log    the run's log (Hydra's file handler)

Stages are numbered in recipe order so folders sort as they ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from reinforce_cot.cluster import command_line
from reinforce_cot.errors import ConfigError


def resolve_run_dir(resume, fresh: str) -> str:
    """Hydra's run dir: the run dir being resumed, else a fresh timestamped one.

    A fresh dir is claimed with an exclusive mkdir: two runs started in the same second (the name's
    resolution) get `<name>` and `<name>_2` instead of sharing, and resuming, one folder."""
    if resume:
        return str(Path(resume).expanduser().resolve())
    Path(fresh).parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = fresh if n == 1 else f"{fresh}_{n}"
        try:
            Path(candidate).mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not claim a run dir next to {fresh}")


# use_cache: Hydra may resolve hydra.run.dir more than once; the claim must happen once per process
OmegaConf.register_new_resolver("rc.run_dir", resolve_run_dir, replace=True, use_cache=True)


def stage_id(index: int, name: str) -> str:
    return f"{index + 1:02d}_{name}"


def check_resumable(run_dir: Path) -> None:
    if not (run_dir / "backup" / "config.yaml").is_file():
        raise ConfigError(
            f"resume={run_dir}: not a run dir (no backup/config.yaml); pass a folder such as outputs/<date>_<name>"
        )


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def write_provenance(run_dir: Path, cfg, overrides: list[str], stage_cfgs: dict) -> None:
    """Resolved config, overrides, each stage's composed config, git commit + dirty diff, packages."""
    backup = run_dir / "backup"
    (backup / "stages").mkdir(parents=True, exist_ok=True)
    (backup / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    for sid, scfg in stage_cfgs.items():
        OmegaConf.save(scfg, backup / "stages" / f"{sid}.yaml", resolve=True)
    # config.yaml marks a run dir as resumable, so it comes after the stage configs a resume reads back: a
    # job preempted in between (Slurm requeue) then starts afresh instead of resuming with stages missing.
    OmegaConf.save(cfg, backup / "config.yaml", resolve=True)
    repo = Path(__file__).resolve().parents[2]
    commit = _git("-C", str(repo), "rev-parse", "HEAD").strip() or "unknown (not a git checkout)"
    status = _git("-C", str(repo), "status", "--porcelain")
    (backup / "git.txt").write_text(f"commit: {commit}\ndirty: {bool(status.strip())}\n{status}")
    (backup / "git_diff.patch").write_text(_git("-C", str(repo), "diff", "HEAD"))
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    (backup / "pip_freeze.txt").write_text(freeze)
    (backup / "command.txt").write_text(command_line())


def note_resume(run_dir: Path, overrides: list[str]) -> None:
    d = run_dir / "backup" / f"resume-{time.strftime('%Y%m%d_%H%M%S')}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    (d / "git.txt").write_text(_git("-C", str(Path(__file__).resolve().parents[2]), "rev-parse", "HEAD"))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)  # atomic: a killed run never leaves half a result file
