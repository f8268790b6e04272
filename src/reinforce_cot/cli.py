"""What every entry point shares: the config tree, what composing it needs registered, log routing, and the
one way out for an error the user can act on.

    python train.py ...                       # reinforce_cot.main
    python -m reinforce_cot.evaluate ckpt=... # reinforce_cot.evaluate
    python -m reinforce_cot.merge ckpt=...    # reinforce_cot.merge
    python train.py -m ... hydra/launcher=slurm   # reinforce_cot.launcher (before any job is submitted)

- CONF_DIR: conf/ of this checkout (an editable install: conf/ sits beside src/, outside the package).
- `register()`: the OmegaConf resolvers the config tree uses (`rc.run_dir`, `rc.mul`) and the
  ConfigStore nodes it lists (`key_check`: reinforce_cot.overrides). reinforce_cot/__init__.py calls it,
  so any `import reinforce_cot...` can compose conf/ (the tests, notebooks and Hydra's own launchers do).
- `route_library_logs()`: transformers/TRL logs into output.log, one progress bar per stage.
- `exit_on_user_error()`: a UserError (reinforce_cot.errors) becomes one `error: <message>` line on stderr
  (and in the log) and its exit code (2 for bad input), never a traceback. reinforce_cot.main uses
  `report()` alone, since it also marks the run dir failed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from reinforce_cot import overrides, rundir
from reinforce_cot.errors import UserError

log = logging.getLogger("reinforce_cot")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def report(error: UserError) -> str:
    """Log and print `error: <message>` as one line; returns that line (for result/FAILED)."""
    line = "error: " + " ".join(str(error).split())
    handlers = logging.getLogger().handlers
    if handlers and not any(getattr(h, "stream", None) is sys.stderr for h in handlers):
        log.error("%s", line)  # into output.log (Hydra's handlers); where the log is stderr, printed once below
    print(line, file=sys.stderr, flush=True)
    return line


@contextlib.contextmanager
def exit_on_user_error():
    """A UserError raised in the block ends the process: one `error:` line, its exit code (2: bad input)."""
    try:
        yield
    except UserError as e:
        report(e)
        raise SystemExit(e.exit_code) from None


def _run_dir(resume, fresh: str) -> str:
    with exit_on_user_error():  # a resume of a folder that is not a run dir: one line, before output.log exists
        return rundir.resolve_run_dir(resume, fresh)


def register() -> None:
    """Resolvers and ConfigStore nodes conf/ refers to (idempotent)."""
    # hydra.run.dir; use_cache: Hydra may resolve it more than once, the claim must happen once per process
    OmegaConf.register_new_resolver("rc.run_dir", _run_dir, replace=True, use_cache=True)
    # `${rc.mul:${model.lr.sft},0.2}`: a learning rate scaled in a recipe (conf/recipe/two_phase.yaml)
    OmegaConf.register_new_resolver("rc.mul", lambda a, b: float(a) * float(b), replace=True)
    # conf/train.yaml's `key_check: per_stage`, conf/evaluate.yaml's `key_check: hydra` (reinforce_cot.overrides)
    per_stage = OmegaConf.create({key: {} for key in (*overrides.STAGE_GROUPS, overrides.TARGET)})
    for key in per_stage:
        OmegaConf.set_struct(per_stage[key], False)  # kept when the group's file merges into it
    store = ConfigStore.instance()
    store.store(group="key_check", name="per_stage", node=per_stage, package="_global_")
    store.store(group="key_check", name="hydra", node={}, package="_global_")


def route_library_logs() -> None:
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
