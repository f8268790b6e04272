"""Generation backends shared by evaluation, curation and rejection sampling.

A backend turns raw rows (question, image, ...) into `n` completions each:

    backend.generate(rows, n=4, temperature=1.0, template=None) -> list[list[str]]

`temperature=0` is greedy. `template` replaces the data's prompt template (curation asks for
answer-only prompts with it). Backends are selected by the `generation` config group
(conf/generation/*.yaml, `_target_` + `_partial_`), then bound to a model:

    make = instantiate(cfg.generation)                   # a partial of the backend class
    backend = make(model=model, processing_class=proc, data_cfg=cfg.data)

- hf: batched `generate` with the local model (CPU or GPU), left padding.
"""

from __future__ import annotations

import logging

from reinforce_cot import data as data_lib

log = logging.getLogger(__name__)


class HFBackend:
    """Batched HF `generate` with the model in memory."""

    def __init__(self, model, processing_class, data_cfg, batch_size: int = 64, max_new_tokens: int = 64):
        self.model, self.processing_class, self.data_cfg = model, processing_class, data_cfg
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)

    def prompt(self, row: dict, template: str | None = None) -> str:
        messages = data_lib.prompt_messages(
            row,
            template or self.data_cfg.prompt_template,
            self.data_cfg.system_prompt,
            with_image=self.data_cfg.modality == "image",
        )
        return self.processing_class.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, rows: list[dict], n: int = 1, temperature: float = 0.0, template: str | None = None):
        import torch

        self.model.eval()
        with_image = self.data_cfg.modality == "image"
        out: list[list[str]] = []
        per_batch = max(1, self.batch_size // n)  # prompts per forward pass, each repeated n times
        for start in range(0, len(rows), per_batch):
            batch = rows[start : start + per_batch]
            prompts = [self.prompt(r, template) for r in batch for _ in range(n)]
            if with_image:
                images = [r["image"] for r in batch for _ in range(n)]
                enc = self.processing_class(text=prompts, images=images, padding=True, return_tensors="pt")
            else:
                enc = self.processing_class(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
            enc = enc.to(self.model.device)
            kwargs = dict(max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
            if temperature > 0:
                kwargs |= dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            else:
                kwargs |= dict(do_sample=False)
            with torch.no_grad():
                ids = self.model.generate(**enc, **kwargs)
            texts = self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out += [texts[i * n : (i + 1) * n] for i in range(len(batch))]
        return out
