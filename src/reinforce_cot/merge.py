"""Merging checkpoints: fold a LoRA adapter into its base, or average checkpoints of one architecture.

Two modes, one command and one recipe stage kind:

- `mode=adapter` (default): base model + adapter -> one full model (peft's merge_and_unload), saved as
  safetensors with the processor, loadable by `model.init_from=<out>` and by vLLM. The base is read from
  the adapter's adapter_config.json and loaded unquantized, so a QLoRA adapter merges into full weights.
  Every train stage with peft does this on its own (ckpt/<stage>/merged).
- `mode=average`: the weighted mean of 2+ checkpoints of the same architecture (Kimi k1.5's long2short
  model merging: average a long-chain and a short-chain model). Weights default to equal and are
  normalised to sum to 1. Checkpoints of different architectures, or with different tensor names or
  shapes, are a ConfigError.

    python -m reinforce_cot.merge ckpt=outputs/<run>/ckpt/01_sft/final                 # -> .../01_sft/merged
    python -m reinforce_cot.merge ckpt=<adapter dir> out=/tmp/merged
    python -m reinforce_cot.merge mode=average "ckpts=[<long ckpt>,<short ckpt>]" "weights=[0.5,0.5]" out=<dir>

In a recipe: `{name: merge, kind: merge, overrides: [merge.mode=average, "merge.ckpts=[long,short]"]}`
(earlier stage names or folders); the result goes to ckpt/<merge stage>/merged, which `init_from` and
the evaluate stage pick up like any train stage's.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from reinforce_cot import rundir
from reinforce_cot.errors import ConfigError, UserError

log = logging.getLogger(__name__)
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def _kind(config) -> str:
    return "vlm" if getattr(config, "vision_config", None) is not None else "lm"


def _load(path: str, dtype="auto"):
    """A full model from a folder or hub id, with the Auto class its config calls for."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForImageTextToText if _kind(config) == "vlm" else AutoModelForCausalLM
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    return auto.from_pretrained(path, dtype=dtype)


def _copy_processor(src: Path, fallback: str | None, out: Path) -> None:
    """The processor files of `src` (a stage saves them beside the adapter), else of the base model."""
    copied = [f for f in PROCESSOR_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copy2(src / f, out / f)
    if not any(f.startswith("tokenizer") for f in copied) and fallback:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(fallback).save_pretrained(str(out))
        log.info("no processor beside the adapter: saved %s's tokenizer", fallback)


def merge_adapter(adapter_dir, out=None, dtype="auto") -> Path:
    """Fold the LoRA adapter in `adapter_dir` into its base; write full safetensors + processor to `out`
    (default: the adapter folder's sibling `merged/`). Returns `out`."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir).expanduser()
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise ConfigError(
            f"ckpt={adapter_dir}: no adapter_config.json there; point ckpt at an adapter folder (ckpt/<stage>/final "
            "of a peft run), or use mode=average for full checkpoints"
        )
    base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"ckpt={adapter_dir}: adapter_config.json names no base_model_name_or_path; set it")
    out = Path(out).expanduser() if out else adapter_dir.parent / rundir.MERGED
    t0 = time.time()
    model = PeftModel.from_pretrained(_load(base, dtype), str(adapter_dir))
    merged = model.merge_and_unload()
    merged.config.name_or_path = str(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    _copy_processor(adapter_dir, base, tmp)
    (tmp / "merge.json").write_text(
        json.dumps({"mode": "adapter", "adapter": str(adapter_dir), "base": base}, indent=2)
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a killed merge never leaves a half-written merged/ that init_from would pick
    log.info("merged %s into %s -> %s (%.1f s)", adapter_dir, base, out, time.time() - t0)
    return out


def _signature(path: Path):
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text())
    shapes = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return config.get("architectures"), config.get("model_type"), shapes


def average(ckpts, weights, out, dtype="auto") -> Path:
    """Weighted mean of full checkpoints of one architecture, accumulated in float32; saved with the
    first checkpoint's config and processor."""
    from reinforce_cot import models

    paths = [models.checkpoint_folder(str(c)) for c in ckpts]
    if len(paths) < 2:
        raise ConfigError(f"merge.ckpts={list(map(str, ckpts))}: averaging needs 2 or more checkpoints")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"merge.weights={weights}: give one non-negative weight per checkpoint ({len(paths)}), not all zero"
        )
    weights = [w / sum(weights) for w in weights]
    if any((p / "adapter_config.json").is_file() and not list(p.glob("model*.safetensors")) for p in paths):
        raise ConfigError(
            f"merge.ckpts={list(map(str, paths))}: average full models; merge adapters first (mode=adapter)"
        )
    ref = _signature(paths[0])
    for p in paths[1:]:
        sig = _signature(p)
        if sig[:2] != ref[:2] or sig[2] != ref[2]:
            what = (
                f"{sig[0] or sig[1]} vs {ref[0] or ref[1]}"
                if sig[:2] != ref[:2]
                else f"{len(set(sig[2].items()) ^ set(ref[2].items()))} tensors differ in name or shape"
            )
            raise ConfigError(
                f"merge.ckpts: {p} and {paths[0]} have different architectures ({what}); "
                "average only checkpoints of one model"
            )
    import torch

    t0 = time.time()
    acc = None
    for path, w in zip(paths, weights):
        model = _load(str(path), dtype)
        state = model.state_dict()
        if acc is None:
            acc, first = {k: v.detach().float() * w for k, v in state.items()}, model
        else:
            for k, v in state.items():
                acc[k] += v.detach().float() * w
            del model
    with torch.no_grad():
        for k, v in first.state_dict().items():
            v.copy_(acc[k].to(v.dtype))
    out = Path(out).expanduser()
    first.config.name_or_path = str(out)
    out.mkdir(parents=True, exist_ok=True)
    first.save_pretrained(str(out), safe_serialization=True)
    _copy_processor(paths[0], None, out)
    summary = {"mode": "average", "ckpts": [str(p) for p in paths], "weights": weights}
    (out / "merge.json").write_text(json.dumps(summary, indent=2))
    log.info("averaged %s with weights %s -> %s (%.1f s)", [str(p) for p in paths], weights, out, time.time() - t0)
    return out


