"""Generation backends shared by evaluation, curation and rejection sampling.

A backend turns raw rows (question, image, ...) into `n` completions each:

    backend.generate(rows, n=4, temperature=1.0, template=None) -> list[list[str]]
    backend.generate_to_jsonl(rows, path, n=4, temperature=1.0) -> list[list[str]]   # resumable

`temperature=0` is greedy. `template` replaces the data's prompt template (answer-only prompts use it).
`generate_to_jsonl` appends one JSON line per prompt as results arrive and, when the file already
holds some, skips the prompts it has: a killed job restarts where it stopped and loses nothing. A
prompt whose generation failed (a malformed server response) is kept as a `"status": "failed"` line
and comes back as `[]`, never silently dropped.

Backends are selected by the `generation` config group (conf/generation/*.yaml, `_target_` +
`_partial_`) and bound to a checkpoint by `load(cfg, path)`:

- hf: batched `generate` with the local model in memory, left padding, on this rank's GPU (else the
  CPU); greedy or plain sampling exactly (no checkpoint generation_config.json defaults). In a
  multi-process run the ranks share the prompts (reinforce_cot.sharded).
- vllm: vLLM's offline engine (`LLM.chat`) on GPU machines; `pip install -e '.[gpu]'`.
- openai: any OpenAI-compatible chat-completions server (`vllm serve`, SGLang, `transformers serve`):
  images as base64 data URLs, asyncio + httpx with a concurrency limit, timeouts, retries with
  exponential backoff; `generation.launch` can start (and stop) the server itself.

    python train.py recipe=unified_reward_think generation=openai generation.base_url=http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from reinforce_cot import data as data_lib
from reinforce_cot.errors import ConfigError, GenerationError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ helpers
def row_key(row: dict) -> str:
    """A stable identity for a prompt: its id (if any) and a hash of its question, answer and image
    pixels, so that a JSONL written for other data with the same ids is never mistaken for this one."""
    h = hashlib.sha1(json.dumps([row["question"], str(row.get("answer"))]).encode())
    for image in row.get("images") or []:
        h.update(image.tobytes())
    return f"{row['id']}#{h.hexdigest()[:10]}" if row.get("id") is not None else h.hexdigest()[:16]


def image_data_url(image) -> str:
    """A PIL image as a `data:image/png;base64,...` URL (what OpenAI-style servers accept)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(row: dict, template: str, system: str | None, own_prompt: bool = True) -> list[dict]:
    """OpenAI chat messages for one row: the training prompt (data.prompt_messages), each image block
    carrying its image as a data URL."""
    images = iter(row.get("images") or [])
    out = []
    for m in data_lib.prompt_messages(row, template, system, own_prompt=own_prompt):
        if isinstance(m.get("content"), list):
            m = {**m, "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(next(images))}} if b.get("type") == "image"
                else b for b in m["content"]
            ]}  # fmt: skip
        out.append(m)
    return out


def read_jsonl(path: Path) -> dict[str, dict]:
    """Records by key; the last line for a key wins. A line cut short by a crash is skipped."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done[rec["key"]] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s:%d: unreadable line (cut short by a crash?) skipped; that prompt is redone", path, lineno)
    return done


class _Appender:
    """Append JSON lines, flushing each: a killed process leaves every finished line on disk."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        ends_clean = not path.exists() or path.stat().st_size == 0 or path.read_bytes()[-1:] == b"\n"
        self.f = path.open("a")
        if not ends_clean:  # a half-written last line: start ours on a fresh line
            self.f.write("\n")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


