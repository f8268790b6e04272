"""benchmarks/gpu_check.py (`make gpu-check`) on the CPU with tiny sizes, so that the GPU check cannot rot
between the rare runs on a GPU; and the memory line it reads on a GPU, as hardware.stage_scope writes it."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reinforce_cot import hardware

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_memory_line_gpu_check_reads_is_the_one_stage_scope_writes(monkeypatch, caplog):
    # CUDA mocked at the boundary: 12 MiB left after the stage, 3 GiB at its peak
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 12 << 20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 20 << 20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 << 30)
    with caplog.at_level(logging.INFO, logger="reinforce_cot.hardware"), hardware.stage_scope("02_rl"):
        pass
    found = _gpu_check_module().MEMORY_RE.findall(caplog.text)
    assert found == [("02_rl", "12", "20", "3072")]


@pytest.mark.slow  # ~1 min on 2 idle cores (3 min at load 14): train.py twice and the plain TRL script once
def test_gpu_check_runs_on_the_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads((tmp_path / "report.json").read_text())["checks"]
    assert {n: c["status"] for n, c in checks.items()} == {
        "recipe": "ok", "lora": "skipped", "zero2": "skipped", "zero3": "skipped", "qlora": "skipped", "bench": "ok",
    }  # fmt: skip
    assert checks["zero3"]["why"] == "covered on CPU by tests/test_multiprocess.py"
    assert checks["recipe"]["generation_on"] == "cpu" and checks["recipe"]["bf16"] is False
    bench = checks["bench"]
    assert bench["grpo_steps"] == 6 and bench["s_per_step"] > 0 and bench["completion_tokens_per_s"] > 0
    assert bench["plain_trl_s_per_step"] > 0 and bench["overhead_ratio"] > 0
    assert "| bench | ok |" in (tmp_path / "report.md").read_text()
