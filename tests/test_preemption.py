"""Signals in a submitit job wait for the trainer's next step boundary (reinforce_cot.preemption).

In-process: a real transformers Trainer (the base every TRL trainer shares: the step loop, the callbacks and
`_save_checkpoint` are its own) on a tiny linear model, and submitit's real signal handlers as its
`process_job` installs them for a local job (whose requeue is `sys.exit(144)`; on Slurm it is `scontrol
requeue`, tested end to end in tests/test_sweeps.py). Each signal is sent by this process to itself while a
known step is in flight.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from submitit.core.utils import DelayedSubmission, JobPaths, UncompletedJobError
from transformers import Trainer, TrainerCallback, TrainingArguments

from reinforce_cot import preemption

LOCAL_REQUEUE = 144  # submitit's local executor requeues by exiting with this code
STEPS = 8


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": torch.nn.functional.mse_loss(self.w(x).squeeze(-1), y)}


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=g)
        return {"x": x, "y": x.sum()}


class Launcher:
    """Stands for the Hydra launcher submitit pickles: checkpoint() resubmits it with the same arguments."""

    def __call__(self):
        return "done"

    def checkpoint(self, *args, **kwargs):
        return DelayedSubmission(self, *args, **kwargs)


class SignalAt(TrainerCallback):
    """Sends `signum` to this process when step `step` begins (so that step is in flight)."""

    def __init__(self, step: int, signum: int, stall_s: float = 0.0):
        self.step, self.signum, self.stall_s = step, signum, stall_s

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)
            if self.stall_s:  # a step longer than the warning: the watchdog must act first
                import time

                time.sleep(self.stall_s)


@pytest.fixture
def job(tmp_path, monkeypatch):
    """This process as a submitit local job: submitit's handlers, then preemption's in front of them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}
    folder = tmp_path / "submitit"
    folder.mkdir()
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "42", "SUBMITIT_FOLDER": str(folder),
                       "SUBMITIT_LOCAL_GLOBALID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    import submitit

    env = submitit.JobEnvironment()
    paths = JobPaths(folder, job_id="42", task_id=0)
    delayed = DelayedSubmission(Launcher())
    delayed.set_timeout(60, 3)
    env._handle_signals(paths, delayed)  # what submitit's process_job does before running the function
    monkeypatch.setattr(preemption, "_state", preemption._State())
    run_dir = tmp_path / "run"
    preemption.install(run_dir, signal_delay_s=30)
    assert preemption.installed()
    yield run_dir, paths
    preemption._cancel_watchdog()
    for s, handler in saved.items():
        signal.signal(s, handler)