# ----------------------------------------------------------------------------------- backends
class Backend:
    """What every backend shares: the prompt text, and the resumable JSONL path over `generate`."""

    in_process = False  # True: load() hands over the model in memory; False: the checkpoint path
    shares_ranks = False  # True: in a multi-process run every rank loads it and runs `generate_batch` for rank 0
    requires: tuple[str, ...] = ()  # importable modules the backend needs (checked at validation)
    chunk_prompts = 64  # prompts per `generate` call in generate_to_jsonl (one line each after it)
    generated_by: list[int] | None = None  # the rank that generated each row of the last `generate` call

    def __init__(self, model=None, processing_class=None, data_cfg=None, max_new_tokens: int = 64):
        self.model, self.processing_class, self.data_cfg = model, processing_class, data_cfg
        self.max_new_tokens = max_new_tokens
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)

    @property
    def with_image(self) -> bool:
        return self.data_cfg.modality == "image"

    def template(self, template: str | None) -> str:
        return template or self.data_cfg.prompt_template

    def messages(self, row: dict, template: str | None) -> list[dict]:
        return chat_messages(row, self.template(template), self.data_cfg.system_prompt, own_prompt=template is None)

    def generate(self, rows: list[dict], n: int = 1, temperature: float = 0.0, template: str | None = None):
        raise NotImplementedError

    def chunk_size(self, n: int) -> int:
        """Prompts per `generate` call in generate_to_jsonl (a JSON line each after it)."""
        return self.chunk_prompts

    def fingerprint(self, n: int, temperature: float, template: str | None) -> str:
        """What makes two requests for the same row interchangeable: a file is reused only for these."""
        source = getattr(getattr(self.model, "config", None), "name_or_path", None) or str(self.model)
        spec = [n, temperature, self.template(template), self.max_new_tokens, source]
        return hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:10]

    def _todo(self, rows, path, n, temperature, template, retry_failed):
        fp = self.fingerprint(n, temperature, template)
        keys = [f"{row_key(r)}:{fp}" for r in rows]
        done = read_jsonl(path)
        todo = [i for i, k in enumerate(keys) if k not in done or (retry_failed and done[k].get("status") != "ok")]
        if len(todo) < len(rows):
            log.info(
                "%s: %d of %d prompts already done, generating the other %d",
                path,
                len(rows) - len(todo),
                len(rows),
                len(todo),
            )
        return keys, done, todo

    @staticmethod
    def _collect(keys, path) -> list[list[str]]:
        done = read_jsonl(path)
        return [done[k]["completions"] if k in done and done[k].get("status") == "ok" else [] for k in keys]

    def generate_to_jsonl(
        self,
        rows: list[dict],
        path: str | Path,
        n: int = 1,
        temperature: float = 0.0,
        template: str | None = None,
        retry_failed: bool = False,
    ) -> list[list[str]]:
        """`generate`, one JSON line per prompt appended to `path` as each chunk finishes; prompts the
        file already holds (same n, temperature, template) are skipped. Failed prompts come back `[]`."""
        path = Path(path)
        keys, _, todo = self._todo(rows, path, n, temperature, template, retry_failed)
        out = _Appender(path)
        step = self.chunk_size(n)
        try:
            for start in range(0, len(todo), step):
                idx = todo[start : start + step]
                texts = self.generate([rows[i] for i in idx], n=n, temperature=temperature, template=template)
                by = self.generated_by or [None] * len(idx)
                for i, t, rank in zip(idx, texts, by):
                    extra = {} if rank is None else {"rank": rank}
                    out.write(_record(keys[i], rows[i], n, temperature, template, "ok", t, **extra))
        finally:
            out.close()
        return self._collect(keys, path)

    def close(self) -> None:
        """Release what the backend holds (a launched server); safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _record(key, row, n, temperature, template, status, completions, error=None, **extra) -> dict:
    rec = {"key": key, "id": row.get("id"), "n": n, "temperature": temperature, "template": template}
    rec |= {"status": status, "completions": completions}
    if error:
        rec["error"] = error
    return rec | extra


class HFBackend(Backend):
    """Batched HF `generate` with the model in memory, on this rank's GPU when there is one.

    Decoding is exactly what is asked (`decoding_config`): greedy, or plain sampling at the temperature,
    never a checkpoint's generation_config.json defaults (Qwen2.5-VL-Instruct ships a repetition
    penalty and top_k/top_p), so that hf and vllm score the same. Prompts go in batches of
    `batch_size // n` prompts, each batch seeded from its own content: the samples do not depend on
    what else ran before or on how many ranks share the work (reinforce_cot.sharded)."""

    in_process = True
    shares_ranks = True

    def __init__(
        self, model, processing_class, data_cfg, batch_size: int = 64, max_new_tokens: int = 64, seed: int = 0
    ):
        super().__init__(model, processing_class, data_cfg, max_new_tokens)
        self.batch_size, self.seed = batch_size, seed
        self.shared = False  # True: loaded on every rank by generation.load under sharded.leading()

    def per_batch(self, n: int) -> int:
        return max(1, self.batch_size // n)  # prompts per forward pass, each repeated n times

    def chunk_size(self, n: int) -> int:
        # whole batches for every rank, about batch_size prompts per rank: batches are then cut at the
        # same places whatever the number of ranks
        from reinforce_cot import sharded

        ranks = sharded.world() if self.shared else 1
        return self.per_batch(n) * ranks * max(1, n // ranks)

    def prompt(self, row: dict, template: str | None = None) -> str:
        messages = data_lib.prompt_messages(
            row, self.template(template), self.data_cfg.system_prompt, own_prompt=template is None
        )
        return self.processing_class.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, rows: list[dict], n: int = 1, temperature: float = 0.0, template: str | None = None):
        from tqdm.auto import tqdm

        from reinforce_cot import sharded

        per = self.per_batch(n)
        batches = [[rows[i] for i in range(s, min(s + per, len(rows)))] for s in range(0, len(rows), per)]
        bar = tqdm(total=len(rows), desc=f"generate n={n}", unit="prompt", disable=None)  # None: off without a tty

        def run(batch: list[dict]) -> list[list[str]]:
            texts = self.generate_batch(batch, n, temperature, template)
            bar.update(len(batch))
            return texts

        if self.shared:  # batch i on rank i % world, gathered here
            done, ranks = sharded.map_batches(batches, run, (n, temperature, template))
        else:
            done, ranks = [run(b) for b in batches], [0] * len(batches)
        bar.close()
        self.generated_by = [r for b, r in zip(batches, ranks) for _ in b]
        return [texts for batch in done for texts in batch]

    def generate_batch(self, batch: list[dict], n: int, temperature: float, template: str | None) -> list[list[str]]:
        """`n` completions for each row of one batch (one forward pass of len(batch) x n sequences)."""
        import torch

        self.model.eval()
        prompts = [self.prompt(r, template) for r in batch for _ in range(n)]
        images = [im for r in batch for _ in range(n) for im in r.get("images") or []]  # in placeholder order
        if images:
            enc = self.processing_class(text=prompts, images=images, padding=True, return_tensors="pt")
        else:
            enc = self.processing_class(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        enc = enc.to(self.model.device)
        config = decoding_config(self.model, temperature, self.max_new_tokens, self.tokenizer.pad_token_id)
        seed = _seed(self.seed, n, temperature, self.template(template), row_key(batch[0]))
        dev = self.model.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), _only_stop_tokens(self.model):
            torch.manual_seed(seed)
            with torch.no_grad():
                ids = self.model.generate(**enc, generation_config=config)
        texts = self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return [texts[i * n : (i + 1) * n] for i in range(len(batch))]

    def close(self) -> None:
        """Drop the model (and on every rank, when shared) and hand its GPU memory back."""
        from reinforce_cot import hardware, sharded

        if self.shared:
            self.shared = False
            sharded.everywhere("close", None, self._drop)
        else:
            self._drop()
        hardware.release_memory()

    def _drop(self) -> None:
        self.model = None


STOP_TOKEN_FIELDS = ("eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id")


def decoding_config(model, temperature: float, max_new_tokens: int, pad_token_id: int | None):
    """The whole decoding recipe as one GenerationConfig: greedy for temperature 0, else plain sampling
    (top_k 0, top_p 1), no repetition penalty, no n-gram ban, one beam; what vLLM and TRL are asked for."""
    from transformers import GenerationConfig

    stops = {k: getattr(model.generation_config, k, None) for k in STOP_TOKEN_FIELDS}
    stops["pad_token_id"] = pad_token_id if pad_token_id is not None else stops["pad_token_id"]
    if temperature > 0:
        how = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    else:
        how = dict(do_sample=False)
    neutral = dict(num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, length_penalty=1.0, typical_p=1.0)
    return GenerationConfig(max_new_tokens=max_new_tokens, **neutral, **how, **stops)


@contextlib.contextmanager
def _only_stop_tokens(model):
    """transformers fills every field a passed GenerationConfig leaves unset (None: suppress_tokens,
    sequence_bias, min_p, ...) from `model.generation_config`; during our call that holds only the
    checkpoint's stop and pad tokens, so nothing else of generation_config.json applies."""
    from transformers import GenerationConfig

    # a PeftModel generates with its base model's generation_config
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = base.generation_config
    base.generation_config = GenerationConfig(**{k: getattr(own, k, None) for k in STOP_TOKEN_FIELDS})
    try:
        yield
    finally:
        base.generation_config = own


