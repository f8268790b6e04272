"""hydra-submitit-launcher's Slurm and local launchers plus reinforce_cot.launcher.SubmititSweep (checks before
submitting, a sweep that outlives a killed job), and Hydra's basic launcher with the same rerun of unfinished jobs
and end of sweep (a table; failed jobs listed, exit code 1: reinforce_cot.sweeps). Selected by
hydra/launcher=slurm, local and sequential (the default)."""

from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from reinforce_cot import sweeps
from reinforce_cot.launcher import SubmititSweep, plan_or_exit, preflight_local, preflight_slurm


class SlurmLauncher(SubmititSweep, submitit_launcher.SlurmLauncher):
    def _preflight(self) -> None:
        preflight_slurm(self.params, self.config)


class LocalLauncher(SubmititSweep, submitit_launcher.LocalLauncher):
    def _preflight(self) -> None:
        preflight_local(self.params, self.config)


class SequentialLauncher(BasicLauncher):
    """Hydra's basic launcher (the jobs one after another in this process), ending like the submitit ones."""

    def launch(self, job_overrides, initial_job_idx):
        jobs, todo = plan_or_exit(self, job_overrides, initial_job_idx)
        for job in todo:  # one at a time, so that each keeps its number (its run dir) in a rerun
            [job.ret] = super().launch([job.overrides], job.num)
        sweeps.finish(jobs, Path(str(self.config.hydra.sweep.dir)))
        return sweeps.returns(jobs)