def run(merge_cfg, out=None) -> Path:
    """Dispatch on merge_cfg.mode (adapter | average)."""
    mode = merge_cfg.get("mode", "adapter")
    ckpts = list(merge_cfg.get("ckpts") or ([merge_cfg.ckpt] if merge_cfg.get("ckpt") else []))
    dtype = merge_cfg.get("dtype", "auto")
    if mode == "adapter":
        if len(ckpts) != 1:
            raise ConfigError(f"merge.ckpts={ckpts}: mode=adapter merges one adapter folder; give ckpt=<adapter dir>")
        return merge_adapter(ckpts[0], out, dtype)
    if mode == "average":
        if not out:
            raise ConfigError("out is required for mode=average: out=<folder for the averaged model>")
        return average(ckpts, merge_cfg.get("weights"), out, dtype)
    raise ConfigError(f"merge.mode={mode}: unknown; use adapter or average")


def merge_stage(cfg, run_dir: Path, sid: str, splits: dict, results: dict) -> dict:
    """The `merge` stage kind (conf/stage/merge.yaml): merge.ckpts are earlier stage names (-> their
    checkpoints) or folders; writes ckpt/<sid>/merged and returns the summary."""
    t0 = time.time()
    by_name = _earlier_models(cfg)
    ckpts = [str(rundir.ckpt(run_dir, by_name[c])) if c in by_name else c for c in cfg.merge.ckpts]
    if cfg.merge.mode == "adapter":  # a stage's adapter lives in its final/
        final = lambda c: Path(c) / rundir.FINAL  # noqa: E731
        ckpts = [str(final(c)) if (final(c) / "adapter_config.json").is_file() else c for c in ckpts]
    spec = OmegaConf.create(
        {**OmegaConf.to_container(cfg.merge, resolve=True), "ckpts": ckpts, "dtype": cfg.model.dtype}
    )
    path = run(spec, rundir.merged(run_dir, sid))
    return {
        "stage": sid,
        "mode": cfg.merge.mode,
        "ckpts": ckpts,
        "weights": json.loads((path / "merge.json").read_text()).get("weights"),
        "merged": str(path),
        "wall_seconds": round(time.time() - t0, 1),
    }


def _earlier_models(cfg) -> dict[str, str]:
    """Earlier stages of the recipe that made a model (`stage.targets`), by stage name -> stage id."""
    return {rundir.stage_name(sid): sid for sid in cfg.stage.targets}


def validate_stage(cfg) -> None:
    """A merge stage's settings, checked with the other stages before anything runs."""
    m = cfg.get("merge") or {}
    if m.get("mode", "adapter") not in ("adapter", "average"):
        raise ConfigError(f"merge.mode={m.get('mode')}: unknown; use adapter or average")
    ckpts = list(m.get("ckpts") or [])
    if not ckpts:
        raise ConfigError("merge.ckpts is empty; list earlier stage names or checkpoint folders")
    names = list(_earlier_models(cfg))
    for c in ckpts:
        if c not in names and not Path(str(c)).expanduser().exists():
            raise ConfigError(f"merge.ckpts: '{c}' is neither an earlier stage with a model ({names}) nor a folder")
    if m.get("mode") == "average" and len(ckpts) < 2:
        raise ConfigError(f"merge.ckpts={ckpts}: averaging needs 2 or more checkpoints")


def main(argv: list[str] | None = None) -> int:
    """`python -m reinforce_cot.merge key=value ...` (keys: ckpt, ckpts, mode, weights, out, dtype)."""
    from reinforce_cot import cli

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    unknown = set(args) - {"ckpt", "ckpts", "mode", "weights", "out", "dtype"}
    try:
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: unknown key; use ckpt, ckpts, mode, weights, out, dtype")
        if not args.get("ckpt") and not args.get("ckpts"):
            raise ConfigError("ckpt is required: python -m reinforce_cot.merge ckpt=<adapter dir> [out=<dir>]")
        out = run(args, args.get("out"))
    except UserError as e:
        cli.report(e)
        return e.exit_code
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
