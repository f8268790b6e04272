"""reinforce-cot's Hydra launchers (Hydra loads launchers only from the hydra_plugins namespace package).

The code is in reinforce_cot.launcher; conf/hydra/launcher/{slurm,local}.yaml select these classes.
"""
