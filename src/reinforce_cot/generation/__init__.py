"""Generation backends shared by evaluation, curation and rejection sampling.

A backend turns raw rows (question, images, ...) into `n` completions each:

    backend.generate(rows, n=4, temperature=1.0, template=None) -> list[list[str]]
    backend.generate_to_jsonl(rows, path, n=4, temperature=1.0) -> list[list[str]]   # resumable

`temperature=0` is greedy; `template` replaces the data's prompt template (answer-only prompts use it).
`generate_to_jsonl` keeps one JSON line per prompt as results arrive and skips, on a rerun, the prompts
the file holds: a killed job restarts where it stopped and loses nothing; a prompt whose generation
failed is kept as failed and comes back as `[]` (store.py).

The `generation` config group selects a backend (conf/generation/*.yaml, `_target_` + `_partial_`) and
owns its settings (`max_new_tokens`, hf's `batch_size`, ...); `load(cfg, path)` binds it to a checkpoint
and `validate(cfg)` runs its own checks (`check_config`) before any weights load. The package:

    base.py     Backend: prompts as chat messages, fingerprints, the resumable path over `generate`
    store.py    the resumable JSONL store, and the one JSONL writer of reinforce_cot
    hf.py       hf: batched transformers `generate`, the model in memory, ranks sharing the prompts
    vllm.py     vllm: vLLM's offline engine (GPU)
    openai.py   openai: any OpenAI-compatible server, async through the openai SDK (retries, timeouts)
    server.py   generation.launch: a server started for the stage and stopped after it

    python train.py recipe=unified_reward_think generation=openai generation.base_url=http://127.0.0.1:8000/v1
"""

from __future__ import annotations

from pathlib import Path

from reinforce_cot.errors import ConfigError
from reinforce_cot.generation.base import Backend, GenerationError
from reinforce_cot.generation.hf import HFBackend
from reinforce_cot.generation.openai import OpenAIBackend
from reinforce_cot.generation.store import read_jsonl, write_jsonl
from reinforce_cot.generation.vllm import VLLMBackend

__all__ = [
    "Backend", "GenerationError", "HFBackend", "OpenAIBackend", "VLLMBackend", "backend_class", "for_model", "load",
    "load_here", "read_jsonl", "validate", "write_jsonl",
]  # fmt: skip


def backend_class(gen_cfg) -> type[Backend]:
    """The class `generation._target_` names (looked up as Hydra does, not called); it must be a Backend."""
    from hydra.utils import instantiate

    try:
        cls = instantiate(gen_cfg, _partial_=True).func
    except Exception:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(
            f"generation._target_={gen_cfg._target_}: not an importable generation.Backend subclass; fix the path "
            "in conf/generation/"
        )
    return cls


def validate(cfg) -> None:
    """Checks on `cfg.generation` that need no weights (the backend's `check_config`: packages, settings)."""
    backend_class(cfg.generation).check_config(cfg.generation)


def load(cfg, path: str, cache_dir: str | Path | None = None) -> Backend:
    """The configured backend bound to the checkpoint at `path` (hf loads it; vllm/openai take the path).

    A backend that `shares_ranks`, loaded by rank 0 of several processes inside `sharded.leading()`, is
    loaded on every rank, each on its own GPU, and shares its prompts among them (reinforce_cot.sharded).
    `cache_dir`: where an openai backend keeps its JSONL (and a launched server its log)."""
    from reinforce_cot import sharded

    cls = backend_class(cfg.generation)
    if cls.shares_ranks and sharded.world() > 1:  # rank 0 of several: every rank loads it, takes a share
        backend = sharded.everywhere("load", (load_here, cfg, path), lambda: load_here(cfg, path))
        backend.shared = True
        return backend
    return cls.build(cfg, path, Path(cache_dir) if cache_dir else None)


def load_here(cfg, path: str) -> Backend:
    """The configured backend on this process alone (each rank's share of a shared one: sharded.follow)."""
    return backend_class(cfg.generation).build(cfg, path)


def for_model(model, processing_class, cfg) -> HFBackend:
    """An hf backend on a model already in memory (evaluation during training), with the generation
    group's `max_new_tokens`, and its `batch_size` when the group is hf."""
    size = {"batch_size": cfg.generation.batch_size} if "batch_size" in cfg.generation else {}
    return HFBackend(model, processing_class, cfg.data, max_new_tokens=cfg.generation.max_new_tokens, **size)
