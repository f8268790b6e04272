"""GPU-path rules checked on CPU: memory per GPU, fp32 master weights, qlora, the launcher's CUDA context.

The GPU side is pretended at validation only (tests/pretend_gpu.py: torch.cuda reports GPUs, a local hub
cache holds the real Qwen2.5-VL configs); nothing runs on a GPU. fp32 master weights are checked by a
real optimizer step on the CPU under bf16 autocast.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from hydra import compose
from hydra.utils import instantiate

from reinforce_cot import adapters, config, data, hardware, memory, models, parts, recipes, training
from reinforce_cot.errors import ConfigError
from tests import pretend_gpu
from tests.helpers import compose_cfg

GiB = 1024**3


@pytest.fixture(autouse=True)
def _forget_pretended_gpus():
    yield
    pretend_gpu.forget()


@pytest.fixture
def gpu_box(monkeypatch, tmp_path, hydra_ctx):
    pretend_gpu.use_hub(monkeypatch, tmp_path / "hub")
    pretend_gpu.gpus(monkeypatch, 8)


def _validate_all(overrides, run_dir):
    """Every stage of the run, validated as recipes.run does (needs hydra_ctx: gpu_box opens it)."""
    stages = recipes.compose_stages(compose(config_name="train", overrides=list(overrides)), list(overrides), run_dir)
    for scfg in stages.values():
        config.validate(scfg)
    return stages


def qwen2_5_vl_params(hidden, layers, inter, heads, kv_heads, vocab, tied, out_hidden) -> int:
    """Qwen2.5-VL's parameter count by hand, from its config.json (vision tower: depth 32, width 1280)."""
    head_dim = hidden // heads
    attn = hidden * hidden + hidden + 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim) + hidden * hidden
    layer = attn + 3 * hidden * inter + 2 * hidden
    text = vocab * hidden * (1 if tied else 2) + layers * layer + hidden
    v, vi = 1280, 3420
    block = 2 * v + (v * 3 * v + 3 * v) + (v * v + v) + 2 * (v * vi + vi) + (vi * v + v)
    merger = v + (4 * v * 4 * v + 4 * v) + (4 * v * out_hidden + out_hidden)
    return text + 3 * 2 * 14 * 14 * v + 32 * block + merger


HAND = {
    "qwen2_5_vl_3b": qwen2_5_vl_params(2048, 36, 11008, 16, 2, 151936, True, 2048),
    "qwen2_5_vl_7b": qwen2_5_vl_params(3584, 28, 18944, 28, 4, 152064, False, 3584),
}


def test_parameter_counts_from_the_hub_config_match_the_hand_count_and_the_published_size(gpu_box):
    for name, published in (("qwen2_5_vl_3b", 3.75e9), ("qwen2_5_vl_7b", 8.29e9)):
        model = parts.skeleton(compose_cfg(f"model={name}").model)
        n = sum(p.numel() for p in model.parameters())
        assert n == HAND[name]
        assert abs(n - published) < 0.005e9


def test_7b_full_fine_tuning_on_2xa100_is_refused_with_the_fixes_that_fit(gpu_box, tmp_path):
    # by hand, per GPU (ZeRO-2, 2 processes): bf16 weights 2P, bf16 grads 2P/2, fp32 master + Adam 12P/2 = 9P,
    # then vLLM 0.3 x 80 GiB and the 4 GiB reserve
    p = HAND["qwen2_5_vl_7b"]
    total = (9 * p + 0.3 * 80 * GiB + 4 * GiB) / GiB
    assert round(total, 1) == 97.5
    with pytest.raises(ConfigError) as e:
        _validate_all(["algo=grpo", "hardware=2xa100", "model=qwen2_5_vl_7b"], tmp_path)
    msg = str(e.value)
    assert f"needs at least {total:.1f} GiB per GPU of 80.0" in msg
    assert f"weights {2 * p / GiB:.1f} + grads {p / GiB:.1f} + optimizer {6 * p / GiB:.1f} + vLLM 24.0" in msg
    assert "fits with peft=lora or deepspeed=zero3_offload" in msg
    assert "\n" not in msg


def test_the_mission_command_validates_every_stage_within_memory(gpu_box, tmp_path, caplog):
    caplog.set_level("INFO", logger="reinforce_cot.memory")
    stages = _validate_all(["algo=gspo", "hardware=2xa100", "model=qwen2_5_vl_3b"], tmp_path)
    assert list(stages) == ["01_sft", "02_rl", "03_evaluate"]
    rl = stages["02_rl"]
    est = memory.estimate(rl, parts.skeleton(rl.model), models.model_config(rl.model))
    p = HAND["qwen2_5_vl_3b"]
    assert (est.weights, est.grads, est.optimizer) == (2 * p, 2 * p / 2, 12 * p / 2)
    assert est.vllm_share == 0.3 * 80 * GiB and est.max_len == 4096  # the preset's vllm_max_model_length
    assert est.kv_per_token == 2 * 36 * 2 * 128 * 2  # K and V x layers x KV heads x head dim x bf16
    assert est.total <= 80 * GiB
    assert "memory estimate (lower bound): 59.5 GiB per GPU of 80.0" in caplog.text


