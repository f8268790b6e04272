"""The run directory: every path in it, what it says about its run, and its provenance.

    outputs/<YYYYmmdd_HHMMSS>_<recipe>/     (multirun: multirun/<date>/<time>/<job>/)
      backup/       config.yaml (resolved), overrides.yaml, stages/NN_name.yaml, git.txt + git_diff.patch,
                    pip_freeze.txt, command.txt (how it was started: the command, or a sweep's and its job's);
                    jobs.txt (a line per start of a submitit job: reinforce_cot.cluster), preemptions.txt (a
                    line per signal acted on: reinforce_cot.preemption); resume-<time>/ for every resume,
                    rerun-<time>/ for a sweep rerun of a job that failed before it started, failed-<time>/
                    for an earlier failure a new one would overwrite (a resume refused in validation)
      ckpt/NN_name/ checkpoint-<step>/ (resumable), final/ (safetensors + processor), merged/ (peft, merge stage)
      data/NN_name/ datasets a curate or rejection_sample stage wrote (hub-layout parquet, report.{json,md})
      result/       NN_name.json per finished stage (its summary), eval_<stage>.json + eval_<stage>/ (metrics,
                    plots, samples.html), summary.json + summary.md (the evaluate stage's table), compare.png;
                    FAILED
      tensorboard/NN_name/   event files (tensorboard --logdir outputs)
      output.log    the run's log (Hydra's file handler: conf/train.yaml)

Stages are numbered in recipe order so folders sort as they ran. Every path above is made by a function
here (`ckpt(run_dir, sid)`, `result(run_dir, sid)`, `jobs_log(run_dir)`, ...); no other module
spells one out. reinforce_cot.runs reads many run dirs back for comparisons through the same functions.

What a run dir says about its run (`status`; sweep tooling builds on it):
- backup/config.yaml: the run passed validation and started; it marks the dir resumable (`is_run_dir`).
  It is written after every stage config was validated and every dataset checked, so bad input never
  leaves one.
- result/<stage id>.json: that stage is done (recipes.run writes it, on rank 0, from what the stage
  returned; a resume skips it). The run finished when every stage of backup/stages/ has one.
- result/FAILED: the run failed. UTF-8 text; its first line is the reason in one line (`error: <the
  ConfigError>` for bad input, `<ExceptionType>: <message>` for an exception in a stage, the torchrun
  child's own reason or `torchrun exited with code N`), the second line points at output.log. Written by
  `mark_failed` on every failure path of `reinforce_cot.main` (validation, a stage, a torchrun child; a
  single run or a sweep job), by rank 0 only. A resume moves it to backup/resume-<time>/FAILED; a sweep
  rerun of a job that failed before it started, to backup/rerun-<time>/FAILED (reinforce_cot.sweeps); a
  failure before either (a resume refused in validation), to backup/failed-<time>/FAILED.
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
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from reinforce_cot.errors import ConfigError

FINAL, MERGED = "final", "merged"  # inside ckpt/<stage>/: the model a stage saved, and with peft merged into it
REPO = Path(__file__).resolve().parents[2]  # the checkout whose commit provenance records


# ----------------------------------------------------------------------------- paths
def stage_id(index: int, name: str) -> str:
    """`01_sft`: stages numbered in recipe order, so folders sort as they ran."""
    return f"{index + 1:02d}_{name}"


def stage_name(sid: str) -> str:
    """The recipe's name of a stage: `01_sft` -> `sft`."""
    return sid.split("_", 1)[1]


def backup(run_dir: Path, *names: str) -> Path:
    return Path(run_dir, "backup", *names)


def run_config(run_dir: Path) -> Path:
    """backup/config.yaml: the run's resolved config; it marks a started run (`is_run_dir`)."""
    return backup(run_dir, "config.yaml")


def jobs_log(run_dir: Path) -> Path:
    """backup/jobs.txt: a line per start of a submitit job (reinforce_cot.cluster), the newest last."""
    return backup(run_dir, "jobs.txt")


def preemptions_log(run_dir: Path) -> Path:
    """backup/preemptions.txt: a line per signal acted on (reinforce_cot.preemption)."""
    return backup(run_dir, "preemptions.txt")


