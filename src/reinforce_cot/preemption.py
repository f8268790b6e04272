"""Preemption-safe training in submitit jobs: signal -> checkpoint at the next step boundary -> requeue -> resume.

    python train.py -m seed=0,1 hydra/launcher=slurm      # each job gets USR2 signal_delay_s before its time limit
    scancel --signal=USR2 <job>                           # what a preemption warning looks like to the job
    scontrol requeue <job>                                # a preemption: SIGTERM, then SIGKILL after KillWait

submitit asks Slurm for `--signal=USR2@<signal_delay_s>` and, on USR2, requeues the job at once (its
handler pickles the launcher's `checkpoint()`, calls `scontrol requeue`, exits): everything since the
last `save_steps` checkpoint would be recomputed. `install`, called by the launcher inside each job after
submitit has set its handlers, puts one in front of them:

- USR2 (the time-limit warning, or a preemption warning sent with `scancel --signal=USR2`) and SIGTERM
  (what `scontrol requeue`, a scheduler preemption, `scancel` and the time limit itself send, KillWait or
  the partition's GraceTime seconds before SIGKILL) only set a flag;
- while a train stage runs (from `attach(trainer)` to `stage_done()`), `StepBoundary`, a TrainerCallback,
  reads the flag at every optimizer-step boundary (with several processes they agree through one
  all-reduce per step) and makes the trainer log that step and save a complete checkpoint there: model,
  optimizer, scheduler, RNG, and the prompt sampler's state (sampling.SamplerMixin saves it inside
  `_save_checkpoint`). Then, after USR2, submitit's own handler requeues the job (its max_num_timeout
  still counts time limits); after SIGTERM the process exits (Slurm is already requeueing or ending
  the job). The requeued job resumes from that checkpoint (training.last_checkpoint), so it loses at
  most the step that was in flight when the signal came, and every step is logged once;
- a signal after the stage's last step is acted on once the stage's result is written (`stage_done`);
  outside a train stage USR2 requeues at once (nothing unsaved to lose) and SIGTERM is only logged;
- a watchdog requeues anyway when no step boundary comes within 3/4 of signal_delay_s (a step longer
  than the warning): the job then resumes from its last periodic checkpoint instead of being killed at
  its time limit and dropped from the sweep;
- a job requeued MAX_STALLED_REQUEUES times in a row without progress (same stages done, same step)
  is not requeued again: it fails with a message instead of looping for ever.

Each signal acted on is one line of backup/preemptions.txt (time, job, signal, stages done, step, action).
Outside submitit jobs nothing is installed.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from reinforce_cot import hardware, rundir

log = logging.getLogger(__name__)

MAX_STALLED_REQUEUES = 3
WATCHDOG_FRACTION = 0.75  # of signal_delay_s: when to requeue without waiting for a step boundary any more
REQUEUE, EXIT = 2, 1  # what a pending signal asks for; the larger wins when processes disagree


class _State:
    def __init__(self):
        self.submitit_handler = None  # submitit's USR2 handler: checkpoint() + scontrol requeue + exit
        self.usr_sig: int | None = None
        self.rank = 0
        self.delay_s = 0.0
        self.pending = 0  # 0, EXIT or REQUEUE
        self.signal_name = ""
        self.boundary: StepBoundary | None = None  # set while a train stage runs
        self.step: int | None = None
        self.run_dir: Path | None = None
        self.watchdog: threading.Timer | None = None


_state = _State()


def installed() -> bool:
    return _state.submitit_handler is not None


def install(run_dir: Path, signal_delay_s: float) -> None:
    """Inside a submitit job (after submitit set its handlers, i.e. from the job's function): defer USR2 and
    SIGTERM to the step boundaries of train stages; `run_dir` gets backup/preemptions.txt."""
    from submitit import JobEnvironment

    usr_sig = JobEnvironment._usr_sig()
    handler = signal.getsignal(usr_sig)
    if not callable(handler) or getattr(handler, "__self__", None) is None:
        return  # not started by submitit's process_job: leave the defaults alone
    _state.submitit_handler, _state.usr_sig, _state.delay_s = handler, usr_sig, float(signal_delay_s or 0)
    _state.run_dir = Path(run_dir)
    _state.rank = handler.__self__.env.global_rank
    signal.signal(usr_sig, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    wanted = REQUEUE if signum == _state.usr_sig else EXIT
    if _state.boundary is None:
        if wanted == REQUEUE:
            log.warning("%s outside a train stage: requeueing now", name)
            _requeue(name, "signal outside a train stage")
        else:
            log.warning("%s outside a train stage: nothing to checkpoint", name)
        return
    log.warning("%s: saving a checkpoint at the end of the current step, then %s", name,
                "requeueing" if wanted == REQUEUE else "exiting")  # fmt: skip
    if wanted > _state.pending:
        _state.pending, _state.signal_name = wanted, name
    if wanted == REQUEUE and _state.watchdog is None and _state.delay_s > 0:
        _state.watchdog = threading.Timer(WATCHDOG_FRACTION * _state.delay_s, _late, args=(name,))
        _state.watchdog.daemon = True
        _state.watchdog.start()


def _late(name: str) -> None:
    """Watchdog thread: no step boundary came in time; requeue from the last checkpoint on disk."""
    if _state.boundary is None or _state.boundary.acting or _state.pending != REQUEUE:
        return
    _state.pending = 0  # requeued here: the boundary must not requeue again (Slurm's SIGTERM comes next)
    log.warning("no step boundary within %.1f s of %s: requeueing without a new checkpoint (the job resumes "
                "from its last saved one; raise hydra.launcher.signal_delay_s above one step + one save)",
                WATCHDOG_FRACTION * _state.delay_s, name)  # fmt: skip
    try:
        _requeue(name, "no step boundary in time")
    except SystemExit:  # submitit's handler requeued and exits: that ends only this thread; Slurm ends the job
        pass
    except Exception as e:  # not requeued (no requeue left, no progress): the time limit will end the job
        log.warning("watchdog: %s", e)


def _cancel_watchdog() -> None:
    if _state.watchdog is not None:
        _state.watchdog.cancel()
        _state.watchdog = None


def attach(trainer) -> None:
    """Before `trainer.train()` in a train stage: act on signals at the trainer's step boundaries until
    `stage_done()`. Does nothing outside submitit jobs."""
    if not installed():
        return
    _state.boundary = StepBoundary(trainer)
    trainer.add_callback(_state.boundary)


def stage_done() -> None:
    """After a stage's result was written (reinforce_cot.recipes.run calls it on every rank after each
    stage): a signal that came after a train stage's last step is acted on now."""
    if _state.boundary is None:
        return
    _state.boundary = None
    _cancel_watchdog()
    wanted, _state.pending = _agree(_state.pending), 0  # every process ends the stage here: they agree
    if wanted:
        _leave(wanted, "after the stage's last step")


