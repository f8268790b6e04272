"""Freezing named parts and per-part learning rates, through the real recipe code (recipe=two_phase, in
process) and the optimizer transformers builds; and the errors for parts a model does not have."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from reinforce_cot import config, tiny
from reinforce_cot.errors import ConfigError
from tests.helpers import compose_cfg, run_in_process

PART_OF = {  # saved tensor names (transformers' on-disk layout) -> part
    "vision": lambda k: k.startswith("visual.") and not k.startswith("visual.merger."),
    "projector": lambda k: k.startswith("visual.merger."),
    "language_model": lambda k: k.startswith(("model.", "lm_head.")),
}


def _by_part(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    """part -> (tensors changed, tensors)"""
    out = {}
    for part, test in PART_OF.items():
        keys = [k for k in before if test(k)]
        out[part] = (sum(not torch.equal(before[k], after[k]) for k in keys), len(keys))
    return out


@pytest.mark.slow  # two 4-step SFT stages and their evaluations, in process: ~10 s
def test_two_phase_freezes_then_trains_all_at_per_part_lrs(tmp_path):
    run = run_in_process(tmp_path, "recipe=two_phase", "debug=smoke")
    cfg = OmegaConf.load(run.dir / "backup/stages/02_full.yaml")
    start = load_file(tiny.build(OmegaConf.load(run.dir / "backup/stages/01_align.yaml").model) / "model.safetensors")
    phase1 = load_file(run.dir / "ckpt/01_align/final/model.safetensors")
    phase2 = load_file(run.dir / "ckpt/02_full/final/model.safetensors")

    changed = _by_part(start, phase1)
    assert changed["vision"][0] == 0 and changed["language_model"][0] == 0  # frozen: bit-identical
    assert changed["projector"][0] == changed["projector"][1] > 0  # the only part that trained
    changed = _by_part(phase1, phase2)
    assert all(n == total > 0 for n, total in changed.values()), changed  # phase 2: every part moves

    base = cfg.model.lr.sft * 0.2
    assert cfg.algo.args.learning_rate == pytest.approx(base)
    groups = run.result("02_full.json")["param_groups"]  # read back from the optimizer's own param_groups
    lrs = {g["part"]: g["lr"] for g in groups}
    assert lrs == pytest.approx({"default": base, "vision": 0.1 * base, "language_model": 0.5 * base})
    assert sum(g["tensors"] for g in groups) == len(phase2)  # every (untied) tensor in exactly one group
    assert run.result("01_align.json")["param_groups"] is None  # phase 1: one plain group, as TRL builds it
    assert [r["stage"] for r in run.result("summary.json")["rows"]] == ["01_align", "02_full"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.freeze=[eyes]"], r"model.freeze=\['eyes'\]: unknown part 'eyes' for model=tiny_vlm; known parts: \["),
        (
            ["model=tiny_lm", "data=arithmetic", "optim.lr_multipliers={vision: 0.1}"],
            r"optim.lr_multipliers=\{'vision': 0.1\}: model=tiny_lm has no 'vision' part",
        ),
        (["optim.lr_multipliers={ears: 2}"], r"unknown part 'ears'"),
        (["optim.lr_multipliers={vision: -1}"], r"optim.lr_multipliers.vision=-1.0: must be >= 0"),
        (
            ["model.freeze=[vision]", "model.parts.vision=encoder\\."],
            r"model.freeze: part 'vision' \(model.parts.vision=encoder\\.\) matches no parameter",
        ),
    ],
)
def test_bad_parts_fail_at_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.validate(compose_cfg("recipe=single", "algo=sft", "reward=none", *overrides))
