"""generation=hf: batched transformers `generate` with the model in memory, on this rank's GPU (else the CPU).

Decoding is exactly what is asked (`decoding_config`): greedy, or plain sampling at the temperature,
never a checkpoint's generation_config.json defaults (Qwen2.5-VL-Instruct ships a repetition penalty and
top_k/top_p), so that hf and vllm score the same. Prompts go in batches of `batch_size // n` prompts,
each batch seeded from its own content: the samples do not depend on what ran before or on how many
ranks share the work. In a multi-process run the ranks share the batches (reinforce_cot.sharded).

    python train.py recipe=kimi generation.max_new_tokens=512 generation.batch_size=16   # every stage that generates
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

from reinforce_cot import data as data_lib
from reinforce_cot.generation.base import Backend
from reinforce_cot.generation.store import row_key

log = logging.getLogger(__name__)

STOP_TOKEN_FIELDS = ("eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id")


class HFBackend(Backend):
    """Batched HF `generate` with the model in memory (see the module docstring)."""

    shares_ranks = True

    def __init__(
        self, model, processing_class, data_cfg, batch_size: int = 64, max_new_tokens: int = 64, seed: int = 0
    ):
        super().__init__(model, processing_class, data_cfg, max_new_tokens)
        self.batch_size, self.seed = batch_size, seed
        self.shared = False  # True: loaded on every rank by generation.load under sharded.leading()

    @classmethod
    def build(cls, cfg, path: str, cache_dir: Path | None = None) -> HFBackend:
        """Loads the checkpoint on this process' device (hardware.device: cuda:LOCAL_RANK, else the CPU)."""
        from hydra.utils import instantiate

        from reinforce_cot import hardware, models

        dev = hardware.device()
        placement = {"device_map": {"": dev.index}} if dev.type == "cuda" else {}
        processing_class = models.load_processing_class(path, cfg.model)
        model = models.load_model(path, cfg.model, **placement)
        log.info("generating with %s on %s", path, model.device)
        return instantiate(cfg.generation)(model=model, processing_class=processing_class, data_cfg=cfg.data)

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