def _seed(*spec) -> int:
    return int(hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:8], 16)


class VLLMBackend(Backend):
    """vLLM's offline engine on the checkpoint folder: `LLM.chat` with `SamplingParams(n=...)`.

    Needs a CUDA GPU and `pip install -e '.[gpu]'` (vllm 0.31). Not runnable on the CPU machines this
    project is tested on: validation stops `generation=vllm` there with a one-line error."""

    requires = ("vllm",)

    def __init__(
        self,
        model,
        processing_class=None,
        data_cfg=None,
        max_new_tokens: int = 64,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        enforce_eager: bool = False,
    ):
        from vllm import LLM

        super().__init__(model, processing_class, data_cfg, max_new_tokens)
        self.seed = seed
        self.llm = LLM(
            model=str(model),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            limit_mm_per_prompt={"image": 1} if self.with_image else None,
            generation_config="vllm",  # vLLM's neutral defaults, never the checkpoint's generation_config.json
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.chunk_prompts = 1024  # vLLM schedules its own batches; chunks only bound the resume granularity

    def generate(self, rows: list[dict], n: int = 1, temperature: float = 0.0, template: str | None = None):
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, max_tokens=self.max_new_tokens, seed=self.seed)
        outs = self.llm.chat([self.messages(r, template) for r in rows], params, use_tqdm=True)
        return [[o.text for o in out.outputs] for out in outs]

    def close(self) -> None:
        """Stop the engine and hand its GPU memory back: a later stage may need the whole GPU."""
        from reinforce_cot import hardware

        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            hardware.shutdown_vllm(llm)
            del llm
            hardware.release_memory()


