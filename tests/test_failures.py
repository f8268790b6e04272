"""A failure never looks like a run: every failure path of main marks result/FAILED with its reason (the
contract in reinforce_cot.rundir), a failed sweep job is a failed Hydra job, and a sweep with failed jobs
exits 1 listing them. main's paths run in-process (the stage or torchrun stubbed at the boundary); one real
sweep runs through the default launcher."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import open_dict

from reinforce_cot import hardware, main, recipes, rundir, sweeps
from reinforce_cot.errors import ConfigError, GenerationError
from tests.helpers import ROOT, compose_cfg, run_in_process


@pytest.fixture
def call_main(tmp_path, monkeypatch):
    """main's body for a run dir under tmp_path, in RUN or MULTIRUN mode, as Hydra would call it."""

    def _call(mode: RunMode):
        cfg = compose_cfg("recipe=single", "algo=sft", return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
            cfg.hydra.mode = mode
        (tmp_path / "run").mkdir(exist_ok=True)  # Hydra makes it before the job starts
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return main.main.__wrapped__(cfg)

    return _call


def _stage_raises(monkeypatch, exc):
    def run(*args):
        raise exc

    monkeypatch.setattr(recipes, "prepare", lambda *args: None)
    monkeypatch.setattr(recipes, "run", run)


def _torchrun_fails(monkeypatch, child_reason: str | None):
    def launch(cfg, run_dir, overrides):
        if child_reason:  # what rank 0 of the children wrote before exiting
            rundir.mark_failed(run_dir, child_reason)
        return 3

    monkeypatch.setattr(recipes, "prepare", lambda *args: None)
    monkeypatch.setattr(hardware, "needs_launch", lambda cfg: True)
    monkeypatch.setattr(hardware, "launch", launch)


CASES = {
    "bad input": (
        lambda mp: _stage_raises(mp, ConfigError("eval.k=-1 must be >= 0")),
        "error: eval.k=-1 must be >= 0",
        2,
    ),
    "server gone": (  # not bad input: exit code 1, still one line and no traceback
        lambda mp: _stage_raises(mp, GenerationError("generation.base_url=http://x:1/v1: no server answers there")),
        "error: generation.base_url=http://x:1/v1: no server answers there",
        1,
    ),
    "exception": (
        lambda mp: _stage_raises(mp, RuntimeError("CUDA out of\nmemory")),
        "RuntimeError: CUDA out of memory",
        1,
    ),
    "torchrun": (lambda mp: _torchrun_fails(mp, None), "torchrun exited with code 3", 3),
    "torchrun child": (lambda mp: _torchrun_fails(mp, "ValueError: bad rank"), "ValueError: bad rank", 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_failed_sweep_job_is_marked_and_fails_in_hydra(call_main, monkeypatch, tmp_path, case):
    setup, reason, _ = CASES[case]
    setup(monkeypatch)
    with pytest.raises(main.JobFailed, match=reason.replace("(", r"\(")):
        call_main(RunMode.MULTIRUN)  # Hydra's run_job records the exception: the job is FAILED
    assert rundir.failure(tmp_path / "run") == reason
    assert (tmp_path / "run" / "result" / "FAILED").read_text().splitlines()[1].endswith("output.log")
    assert rundir.status(tmp_path / "run") == "failed"


@pytest.mark.parametrize("case", list(CASES))
def test_a_failed_run_is_marked_and_exits_non_zero(call_main, monkeypatch, tmp_path, case):
    setup, reason, code = CASES[case]
    setup(monkeypatch)
    with pytest.raises((SystemExit, RuntimeError)) as e:
        call_main(RunMode.RUN)
    assert (e.value.code if isinstance(e.value, SystemExit) else 1) == code  # an exception keeps its traceback
    assert rundir.failure(tmp_path / "run") == reason


def test_a_resume_moves_the_failed_marker_to_its_record(tmp_path):
    rundir.mark_failed(tmp_path, "RuntimeError: boom")
    rundir.note_resume(tmp_path, ["resume=x"])
    assert rundir.failure(tmp_path) is None and rundir.status(tmp_path) == "incomplete"
    [kept] = (tmp_path / "backup").glob("resume-*/FAILED")
    assert kept.read_text().startswith("RuntimeError: boom\n")


def test_a_resume_refused_before_it_starts_keeps_the_earlier_failure(call_main, monkeypatch, tmp_path):
    # the run failed once; its resume then fails validation (before note_resume would keep the marker)
    rundir.mark_failed(tmp_path / "run", "RuntimeError: boom")
    _stage_raises(monkeypatch, ConfigError("resume=run: these overrides differ from the run's"))
    with pytest.raises(SystemExit):
        call_main(RunMode.RUN)
    assert rundir.failure(tmp_path / "run") == "error: resume=run: these overrides differ from the run's"
    [kept] = (tmp_path / "run" / "backup").glob("failed-*/FAILED")
    assert kept.read_text().startswith("RuntimeError: boom\n")
    rundir.mark_failed(tmp_path / "run", rundir.failure(tmp_path / "run"))  # the same reason again: one marker
    assert len(list((tmp_path / "run" / "backup").glob("failed-*"))) == 1


def _job(status, value, overrides):
    ret = JobReturn(overrides=overrides, status=status)
    ret.return_value = value
    return ret


def test_finish_sweep_lists_failed_jobs_and_exits_1(capsys, tmp_path):
    ok = _job(JobStatus.COMPLETED, {"01_sft": {}}, ["seed=0"])
    bad = _job(JobStatus.FAILED, main.JobFailed("error: eval.k=-1 must be >= 0"), ["seed=1", "eval.k=-1"])
    sweeps.finish([sweeps.Job(0, ["seed=0"], ret=ok)], tmp_path)  # every job ok: returns
    with pytest.raises(SystemExit) as e:
        sweeps.finish([sweeps.Job(0, ["seed=0"], ret=ok), sweeps.Job(1, ["seed=1", "eval.k=-1"], ret=bad)], tmp_path)
    assert e.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [
        "error: 1 of 2 jobs of the sweep failed:",
        "  #1 seed=1 eval.k=-1: error: eval.k=-1 must be >= 0  (no run dir)",
    ]
    assert err[2].startswith("rerun the failed and unfinished jobs: python ") and err[2].endswith(f"={tmp_path}")


def test_sweep_whose_jobs_fail_exits_1_and_lists_them(tmp_path):
    # Both jobs fail in validation (seconds): the default launcher runs both, marks both, lists both.
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "recipe=single", "algo=sft", "eval.k=-1,-2"]
    cmd += [f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    listing = proc.stderr[proc.stderr.index("error: 2 of 2 jobs of the sweep failed:") :].splitlines()
    for job, k in ((0, -1), (1, -2)):
        run_dir = tmp_path / "sweep" / str(job)
        reason = f"error: eval.k={k} must be >= 0 (samples per prompt; 0 skips sampled metrics)"
        assert listing[1 + job] == f"  #{job} recipe=single algo=sft eval.k={k}: {reason}  ({run_dir})"
        assert rundir.failure(run_dir) == reason
        assert not (run_dir / "backup" / "config.yaml").exists()  # not resumable: it never started
    assert "Traceback" not in proc.stderr
    table = (tmp_path / "sweep" / "sweep.md").read_text()  # the end-of-sweep table (reinforce_cot.sweeps)
    assert "| 0   | eval.k=-1 | FAILED: error: eval.k=-1 must be >= 0" in table, table

    # Rerun into its sweep dir: neither job finished, so both run again, each into its own run dir; the reason
    # the first try failed is kept (these failed before they started: no backup/config.yaml, a fresh start)
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1 and "0 job(s) done before, not run again (-); running #0 #1" in rerun.stdout
    for job, k in ((0, -1), (1, -2)):
        run_dir = tmp_path / "sweep" / str(job)
        [kept] = run_dir.glob("backup/rerun-*/FAILED")
        assert kept.read_text().startswith(f"error: eval.k={k} must be >= 0") and rundir.status(run_dir) == "failed"


# ------------------------------------------------- bad input fails in validation, before anything is written


BAD_INPUT = {
    # torch checks the learning rate only when the optimizer is made, after the weights load
    "negative lr": (
        ["recipe=single", "algo=sft", "algo.args.learning_rate=-0.001"],
        "algo.args.learning_rate=-0.001: the optimizer (adamw_torch_fused) refuses it: Invalid learning rate: -0.001",
    ),
    "beta": (["recipe=single", "algo=grpo", "++algo.args.adam_beta1=1.5"], "algo.args.adam_beta1=1.5: the optimizer"),
    "batch size": (["recipe=single", "algo=sft", "algo.args.per_device_train_batch_size=0"], "must be >= 1"),
    "TRL's own check": (
        ["recipe=single", "algo=sft", "algo.args.logging_steps=0"],
        "algo=sft: logging strategy IntervalStrategy.STEPS requires non-zero algo.args.logging_steps",
    ),
    # offline (tests run with HF_HUB_OFFLINE=1): the hub id is looked up in the local hub cache
    "hub id": (["recipe=single", "algo=sft", "model.path=nobody/no-such-model"], "not in the local hub cache"),
    # the default recipe's second stage takes a preference algo: what is wrong is the data
    "dpo without pairs": (["algo=dpo", "debug=smoke"], "algo=dpo needs preference pairs but data=shapes_count rows"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_in_validation_before_anything_is_written(tmp_path, monkeypatch, case):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import; the session sets HF_HUB_OFFLINE=1
    overrides, message = BAD_INPUT[case]
    with pytest.raises(ConfigError) as e:
        run_in_process(tmp_path, *overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # no backup/config.yaml (resumable), no ckpt/


def test_resume_of_a_missing_folder_creates_nothing(train, tmp_path):
    run = train(f"resume={tmp_path}/outputs/20260101_120000_quickstart")
    assert run.returncode == 2, run
    assert run.stderr.strip().splitlines() == [
        f"error: resume={tmp_path}/outputs/20260101_120000_quickstart: does not exist; pass a run dir such as "
        "outputs/<date>_<name>"
    ]
    assert not (tmp_path / "outputs").exists()
