"""One training stage: seed -> data -> model (+ freezing) -> rewards -> TRL trainer (+ peft, per-part LRs)
-> train (auto-resume) -> save (+ LoRA merge).

The algo config names the TRL trainer and mirrors its config dataclass (`algo.trainer`, `algo.args`),
so this module only wires objects together; what each algorithm does is TRL's. A stage whose
ckpt/<stage>/ already holds a checkpoint continues from the newest one (same optimizer, scheduler, RNG
and data order), which is how `resume=<run dir>` and Slurm requeues pick up where they stopped.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hydra.utils import instantiate

from reinforce_cot import (
    adapters,
    callbacks,
    dynamic_sampling,
    hardware,
    models,
    parts,
    preemption,
    rewards,
    rundir,
    sampling,
    vllm_images,
)
from reinforce_cot import data as data_lib

log = logging.getLogger(__name__)


def build_dataset(cfg, split):
    """The train split (reinforce_cot.data's row contract) in the columns TRL's trainer reads; images
    decoded per batch at model.image_max_pixels."""
    m = cfg.model
    return data_lib.format_split(split, cfg.data, cfg.algo.kind, m.get("image_max_pixels"), m.get("image_factor", 28))


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint-<step>/ (trainer_state.json is written last, so a checkpoint a
    kill interrupted mid-save is skipped)."""
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _logger_env(cfg, run_dir: Path, sid: str) -> None:
    """Point TRL's logger callbacks at the run dir (they read these variables when created)."""
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(rundir.tensorboard(run_dir, sid))
    if "wandb" in cfg.logger.report_to:
        os.environ["WANDB_DIR"] = str(run_dir)
        os.environ["WANDB_PROJECT"] = cfg.logger.project
        os.environ["WANDB_MODE"] = cfg.logger.mode
        if cfg.logger.get("entity"):
            os.environ["WANDB_ENTITY"] = cfg.logger.entity
        # one W&B run per stage of a run dir, however often it restarts: a requeued or resumed stage continues it
        os.environ["WANDB_RUN_ID"] = wandb_run_id(run_dir, sid)
        os.environ["WANDB_RESUME"] = "allow"


def wandb_run_id(run_dir: Path, sid: str) -> str:
    import hashlib

    return hashlib.sha1(f"{Path(run_dir).resolve()}/{sid}".encode()).hexdigest()[:16]


def train_stage(cfg, run_dir: Path, sid: str, splits: dict, earlier: dict | None = None) -> dict:
    """Train one stage (the `train` kind, conf/stage/train.yaml); returns its summary."""
    from transformers import set_seed

    t0 = time.time()
    set_seed(cfg.seed)
    ckpt_dir = rundir.ckpt(run_dir, sid)
    train_ds = build_dataset(cfg, splits["train"])
    columns = list(train_ds[0]) if train_ds.format["type"] == "custom" else train_ds.column_names  # a view: its rows
    log.info("[%s] dataset: %d rows, columns %s", sid, len(train_ds), columns)

    _logger_env(cfg, run_dir, sid)
    # the args before the model, as transformers documents for ZeRO-3: while they live, from_pretrained loads
    # each rank's shard only (zero.Init), instead of the whole model on every rank (8 x 16.6 GB for a 7B)
    args = instantiate(cfg.algo.args, output_dir=str(ckpt_dir), run_name=f"{run_dir.name}/{sid}")
    world = args.world_size  # sets up the process group now (lazily done otherwise): zero.Init partitions over it
    if hardware.zero(cfg.algo.args)[0] == 3:
        import deepspeed

        deepspeed.init_distributed()  # zero.Init counts ranks through deepspeed.comm, which the trainer sets up later
    path = models.resolve_path(cfg.model)
    processing_class = models.load_processing_class(path, cfg.model)
    model = models.load_model(path, cfg.model, dtype=adapters.load_dtype(cfg), **adapters.load_kwargs(cfg))
    if hasattr(next(model.parameters()), "ds_id"):  # DeepSpeed's mark on a partitioned parameter
        log.info("[%s] model loaded partitioned (ZeRO-3 zero.Init): this rank holds 1/%d of it", sid, world)
    parts.freeze(model, cfg)

    kwargs = dict(model=model, args=args, train_dataset=train_ds, processing_class=processing_class)
    if cfg.algo.kind == "rl":
        funcs, weights = rewards.build(cfg.reward)
        args.reward_weights = weights
        kwargs["reward_funcs"] = funcs
        log.info("[%s] rewards: %s", sid, dict(zip([f.__name__ for f in funcs], weights)))
    kwargs.update(adapters.trainer_kwargs(cfg, model))
    make_trainer = instantiate(cfg.algo.trainer)
    if cfg.algo.kind == "rl" and (cfg.get("sampler") or {}).get("_target_"):  # not TRL's own order
        make_trainer = sampling.with_sampler(make_trainer, cfg.sampler)
        log.info("[%s] sampler: %s", sid, cfg.sampler.name)
    if vllm_images.needed(cfg):  # vLLM gets one placeholder per image, not TRL 1.16's expanded ids (trl#6294)
        make_trainer = vllm_images.with_vllm_images(make_trainer, cfg.model)
    if dynamic_sampling.needed(cfg):  # DAPO's dynamic sampling and/or a generation budget
        make_trainer = dynamic_sampling.with_dynamic_sampling(make_trainer, cfg.algo.dynamic_sampling)
        log.info("[%s] dynamic sampling: %s", sid, dict(cfg.algo.dynamic_sampling))
    trainer = make_trainer(**kwargs)
    parts.install_lr_multipliers(trainer, cfg)
    callbacks.attach(trainer, cfg, sid, splits["test"])  # progress bar, metrics to output.log, eval during training
    log.info("[%s] %s", sid, adapters.describe_trainable(trainer.model))
    if cfg.algo.kind == "preference" or cfg.algo.args.get("beta"):
        ref = getattr(trainer, "ref_model", None)
        where = (
            type(ref).__name__ + " loaded from " + ref.name_or_path
            if ref is not None
            else "the policy, adapter disabled"
        )
        log.info("[%s] reference model: %s", sid, where if ref is not None or adapters.enabled(cfg) else "none")

    resume_from = last_checkpoint(ckpt_dir)
    if resume_from:
        log.info("[%s] resuming from %s", sid, resume_from)
    preemption.attach(trainer)  # in a Slurm job: USR2/SIGTERM -> checkpoint at the next step -> requeue
    out = trainer.train(resume_from_checkpoint=resume_from)

    final = rundir.final(run_dir, sid)
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        processing_class.save_pretrained(str(final))
        # final/ holds safetensors and JSON only: the pickled TrainingArguments become readable JSON
        (final / "training_args.bin").unlink(missing_ok=True)
        (final / "training_args.json").write_text(args.to_json_string())
    merged = None
    if adapters.enabled(cfg) and cfg.peft.get("merge", True) and trainer.is_world_process_zero():
        from reinforce_cot.merge import merge_adapter

        with hardware.local_loading():  # rank 0 alone: no ZeRO-3 partitioning of the base it loads
            merged = str(merge_adapter(final, rundir.merged(run_dir, sid), cfg.model.dtype))
    summary = {
        "stage": sid,
        "algo": cfg.algo.name,
        "global_step": trainer.state.global_step,
        "train_metrics": out.metrics,
        "wall_seconds": round(time.time() - t0, 1),
        "final": str(final),
        "merged": merged,
        "param_groups": getattr(trainer, "rc_param_groups", None),
        "resumed_from": resume_from,
        "ranks": hardware.ranks_that_ran(),  # every process that trained (multi-process presets)
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],  # NO, MULTI_CPU, DEEPSPEED..
        "log_history": trainer.state.log_history,
    }
    numbers = callbacks.summary(trainer.state, callbacks.progress_keys(cfg), summary["wall_seconds"])
    log.info("[%s] done: %s -> %s", sid, numbers, final)
    hardware.release_trainer(trainer)  # DeepSpeed engine, colocated vLLM; the rest goes with the stage (stage_scope)
    return summary