class _Malformed(Exception):
    """The server answered, but not with usable completions: the row is marked failed."""


class _Unreachable(Exception):
    """No answer after every retry: the server is down or hangs."""


class OpenAIBackend(Backend):
    """Any OpenAI-compatible `/chat/completions` server, asynchronously, resumable through JSONL.

    `model` is the checkpoint path; it is also the model name sent to the server unless
    `served_model` is set (what `vllm serve <path>` and `transformers serve` expect). Servers that
    ignore `n` (transformers serve) are asked again until each prompt has `n` completions.

    Failure handling: connection errors, timeouts, 408/429 and 5xx are retried with exponential
    backoff (`backoff_s` x 2^attempt, jittered, capped at 30 s) up to `max_retries` times; a 4xx or
    a 200 without usable completions marks the row failed (kept in the JSONL with the error). When a
    request exhausts its retries the server is taken for gone: pending prompts stop, every finished
    one is already on disk, and GenerationError says how to resume.
    """

    requires = ("httpx",)

    def __init__(
        self,
        model=None,
        processing_class=None,
        data_cfg=None,
        max_new_tokens: int = 64,
        base_url: str = "http://127.0.0.1:8000/v1",
        served_model: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        extra_body: dict | None = None,
        launch: str | None = None,
        launch_timeout_s: float = 600.0,
        retry_failed: bool = False,
        cache_dir: str | None = None,
    ):
        super().__init__(model, processing_class, data_cfg, max_new_tokens)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
        self.base_url = base_url.rstrip("/")
        self.served_model = served_model or (str(model) if model is not None else None)
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.extra_body = dict(extra_body or {})
        self.retry_failed = retry_failed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.chunk_prompts = 1 << 30  # all prompts go out at once; max_concurrency bounds what is in flight
        self._server: subprocess.Popen | None = None
        if launch:
            self._launch(launch, launch_timeout_s)

    # -- the server
    def _launch(self, command: str, timeout_s: float) -> None:
        """Start the server from a template (`{model}`, `{port}`, `{host}`, `{python}`) and wait for it."""
        url = urlparse(self.base_url)
        cmd = command.format(model=self.model, port=url.port or 80, host=url.hostname, python=sys.executable)
        log_path = Path(self.cache_dir or ".") / "server.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting the generation server: %s (log: %s)", cmd, log_path)
        self._server_log = log_path.open("a")
        self._server = subprocess.Popen(
            shlex.split(cmd), stdout=self._server_log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self._server.poll() is not None:
                raise GenerationError(
                    f"generation.launch={command!r}: the server exited with code {self._server.returncode} "
                    f"before answering; see {log_path}"
                )
            if self._answers(timeout=2.0):
                return
            time.sleep(0.5)
        self.close()
        raise GenerationError(
            f"generation.launch={command!r}: no answer at {self.base_url} after {timeout_s:.0f} s; see {log_path} "
            "or raise generation.launch_timeout_s"
        )

    def close(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.terminate()
            try:
                self._server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
        if self._server is not None:
            self._server_log.close()
        self._server = None

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _answers(self, timeout: float) -> bool:
        """Whether anything answers HTTP at base_url (any status: some servers 500 on /models)."""
        import httpx

        try:
            httpx.get(f"{self.base_url}/models", timeout=timeout, headers=self._headers())
            return True
        except httpx.HTTPError:
            return False

    def check_server(self) -> None:
        if not self._answers(timeout=min(10.0, self.timeout_s)):
            raise GenerationError(
                f"generation.base_url={self.base_url}: no server answers there; start one "
                f"(e.g. `vllm serve {self.served_model} --port 8000`), fix the URL, or set generation.launch"
            )

    # -- one request
    async def _post(self, client, body: dict) -> dict:
        import httpx

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(30.0, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random())
                await asyncio.sleep(delay)
            try:
                resp = await client.post(f"{self.base_url}/chat/completions", json=body, headers=self._headers())
            except httpx.TimeoutException as e:
                last = f"timeout after {self.timeout_s:.0f} s ({type(e).__name__})"
                continue
            except httpx.HTTPError as e:  # connection refused / reset: the server may be restarting
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code in (408, 429) or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code >= 500 and attempt == self.max_retries:
                    raise _Malformed(last)  # the server is up but fails on this prompt: mark the row
                continue
            if resp.status_code >= 400:
                raise _Malformed(f"HTTP {resp.status_code}: {resp.text[:200]}")
            try:
                return resp.json()
            except ValueError:
                raise _Malformed(f"response is not JSON: {resp.text[:200]!r}") from None
        raise _Unreachable(last)

    @staticmethod
    def _message_text(message: dict) -> str:
        """The completion as the model wrote it. Servers with a reasoning parser (vllm serve
        --reasoning-parser, transformers serve) move the <think> part into `reasoning_content` (or
        `reasoning`); it is put back, since rewards and metrics read the whole chain."""
        content = message["content"]
        thought = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(thought, str) and thought and "<think>" not in (content or ""):
            return f"<think>{thought}</think>{content or ''}"
        return content

    @classmethod
    def _texts(cls, data: Any) -> tuple[list[str], list]:
        try:
            choices = data["choices"]
            texts = [cls._message_text(c["message"]) for c in choices]
            reasons = [c.get("finish_reason") for c in choices]
        except (KeyError, TypeError, IndexError) as e:
            raise _Malformed(f"no choices[].message.content in the response ({type(e).__name__}: {e})") from None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise _Malformed(f"no completion text in the response: {json.dumps(data)[:200]}")
        return texts, reasons

    async def _one(self, client, row: dict, n: int, temperature: float, template: str | None) -> tuple[list, list]:
        texts: list[str] = []
        reasons: list = []
        messages = self.messages(row, template)
        while len(texts) < n:
            body = {
                "model": self.served_model,
                "messages": messages,
                "n": n - len(texts),
                "temperature": temperature,
                "max_tokens": self.max_new_tokens,
            } | self.extra_body
            got, why = self._texts(await self._post(client, body))
            texts += got
            reasons += why
        return texts[:n], reasons[:n]

    # -- many requests
    async def _run(self, rows, idx, keys, n, temperature, template, out: _Appender) -> dict:
        import httpx
        from tqdm.auto import tqdm

        sem = asyncio.Semaphore(self.max_concurrency)
        bar = tqdm(total=len(idx), desc=f"requests n={n}", unit="prompt", disable=None)
        state = {"down": None, "ok": 0, "failed": 0}
        limits = httpx.Limits(max_connections=self.max_concurrency)

        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:

            async def task(i: int):
                async with sem:
                    if state["down"]:
                        return
                    try:
                        texts, reasons = await self._one(client, rows[i], n, temperature, template)
                        rec = _record(keys[i], rows[i], n, temperature, template, "ok", texts, finish_reasons=reasons)
                        state["ok"] += 1
                    except _Malformed as e:
                        rec = _record(keys[i], rows[i], n, temperature, template, "failed", [], error=str(e))
                        state["failed"] += 1
                        log.warning("prompt %s marked failed: %s", keys[i], e)
                    except _Unreachable as e:
                        state["down"] = state["down"] or str(e)
                        return
                    out.write(rec)
                    bar.update(1)

            await asyncio.gather(*(task(i) for i in idx))
        bar.close()
        return state

    def generate_to_jsonl(self, rows, path, n=1, temperature=0.0, template=None, retry_failed=None):
        path = Path(path)
        retry = self.retry_failed if retry_failed is None else retry_failed
        keys, _, todo = self._todo(rows, path, n, temperature, template, retry)
        if todo:
            self.check_server()
            out = _Appender(path)
            t0 = time.time()
            try:
                state = asyncio.run(self._run(rows, todo, keys, n, temperature, template, out))
            finally:
                out.close()
            log.info(
                "%s: %d prompts answered, %d failed, in %.1f s", path, state["ok"], state["failed"], time.time() - t0
            )
            if state["down"]:
                have = len(read_jsonl(path))
                raise GenerationError(
                    f"generation.base_url={self.base_url}: the server stopped answering ({state['down']}); "
                    f"{have} prompts are kept in {path}; bring the server back and rerun: done prompts are skipped"
                )
        return self._collect(keys, path)

    def generate(self, rows: list[dict], n: int = 1, temperature: float = 0.0, template: str | None = None):
        """Like every backend's; results also go to <cache_dir>/<fingerprint>.jsonl when cache_dir is set."""
        if self.cache_dir:
            path = self.cache_dir / f"generations-{self.fingerprint(n, temperature, template)}.jsonl"
            return self.generate_to_jsonl(rows, path, n, temperature, template)
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            return self.generate_to_jsonl(rows, Path(d) / "g.jsonl", n, temperature, template)


# ------------------------------------------------------------------------------------ wiring
def backend_class(gen_cfg) -> type:
    from hydra.utils import get_class

    return get_class(gen_cfg._target_)


def validate(cfg) -> None:
    """Checks on `cfg.generation` that need no weights: the backend's packages, the server settings."""
    gen = cfg.generation
    cls = backend_class(gen)
    for module in getattr(cls, "requires", ()):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"generation={cls.__name__.removesuffix('Backend').lower()}: the '{module}' package is not installed"
                + (
                    " (vLLM needs a CUDA GPU); on a GPU machine: pip install -e '.[gpu]'; here use generation=hf or "
                    "generation=openai"
                    if module == "vllm"
                    else f"; pip install {module}"
                )
            )
    if issubclass(cls, OpenAIBackend):
        if urlparse(str(gen.base_url)).scheme not in ("http", "https"):
            raise ConfigError(f"generation.base_url={gen.base_url}: not an http(s) URL; use http://host:port/v1")
        for key in ("max_concurrency", "timeout_s"):
            if gen[key] <= 0:
                raise ConfigError(f"generation.{key}={gen[key]} must be > 0")
        if gen.max_retries < 0:
            raise ConfigError(f"generation.max_retries={gen.max_retries} must be >= 0")


def load(cfg, path: str, cache_dir: str | Path | None = None) -> Backend:
    """The configured backend bound to the checkpoint at `path` (hf loads it; vllm/openai take the path).

    An in-process backend loaded by rank 0 of several processes inside `sharded.leading()` is loaded on
    every rank, each on its own GPU, and shares its prompts among them (reinforce_cot.sharded).
    `cache_dir`: where an openai backend keeps its JSONL (and a launched server its log)."""
    from hydra.utils import instantiate

    from reinforce_cot import models, sharded

    cls = backend_class(cfg.generation)
    if cls.in_process:
        if cls.shares_ranks and sharded.world() > 1:  # rank 0 of several: every rank loads it, takes a share
            backend = sharded.everywhere("load", (cfg, path), lambda: load_here(cfg, path))
            backend.shared = True
            return backend
        return load_here(cfg, path)
    extra = {"cache_dir": str(cache_dir)} if cache_dir and issubclass(cls, OpenAIBackend) else {}
    backend = instantiate(cfg.generation)(model=path, processing_class=None, data_cfg=cfg.data, **extra)
    if backend.tokenizer is None and models.is_local(path):  # token counts for length metrics
        try:
            processing_class = models.load_processing_class(path, cfg.model)
            backend.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        except (OSError, ValueError) as e:
            log.warning("no tokenizer at %s (%s): lengths are counted in words", path, e)
    return backend


def load_here(cfg, path: str) -> Backend:
    """The in-process backend on this process' device (hardware.device: cuda:LOCAL_RANK, else the CPU)."""
    from hydra.utils import instantiate

    from reinforce_cot import hardware, models

    dev = hardware.device()
    placement = {"device_map": {"": dev.index}} if dev.type == "cuda" else {}
    processing_class = models.load_processing_class(path, cfg.model)
    model = models.load_model(path, cfg.model, **placement)
    log.info("generating with %s on %s", path, model.device)
    return instantiate(cfg.generation)(model=model, processing_class=processing_class, data_cfg=cfg.data)
