"""generation=openai: any OpenAI-compatible chat-completions server (`vllm serve`, SGLang, `transformers serve`).

Requests go out asynchronously through the `openai` SDK (`AsyncOpenAI`, httpx underneath), at most
`max_concurrency` in flight, each bounded by `timeout_s`. The SDK retries connection errors, timeouts,
408, 409, 429 and 5xx up to `max_retries` times with jittered exponential backoff (0.5 s doubling, capped
at 8 s, or the server's Retry-After). After that:

- a prompt the server answered without usable completions (a 4xx, a 5xx after every retry, a body that
  is not JSON or has no choices[].message.content) is kept in the store as failed, with its error;
- connection errors, timeouts, 408 or 429 after every retry mean the server is gone: pending prompts
  stop, every finished one is already on disk, and GenerationError says how to resume.

Images travel as base64 data URLs. `model` is the checkpoint path, also the model name sent unless
`served_model` is set (what `vllm serve <path>` and `transformers serve` expect). A server that ignores
`n` (transformers serve) is asked again until each prompt has n completions; a server's reasoning parser
output (`reasoning_content`) is put back in front of the answer. `launch` starts the server for the stage
and stops it afterwards (reinforce_cot.generation.server).

    python train.py recipe=unified_reward_think generation=openai generation.base_url=http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from reinforce_cot.errors import ConfigError
from reinforce_cot.generation import server
from reinforce_cot.generation.base import Backend, Emit, GenerationError

log = logging.getLogger(__name__)


class _Malformed(Exception):
    """The server answered, but not with usable completions: the row is marked failed."""


class _Unreachable(Exception):
    """No answer after every retry: the server is down or hangs."""


class OpenAIBackend(Backend):
    """An OpenAI-compatible `/chat/completions` server (see the module docstring)."""

    requires = ("openai",)

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
        extra_body: dict | None = None,
        launch: str | None = None,
        launch_timeout_s: float = 600.0,
        retry_failed: bool = False,
        cache_dir: str | None = None,
    ):
        super().__init__(model, processing_class, data_cfg, max_new_tokens)
        for name in ("openai", "httpx", "httpx2"):  # a line per request or retry otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        self.base_url = base_url.rstrip("/")
        self.served_model = served_model or (str(model) if model is not None else None)
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self.extra_body = dict(extra_body or {})
        self.retry_failed = retry_failed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.server = None
        if launch:
            log_path = (self.cache_dir or Path(".")) / "server.log"
            self.server = server.Launched(launch, self.base_url, str(model), log_path, launch_timeout_s, self.api_key)

    @classmethod
    def check_config(cls, gen) -> None:
        super().check_config(gen)
        if urlparse(str(gen.base_url)).scheme not in ("http", "https"):
            raise ConfigError(f"generation.base_url={gen.base_url}: not an http(s) URL; use http://host:port/v1")
        for key in ("max_concurrency", "timeout_s"):
            if gen[key] <= 0:
                raise ConfigError(f"generation.{key}={gen[key]} must be > 0")
        if gen.max_retries < 0:
            raise ConfigError(f"generation.max_retries={gen.max_retries} must be >= 0")

    @classmethod
    def build(cls, cfg, path: str, cache_dir: Path | None = None) -> OpenAIBackend:
        """Bound to the checkpoint's name; its generations (and a launched server's log) go to `cache_dir`.
        The checkpoint's tokenizer, when it is a local folder, counts tokens for the length metrics."""
        from hydra.utils import instantiate

        from reinforce_cot import models

        kept = {"cache_dir": str(cache_dir)} if cache_dir else {}
        backend = instantiate(cfg.generation)(model=path, processing_class=None, data_cfg=cfg.data, **kept)
        if models.is_local(path):
            try:
                processing_class = models.load_processing_class(path, cfg.model)
                backend.tokenizer = getattr(processing_class, "tokenizer", processing_class)
            except (OSError, ValueError) as e:
                log.warning("no tokenizer at %s (%s): lengths are counted in words", path, e)
        return backend

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def ready(self) -> None:
        if not server.answers(self.base_url, self.api_key, timeout=min(10.0, self.timeout_s)):
            raise GenerationError(
                f"generation.base_url={self.base_url}: no server answers there; start one "
                f"(e.g. `vllm serve {self.served_model} --port 8000`), fix the URL, or set generation.launch"
            )

    # -- one request
    async def _post(self, client, body: dict) -> dict:
        """One chat completion, retried by the SDK; what is left after its retries is classified here."""
        import openai

        try:
            raw = await client.chat.completions.with_raw_response.create(**body)
        except openai.APITimeoutError:
            raise _Unreachable(f"timeout after {self.timeout_s:.0f} s") from None
        except openai.APIConnectionError as e:  # refused / reset: the server is gone or restarting
            cause = e.__cause__
            raise _Unreachable(f"{type(cause).__name__}: {cause}" if cause else str(e)) from None
        except openai.APIStatusError as e:
            why = f"HTTP {e.status_code}: {e.response.text[:200]}"
            if e.status_code in (408, 429):  # still timing out or throttled after every retry
                raise _Unreachable(why) from None
            raise _Malformed(why) from None  # the server is up but refuses or fails on this prompt
        try:
            return json.loads(raw.text)
        except ValueError:
            raise _Malformed(f"response is not JSON: {raw.text[:200]!r}") from None

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
        while len(texts) < n:  # a server that ignores `n` answers one at a time
            body = {
                "model": self.served_model,
                "messages": messages,
                "n": n - len(texts),
                "temperature": temperature,
                "max_tokens": self.max_new_tokens,
                "extra_body": self.extra_body,
            }
            got, why = self._texts(await self._post(client, body))
            texts += got
            reasons += why
        return texts[:n], reasons[:n]

    # -- many requests
    async def _run(self, rows, idx, n, temperature, template, emit: Emit) -> dict:
        import openai
        from tqdm.auto import tqdm

        sem = asyncio.Semaphore(self.max_concurrency)
        bar = tqdm(total=len(idx), desc=f"requests n={n}", unit="prompt", disable=None)
        state = {"down": None, "ok": 0, "failed": 0}
        key = self.api_key or server.NO_KEY
        async with openai.AsyncOpenAI(
            base_url=self.base_url, api_key=key, timeout=self.timeout_s, max_retries=self.max_retries
        ) as client:

            async def task(i: int):
                async with sem:
                    if state["down"]:
                        return
                    try:
                        texts, reasons = await self._one(client, rows[i], n, temperature, template)
                    except _Malformed as e:
                        emit(i, [], status="failed", error=str(e))
                        state["failed"] += 1
                        log.warning("prompt %s marked failed: %s", rows[i].get("id"), e)
                    except _Unreachable as e:
                        state["down"] = state["down"] or str(e)
                        return
                    else:
                        emit(i, texts, finish_reasons=reasons)
                        state["ok"] += 1
                    bar.update(1)

            await asyncio.gather(*(task(i) for i in idx))
        bar.close()
        return state

    def produce(self, rows, idx, n, temperature, template, emit: Emit) -> None:
        """Every prompt of `idx` at once (`max_concurrency` in flight), each emitted as it is answered."""
        t0 = time.time()
        state = asyncio.run(self._run(rows, idx, n, temperature, template, emit))
        log.info("%d prompts answered, %d failed, in %.1f s", state["ok"], state["failed"], time.time() - t0)
        if state["down"]:
            raise GenerationError(
                f"generation.base_url={self.base_url}: the server stopped answering ({state['down']}); "
                "bring it back and rerun"
            )

    def generate(self, rows: list[dict], n: int = 1, temperature: float = 0.0, template: str | None = None):
        """Like every backend's; with a cache_dir the results also go to <cache_dir>/generations-<fingerprint>.jsonl,
        so a rerun reuses them."""
        if self.cache_dir:
            path = self.cache_dir / f"generations-{self.fingerprint(n, temperature, template)}.jsonl"
            return self.generate_to_jsonl(rows, path, n, temperature, template)
        out: list[list[str]] = [[] for _ in range(len(rows))]

        def keep(i: int, completions: list[str], **_) -> None:
            out[i] = completions

        self.ready()
        self.produce(rows, list(range(len(rows))), n, temperature, template, keep)
        return out
