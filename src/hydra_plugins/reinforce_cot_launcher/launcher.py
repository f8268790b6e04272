"""hydra-submitit-launcher's Slurm and local launchers plus reinforce_cot.launcher.SubmititSweep (checks before
submitting, a sweep that outlives a killed job), and Hydra's basic launcher with the same end of sweep (a line
per job; failed jobs listed, exit code 1). Selected by hydra/launcher=slurm, local and sequential (the default)."""

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from reinforce_cot.launcher import SubmititSweep, finish_sweep, preflight_local, preflight_slurm


class SlurmLauncher(SubmititSweep, submitit_launcher.SlurmLauncher):
    def _preflight(self) -> None:
        preflight_slurm(self.params, self.config)


class LocalLauncher(SubmititSweep, submitit_launcher.LocalLauncher):
    def _preflight(self) -> None:
        preflight_local(self.params, self.config)


class SequentialLauncher(BasicLauncher):
    """Hydra's basic launcher (the jobs one after another in this process), ending like the submitit ones."""

    def launch(self, job_overrides, initial_job_idx):
        returns = super().launch(job_overrides, initial_job_idx)
        finish_sweep([(f"#{initial_job_idx + i}", ret) for i, ret in enumerate(returns)])
        return returns
