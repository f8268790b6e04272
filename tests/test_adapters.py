"""LoRA through the real CLI, TRL and peft: adapter + automatic merge, merged logits == adapter logits,
the standalone merge command, weight averaging, the merge stage, and the errors for bad adapter input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reinforce_cot import adapters, config, data, merge, models, parts, tiny
from reinforce_cot.errors import ConfigError
from tests.helpers import ROOT, assert_every_tensor_moved, compose_cfg, run_in_process, run_train

# fp32 on CPU: the merged W + s*B@A and the adapter's x@W + s*(x@A)@B differ only by rounding (measured
# max |diff| 3e-7 on logits of size ~1, while the adapter moves logits by ~0.3 against the base)
LOGIT_ATOL = 1e-5


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One LoRA SFT stage through the real CLI (~10 s), shared by the tests of its outputs."""
    run = run_train(
        tmp_path_factory.mktemp("lora"), "recipe=single", "algo=sft", "reward=none", "peft=lora", "debug=smoke"
    )
    assert run.returncode == 0, run
    return run


def _inputs(processor):
    row = data.shapes_rows(1, seed=5)[0]
    msgs = data.prompt_messages(row, data.DEFAULT_TEMPLATE, None, True) + [
        {"role": "assistant", "content": data.target(row)}
    ]
    text = processor.apply_chat_template(msgs, tokenize=False)
    return processor(text=[text], images=[row["image"]], return_tensors="pt")


@pytest.mark.slow  # lora_run: ~10 s
@pytest.mark.xdist_group("lora_run")  # one worker builds the module fixture
def test_lora_stage_writes_adapter_and_merged_model(lora_run):
    from peft import PeftModel

    ckpt = lora_run.dir / "ckpt" / "01_sft"
    final, merged = ckpt / "final", ckpt / "merged"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # final/ is the adapter only
    assert (merged / "model.safetensors").is_file() and (merged / "processor_config.json").is_file()
    assert lora_run.result("01_sft.json")["merged"] == str(merged)
    assert models.checkpoint_folder(str(ckpt)) == merged  # later stages and evaluation start from merged/
    assert f"loaded Qwen2_5_VLForConditionalGeneration from {merged}" in (lora_run.dir / "output.log").read_text()

    adapter_keys = load_file(final / "adapter_model.safetensors").keys()
    assert adapter_keys and all("language_model" in k for k in adapter_keys)  # vision tower left out by default

    base_dir = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    base, after = load_file(Path(base_dir) / "model.safetensors"), load_file(merged / "model.safetensors")
    assert all(torch.equal(base[k], after[k]) for k in base if k.startswith("visual."))
    assert any(not torch.equal(base[k], after[k]) for k in base if "self_attn.q_proj.weight" in k)
    # module paths (model.language_model.layers.*) as saved: transformers writes Qwen2.5-VL's hub key names
    adapted = {
        k.split(".lora_")[0].removeprefix("base_model.model.").replace("model.language_model.", "model.")
        for k in adapter_keys
    }
    assert_every_tensor_moved(base, after, keys=[f"{m}.weight" for m in adapted])  # every adapted module trained

    mcfg = compose_cfg("recipe=single").model
    processor = models.load_processing_class(str(merged), mcfg)
    inputs = _inputs(processor)
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(merge._load(base_dir, "float32"), str(final)).eval()(**inputs).logits
        merged_logits = models.load_model(str(merged), mcfg).eval()(**inputs).logits
        base_logits = merge._load(base_dir, "float32").eval()(**inputs).logits
    assert (with_adapter - base_logits).abs().max() > 100 * LOGIT_ATOL  # the adapter did change the model
    torch.testing.assert_close(merged_logits, with_adapter, atol=LOGIT_ATOL, rtol=0)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "reinforce_cot.merge", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow  # lora_run, then `python -m reinforce_cot.merge`: ~15 s
