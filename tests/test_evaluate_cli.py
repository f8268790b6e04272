"""`python -m reinforce_cot.evaluate`: bad input ends in one line naming the key and the fix (exit 2, no
weights loaded), and several run dirs give one table and one plot, each run evaluated with its own model
and data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from reinforce_cot import tiny
from tests.helpers import compose_cfg, free_port


def evaluate(tmp_path: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "reinforce_cot.evaluate", f"output_root={tmp_path}/out", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env={**os.environ})


def _one_line_error(proc, needle: str, code: int = 2) -> None:
    assert proc.returncode == code, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err[-1].startswith("error: ") and needle in err[-1], proc.stderr[-3000:]
    assert "loaded Qwen" not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def random_vlm() -> Path:
    return tiny.build(compose_cfg().model)


def test_ckpt_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(evaluate(tmp_path, f"ckpt={tmp_path}/empty"), f"ckpt={tmp_path}/empty: no weights (*.safetensors)")


def test_ckpt_is_required(tmp_path):
    _one_line_error(evaluate(tmp_path), "ckpt is required; add ckpt=<checkpoint folder or run dir>")


def test_dataset_without_an_answer_column(tmp_path, random_vlm):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "How many?", "label": "2"}]  # the gold answer is under another name
    (tmp_path / "t.jsonl").write_text("\n".join(map(json.dumps, rows)))
    data = ["data=jsonl", f"data.train.path={tmp_path}/t.jsonl", f"data.test.path={tmp_path}/t.jsonl"]
    proc = evaluate(tmp_path, f"ckpt={random_vlm}", *data, f"data.image_folder={tmp_path}")
    _one_line_error(proc, "t.jsonl:1: no 'answer' field; every row needs a answer")


def test_server_url_that_does_not_answer(tmp_path, random_vlm):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    proc = evaluate(tmp_path, f"ckpt={random_vlm}", "generation=openai", f"generation.base_url={url}")
    # a server that does not answer is not bad input: exit code 1 (reinforce_cot.errors), still one line
    _one_line_error(proc, f"generation.base_url={url}: no server answers there; start one", code=1)


@pytest.mark.slow  # the two checkpoint fixtures, then two evaluations: ~10 s
def test_comparison_of_run_dirs_is_one_table_and_one_plot(tmp_path, sft_checkpoint, sft_text_checkpoint):
    runs = [sft_checkpoint.parents[2], sft_text_checkpoint.parents[2]]  # a VLM on shapes, an LM on arithmetic
    small = ["eval.max_prompts=8", "eval.k=2", "eval.consistency=false"]
    proc = evaluate(tmp_path, f"ckpt=[{runs[0]},{runs[1]}]", *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and all(f"{r.name}/01_sft" in proc.stdout for r in runs)  # header + one row each
    out = next((tmp_path / "out").glob("*_evaluate")) / "result"
    compare = json.loads((out / "compare.json").read_text())
    assert [r["model"] for r in compare["rows"]] == [f"{r.name}/01_sft" for r in runs]
    with Image.open(out / "compare.png") as im:
        assert im.format == "PNG"
    # each run was evaluated with its own model and data (from its backup/config.yaml)
    for run, data in zip(runs, ["shapes_count", "arithmetic"]):
        ev = json.loads((run / "result" / f"eval_01_sft_{data}.json").read_text())
        assert ev["config"]["data"]["name"] == data and ev["metrics"]["n_prompts"] == 8
        assert ev["config"]["model"]["path"] == str(run / "ckpt" / "01_sft" / "final")