def ckpt(run_dir: Path, sid: str) -> Path:
    return Path(run_dir, "ckpt", sid)


def final(run_dir: Path, sid: str) -> Path:
    return ckpt(run_dir, sid) / FINAL


def merged(run_dir: Path, sid: str) -> Path:
    return ckpt(run_dir, sid) / MERGED


def data(run_dir: Path, sid: str) -> Path:
    return Path(run_dir, "data", sid)


def results(run_dir: Path) -> Path:
    return Path(run_dir, "result")


def result(run_dir: Path, sid: str) -> Path:
    """result/<sid>.json: the stage's summary; it exists once the stage is done."""
    return results(run_dir) / f"{sid}.json"


def summary(run_dir: Path, suffix: str = ".json") -> Path:
    """result/summary.json (.md): the evaluate stage's table."""
    return results(run_dir) / f"summary{suffix}"


def tensorboard(run_dir: Path, sid: str | None = None) -> Path:
    return Path(run_dir, "tensorboard", *([sid] if sid else []))


def log_file(run_dir: Path) -> Path:
    return Path(run_dir, "output.log")


FAILED = Path("result") / "FAILED"


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a started run dir (backup/config.yaml: see the module docstring)."""
    return run_config(path).is_file()


def run_dir_of(path: Path) -> Path | None:
    """The run dir a checkpoint folder lives in (<run>/ckpt/<stage>/final), if any."""
    path = Path(path)
    return next((p for p in (path, *path.parents[:3]) if is_run_dir(p)), None)


def saved_models(path: Path) -> list[Path]:
    """Where models may be saved under `path`: merged/ and final/ of a stage's ckpt dir, or of every stage
    of a run dir (reinforce_cot.models.checkpoint_folder picks one that holds weights)."""
    p = Path(path)
    return [p / MERGED, p / FINAL, *sorted(p.glob(f"ckpt/*/{MERGED}")), *sorted(p.glob(f"ckpt/*/{FINAL}"))]


# ----------------------------------------------------------------------------- what a run dir says
def stage_configs(run_dir: Path) -> dict:
    """Each stage's composed config as the run saved it (backup/stages/), by stage id in run order."""
    return {p.stem: OmegaConf.load(p) for p in sorted(backup(run_dir, "stages").glob("*.yaml"))}


def overrides(run_dir: Path) -> list[str]:
    """The command-line overrides the run was started with (backup/overrides.yaml); [] before it started."""
    path = backup(run_dir, "overrides.yaml")
    return [str(o) for o in OmegaConf.load(path)] if path.exists() else []


def stage_result(run_dir: Path, sid: str) -> dict | None:
    """A finished stage's summary (result/<sid>.json), or None while it is not done."""
    path = result(run_dir, sid)
    return json.loads(path.read_text()) if path.is_file() else None


def done_stages(run_dir: Path) -> list[str]:
    """The ids of the stages that are done (result/<stage id>.json), in run order."""
    return [p.stem for p in sorted(results(run_dir).glob("[0-9][0-9]_*.json"))]


def stage_results(run_dir: Path) -> dict[str, dict]:
    """Every finished stage's summary, by stage id."""
    return {sid: stage_result(run_dir, sid) for sid in done_stages(run_dir)}


def status(run_dir: Path) -> str:
    """ok (every stage done), failed (result/FAILED: `failure` says why), or incomplete (not started, still
    running, or killed from outside: resumable). The contract is in the module docstring."""
    if failure(run_dir) is not None:
        return "failed"
    stages = [p.stem for p in backup(run_dir, "stages").glob("*.yaml")]
    return "ok" if stages and all(result(run_dir, sid).is_file() for sid in stages) else "incomplete"


def mark_failed(run_dir: Path, reason: str) -> None:
    """Mark a run dir failed (result/FAILED, the contract in the module docstring) with a one-line reason."""
    line = " ".join(str(reason).split()) or "failed"  # one line, whatever the exception's text
    if failure(run_dir) not in (None, line):  # an earlier attempt's (a resume refused in validation): kept
        keep_failure(run_dir, f"failed-{time.strftime('%Y%m%d_%H%M%S')}")
    path = Path(run_dir) / FAILED
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{line}\nsee {log_file(run_dir)}\n")


