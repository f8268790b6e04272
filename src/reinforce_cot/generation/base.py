"""What every generation backend shares: prompts as chat messages, the request fingerprint, its own
config checks and binding to a checkpoint, and `generate_to_jsonl`, the resumable path through the store.

A backend implements `generate(rows, n, temperature, template) -> list[list[str]]` (n completions per
row). The base class turns it into `generate_to_jsonl(rows, path, ...)`: the prompts the file holds
already are skipped, the others go to `produce` in chunks and each prompt's record is appended as it
arrives (reinforce_cot.generation.store). A backend whose results arrive one prompt at a time (openai)
overrides `produce` instead, emitting each prompt as it is answered.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from reinforce_cot import data as data_lib
from reinforce_cot import images
from reinforce_cot.errors import ConfigError, GenerationError  # noqa: F401  (GenerationError: re-exported)
from reinforce_cot.generation.store import Store, row_key


def chat_messages(row: dict, template: str, system: str | None, own_prompt: bool = True) -> list[dict]:
    """OpenAI-style chat messages for one row (what servers and vLLM's `LLM.chat` take): the training
    prompt (data.prompt_messages) with each image block carrying its image as a data URL."""
    pixels = iter(row.get("images") or [])
    out = []
    for m in data_lib.prompt_messages(row, template, system, own_prompt=own_prompt):
        if isinstance(m.get("content"), list):
            m = {**m, "content": [
                {"type": "image_url", "image_url": {"url": images.data_url(next(pixels))}} if b.get("type") == "image"
                else b for b in m["content"]
            ]}  # fmt: skip
        out.append(m)
    return out


def record(key, row, n, temperature, template, status, completions, **fields) -> dict:
    """One line of the store: the prompt's key and id, the request, the outcome (+ error, rank, ...)."""
    rec = {"key": key, "id": row.get("id"), "n": n, "temperature": temperature, "template": template}
    return rec | {"status": status, "completions": completions} | {k: v for k, v in fields.items() if v is not None}


# emit(i, completions, status="ok", **fields): one prompt's outcome, written to the store as it arrives
Emit = Callable[..., None]


class Backend:
    """The base of every backend (see the module docstring)."""

    shares_ranks = False  # True: in a multi-process run every rank loads it and runs `generate_batch` for rank 0
    requires: tuple[str, ...] = ()  # importable modules the backend needs (checked at validation)
    chunk_prompts = 64  # prompts per `generate` call in produce (a JSON line each after it)
    retry_failed = False  # generate_to_jsonl's default: re-ask prompts whose generation failed
    generated_by: list[int] | None = None  # the rank that generated each row of the last `generate` call

    def __init__(self, model=None, processing_class=None, data_cfg=None, max_new_tokens: int = 64):
        self.model, self.processing_class, self.data_cfg = model, processing_class, data_cfg
        self.max_new_tokens = max_new_tokens
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)

    # -- configuration
    @classmethod
    def name(cls) -> str:
        """The backend as `generation=<name>` selects it."""
        return cls.__name__.removesuffix("Backend").lower()

    @classmethod
    def check_config(cls, gen) -> None:
        """Checks on `cfg.generation` that need no weights, raising ConfigError: by default that the
        `requires` packages are installed."""
        for module in cls.requires:
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"generation={cls.name()}: the '{module}' package is not installed; pip install {module}"
                )

    @classmethod
    def build(cls, cfg, path: str, cache_dir: Path | None = None) -> Backend:
        """The configured backend (`cfg.generation`) bound to the checkpoint at `path`: by default it gets
        the path itself (an engine or a server loads it). `cache_dir`: where a backend may keep files."""
        from hydra.utils import instantiate

        return instantiate(cfg.generation)(model=path, processing_class=None, data_cfg=cfg.data)

    # -- prompts
    @property
    def with_image(self) -> bool:
        return self.data_cfg.modality == "image"

    def template(self, template: str | None) -> str:
        return template or self.data_cfg.prompt_template

    def messages(self, row: dict, template: str | None) -> list[dict]:
        return chat_messages(row, self.template(template), self.data_cfg.system_prompt, own_prompt=template is None)

    def fingerprint(self, n: int, temperature: float, template: str | None) -> str:
        """What makes two requests for the same row interchangeable: a file is reused only for these."""
        source = getattr(getattr(self.model, "config", None), "name_or_path", None) or str(self.model)
        spec = [n, temperature, self.template(template), self.max_new_tokens, source]
        return hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:10]

    # -- generating
    def generate(self, rows: list[dict], n: int = 1, temperature: float = 0.0, template: str | None = None):
        """`n` completions for each row; `temperature=0` is greedy, `template` replaces the data's prompt."""
        raise NotImplementedError

    def chunk_size(self, n: int) -> int:
        """Prompts per `generate` call in `produce` (each one's line is written after the call)."""
        return self.chunk_prompts

    def ready(self) -> None:
        """Called before anything is generated: raise GenerationError if generation cannot start."""

    def produce(self, rows, idx: list[int], n: int, temperature: float, template: str | None, emit: Emit) -> None:
        """Generate for rows[i], i in `idx`, calling `emit(i, completions, **fields)` as results arrive:
        here `generate` over chunks of `chunk_size(n)` prompts."""
        step = self.chunk_size(n)
        for start in range(0, len(idx), step):
            part = idx[start : start + step]
            texts = self.generate([rows[i] for i in part], n=n, temperature=temperature, template=template)
            for i, t, rank in zip(part, texts, self.generated_by or [None] * len(part)):
                emit(i, t, rank=rank)

    def generate_to_jsonl(
        self,
        rows,
        path: str | Path,
        n: int = 1,
        temperature: float = 0.0,
        template: str | None = None,
        retry_failed: bool | None = None,
    ) -> list[list[str]]:
        """`generate`, one JSON line per prompt appended to `path` as results arrive; prompts the file
        already holds (same n, temperature, template) are skipped. Failed prompts come back `[]`."""
        store = Store(path)
        fp = self.fingerprint(n, temperature, template)
        keys = [f"{row_key(r)}:{fp}" for r in rows]
        todo = store.todo(keys, self.retry_failed if retry_failed is None else retry_failed)
        if todo:
            self.ready()
            with store.appending() as write:

                def emit(i: int, completions: list[str], status: str = "ok", **fields) -> None:
                    write(record(keys[i], rows[i], n, temperature, template, status, completions, **fields))

                try:
                    self.produce(rows, todo, n, temperature, template, emit)
                except GenerationError as e:
                    raise GenerationError(
                        f"{e}; {len(store.done())} prompts are kept in {store.path}, and a rerun skips them"
                    ) from None
        return store.completions(keys)

    def close(self) -> None:
        """Release what the backend holds (a model, an engine, a launched server); safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
