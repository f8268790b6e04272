"""hydra-submitit-launcher's Slurm and local launchers plus reinforce_cot.launcher.SubmititSweep (checks before
submitting, a sweep that outlives a killed job). Selected by hydra/launcher=slurm and hydra/launcher=local."""

from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from reinforce_cot.launcher import SubmititSweep, preflight_local, preflight_slurm


class SlurmLauncher(SubmititSweep, submitit_launcher.SlurmLauncher):
    def _preflight(self) -> None:
        preflight_slurm(self.params, self.config)


class LocalLauncher(SubmititSweep, submitit_launcher.LocalLauncher):
    def _preflight(self) -> None:
        preflight_local(self.params, self.config)