def test_vllm_kv_cache_for_the_full_context_that_cannot_fit_names_the_longest_that_does(gpu_box, tmp_path):
    # 7B, vLLM at 0.2 x 80 = 16 GiB: bf16 weights 2P = 15.4 GiB leave 0.55 GiB for KV at 57344 B per token
    p = HAND["qwen2_5_vl_7b"]
    fits = int((0.2 * 80 * GiB - 2 * p) // (2 * 28 * 4 * 128 * 2))
    over = ["hardware.vllm.vllm_gpu_memory_utilization=0.2", "hardware.vllm.vllm_max_model_length=null"]
    with pytest.raises(
        ConfigError, match=rf"the model's 128000.*set algo.args.vllm_max_model_length to at most {fits} "
    ):
        _validate_all(["recipe=single", "algo=grpo", "hardware=8xh100", "model=qwen2_5_vl_7b", *over], tmp_path)


def test_a_hub_model_missing_offline_is_named_with_the_fix(gpu_box, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model.path=Qwen/Qwen2.5-VL-32B-Instruct: not in the local hub cache .*\(hf download Qwen/Qwen2.5-VL-32B",
    ):
        _validate_all(
            ["recipe=single", "hardware=8xh100", "model=qwen2_5_vl_7b", "model.path=Qwen/Qwen2.5-VL-32B-Instruct"],
            tmp_path,
        )


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (
            ["algo=gspo", "hardware=1xa100", "model=qwen2_5_vl_3b", "peft=lora"],
            None,
        ),  # was: steps_per_generation 4 <= GAS 4
        (["algo=grpo", "hardware=1xa100", "model=qwen2_5_vl_7b", "peft=qlora", "hardware.vllm.use_vllm=false"], None),
        (["algo=grpo", "hardware=1xa100", "model=qwen2_5_vl_7b", "peft=qlora"], "trl#4973"),
        (
            ["algo=grpo", "hardware=8xh100", "model=qwen2_5_vl_7b", "peft=qlora", "hardware.vllm.use_vllm=false"],
            "ZeRO-3 cannot partition",
        ),
        (
            ["algo=grpo", "hardware=1xa100", "model=qwen2_5_vl_3b"],
            "does not fit.*fits with peft=lora",
        ),  # fp32 masters: 16 B/param
    ],
)
def test_gpu_preset_rules(gpu_box, tmp_path, overrides, error):
    if error is None:
        _validate_all(["recipe=single", *overrides], tmp_path)
    else:
        with pytest.raises(ConfigError, match=error):
            _validate_all(["recipe=single", *overrides], tmp_path)


def test_no_gpu_error_names_the_cuda_build_and_the_driver(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        hardware.validate(compose_cfg("hardware=1xa100"))
    assert f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none'}" in str(e.value)
    assert "NVIDIA driver" in str(e.value)


def test_the_launching_parent_validates_without_a_cuda_context(gpu_box, tmp_path, monkeypatch):
    """R16: TrainingArguments pick cuda:0 with torch.cuda.set_device when built outside torchrun; the parent
    that only launches and waits must not, or it holds ~0.5 GB of GPU 0 for the whole run."""
    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(subprocess, "run", lambda cmd, env=None: subprocess.CompletedProcess(cmd, 0))
    overrides = ["algo=gspo", "hardware=2xa100", "model=qwen2_5_vl_3b"]
    cfg = compose(config_name="train", overrides=overrides)  # gpu_box opened hydra_ctx: launch composes the stages
    assert hardware.needs_launch(cfg)
    recipes.prepare(cfg, tmp_path / "run", overrides)  # what main does before it launches
    assert hardware.launch(cfg, tmp_path / "run", overrides) == 0
    assert devices == []
    _ = instantiate(cfg.algo.args, output_dir=str(tmp_path / "x")).world_size  # the same, outside the context
    assert devices, "TrainingArguments no longer select a device: this test guards nothing"


@pytest.mark.slow  # two 1-step trainings: ~5 s
def test_mixed_precision_full_fine_tuning_keeps_fp32_masters(tmp_path):
    """R6: one AdamW step at lr 1e-6 under the 1xa100 settings (bf16 autocast, no DeepSpeed, no peft) moves
    nearly every weight; the same step on bf16 weights rounds ~98% of the updates away."""
    cfg = compose_cfg(
        "recipe=single",
        "algo=sft",
        "reward=none",
        "hardware=1xa100",
        "model.dtype=bfloat16",  # the hub models' dtype; the tiny model is built in it
        "+algo.args.use_cpu=true",  # bf16 autocast on the CPU: the same mixed precision, no GPU here
        "algo.args.gradient_checkpointing=false",
        "algo.args.learning_rate=1e-6",
        "algo.args.lr_scheduler_type=constant",
        "algo.args.warmup_steps=0",
        "algo.args.max_steps=1",
        "algo.args.per_device_train_batch_size=8",  # one step of 8 rows: the rounding, not the data, is under test
        "algo.args.gradient_accumulation_steps=1",
        "algo.args.save_strategy=no",
        "algo.args.report_to=[]",
        "data.train.n=8",
    )
    assert adapters.load_dtype(cfg) == "float32"
    assert (
        adapters.load_dtype(compose_cfg("hardware=2xa100", "model=qwen2_5_vl_3b")) == "bfloat16"
    )  # DeepSpeed's own masters
    assert adapters.load_dtype(compose_cfg("hardware=1xa100", "model=qwen2_5_vl_3b", "peft=lora")) == "bfloat16"
    ds = training.build_dataset(cfg, data.load_splits(cfg.data)["train"])
    path = models.resolve_path(cfg.model)
    proc = models.load_processing_class(path, cfg.model)
    changed = {}
    for dtype in (adapters.load_dtype(cfg), "bfloat16"):
        model = models.load_model(path, cfg.model, dtype=dtype)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = instantiate(cfg.algo.args, output_dir=str(tmp_path / dtype))
        assert args.bf16
        instantiate(cfg.algo.trainer)(model=model, args=args, train_dataset=ds, processing_class=proc).train()
        moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
        changed[dtype] = moved / sum(p.numel() for p in before.values())
    assert changed["float32"] > 0.99  # measured 0.99999
    assert changed["bfloat16"] < 0.05  # measured 0.025: the update is below half a bf16 ulp for the rest
