"""generation=vllm: vLLM's offline engine on the checkpoint folder, `LLM.chat` with `SamplingParams(n=...)`.

Needs a CUDA GPU and `pip install -e '.[gpu]'` (vllm 0.31). Not runnable on the CPU machines this project
is tested on: validation stops `generation=vllm` there with a one-line error (`check_config`), and
tests/test_sharded.py checks what it asks of a stand-in `vllm.LLM`.

    python train.py recipe=unified_reward_think generation=vllm hardware=1xa100 model=qwen2_5_vl_3b
"""

from __future__ import annotations

import importlib.util

from reinforce_cot.errors import ConfigError
from reinforce_cot.generation.base import Backend


class VLLMBackend(Backend):
    """vLLM's offline engine (see the module docstring)."""

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

    @classmethod
    def check_config(cls, gen) -> None:
        """vllm installed (what a CPU machine lacks, whatever pip says)."""
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "generation=vllm: the 'vllm' package is not installed (vLLM needs a CUDA GPU); on a GPU machine: "
                "pip install -e '.[gpu]'; here use generation=hf or generation=openai"
            )

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
