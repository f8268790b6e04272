"""What vLLM receives for image prompts, at the token level, through TRL 1.16's real GRPO/RLOO code.

vLLM cannot run here (CUDA only), so the boundary is replaced by recording stand-ins: `vllm.LLM` for
colocate mode and TRL's `VLLMClient` for server mode. The stand-in server counts image tokens with a
Qwen-VL processor at the hub default budget (12.8 M pixels), as a real `vllm serve` of a hub model does.
Everything on the trainer's side (tokenization, chat template, TRL's VLLMGeneration) is the real code.
"""

from __future__ import annotations

import functools
import types

import pytest
from hydra.utils import instantiate
from PIL import Image

from reinforce_cot import data as data_lib
from reinforce_cot import hardware, models, rewards, training, vllm_images
from reinforce_cot import images as images_lib
from tests.helpers import compose_cfg

HUB_MAX_PIXELS = 12845056  # Qwen2.5-VL's preprocessor_config.json on the hub: what vLLM uses unless told otherwise
COMPLETION = [100, 101, 102]  # ordinary tokens of the tiny vocabulary (ids < 7 are the special ones)


def _qwen_image_processor(patch: int, max_pixels: int, min_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def _tokens(processor, img) -> int:
    """Image tokens a Qwen-VL processor makes of `img` (patches / merge^2)."""
    grid = processor(images=[img], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // processor.merge_size**2


class _Completion:
    def __init__(self):
        self.token_ids = list(COMPLETION)
        self.logprobs = [{t: types.SimpleNamespace(rank=1, logprob=-1.0)} for t in COMPLETION]


class RecordingLLM:
    """Stands in for `vllm.LLM` (colocate): records every prompt it is given, returns a fixed completion."""

    prompts: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=lambda pairs: None))
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
        )

    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        RecordingLLM.prompts.extend(prompts)
        return [types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[_Completion()]) for p in prompts]

    def reset_prefix_cache(self):
        pass


class RecordingServer:
    """Stands in for TRL's `VLLMClient` (server mode): image features as `vllm serve` reports them, one
    placeholder per image with the server processor's token count, and a record of each request."""

    processor = None  # set per test: the server's image processor
    requests: list[dict] = []
    images: list = []  # the images of each prompt, in the order the requests come

    def __init__(self, base_url=None, group_port=None, connection_timeout=None):
        pass

    def init_communicator(self, device=None):
        pass

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def image_features(self, images):
        RecordingServer.images.extend(images)
        out = []
        for imgs in images:
            if not imgs:
                out.append(None)
                continue
            lengths = [_tokens(RecordingServer.processor, im) for im in imgs]
            offsets = [2 + sum(lengths[:i]) + 2 * i for i in range(len(lengths))]  # in the server's own render
            out.append(
                {
                    "mm_placeholders": {"image": [{"offset": o, "length": n} for o, n in zip(offsets, lengths)]},
                    "mm_hashes": {"image": [f"h{i}" for i in range(len(imgs))]},
                }
            )
        return out

    def generate(self, prompts, features=None, n=1, **sampling):
        RecordingServer.requests.extend({"token_ids": p, "features": f} for p, f in zip(prompts, features))
        k = len(prompts) * n
        return {
            "prompt_ids": list(prompts),
            "completion_ids": [list(COMPLETION)] * k,
            "logprobs": [[[-1.0]] * len(COMPLETION)] * k,
            "logprob_token_ids": [[[t] for t in COMPLETION]] * k,
        }

    def update_named_params(self, metadata, params):
        for _ in params:
            pass

    def reset_prefix_cache(self):
        pass


@pytest.fixture
def fake_vllm(monkeypatch):
    import trl.generation.vllm_generation as vg

    monkeypatch.setattr(vg, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vg, "LLM", RecordingLLM, raising=False)  # absent without vllm
    monkeypatch.setattr(vg, "SamplingParams", lambda **kw: kw, raising=False)
    monkeypatch.setattr(vg, "VLLMClient", RecordingServer)
    RecordingLLM.prompts = []
    RecordingServer.requests = []
    RecordingServer.images = []
    # TRL's colocated vLLM sets RANK/WORLD_SIZE/MASTER_* and starts a process group of one: undone after the test,
    # as after a stage, or the next TrainingArguments in this process sets up torch.distributed from them
    with hardware.stage_scope("vllm_images test"):
        yield


