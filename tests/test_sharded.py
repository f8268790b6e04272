"""Generation on each rank's device (reinforce_cot.sharded, generation.load_here), the thread policy, and
decoding that is exactly what is asked (no checkpoint generation_config.json leaking into evaluation).

No GPU here: device placement is checked with torch.cuda.is_available mocked (the boundary), and the
sharing of prompts between ranks with two real gloo processes under torchrun."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from reinforce_cot import data, generation, hardware, images, models, tiny
from tests.helpers import ROOT, compose_cfg, free_port


def test_generation_model_goes_to_this_ranks_gpu(monkeypatch):
    cfg = compose_cfg("generation.max_new_tokens=4")
    path = str(tiny.build(cfg.model))
    placed = []
    real_load = models.load_model

    def load_on_cpu(path, model_cfg, **kwargs):  # records where it was asked to go; loads on the CPU (no GPU here)
        placed.append(kwargs)
        return real_load(path, model_cfg)

    monkeypatch.setattr(models, "load_model", load_on_cpu)
    with generation.load(cfg, path):
        pass
    assert placed == [{}] and hardware.device() == torch.device("cpu")  # no CUDA: the CPU, as before

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hardware.device() == torch.device("cuda", 1)
    with generation.load(cfg, path) as backend:
        assert placed[-1] == {"device_map": {"": 1}}  # this rank's GPU, loaded straight there
    assert backend.model is None  # closing drops the model (and empties the CUDA cache)


@pytest.mark.parametrize(
    "nvidia, env, expected",
    [
        (False, {}, "1"),  # CPU only: one thread (DESIGN.md: 0.06 s -> 5 s per step with 2 threads and a neighbour)
        (True, {}, None),  # a GPU: not forced to 1 (torch's choice; hardware.launch shares the cores out)
        (True, {"CUDA_VISIBLE_DEVICES": ""}, "1"),  # GPUs hidden: a CPU run
        (True, {"OMP_NUM_THREADS": "3"}, "3"),  # the user's setting always wins
        (False, {"OMP_NUM_THREADS": "3"}, "3"),
    ],
)
def test_thread_policy(nvidia, env, expected):
    # A fresh interpreter in which /dev/nvidia0 exists or not (glob patched; the package imports no torch first).
    code = (
        f"import glob, os; glob.glob = lambda p: ['/dev/nvidia0'] if {nvidia} and 'nvidia' in p else []; "
        "import reinforce_cot; print(os.environ.get('OMP_NUM_THREADS'))"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


def test_threads_per_process_on_gpu_machines():
    from reinforce_cot.hardware import default_threads

    cores = len(os.sched_getaffinity(0))
    assert default_threads(4, gpu=False) == 1
    assert default_threads(1, gpu=True) == cores
    assert default_threads(2 * cores, gpu=True) == 1  # never 0


@pytest.mark.slow  # the sft_checkpoint fixture; the generations themselves take ~2 s
def test_greedy_ignores_a_checkpoints_generation_defaults(sft_checkpoint, tmp_path):
    """A checkpoint whose generation_config.json asks for a repetition penalty, an n-gram ban and top-k/top-p
    (as Qwen2.5-VL-Instruct's does) scores exactly like the same weights without it, greedy and sampled."""
    polluted = tmp_path / "polluted"
    shutil.copytree(sft_checkpoint, polluted)
    gc_file = polluted / "generation_config.json"
    defaults = json.loads(gc_file.read_text())
    gc_file.write_text(
        json.dumps(
            defaults
            | {"repetition_penalty": 1.8, "no_repeat_ngram_size": 2, "top_k": 1, "top_p": 0.1, "do_sample": True}
        )
    )
    cfg = compose_cfg("generation.max_new_tokens=24", "generation.batch_size=8")
    rows = images.capped(data.from_rows(data.shapes_rows(8, seed=7, image_size=64)), None)  # the row contract
    out = {}
    for name, path in (("clean", sft_checkpoint), ("polluted", polluted)):
        with generation.load(cfg, str(path)) as backend:
            out[name] = (backend.generate(rows, 1, 0.0), backend.generate(rows, 2, 1.0))
            if name == "polluted":  # the defaults do bite when transformers is left to apply them
                enc = backend.processing_class(
                    text=[backend.prompt(r) for r in rows],
                    images=[r["images"][0] for r in rows],
                    padding=True,
                    return_tensors="pt",
                )
                ids = backend.model.generate(**enc, max_new_tokens=24, do_sample=False)
                inherited = backend.tokenizer.batch_decode(
                    ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
    assert out["polluted"] == out["clean"]
    assert inherited != [t[0] for t in out["clean"][0]]


@pytest.mark.slow  # ~25 s: two interpreters import torch + transformers; the evaluation itself is a second
def test_two_processes_share_the_evaluate_stage_and_match_one_process(sft_checkpoint, tmp_path):
    """The sft_checkpoint run's own evaluate stage ran in 1 process; its copy, resumed under torchrun with 2
    gloo processes, re-runs that stage with rank 1 generating every other batch. Same generations, same
    metrics, and each rank generated its half."""
    run = sft_checkpoint.parents[2]
    copy = tmp_path / "run"
    shutil.copytree(run / "backup", copy / "backup")
    shutil.copytree(run / "ckpt" / "01_sft" / "final", copy / "ckpt" / "01_sft" / "final")
    (copy / "result").mkdir()
    shutil.copy(run / "result" / "01_sft.json", copy / "result")  # the train stage is done; evaluate is not
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "train.py"), f"resume={copy}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = json.loads((run / "result" / "eval_01_sft.json").read_text())["metrics"]
    two = json.loads((copy / "result" / "eval_01_sft.json").read_text())["metrics"]
    for key in ("greedy_accuracy", "sampled_accuracy", "pass@2", "maj@2", "accuracy_answer_only", "format_rate",
                "mean_completion_tokens", "accuracy_by_difficulty", "reasoning", "samples"):  # fmt: skip
        assert two[key] == one[key], key
    for name in ("greedy", "sampled_k2", "answer_only"):
        recs = [json.loads(line) for line in (copy / "result/eval_01_sft/generations" / f"{name}.jsonl").open()]
        before = [json.loads(line) for line in (run / "result/eval_01_sft/generations" / f"{name}.jsonl").open()]
        assert {r["id"]: r["completions"] for r in recs} == {r["id"]: r["completions"] for r in before}
        assert collections.Counter(r["rank"] for r in recs) == {0: 8, 1: 8}  # 16 prompts, batches alternate
    assert "generated 8 prompts x 1 for rank 0" in proc.stdout + proc.stderr  # logged by rank 1


def test_vllm_backend_ignores_checkpoint_defaults_and_stops_its_engine(monkeypatch):
    """vLLM cannot run here: a stand-in `vllm` module records what the backend asks of it."""
    import types

    made: list = []

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.stopped = kwargs, False
            self.llm_engine = types.SimpleNamespace(engine_core=self)
            made.append(self)

        def get_tokenizer(self):
            return None

        def shutdown(self):
            self.stopped = True

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=dict))
    cfg = compose_cfg("generation=vllm")
    with generation.VLLMBackend("/some/model", data_cfg=cfg.data) as backend:
        assert made[0].kwargs["generation_config"] == "vllm"  # the checkpoint's top_k/top_p/penalty stay out
    assert made[0].stopped and not hasattr(backend, "llm")  # the engine was shut down and let go


WAITER = """
import os, sys, time
from datetime import timedelta
import torch.distributed as dist
from reinforce_cot import hardware

dist.init_process_group("gloo", timeout=timedelta(seconds=2))  # the default group's watchdog: 2 s here, 30 min on GPUs
from accelerate import PartialState
PartialState(cpu=True)  # as a CPU stage's TrainingArguments sets it up (a GPU one: NCCL)
if hardware.rank() == 0:
    time.sleep(6)  # rank 0 alone: a merge, plots, an evaluation through a server...
hardware.barrier()
sys.stdout.write(f"rank {hardware.rank()} waited\\n")  # one write: the two ranks share the pipe
"""


@pytest.mark.slow  # torchrun, 2 processes, one waiting 6 s for the other: ~10 s
def test_waiting_ranks_outlast_the_default_groups_timeout(tmp_path):
    """The ranks that wait for rank 0 (hardware.barrier, sharded.follow) wait on a gloo group with a long
    timeout, not on the default group, whose timeout (ddp_timeout, 30 min) would kill them."""
    script = tmp_path / "waiter.py"
    script.write_text(WAITER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 waited" in proc.stdout and "rank 1 waited" in proc.stdout
