"""`python train.py [group=choice ...] [key=value ...]`: compose the config, run the recipe.

    python train.py                                   # quickstart: tiny VLM, SFT -> GRPO -> evaluate
    python train.py recipe=single algo=sft            # one stage
    python train.py algo=gspo hardware=1xa100 model=qwen2_5_vl_3b
    python train.py resume=outputs/20260101_120000_quickstart
    python train.py -m algo=grpo,gspo seed=0,1        # a sweep: one run dir per job under multirun/
    python train.py hardware=cpu_ddp2                 # 2 processes: re-executed under torchrun (hardware.py)
    python train.py -m algo=grpo,gspo seed=0,1 hardware=slurm_1node_8gpu   # the same sweep on Slurm (slurm/sweeps.md)

Flow: compose -> validate every stage (before any weights load) -> run dir + provenance -> stages
(train: data -> model -> rewards -> TRL trainer -> train with auto-resume -> save; evaluate) -> table.
Bad input ends with a one-line `error: ...` naming the key and the fix (exit code 2).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from reinforce_cot import hardware, recipes
from reinforce_cot.cluster import quiet_other_ranks, setup_job
from reinforce_cot.errors import ConfigError

log = logging.getLogger("reinforce_cot")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def _route_library_logs() -> None:
    """Send transformers/TRL logs through the root logger so they land in output.log too; no transformers
    bars ("Loading weights", "Writing model shards" at every checkpoint): a stage shows one bar of its own
    (reinforce_cot.callbacks). Hub downloads keep theirs (drawn on a terminal only)."""
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity_warning()
    hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()  # also the hub's ...
    if hub_bars:  # ... which downloads keep, unless HF_HUB_DISABLE_PROGRESS_BARS=1
        huggingface_hub.utils.enable_progress_bars()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig):
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    _route_library_logs()
    quiet_other_ranks(run_dir)  # a submitit task other than the first: output.log is rank 0's
    try:
        setup_job(cfg, run_dir)  # in a submitit job: torch.distributed env from its tasks
        hardware.default_env()
        hardware.setup_process_logging()  # ranks > 0 log to the console only
        log.info("run dir: %s", run_dir)
        if hardware.needs_launch(cfg):  # N processes under torchrun, same run dir (reinforce_cot.hardware)
            code = hardware.launch(cfg, run_dir, list(hc.overrides.task))
            if code and hc.mode != RunMode.MULTIRUN:
                raise SystemExit(code)
            return {"status": "failed" if code else "ok", "processes": cfg.hardware.num_processes}
        return recipes.run(cfg, run_dir, list(hc.overrides.task))
    except ConfigError as e:
        log.error("error: %s", e)
        print(f"error: {e}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            return {"status": "failed", "error": str(e)}
        raise SystemExit(2) from None
    except Exception:
        if hc.mode != RunMode.MULTIRUN:
            raise
        # A sweep goes on when one job fails: the failure is logged and marked in its run dir.
        log.exception("job failed; the sweep continues")
        (run_dir / "result").mkdir(parents=True, exist_ok=True)
        (run_dir / "result" / "FAILED").write_text("see output.log\n")
        return {"status": "failed"}


if __name__ == "__main__":
    main()
