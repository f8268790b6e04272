"""reinforce-cot: teach vision-language (and text) models to reason step by step with TRL + Hydra.

    python train.py                                   # the quickstart recipe: tiny VLM, SFT -> GRPO -> evaluate
    python -m reinforce_cot.evaluate ckpt=outputs/<run>

How the package is layered. Each module imports only from layers below its own (lazy imports inside
functions included: tests/test_imports.py checks that the import graph has no cycle); where a lower
layer must call a higher one, the function is passed in (sharded's `load` message names its loader):

  1. leaves        errors, images, processing, reasoning
  2. processes     hardware (ranks, barriers, torchrun, what a stage leaves), rundir (every run-dir path,
                   provenance, the done/failed contract), overrides (which override reaches which stage),
                   cli (conf/, resolvers, the one `error:` exit), cluster + preemption (inside Slurm jobs)
  3. parts         data, sources, preference, rewards, tiny, models, parts, adapters, memory, sampling,
                   dynamic_sampling, vllm_images, sharded, generation, report, evaluation, callbacks
  4. stages        training, curation, rejection, merge, evaluation.evaluate_stage: fn(cfg, run_dir, stage
                   id, splits, earlier results) -> summary dict; the kinds are conf/stage/*.yaml
  5. recipes       config (validation of one stage), recipes (compose, validate, load data, run the stages,
                   write result/<stage>.json), runs and sweeps (reading run dirs back)
  6. entry points  main (train.py), evaluate, merge.main, launcher (+ hydra_plugins/)

Importing the package sets OMP_NUM_THREADS=1 on CPU-only machines (unless set; reinforce_cot.hardware
says why) before anything imports torch, and registers what conf/ needs to compose (reinforce_cot.cli).
"""

import os

from reinforce_cot import cli, hardware

if "OMP_NUM_THREADS" not in os.environ and not hardware.gpu_visible():
    os.environ["OMP_NUM_THREADS"] = str(hardware.default_threads(gpu=False))
cli.register()

__version__ = "0.1.0"
