"""`python train.py [group=choice ...] [key=value ...]`: compose the config, run the recipe.

    python train.py                                   # quickstart: tiny VLM, SFT -> GRPO -> evaluate
    python train.py recipe=single algo=sft            # one stage
    python train.py algo=gspo hardware=2xa100 model=qwen2_5_vl_3b
    python train.py resume=outputs/20260101_120000_quickstart
    python train.py -m algo=grpo,gspo seed=0,1        # a sweep: one run dir per job under multirun/
    python train.py hardware=cpu_ddp2                 # 2 processes: re-executed under torchrun (hardware.py)
    python train.py -m algo=grpo,gspo seed=0,1 hardware=slurm_1node_8gpu   # the same sweep on Slurm (slurm/sweeps.md)

Flow: recipes.prepare (compose every stage, validate each, load and check its data: before any weights
load, writing nothing) -> either recipes.run (provenance, then each stage: train = data -> model -> rewards
-> TRL trainer -> train with auto-resume -> save; evaluate -> table) or, for N processes, hardware.launch
(this command again under torchrun). Bad input ends with a one-line `error: ...` naming the key and the fix
(exit code 2; reinforce_cot.cli); a generation server that died, one line and exit code 1. Every failure, of a
run or of a sweep job, leaves result/FAILED with its reason (the contract: reinforce_cot.rundir); in a sweep
the other jobs go on, and the sweep exits 1 listing the failed ones (reinforce_cot.sweeps.finish).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from reinforce_cot import cli, hardware, recipes, rundir
from reinforce_cot.cluster import quiet_other_ranks, setup_job
from reinforce_cot.errors import UserError

log = logging.getLogger("reinforce_cot")


class JobFailed(RuntimeError):
    """A sweep job failed (bad input, an exception, a torchrun child): raised so that Hydra counts the job as
    failed and the launcher lists it (reinforce_cot.sweeps.finish); result/FAILED holds the reason."""


@hydra.main(version_base="1.3", config_path=str(cli.CONF_DIR), config_name="train")
def main(cfg: DictConfig):
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    sweep = hc.mode == RunMode.MULTIRUN
    cli.route_library_logs()
    quiet_other_ranks(run_dir)  # a submitit task other than the first: output.log is rank 0's
    try:
        setup_job(cfg, run_dir)  # in a submitit job: torch.distributed env from its tasks
        hardware.default_env()
        hardware.setup_process_logging()  # ranks > 0 log to the console only
        log.info("run dir: %s", run_dir)
        recipe = recipes.prepare(cfg, run_dir, overrides)  # compose (or reload), validate, data: writes nothing
        if not hardware.needs_launch(cfg):
            return recipes.run(recipe)
        del recipe  # the N processes prepare their own
        # N processes under torchrun, same run dir (reinforce_cot.hardware); rank 0 marks its own failure
        code = hardware.launch(cfg, run_dir, overrides)
        if not code:
            return {"status": "ok", "processes": cfg.hardware.num_processes}
        reason, exit_code = rundir.failure(run_dir) or f"torchrun exited with code {code}", code
    except UserError as e:  # bad input (exit code 2), a generation server that died (1): one line, no traceback
        reason, exit_code = cli.report(e), e.exit_code
    except Exception as e:
        if not sweep:
            _mark_failed(run_dir, f"{type(e).__name__}: {e}")
            raise
        log.exception("job failed; the sweep continues")  # a sweep goes on when one job fails
        reason, exit_code = f"{type(e).__name__}: {e}", 1
    reason = " ".join(reason.split())  # one line, whatever the exception's text
    _mark_failed(run_dir, reason)
    if sweep:
        raise JobFailed(reason) from None
    raise SystemExit(exit_code)


def _mark_failed(run_dir: Path, reason: str) -> None:
    if hardware.is_main():  # one writer per run dir
        rundir.mark_failed(run_dir, reason)


if __name__ == "__main__":
    main()
