"""Generation backends against real OpenAI-compatible servers on 127.0.0.1.

- `transformers serve` (the stock server) with the tiny text model: the openai backend gets the same
  greedy completions as local HF generation, and n samples although that server ignores `n`.
- tests/chat_server.py (the tiny VLM, which transformers serve cannot load here): images travel as
  base64 data URLs and come back as the same completions as local generation; then the failure cases:
  server down at start, server dying mid-way (a rerun resumes and loses nothing), malformed responses
  (rows kept as failed, not dropped), and the evaluate CLI starting and stopping its own server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from reinforce_cot import generation, images, recipes, tiny
from reinforce_cot.errors import ConfigError
from reinforce_cot.generation import GenerationError
from tests.chat_server import decode_image
from tests.helpers import ROOT, compose_cfg, free_port

SERVER = ROOT / "tests" / "chat_server.py"
# Fast failure for tests: 2 retries (the SDK waits ~0.5 s, then ~1 s) instead of 5 (the production default).
FAST = ["generation.max_retries=2", "generation.timeout_s=60"]
SHORT = "generation.max_new_tokens=8"  # the failure tests need answers, not long ones (the random model rambles)


def openai_cfg(port: int, *overrides: str):
    return compose_cfg("generation=openai", f"generation.base_url=http://127.0.0.1:{port}/v1", *FAST, *overrides)


class Server:
    """A server process on 127.0.0.1; stopped by its pid (never by name)."""

    def __init__(self, cmd: list[str], port: int, log: Path, timeout: float = 120):
        self.port, self.log = port, log
        self.proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server did not come up:\n{log.read_text()[-3000:]}")

    def posts(self) -> int:
        return self.log.read_text().count("POST /v1/chat/completions")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def chat_server(ckpt, port: int, log: Path, *flags: str, kind: str = "vlm") -> Server:
    cmd = [sys.executable, str(SERVER), "--model", str(ckpt), "--port", str(port), "--kind", kind, *flags]
    return Server(cmd, port, log)


@pytest.fixture(scope="module")
def random_vlm() -> Path:
    """The tiny VLM at its random init: the failure tests need a model, not a good one."""
    return tiny.build(compose_cfg().model)


@pytest.mark.slow  # a server (transformers serve), after the sft_text_checkpoint fixture
def test_transformers_serve_text_model_matches_local_generation(sft_text_checkpoint, tmp_path):
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    server = Server([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)], port, tmp_path / "serve.log")
    try:
        # transformers serve samples only with do_sample in the generation config it is sent
        sample = "+generation.extra_body={generation_config: '{\"do_sample\": true}'}"
        cfg = openai_cfg(port, "model=tiny_lm", "data=arithmetic", "data.test.n=24", sample)
        rows = recipes.stage_data(cfg)["test"].select(range(4))  # the stock server answers one request at a time
        remote = generation.load(cfg, str(sft_text_checkpoint), cache_dir=tmp_path)
        greedy = remote.generate_to_jsonl(rows, tmp_path / "greedy.jsonl", n=1, temperature=0.0)
        local = generation.load(compose_cfg("model=tiny_lm", "data=arithmetic"), str(sft_text_checkpoint))
        assert greedy == local.generate(rows, n=1, temperature=0.0)
        assert all("</think><answer>" in g[0] for g in greedy)  # the server's reasoning split is undone
        sampled = remote.generate_to_jsonl(rows, tmp_path / "sampled.jsonl", n=2, temperature=1.0)
        assert [len(s) for s in sampled] == [2] * 4  # asked again where the server ignored n
    finally:
        server.stop()


@pytest.mark.slow  # a server, after the sft_checkpoint fixture
def test_vlm_server_matches_local_generation(sft_checkpoint, tmp_path):
    port = free_port()
    server = chat_server(sft_checkpoint, port, tmp_path / "server.log")
    try:
        cfg = openai_cfg(port, "data.test.n=24")
        rows = recipes.stage_data(cfg)["test"].select(range(8))
        remote = generation.load(cfg, str(sft_checkpoint))
        out = tmp_path / "g.jsonl"
        greedy = remote.generate_to_jsonl(rows, out, n=1, temperature=0.0)
        local = generation.load(compose_cfg(), str(sft_checkpoint))
        assert greedy == local.generate(rows, n=1, temperature=0.0)  # same prompt, image and decoding
        sent = decode_image(images.data_url(rows[0]["images"][0]))
        assert sent.tobytes() == rows[0]["images"][0].tobytes()  # the data URL carries the exact pixels
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(lines) == 8 and {x["status"] for x in lines} == {"ok"}
        assert all(x["finish_reasons"][0] in ("stop", "length") for x in lines)
        sampled = remote.generate(rows, n=3, temperature=1.0)
        assert [len(s) for s in sampled] == [3] * 8
    finally:
        server.stop()


def test_server_down_at_start_is_one_clear_error(random_vlm, tmp_path):
    port = free_port()  # nothing listens there
    cfg = openai_cfg(port, "data.test.n=8")
    rows = recipes.stage_data(cfg)["test"].select(range(4))
    backend = generation.load(cfg, str(random_vlm))
    t0 = time.time()
    with pytest.raises(GenerationError) as e:
        backend.generate_to_jsonl(rows, tmp_path / "g.jsonl", n=1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"generation.base_url=http://127.0.0.1:{port}/v1: no server answers")
    assert time.time() - t0 < 30
    assert not (tmp_path / "g.jsonl").exists()


@pytest.mark.slow  # two servers, one after the other: ~8 s
def test_server_dying_midway_then_restart_resumes(random_vlm, tmp_path):
    port = free_port()
    cfg = openai_cfg(port, "data.test.n=24", "generation.max_concurrency=2", SHORT)
    rows = recipes.stage_data(cfg)["test"].select(range(12))
    out = tmp_path / "g.jsonl"
    first = chat_server(random_vlm, port, tmp_path / "first.log", "--exit-after", "5")
    try:
        backend = generation.load(cfg, str(random_vlm))
        with pytest.raises(GenerationError) as e:
            backend.generate_to_jsonl(rows, out, n=2, temperature=1.0)
        assert "stopped answering" in str(e.value) and f"5 prompts are kept in {out}" in str(e.value)
        assert first.proc.wait(timeout=30) == 3  # it really died
    finally:
        first.stop()
    before = {json.loads(x)["key"]: x for x in out.read_text().splitlines()}
    assert len(before) == 5

    second = chat_server(random_vlm, port, tmp_path / "second.log")
    try:
        result = generation.load(cfg, str(random_vlm)).generate_to_jsonl(rows, out, n=2, temperature=1.0)
        assert second.posts() == 7  # only the prompts the first server did not answer
    finally:
        second.stop()
    assert [len(r) for r in result] == [2] * 12
    after = out.read_text().splitlines()
    keys = [json.loads(x)["key"] for x in after]
    assert len(keys) == len(set(keys)) == 12  # nothing lost, nothing twice
    assert all(line in after for line in before.values())  # the first run's results kept as they were


@pytest.mark.slow  # a server: ~5 s
def test_malformed_responses_mark_rows_failed(random_vlm, tmp_path):
    port = free_port()
    cfg = openai_cfg(port, "data.test.n=24", "generation.max_concurrency=1", SHORT)
    rows = recipes.stage_data(cfg)["test"].select(range(9))
    out = tmp_path / "g.jsonl"
    server = chat_server(random_vlm, port, tmp_path / "server.log", "--malformed-every", "3")
    try:
        backend = generation.load(cfg, str(random_vlm))
        result = backend.generate_to_jsonl(rows, out, n=1)
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        failed = [x for x in lines if x["status"] == "failed"]
        assert len(lines) == 9 and len(failed) == 3  # kept, not dropped
        assert {x["id"] for x in failed} == {r["id"] for r, c in zip(rows, result) if c == []}
        errors = " ".join(x["error"] for x in failed)
        assert "not JSON" in errors and "no choices[].message.content" in errors
        assert sum(c == [] for c in result) == 3 and all(len(c) == 1 for c in result if c)
        backend.generate_to_jsonl(rows, out, n=1)  # a rerun skips failed rows too ...
        assert server.posts() == 9
        retried = backend.generate_to_jsonl(rows, out, n=1, retry_failed=True)  # ... unless asked
        assert server.posts() == 12 and sum(c == [] for c in retried) == 1  # the 12th answer is malformed again
    finally:
        server.stop()


@pytest.mark.slow  # the evaluate CLI starting a server, after the sft_checkpoint fixture: ~10 s
def test_evaluate_cli_launches_its_own_server(sft_checkpoint, tmp_path):
    """`python -m reinforce_cot.evaluate ... generation=openai generation.launch=...` starts the server on the
    checkpoint, evaluates through it and stops it; its completions are the local evaluation's."""
    port = free_port()
    run_dir = sft_checkpoint.parents[2]
    local = json.loads((run_dir / "result" / "eval_01_sft.json").read_text())["metrics"]["samples"]
    cmd = [
        sys.executable, "-m", "reinforce_cot.evaluate", f"ckpt={sft_checkpoint}", f"output_root={tmp_path}/out",
        "generation=openai", f"generation.base_url=http://127.0.0.1:{port}/v1",
        f"generation.launch='{{python}} {SERVER} --model {{model}} --port {{port}}'",
        "eval.max_prompts=8", "eval.k=0", "eval.answer_only_template=null", "eval.consistency=false",  # greedy only
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads((run_dir / "result" / "eval_01_sft_shapes_count.json").read_text())["metrics"]
    assert [r["completion"] for r in remote["samples"]] == [r["completion"] for r in local[:8]]
    assert remote["greedy_accuracy"] == sum(r["correct"] for r in local[:8]) / 8
    folder = run_dir / "result" / "eval_01_sft_shapes_count"
    assert "serving" in (folder / "server.log").read_text()
    assert len((folder / "generations" / "greedy.jsonl").read_text().splitlines()) == 8
    with pytest.raises(httpx.ConnectError):  # stopped afterwards
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert "| 01_sft" in proc.stdout.replace(run_dir.name + "/", "")  # the table, printed


def test_a_generation_target_that_is_not_a_backend_is_one_clear_error():
    cfg = compose_cfg("generation._target_=reinforce_cot.data.from_rows")  # importable, but a function
    with pytest.raises(ConfigError, match=r"^generation._target_=reinforce_cot.data.from_rows: not an importable"):
        generation.validate(cfg)
    generation.validate(compose_cfg("generation=openai"))  # each backend's own checks pass on its defaults