def failure(run_dir: Path) -> str | None:
    """Why the run failed (result/FAILED's first line), or None when it has not failed."""
    path = Path(run_dir) / FAILED
    return path.read_text().split("\n", 1)[0] if path.is_file() else None


def keep_failure(run_dir: Path, folder: str) -> None:
    """Move result/FAILED to backup/<folder>/FAILED: the run is live again (a resume, a sweep rerun), and
    why its last attempt failed is kept."""
    path = Path(run_dir) / FAILED
    if path.is_file():
        backup(run_dir, folder).mkdir(parents=True, exist_ok=True)
        path.replace(backup(run_dir, folder, "FAILED"))


def check_resumable(run_dir: Path) -> None:
    if not is_run_dir(run_dir):
        what = "does not exist" if not Path(run_dir).exists() else "is not a run dir (no backup/config.yaml)"
        raise ConfigError(f"resume={run_dir}: {what}; pass a run dir such as outputs/<date>_<name>")


def resolve_run_dir(resume, fresh: str) -> str:
    """Hydra's run dir (the `rc.run_dir` resolver of conf/train.yaml): the run dir being resumed, else a
    fresh timestamped one.

    A fresh dir is claimed with an exclusive mkdir: two runs started in the same second (the name's
    resolution) get `<name>` and `<name>_2` instead of sharing, and resuming, one folder. A resume of a
    folder that is not a run dir is a ConfigError here: Hydra makes the run dir and its output.log right
    after this, and nothing may be written for a typo."""
    if resume:
        path = Path(resume).expanduser().resolve()
        check_resumable(path)
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


# ----------------------------------------------------------------------------- writing
def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)  # atomic: a killed run never leaves half a result file


def append_line(path: Path, line: str) -> None:
    """One line at the end of a log file of the run dir (backup/jobs.txt, backup/preemptions.txt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def command_line() -> str:
    """How this run was started: the command itself, or inside a submitit job the sweep's command (which the
    launcher exports as RCOT_SWEEP_COMMAND) and the job's own overrides."""
    sweep = os.environ.get("RCOT_SWEEP_COMMAND")
    if not os.environ.get("SUBMITIT_EXECUTOR") or not sweep:
        return shlex.join(sys.argv) + "\n"
    from hydra.core.hydra_config import HydraConfig

    job = shlex.join(["python", "train.py", *HydraConfig.get().overrides.task])
    return f"sweep: {sweep}\njob:   {job}\n"


def write_provenance(run_dir: Path, cfg, overrides: list[str], stage_cfgs: dict) -> None:
    """Resolved config, overrides, each stage's composed config, git commit + dirty diff, packages, command."""
    backup(run_dir, "stages").mkdir(parents=True, exist_ok=True)
    backup(run_dir, "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    for sid, scfg in stage_cfgs.items():
        OmegaConf.save(scfg, backup(run_dir, "stages", f"{sid}.yaml"), resolve=True)
    # config.yaml marks a run dir as resumable, so it comes after the stage configs a resume reads back: a
    # job preempted in between (Slurm requeue) then starts afresh instead of resuming with stages missing.
    OmegaConf.save(cfg, run_config(run_dir), resolve=True)
    commit = _git("rev-parse", "HEAD").strip() or "unknown (not a git checkout)"
    status_lines = _git("status", "--porcelain")
    backup(run_dir, "git.txt").write_text(f"commit: {commit}\ndirty: {bool(status_lines.strip())}\n{status_lines}")
    backup(run_dir, "git_diff.patch").write_text(_git("diff", "HEAD"))
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    backup(run_dir, "pip_freeze.txt").write_text(freeze)
    backup(run_dir, "command.txt").write_text(command_line())


def note_resume(run_dir: Path, overrides: list[str]) -> None:
    """backup/resume-<time>/: this resume's overrides and commit, and why the attempt it continues failed."""
    folder = f"resume-{time.strftime('%Y%m%d_%H%M%S')}"
    backup(run_dir, folder).mkdir(parents=True, exist_ok=True)
    keep_failure(run_dir, folder)
    backup(run_dir, folder, "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    backup(run_dir, folder, "git.txt").write_text(_git("rev-parse", "HEAD"))