def _trainer(algo: str, mode: str, mixin: bool, rows):
    """A real TRL trainer on the tiny VLM with use_vllm (batch shrunk to 2 prompts x 2 samples: the
    tokens, not the batch, are under test)."""
    cfg = compose_cfg(
        "recipe=single",
        f"algo={algo}",
        "debug=smoke",
        "algo.args.use_vllm=true",
        f"algo.args.vllm_mode={mode}",
        "algo.args.num_generations=2",
        "algo.args.per_device_train_batch_size=4",
        "algo.args.steps_per_generation=1",
    )
    path = models.resolve_path(cfg.model)
    proc = models.load_processing_class(path, cfg.model)
    args = instantiate(cfg.algo.args, output_dir="/tmp/rcot_vllm_images_test")
    funcs, _ = rewards.build(cfg.reward)
    make = instantiate(cfg.algo.trainer)
    assert vllm_images.needed(cfg)
    if mixin:
        make = vllm_images.with_vllm_images(make, cfg.model)
    trainer = make(
        model=models.load_model(path, cfg.model),
        args=args,
        train_dataset=training.build_dataset(cfg, rows),
        processing_class=proc,
        reward_funcs=funcs,
    )
    return trainer, cfg


def _rows(image_size: int = 64):
    rows = data_lib.shapes_rows(2, seed=0)
    if image_size != 64:  # the same drawing, larger than the tiny model's cap (4096 pixels)
        rows = [{**r, "image": r["image"].resize((image_size, image_size))} for r in rows]
    return images_lib.capped(data_lib.from_rows(rows), None)  # the split contract, as data loading makes it


def _inputs(trainer, rows):
    ds = trainer.train_dataset
    return [ds[i] for i in (0, 0, 1, 1)]  # 2 prompts x num_generations 2, as TRL's sampler lays them out


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_colocated_vllm_gets_one_placeholder_per_image_and_the_trainer_keeps_the_expanded_ids(fake_vllm, algo):
    rows = _rows()
    trainer, _ = _trainer(algo, "colocate", mixin=True, rows=rows)
    proc, pad = trainer.processing_class, trainer.processing_class.image_token_id
    out = trainer._generate_and_score_completions(_inputs(trainer, rows))

    sent = RecordingLLM.prompts
    assert len(sent) == 4
    for p in sent:
        assert vllm_images.runs(p["prompt_token_ids"], pad) == [1]  # one placeholder for the one image
        assert isinstance(p["multi_modal_data"]["image"], Image.Image)
    # exactly the tokenizer-only render of the chat template (what vLLM expects; trl PR #6718's render)
    text = proc.apply_chat_template([trainer.train_dataset[0]["prompt"]], add_generation_prompt=True, tokenize=False)
    assert sent[0]["prompt_token_ids"] == proc.tokenizer(text, add_special_tokens=False)["input_ids"][0]
    # the loss still sees the processor's expansion: one run of N = 16 tokens (64x64 image, 8-px patches, merge 2)
    ids = out["prompt_ids"][0][out["prompt_mask"][0].bool()].tolist()
    assert vllm_images.runs(ids, pad) == [16]
    assert out["completion_ids"][0][: len(COMPLETION)].tolist() == COMPLETION


def test_trl_1_16_alone_sends_vllm_the_expanded_prompt(fake_vllm):
    """The bug the mixin fixes (trl#6294): without it, vLLM gets N = 16 pads and would expand the first again.
    If TRL fixes it, this test says so and the mixin can go."""
    rows = _rows()
    trainer, _ = _trainer("grpo", "colocate", mixin=False, rows=rows)
    trainer._generate_and_score_completions(_inputs(trainer, rows))
    pad = trainer.processing_class.image_token_id
    assert [vllm_images.runs(p["prompt_token_ids"], pad) for p in RecordingLLM.prompts] == [[16]] * 4