@pytest.mark.xdist_group("lora_run")  # one worker builds the module fixture
def test_standalone_merge_command_matches_the_stage_merge(lora_run, tmp_path):
    final = lora_run.dir / "ckpt" / "01_sft" / "final"
    proc = _cli(f"ckpt={final}", f"out={tmp_path / 'm'}")  # the real `python -m` entry, once
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "m")
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(final.parent / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_command_errors(tmp_path, capsys):
    assert merge.main([f"ckpt={tmp_path}"]) == 2
    assert f"error: ckpt={tmp_path}: no adapter_config.json there" in capsys.readouterr().err
    assert merge.main(["mode=average", f"ckpts=[{tmp_path},{tmp_path}]"]) == 2
    assert "error: out is required for mode=average" in capsys.readouterr().err
    assert merge.main(["ckpt=x", "weight=[1]"]) == 2
    assert "error: weight: unknown key" in capsys.readouterr().err


@pytest.mark.slow  # lora_run
@pytest.mark.xdist_group("lora_run")  # one worker builds the module fixture
def test_weight_averaging_with_weights(lora_run, tmp_path):
    start = tiny.build(compose_cfg("recipe=single").model)  # the same architecture before training
    merged = lora_run.dir / "ckpt" / "01_sft" / "merged"
    out = tmp_path / "avg"
    assert merge.main(["mode=average", f"ckpts=[{start},{merged}]", "weights=[1,3]", f"out={out}"]) == 0
    a, b, avg = (load_file(p / "model.safetensors") for p in (start, merged, out))
    for k in avg:
        torch.testing.assert_close(avg[k], 0.25 * a[k] + 0.75 * b[k], atol=1e-6, rtol=0)  # weights normalised
    assert json.loads((out / "merge.json").read_text())["weights"] == [0.25, 0.75]
    assert (out / "processor_config.json").is_file()


def test_averaging_different_architectures_is_an_error(tmp_path):
    vlm, lm = (
        tiny.build(compose_cfg("recipe=single").model),
        tiny.build(compose_cfg("recipe=single", "model=tiny_lm").model),
    )
    with pytest.raises(ConfigError, match="have different architectures .*Qwen2ForCausalLM"):
        merge.average([vlm, lm], None, tmp_path / "x")
    with pytest.raises(ConfigError, match=r"merge.weights=\[1.0\]: give one non-negative weight per checkpoint"):
        merge.average([vlm, vlm], [1.0], tmp_path / "x")
    with pytest.raises(ConfigError, match="averaging needs 2 or more"):
        merge.average([vlm], None, tmp_path / "x")


def test_vision_tower_is_adapted_on_request():
    cfg = compose_cfg("recipe=single", "peft=lora", "peft.target_parts=[language_model,vision]")
    peft_cfg, hits = adapters.lora_config(cfg, parts.skeleton(cfg.model))
    assert any(h.startswith("model.visual.blocks.") and h.endswith(".attn.qkv") for h in hits)
    assert not any("merger" in h or h == "lm_head" for h in hits)  # projector and output head left out
    only_lm = adapters.lora_config(compose_cfg("recipe=single", "peft=lora"), parts.skeleton(cfg.model))[1]
    assert len(only_lm) == 14 and all(h.startswith("model.language_model.layers.") for h in only_lm)  # 2 layers x 7


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["peft=lora", "peft.config.target_modules=[qq_proj]"],
            r"peft.config.target_modules=\['qq_proj'\] matches no module",
        ),
        (["peft=lora", "peft.target_parts=[eyes]"], r"peft.target_parts=\['eyes'\]: unknown part 'eyes'"),
        (
            ["peft=lora", "model=tiny_lm", "data=arithmetic", "peft.target_parts=[vision]"],
            "model=tiny_lm has no 'vision' part",
        ),
        (["peft=qlora"], "peft=qlora: 4-bit QLoRA .* needs a CUDA GPU and this machine has none; use peft=lora"),
    ],
)
def test_bad_adapter_settings_fail_at_validation(overrides, message):
    if "peft=qlora" in overrides and torch.cuda.is_available():
        pytest.skip("CUDA present: qlora is allowed here")
    with pytest.raises(ConfigError, match=message):
        config.validate(compose_cfg("recipe=single", *overrides))


@pytest.mark.slow  # SFT, RL, merge and evaluation stages, in process: ~10 s
def test_merge_stage_averages_sft_and_rl(tmp_path):
    run = run_in_process(tmp_path, "recipe=sft_rl_merge", "debug=smoke", "merge.weights=[0.3,0.7]")
    ck = run.dir / "ckpt"
    sft, rl, avg = (
        load_file(ck / s / sub / "model.safetensors")
        for s, sub in [("01_sft", "final"), ("02_rl", "final"), ("03_merge", "merged")]
    )
    for k in avg:
        torch.testing.assert_close(avg[k], 0.3 * sft[k] + 0.7 * rl[k], atol=1e-6, rtol=0)
    assert run.result("03_merge.json")["weights"] == [0.3, 0.7]
    assert [r["stage"] for r in run.result("summary.json")["rows"]] == ["01_sft", "02_rl", "03_merge"]
