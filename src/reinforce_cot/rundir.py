"""The run directory and its provenance.

    outputs/<YYYYmmdd_HHMMSS>_<recipe>/     (multirun: multirun/<date>/<time>/<job>/)
      backup/       config.yaml (resolved), overrides.yaml, stages/NN_name.yaml, git.txt + git_diff.patch,
                    pip_freeze.txt; resume-<time>/ for every resume
      ckpt/NN_name/ checkpoint-<step>/ (resumable), final/ (safetensors + processor), merged/ (peft)
      data/NN_name/ datasets a curate or rejection_sample stage wrote (JSONL + images/, report.json)
      result/       NN_name.json per stage, summary.json + summary.md (the table), plots; FAILED
      tensorboard/NN_name/   event files
      output.log    the run's log (Hydra's file handler)

Stages are numbered in recipe order so folders sort as they ran.

What a run dir says about its run (runs.status reads it; sweep tooling builds on it):
- backup/config.yaml: the run passed validation and started; it marks the dir resumable. It is written
  after every stage config was validated and every dataset checked, so bad input never leaves one.
- result/summary.json: the run finished (its last stage, evaluate, wrote the table).
- result/FAILED: the run failed. UTF-8 text; its first line is the reason in one line (`error: <the
  ConfigError>` for bad input, `<ExceptionType>: <message>` for an exception in a stage, the torchrun
  child's own reason or `torchrun exited with code N`), the second line points at output.log. Written by
  `mark_failed` on every failure path of `reinforce_cot.main` (validation, a stage, a torchrun child; a
  single run or a sweep job), by rank 0 only. A resume moves it to backup/resume-<time>/FAILED; a sweep
  rerun of a job that failed before it started, to backup/rerun-<time>/FAILED (reinforce_cot.sweeps).
- none of these: running, or killed from outside (time limit, scancel, OOM kill): a killed job writes
  nothing, so it is told apart from a failed one and can be resumed (`resume=<dir>`, Slurm requeue).
Exit codes: a run exits 0 when it finished, 2 for bad input (`error: ...`, one line), 1 (or torchrun's
code) for a failure in a stage. A sweep (`-m`) runs every job, then exits 0 when every job finished,
1 when any failed or ended without a result, listing those jobs on stderr one per line:
`  #<job> <overrides>: <reason>  (<run dir>)` (reinforce_cot.sweeps.finish), 2 when its launcher
refused it before any job started.
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
    resolution) get `<name>` and `<name>_2` instead of sharing, and resuming, one folder. A resume of a
    folder that is not a run dir stops here, with one line and exit code 2: Hydra makes the run dir and
    its output.log right after this, and nothing may be written for a typo."""
    if resume:
        path = Path(resume).expanduser().resolve()
        try:
            check_resumable(path)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return str(path)
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


FAILED = Path("result") / "FAILED"


def mark_failed(run_dir: Path, reason: str) -> None:
    """Mark a run dir failed (result/FAILED, the contract in the module docstring) with a one-line reason."""
    line = " ".join(str(reason).split()) or "failed"  # one line, whatever the exception's text
    (run_dir / FAILED).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).write_text(f"{line}\nsee {run_dir / 'output.log'}\n")


def failure(run_dir: Path) -> str | None:
    """Why the run failed (result/FAILED's first line), or None when it has not failed."""
    path = Path(run_dir) / FAILED
    return path.read_text().split("\n", 1)[0] if path.is_file() else None


def check_resumable(run_dir: Path) -> None:
    if not (run_dir / "backup" / "config.yaml").is_file():
        what = "does not exist" if not run_dir.exists() else "is not a run dir (no backup/config.yaml)"
        raise ConfigError(f"resume={run_dir}: {what}; pass a run dir such as outputs/<date>_<name>")


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
    if (run_dir / FAILED).is_file():  # why the attempt this resume continues failed; the run is live again
        (run_dir / FAILED).replace(d / "FAILED")
    (d / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    (d / "git.txt").write_text(_git("-C", str(Path(__file__).resolve().parents[2]), "rev-parse", "HEAD"))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)  # atomic: a killed run never leaves half a result file
