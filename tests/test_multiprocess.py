"""Multi-process training from one command: `python train.py hardware=cpu_ddp2` re-executes itself under
torchrun (two gloo processes, one run dir, rank 0 alone writes), DeepSpeed ZeRO-2 on CPU, and the
checks of GPU-only hardware settings."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from reinforce_cot import config, hardware, tiny
from reinforce_cot.errors import ConfigError
from tests.helpers import assert_every_tensor_moved, compose_cfg

SFT = ("recipe=single", "algo=sft", "reward=none", "debug=smoke")
# 5 prompts, 2 processes: shares of 3 and 2; at 2 completions per generate call, 2 calls vs 1 unless padded
EVAL = ("eval.every_steps=2", "eval.during_train_prompts=5", "generation.batch_size=2")


def _check_two_ranks_one_writer(run, distributed_type: str):
    assert run.returncode == 0, run
    res = run.result("01_sft.json")
    assert res["ranks"] == [0, 1]  # gathered from every process that trained
    assert res["distributed_type"] == distributed_type
    console = run.stdout + run.stderr
    assert "process rank 0 of 2" in console and "process rank 1 of 2" in console
    progress = re.findall(r"\[rank (\d)\].*\[01_sft\] step \d+/4 ", console)  # progress lines (no terminal)
    assert progress and set(progress) == {"0"}  # drawn by rank 0 alone
    log = (run.dir / "output.log").read_text()
    assert "[rank 0]" in log and "[rank 1]" not in log  # rank 1 logs to the console only
    assert "starting 2 processes" in log and f"hydra.run.dir={run.dir}" in log  # both children in THIS run dir
    assert len([p for p in run.dir.parent.iterdir() if p.is_dir()]) == 1  # no second, timestamped run dir
    assert len(list((run.dir / "tensorboard" / "01_sft").glob("events.out.tfevents.*"))) == 1
    # each step consumed 16 rows per process: 32 of 96 rows = 1/3 epoch (one process: 1/6)
    first = next(h for h in res["log_history"] if "loss" in h)
    assert first["epoch"] == pytest.approx(1 / 3, abs=1e-3)
    assert res["global_step"] == 4
    start = tiny.build(OmegaConf.load(run.dir / "backup/config.yaml").model)
    assert_every_tensor_moved(start, run.dir / "ckpt/01_sft/final")
    assert (run.dir / "result/summary.json").is_file()  # the evaluate stage ran (on rank 0)


def _check_eval_during_training(run, sid="01_sft"):
    """Both processes generated their share of the 5 prompts (3 + 2, padded to 3) and got back all of them:
    evaluations at step 0, 2 and 4, instead of a hang where one process waits in a collective (ZeRO-3's
    synced generate) that the other skipped."""
    history = run.result(f"{sid}.json")["log_history"]
    evals = [h for h in history if "eval_greedy_accuracy" in h]
    assert [h["step"] for h in evals] == [0, 2, 4]
    assert all(0 < h["eval_mean_completion_tokens"] <= 40 and "eval_pass@2" in h for h in evals)


@pytest.mark.slow  # ~35 s: a parent and two child interpreters each import torch + transformers
def test_ddp2_runs_two_gloo_processes_and_only_rank0_writes(train):
    run = train(*SFT, "hardware=cpu_ddp2", *EVAL)
    _check_two_ranks_one_writer(run, "MULTI_CPU")
    _check_eval_during_training(run)


@pytest.mark.slow  # ~40 s: torchrun, 2 processes under DeepSpeed (its op compiled on the first run: 1-3 min)
def test_deepspeed_zero2_on_cpu(train):
    # The first run ever JIT-compiles DeepSpeed's CPU comm op (1-3 min); it is cached in
    # ~/.cache/reinforce_cot/torch_extensions (TORCH_EXTENSIONS_DIR), so later runs take ~1 min.
    run = train(*SFT, "hardware=cpu_zero2", timeout=900)
    _check_two_ranks_one_writer(run, "DEEPSPEED")
    stage = OmegaConf.load(run.dir / "backup/stages/01_sft.yaml")  # provenance: the DeepSpeed settings themselves
    assert stage.algo.args.deepspeed.zero_optimization.stage == 2 and stage.deepspeed.name == "zero2"


def test_presets_set_processes_deepspeed_and_vllm():
    ddp, z2 = compose_cfg("recipe=single", "hardware=cpu_ddp2"), compose_cfg("recipe=single", "hardware=cpu_zero2")
    assert ddp.hardware.num_processes == z2.hardware.num_processes == 2
    assert ddp.algo.args.deepspeed is None and z2.algo.args.deepspeed.zero_optimization.stage == 2
    for hw, stage in [("2xa100", 2), ("8xh100", 3), ("slurm_2node_8gpu", 3)]:
        cfg = compose_cfg("recipe=single", f"hardware={hw}", "algo=rloo")
        assert cfg.algo.args.deepspeed.zero_optimization.stage == stage and cfg.deepspeed.name == f"zero{stage}"
        assert cfg.algo.args.use_vllm is True and cfg.algo.args.vllm_mode == "colocate"
    chosen = compose_cfg(
        "recipe=single", "hardware=2xa100", "deepspeed=zero3_offload"
    ).algo.args  # the command line beats the preset
    assert hardware.zero(chosen) == (3, True, False)  # what the memory estimate and the qlora rule read
    assert (
        compose_cfg("recipe=single", "hardware=1xa100", "algo=sft").algo.args.get("use_vllm") is None
    )  # SFTConfig has none
    assert compose_cfg("recipe=single", "hardware=cpu", "algo=grpo").algo.args.use_vllm is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo=grpo", "hardware.vllm.use_vllm=true"], "sets use_vllm=true but vllm is not installed; pip install"),
        (
            ["algo=grpo", "peft=qlora", "hardware.vllm.use_vllm=true"],
            "peft=qlora with algo.args.use_vllm=true: TRL 1.16 pushes the 4-bit weights to vLLM without their",
        ),
        (
            ["algo=rloo", "hardware.vllm.use_vllm=true", "hardware.vllm.vllm_mode=remote"],
            "vllm_mode=remote: use colocate",
        ),
        (["hardware=1xa100"], "hardware=1xa100 trains on CUDA GPUs but none is visible here"),
        (
            ["algo=sft", "hardware=cpu_zero2", "algo.args.deepspeed=/nope/ds.json"],
            "algo.args.deepspeed=/nope/ds.json: no such file",
        ),
    ],
)
def test_bad_hardware_settings_fail_at_validation(overrides, message):
    if torch.cuda.is_available() and "hardware=1xa100" in overrides:
        pytest.skip("CUDA present")
    try:
        import vllm  # noqa: F401

        if "not installed" in message or "remote" in message:
            pytest.skip("vllm installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        config.validate(compose_cfg("recipe=single", *overrides))


@pytest.mark.slow  # ~65 s: torchrun, 2 processes, ZeRO-3 + LoRA, evaluation during training and after
def test_deepspeed_zero3_with_lora_merges_and_evaluates_on_rank0(train):
    # Regression: under ZeRO-3, from_pretrained partitions every new model across ranks (a collective),
    # so rank 0 loading the base to merge the adapter, or a model to evaluate, hung while rank 1 waited
    # at the barrier (hardware.local_loading lifts that for rank-0-only work).
    run = train(
        *SFT,
        "hardware=cpu_zero2",
        "peft=lora",
        "deepspeed=zero3",
        *EVAL,  # ZeRO-3: generate is a collective (synced_gpus) over parameters gathered for it
        timeout=600,
    )
    assert run.returncode == 0, run
    _check_eval_during_training(run)
    # the TrainingArguments (and their DeepSpeed config) exist before the model loads: each rank loads its shard
    assert (
        "[01_sft] model loaded partitioned (ZeRO-3 zero.Init): this rank holds 1/2 of it"
        in (run.dir / "output.log").read_text()
    )
    res = run.result("01_sft.json")
    assert res["ranks"] == [0, 1] and res["distributed_type"] == "DEEPSPEED"
    assert (run.dir / "ckpt/01_sft/merged/model.safetensors").is_file()
    assert (run.dir / "ckpt/01_sft/final/adapter_model.safetensors").is_file()
    assert run.result("summary.json")["rows"][0]["stage"] == "01_sft"
