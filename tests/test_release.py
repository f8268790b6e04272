"""Nothing a finished stage made outlives it (hardware.stage_scope, hardware.release_trainer): on a GPU that
is the memory the next stage, or a vLLM server it launches, needs.

The recipe runs in this process, as `python train.py` does. The stand-in for TRL's colocated vLLM is the
boundary: vLLM cannot run here, so the test does to the trainer and the process what TRL 1.16's
VLLMGeneration does on a 1-GPU run (an engine on the trainer; RANK/LOCAL_RANK/WORLD_SIZE and MASTER_*
in os.environ; a process group of one), and checks that all of it is undone."""

from __future__ import annotations

import os
import weakref

import pytest
import torch.distributed as dist

from reinforce_cot import models, parts, training
from tests.helpers import run_in_process


class StandInLLM:
    """What hardware.release_trainer sees of a vllm.LLM: llm_engine.engine_core.shutdown()."""

    shutdowns = 0

    def __init__(self):
        self.llm_engine = type("Engine", (), {"engine_core": self})()

    def shutdown(self):
        StandInLLM.shutdowns += 1


@pytest.mark.slow  # 28-45 s on the loaded 2-core machine (imports TRL, trains 2 steps, evaluates 4 prompts)
def test_a_finished_stage_leaves_nothing_behind(tmp_path, monkeypatch):
    # 2 steps, 4 prompts, no sampled or answer-only metrics: the stages only need to make things
    overrides = ["recipe=single", "algo=sft", "reward=none", "debug=smoke", "algo.args.max_steps=2", "eval.k=0",
                 "eval.max_prompts=4", "eval.answer_only_template=null", "logger=none"]  # fmt: skip
    made: dict[str, list] = {"models": [], "trainers": []}
    real_load, real_lr = models.load_model, parts.install_lr_multipliers

    def load_model(*args, **kwargs):  # the trained model, and the one the evaluate stage generates with
        model = real_load(*args, **kwargs)
        made["models"].append(weakref.ref(model))
        return model

    def install_lr_multipliers(trainer, cfg):
        made["trainers"].append(weakref.ref(trainer))
        # what TRL's colocated vLLM does on one GPU (trl/generation/vllm_generation.py:331-335, vLLM's
        # external launcher): an engine on the trainer, distributed variables, a process group of one
        trainer.vllm_generation = type("VLLMGeneration", (), {"llm": StandInLLM()})()
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        dist.init_process_group("gloo", rank=0, world_size=1)
        return real_lr(trainer, cfg)

    env: dict = {}
    real_stage = training.train_stage

    def train_stage(*args, **kwargs):  # the environment as the stage found it (after validation's imports)
        env.update(os.environ)
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(parts, "install_lr_multipliers", install_lr_multipliers)
    monkeypatch.setattr(training, "train_stage", train_stage)
    results = run_in_process(tmp_path, *overrides).results

    assert results["01_sft"]["global_step"] == 2 and "rows" in results["02_evaluate"]
    assert len(made["models"]) == 2 and len(made["trainers"]) == 1
    alive = [name for name, refs in made.items() for ref in refs if ref() is not None]
    assert alive == []  # no gc.collect() here: stage_scope collected the reference cycles they sit in
    assert StandInLLM.shutdowns == 1  # the colocated engine was stopped
    assert dict(os.environ) == env  # RANK, MASTER_*, VLLM_*, TENSORBOARD_LOGGING_DIR... all gone again
    assert not dist.is_initialized()  # the 1-process group went with the stage
    from accelerate.state import PartialState

    assert PartialState._shared_state == {}  # the next stage's accelerate starts from scratch