def make_trainer(run_dir, *callbacks):
    args = TrainingArguments(
        output_dir=str(run_dir / "ckpt" / "01_sft"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        logging_steps=2,  # step 3 is off this cadence: the checkpointed step must be logged anyway
        save_steps=1000,  # no periodic checkpoint: the only one is the signal's
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=Regression(), args=args, train_dataset=Rows(), callbacks=list(callbacks))
    preemption.attach(trainer)
    return trainer


def checkpoints(run_dir):
    return sorted(p.name for p in (run_dir / "ckpt" / "01_sft").glob("checkpoint-*"))


def lines(run_dir):
    return (run_dir / "backup" / "preemptions.txt").read_text().splitlines()


def test_usr2_checkpoints_the_step_in_flight_then_submitit_requeues(job):
    run_dir, paths = job
    trainer = make_trainer(run_dir, SignalAt(3, signal.SIGUSR2))
    with pytest.raises(SystemExit) as exit_:
        trainer.train()
    assert exit_.value.code == LOCAL_REQUEUE  # submitit's own handler requeued, after the checkpoint
    assert checkpoints(run_dir) == ["checkpoint-3"]
    ckpt = run_dir / "ckpt" / "01_sft" / "checkpoint-3"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (ckpt / name).is_file(), name  # complete: resumable as it stands
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [h["step"] for h in state["log_history"] if "loss" in h] == [2, 3]
    assert paths.submitted_pickle.is_file()  # the launcher's checkpoint() was pickled for the requeued run
    [line] = lines(run_dir)
    assert "signal=SIGUSR2 stages_done=0 step=3 action=requeue why=checkpoint-3_saved" in line, line

    # the requeued run: a fresh trainer resumes there and ends at the planned step
    preemption._state.pending = 0
    resumed = make_trainer(run_dir)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == STEPS
    logged = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert logged == [2, 3, 4, 6, 8]  # 2 and 3 from the first run, once each; then the cadence goes on


def test_sigterm_checkpoints_the_step_in_flight_then_exits(job):
    run_dir, paths = job
    trainer = make_trainer(run_dir, SignalAt(5, signal.SIGTERM))
    with pytest.raises(SystemExit) as exit_:
        trainer.train()
    assert exit_.value.code == 128 + signal.SIGTERM
    assert checkpoints(run_dir) == ["checkpoint-5"]
    assert not paths.submitted_pickle.exists()  # Slurm requeues (or cancels) the job itself: no requeue here
    assert "signal=SIGTERM stages_done=0 step=5 action=exit" in lines(run_dir)[0]


def test_signal_after_the_last_step_is_acted_on_when_the_stage_is_done(job):
    run_dir, _ = job
    trainer = make_trainer(run_dir)
    trainer.train()
    os.kill(os.getpid(), signal.SIGUSR2)  # while the stage saves its final model, say: nothing happens yet
    assert not (run_dir / "backup" / "preemptions.txt").exists()
    with pytest.raises(SystemExit) as exit_:
        preemption.stage_done()
    assert exit_.value.code == LOCAL_REQUEUE
    assert "step=8 action=requeue why=after_the_stage's_last_step" in lines(run_dir)[0]


def test_outside_a_train_stage_usr2_requeues_at_once_and_sigterm_waits(job):
    run_dir, _ = job
    os.kill(os.getpid(), signal.SIGTERM)  # only logged: Slurm's SIGKILL follows after KillWait
    assert not (run_dir / "backup" / "preemptions.txt").exists()
    with pytest.raises(SystemExit) as exit_:
        os.kill(os.getpid(), signal.SIGUSR2)
    assert exit_.value.code == LOCAL_REQUEUE
    assert "action=requeue why=signal_outside_a_train_stage" in lines(run_dir)[0]


def test_no_boundary_in_time_requeues_from_the_watchdog(job):
    run_dir, paths = job
    preemption._state.delay_s = 0.4  # watchdog at 0.3 s; step 3 takes 1.5 s
    trainer = make_trainer(run_dir, SignalAt(3, signal.SIGUSR2, stall_s=1.5))
    trainer.train()  # the watchdog's requeue ends only its own thread; on Slurm, Slurm then ends the job
    assert paths.submitted_pickle.is_file()
    assert "step=2 action=requeue why=no_step_boundary_in_time" in lines(run_dir)[0]
    assert "checkpoint-3" not in checkpoints(run_dir)  # requeued once, by the watchdog; not again at step 3
    assert len(lines(run_dir)) == 1


def test_a_job_that_makes_no_progress_is_not_requeued_for_ever(job):
    run_dir, paths = job
    backup = run_dir / "backup"
    backup.mkdir(parents=True)
    same = "signal=SIGUSR2 stages_done=0 step=- action=requeue why=signal_outside_a_train_stage\n"
    (backup / "preemptions.txt").write_text(same * preemption.MAX_STALLED_REQUEUES)
    with pytest.raises(UncompletedJobError, match="the last 3 requeues of this job made no progress"):
        os.kill(os.getpid(), signal.SIGUSR2)
    assert "action=not_requeued" in lines(run_dir)[-1]
    assert not paths.submitted_pickle.exists()