@pytest.mark.parametrize("mixin", [True, False])
def test_server_features_sit_on_runs_as_long_as_the_servers_token_count(fake_vllm, mixin):
    """An image larger than model.image_max_pixels: the trainer's processor caps it (16 tokens), a server at
    the hub default budget would not (144 tokens). Data loading fits every image where it is decoded
    (images.capped), and the mixin fits what it sends to vLLM again, so either way the server's count equals
    the run TRL points it at; unfitted, TRL would silently pair a 16-token run with 144 tokens of features."""
    RecordingServer.processor = _qwen_image_processor(8, HUB_MAX_PIXELS, 256)
    rows = _rows(image_size=200)
    trainer, _ = _trainer("grpo", "server", mixin=mixin, rows=rows)
    trainer._generate_and_score_completions(_inputs(trainer, rows))
    pad = trainer.processing_class.image_token_id
    assert len(RecordingServer.requests) == 2  # one request per distinct prompt (n = num_generations)
    for req, imgs in zip(RecordingServer.requests, RecordingServer.images, strict=True):
        run = vllm_images.runs(req["token_ids"], pad)
        placed = [p["length"] for p in req["features"]["mm_placeholders"]["image"]]
        assert placed == run == [16]  # TRL's placement: the trainer's run
        assert _tokens(RecordingServer.processor, imgs[0]) == 16
    # what the server would count for the image as stored: 200 px -> 192 at factor 16, 12 x 12 tokens
    assert _tokens(RecordingServer.processor, Image.new("RGB", (200, 200))) == 144


def test_a_server_with_another_budget_is_refused_with_the_fix(fake_vllm):
    RecordingServer.processor = _qwen_image_processor(
        8, 1024, 256
    )  # serves the images at a quarter of the trainer's pixels
    rows = _rows()
    trainer, _ = _trainer("grpo", "server", mixin=True, rows=rows)
    with pytest.raises(vllm_images.ServerImageTokenMismatch, match="--mm-processor-kwargs"):
        trainer._generate_and_score_completions(_inputs(trainer, rows))


@pytest.mark.parametrize(
    ("patch", "cap", "size"),
    [(14, 401408, (1600, 1200)), (14, 401408, (3000, 500)), (8, 4096, (200, 200))],
    ids=["qwen2_5_vl-1600x1200", "qwen2_5_vl-3000x500", "tiny-200x200"],
)
def test_trainer_and_a_hub_default_processor_agree_on_fitted_images(patch, cap, size):
    """R2: the trainer's processor (max_pixels = model.image_max_pixels) and vLLM's (hub default, 12.8 M
    pixels) cut an `images.fit` output into the same number of tokens; on the raw image they do not."""
    img = Image.new("RGB", size, (120, 30, 200))
    min_pixels = 3136 if patch == 14 else 256  # Qwen2.5-VL's hub min_pixels (56 x 56); the tiny model's
    trainer = _qwen_image_processor(patch, cap, min_pixels)
    hub = _qwen_image_processor(patch, HUB_MAX_PIXELS, min_pixels)
    fitted = images_lib.fit(img, cap, factor=patch * 2)
    assert _tokens(trainer, img) == _tokens(trainer, fitted) == _tokens(hub, fitted)
    assert _tokens(hub, img) > _tokens(trainer, img)  # without the cap the two disagree


def test_llm_gets_no_processor_budget_of_its_own(fake_vllm):
    """TRL 1.16 starts vLLM from the model path with no mm_processor_kwargs: the budget vLLM uses is the
    checkpoint's, which is why images are fitted before they reach it (this test pins that assumption)."""
    trainer, _ = _trainer("grpo", "colocate", mixin=True, rows=_rows())
    kwargs = trainer.vllm_generation.llm.kwargs
    assert "mm_processor_kwargs" not in kwargs and "limit_mm_per_prompt" not in kwargs


def test_unexpand_and_runs_agree():
    ids = [3, 5, 5, 5, 4, 7, 3, 5, 5, 4]
    assert vllm_images.runs(vllm_images.unexpand(ids, 5), 5) == [1, 1]
    assert functools.reduce(lambda a, _: vllm_images.unexpand(a, 5), range(3), ids) == vllm_images.unexpand(ids, 5)
