"""RLOO and DPO through the real recipe code and TRL (in process), on the tiny VLM (images) and the tiny text
model; preference pairs and the errors for data that cannot feed DPO."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from reinforce_cot import data, preference
from reinforce_cot.errors import ConfigError
from tests.helpers import CONF, assert_every_tensor_moved, changed_tensors, run_in_process

MODELS = {
    "tiny_vlm": {"rl": [], "preference": ["data=shapes_count_pref"]},
    "tiny_lm": {"rl": ["model=tiny_lm", "data=arithmetic"], "preference": ["model=tiny_lm", "data=arithmetic_pref"]},
}


@pytest.mark.slow  # ~20 s each: 4 RLOO steps and an evaluation
@pytest.mark.parametrize("model", list(MODELS))
def test_rloo_smoke(tmp_path, sft_checkpoint, sft_text_checkpoint, model):
    start = sft_checkpoint if model == "tiny_vlm" else sft_text_checkpoint
    run = run_in_process(
        tmp_path, "recipe=single", "algo=rloo", "debug=smoke", f"model.init_from={start}", *MODELS[model]["rl"]
    )
    final = run.dir / "ckpt" / "01_rloo" / "final"
    assert_every_tensor_moved(start, final)
    history = run.result("01_rloo.json")["log_history"]
    assert run.result("01_rloo.json")["global_step"] == 4
    logged = {k for h in history for k in h}
    assert {"rewards/accuracy/mean", "rewards/format/mean", "kl"} <= logged  # TRL's RLOO metrics, per component
    assert "RLOOTrainer" in (run.dir / "backup/stages/01_rloo.yaml").read_text()


@pytest.mark.slow  # ~20 s each: 4 DPO steps and an evaluation
@pytest.mark.parametrize("model", list(MODELS))
def test_dpo_smoke(tmp_path, caplog, sft_checkpoint, sft_text_checkpoint, model):
    start = sft_checkpoint if model == "tiny_vlm" else sft_text_checkpoint
    caplog.set_level("INFO")
    run = run_in_process(
        tmp_path, "recipe=single", "algo=dpo", "debug=smoke", f"model.init_from={start}", *MODELS[model]["preference"]
    )
    final = run.dir / "ckpt" / "01_dpo" / "final"
    assert_every_tensor_moved(start, final)  # on tiny_vlm: the images reached the model, the vision tower moved too
    if model == "tiny_vlm":
        assert any(k.startswith("visual.") for k in changed_tensors(start, final))
    history = run.result("01_dpo.json")["log_history"]
    margins = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    assert len(margins) == 4 and margins[0] == 0.0  # step 1: policy == reference (the SFT start)
    assert any(m != 0.0 for m in margins[1:])  # then the policy moves away from its reference
    assert caplog.text.count("dataset: 96 rows, columns ['prompt', 'chosen', 'rejected'") == 1


def test_dpo_on_data_without_pairs_fails_before_weights(tmp_path):
    with pytest.raises(ConfigError) as e:
        run_in_process(tmp_path, "recipe=single", "algo=dpo", "debug=smoke")
    assert "algo=dpo needs preference pairs but data=shapes_count rows have no chosen/rejected" in str(e.value)
    assert "data=shapes_count_pref" in str(e.value)
    assert not (tmp_path / "run").exists()  # found before any weights load or anything is written


def test_synthetic_pairs_differ_only_where_reasoning_goes_wrong():
    for row in preference.shapes_count_pairs(50, seed=3, targets=["red square"]):
        assert row["chosen"] == data.target(row)
        wrong = row["rejected"].split("<answer>")[1].split("</answer>")[0]
        assert wrong != row["answer"] and 1 <= int(wrong) <= 5
        assert row["rejected"].startswith("<think>I count the red squares: 1")
        assert row["rejected"].count(f"So there are {wrong}.") == 1
        assert ("I ignore" in row["rejected"]) == (row["distractors"] > 0)  # same chain shape
    for row in preference.arithmetic_pairs(50, seed=3):
        a, b = map(int, row["layout"].split("+"))
        wrong = int(row["rejected"].split("<answer>")[1].split("</answer>")[0])
        assert wrong != a + b and row["chosen"].endswith(f"<answer>{a + b}</answer>")


def _jsonl(tmp_path, recs):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return data.jsonl_rows(str(p), None, OmegaConf.load(CONF / "data" / "jsonl.yaml").fields)


def test_jsonl_pairs_load_and_format(tmp_path):
    chosen = [{"role": "assistant", "content": "<think>2 + 2 = 4</think><answer>4</answer>"}]
    rows = _jsonl(
        tmp_path,
        [
            {"question": "What is 2 + 2?", "answer": 4, "chosen": chosen, "rejected": "<answer>5</answer>"},
            {
                "question": "What is 1 + 1?",
                "answer": 2,
                "chosen": "<answer>2</answer>",
                "rejected": "<answer>3</answer>",
            },
        ],
    )
    preference.check_pairs(rows, "jsonl", "dpo")
    cfg = OmegaConf.create({"prompt_template": "{question}", "system_prompt": None})
    ds = data.format_split(rows, cfg, "preference")
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[0]["chosen"] == chosen and ds[0]["rejected"] == [{"role": "assistant", "content": "<answer>5</answer>"}]
    assert ds[1]["prompt"] == [{"role": "user", "content": "What is 1 + 1?"}]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"rejected": ""}, "row pairs-1 has an empty 'rejected'"),
        ({"chosen": [{"role": "assistant", "content": " "}]}, "row pairs-1 has an empty 'chosen'"),
        ({"rejected": "<answer>4</answer>"}, "row pairs-1 has chosen == rejected"),
    ],
)
def test_bad_pairs_are_config_errors(tmp_path, bad, message):
    rec = {"question": "What is 2 + 2?", "answer": 4, "chosen": "<answer>4</answer>", "rejected": "<answer>5</answer>"}
    rows = _jsonl(tmp_path, [{**rec, **bad}])
    with pytest.raises(ConfigError, match=message):
        preference.check_pairs(rows, "jsonl", "dpo")