class StepBoundary(TrainerCallback):
    """Reads the signal flag at each optimizer-step boundary; on it, log + save the step, then leave."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.acting = 0

    def on_step_begin(self, args, state, control, **kwargs):
        _state.step = state.global_step  # (a resumed trainer loads its step after on_train_begin)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        _state.step = state.global_step
        wanted = _agree(_state.pending)
        if wanted and not self.acting:
            _cancel_watchdog()
            self.acting = wanted
            control.should_log = True  # the step's metrics reach the log before the checkpoint, once
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.acting:
            for cb in self.trainer.callback_handler.callbacks:  # events since the last flush would be lost
                writer = getattr(cb, "tb_writer", None)
                if writer is not None:
                    writer.flush()
            _state.boundary, _state.pending = None, 0
            _leave(self.acting, f"checkpoint-{state.global_step} saved")
        return control


def _agree(wanted: int) -> int:
    """The largest pending request over all processes (one tiny all-reduce per step when distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return wanted
    import torch
    from accelerate import PartialState

    flag = torch.tensor([wanted], device=PartialState().device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def _leave(wanted: int, what: str) -> None:
    """Every process gets here together: requeue (rank 0 asks Slurm) or exit."""
    hardware.barrier()  # no process exits before all have saved (KillOnBadExit clusters end the job)
    name = _state.signal_name or "signal"
    if wanted == REQUEUE:
        _requeue(name, what)  # rank 0: raises SystemExit (requeued) or UncompletedJobError (not)
        raise SystemExit(0)  # other ranks: rank 0's requeue ends this job
    _record(name, "exit", what)
    log.warning("%s: %s; exiting (Slurm requeues or ends the job)", name, what)
    raise SystemExit(128 + signal.SIGTERM)


def _requeue(name: str, what: str) -> None:
    """On rank 0: refuse a requeue that would loop without progress, else let submitit's handler requeue."""
    if _state.rank != 0:
        return
    from submitit.core.utils import UncompletedJobError

    stalled = _stalled_requeues()
    if stalled >= MAX_STALLED_REQUEUES:
        _record(name, "not requeued", f"{what}; {stalled} requeues in a row made no progress")
        raise UncompletedJobError(
            f"{name}: not requeued: the last {stalled} requeues of this job made no progress (same stages done, "
            f"step {_state.step}); give each run more time (hydra.launcher.timeout_min) or fix what stalls it"
        )
    _record(name, "requeue", what)
    _wandb_preempting()
    _state.submitit_handler(_state.usr_sig, None)


def _wandb_preempting() -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.mark_preempting()  # the run shows as preempted, not crashed, until the job resumes it


# ----------------------------------------------------------------------------- backup/preemptions.txt
def _progress() -> str:
    run_dir = _state.run_dir
    done = len(rundir.done_stages(run_dir)) if run_dir else 0
    return f"stages_done={done} step={_state.step if _state.step is not None else '-'}"


def _record(name: str, action: str, what: str) -> None:
    run_dir = _state.run_dir
    if run_dir is None or _state.rank != 0:
        return
    import os

    job = os.environ.get("SLURM_ARRAY_JOB_ID", "")
    job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID", "")
    line = (
        f"time={time.strftime('%Y-%m-%d %H:%M:%S')} job={job} restart={os.environ.get('SLURM_RESTART_COUNT', '0')} "
        f"signal={name} {_progress()} action={action.replace(' ', '_')} why={what.replace(' ', '_')}\n"
    )
    rundir.append_line(rundir.preemptions_log(run_dir), line)


def _stalled_requeues() -> int:
    """How many requeues in a row, counting back from the newest, left the job where it is now."""
    run_dir = _state.run_dir
    path = rundir.preemptions_log(run_dir) if run_dir else None
    if path is None or not path.is_file():
        return 0
    same, n = f" {_progress()} action=requeue ", 0
    for line in reversed(path.read_text().splitlines()):
        if same not in line:
            break
        n += 1
    return n
