"""DAPO's dynamic sampling on TRL's GRPOTrainer: train only on groups whose rewards differ.

A group (the num_generations completions of one prompt) whose rewards are all equal (all right or all
wrong) gets zero advantage, so it adds no gradient; with the token-level loss it still counts in the
normaliser and shrinks every step (DAPO, Yu et al. 2025, sec. 3.2). Dynamic sampling drops those groups and
generates for more prompts until the generation batch holds only informative ones:

    python train.py recipe=single algo=dapo reward=dapo
    python train.py recipe=single algo=dapo reward=dapo algo.dynamic_sampling.metric=null  # any reward spread
    python train.py recipe=single algo=grpo algo.dynamic_sampling.enabled=true   # on any GRPO-based algo

Settings (`algo.dynamic_sampling`, conf/algo/grpo.yaml): `enabled`; `max_extra_rounds` (extra generation
rounds per generation batch at most); `metric` (null: the weighted total reward, i.e. exactly the groups
with zero advantage; or one reward's name: `accuracy`, algo=dapo's, is the paper's and verl's "acc", and
EasyR1's `filter_key=accuracy` with bounds (0.01, 0.99) on the group mean); `max_completions`
(stop training at the first generation boundary once this many completions have been generated, also
with `enabled: false`: the same generation budget for arms that generate different amounts per step).

Semantics, per generation batch (TRL: generation_batch_size = G x T completions, T prompts, one batch
feeding steps_per_generation x num_iterations micro-steps):

1. Round 1 generates and scores TRL's own batch (the dataloader's T prompts). Groups whose metric has
   zero spread (nan-aware std <= 1e-8, TRL's `frac_reward_zero_std` test) are dropped.
2. While fewer than T informative groups are kept and fewer than `max_extra_rounds` extra rounds ran,
   more prompts are drawn and generated in TRL's layout (every process its contiguous slice): as many as
   the missing groups over the share of informative groups seen so far in this batch (`extra_size`), at
   most T. verl draws whole generation batches (often 3x oversampled) and discards the surplus; sizing
   the round to need keeps the generation budget for groups that are trained.
3. The first T informative groups (in generation order) are trained. If the rounds ran out, the batch
   holds what there is: the kept groups, rounded down to whole micro-batches on every process (a
   multiple of processes x steps_per_generation / gcd(G, that) groups); with none at all, round 1's batch
   as TRL would have trained it. Logged as `dynamic_sampling/short`.

Logged: `dynamic_sampling/filtered_fraction` (zero-spread groups / groups generated, all rounds),
`dynamic_sampling/extra_rounds`, `dynamic_sampling/kept_groups`, `dynamic_sampling/short` per generation
batch; `dynamic_sampling/prompts` (prompts drawn) and `dynamic_sampling/completions` (completions
generated), both cumulative. TRL's own `frac_reward_zero_std` then describes the trained batch (~0).

Where extra prompts come from. Like ms-swift (a separate resample iterator), not like verl and EasyR1
(which keep pulling their one dataloader, whole batches in verl, mini rollout batches in EasyR1, so an epoch
ends after fewer optimizer steps; ms-swift falls back to the unfiltered batch when its retries run out,
verl raises): the dataloader feeds round 1
and keeps its epoch accounting; extra rounds are drawn by `sampling.GroupedSampler.draw(position, key)`,
from the configured sampler's current pool and weights (curriculum: the prompts open at this point;
prioritized: by failure rate, updated from every round's rewards, filtered groups included) or uniformly
when TRL's own order is in use. Each extra round has its own seeded generator, numbered by a counter
that is saved with each checkpoint, prompts drawn earlier in the same batch are left out, and process 0
draws and broadcasts, so every process sees the same prompts.

Where this hooks into TRL 1.16 (grpo_trainer.py) and why there:

- `_prepare_inputs` generates once per generation batch, then shuffles it and splits it into
  steps_per_generation micro-batches (`split_tensor_dict` drops a remainder): the buffering is left
  alone; the batch it buffers is just chosen differently, which is why a short batch is cut to whole
  micro-batches.
- `_generate_and_score_completions(inputs)` is overridden: it runs the rounds (prompt building as in
  TRL's lines for plain conversational/image prompts, then TRL's own `_generate` and `_calculate_rewards`,
  which gathers rewards over processes), selects groups, gives each process its slice of the selected
  rows (all processes' rounds are exchanged with `gather_object` when there are several), and then calls
  TRL's method on the selected inputs with `_generate` and `_calculate_rewards` answering from that
  cache. So the tensors, old/ref log-probs, images, advantages and loss normaliser (`num_items_in_batch`)
  are TRL's own, computed once on exactly the trained rows, and reward functions with side effects (the
  prioritized sampler's success rates, the length reward's gathering) run once per generated round.
- Data position on resume: `Trainer` skips the dataloader forward by the batches already trained
  (`skip_first_batches`) and restores the RNG; the dataloader only feeds round 1, so that still holds.
  The extra-round counter and the cumulative counts are written to `checkpoint-*/dynamic_sampling.json`
  before the rest of the checkpoint and read back by `train(resume_from_checkpoint)`, so a resumed run
  draws the extra rounds an uninterrupted one would have and stops at the same generation budget.
  TRL itself does not save its `_step` counter or its buffer: a checkpoint inside a generation batch
  (save_steps not a multiple of steps_per_generation) regenerates on resume, with or without this mixin.

Not supported (refused when the trainer is built): tools, environments and `rollout_func` (rows then
carry tool masks and extra fields this cache does not hold), iterable datasets (no random access for
extra rounds). RLOO has its own trainer class and is not wired. A run stopped by `max_completions`
leaves a learning-rate schedule that decays over max_steps unfinished.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from reinforce_cot.errors import ConfigError
from reinforce_cot.sampling import GroupedSampler, with_mixin

log = logging.getLogger(__name__)
STATE_FILE = "dynamic_sampling.json"
ZERO_STD = 1e-8  # torch.isclose(std, 0)'s atol: TRL's test for frac_reward_zero_std


def informative(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """One bool per group of `group_size` consecutive rows: the values differ (nan rows ignored; fewer
    than two scored rows cannot differ).

    >>> informative(torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), 2.0]), 2).tolist()
    [False, True, False]
    """
    from trl.trainer.utils import nanstd

    std = nanstd(values.view(-1, group_size), dim=1)
    return torch.nan_to_num(std, nan=0.0) > ZERO_STD


def keep_unit(group_size: int, processes: int, steps_per_generation: int) -> int:
    """Smallest number of groups that splits into equal whole micro-batches on every process.

    >>> keep_unit(8, 1, 4), keep_unit(8, 2, 4), keep_unit(4, 2, 4), keep_unit(6, 4, 1)
    (1, 1, 2, 2)
    """
    split = processes * steps_per_generation
    return split // math.gcd(group_size, split)


def groups_to_train(kept: int, target: int, unit: int) -> int:
    """How many of the `kept` informative groups a batch of `target` groups trains: `target` when there are
    enough, else as many as fill whole micro-batches (0: none).

    >>> groups_to_train(40, 32, 1), groups_to_train(13, 32, 2), groups_to_train(1, 32, 2)
    (32, 12, 0)
    """
    return target if kept >= target else kept // unit * unit


def extra_size(missing: int, kept: int, generated: int, target: int, group_size: int, processes: int) -> int:
    """Prompts for the next extra round: the `missing` groups over the share of informative groups seen so far
    in this batch (`kept` of `generated`), at most `target`, rounded up so that every process gets the same
    number of rows. Sized to need, not a whole generation batch, so that the budget is not spent on groups
    that would be thrown away.

    >>> extra_size(4, 28, 32, 32, 8, 1), extra_size(16, 16, 32, 32, 8, 1), extra_size(3, 0, 32, 32, 8, 1)
    (5, 32, 32)
    >>> extra_size(1, 7, 8, 8, 4, 8)  # 8 processes, 4 completions per prompt: prompts come in pairs
    2
    """
    want = target if kept == 0 else min(target, math.ceil(missing * generated / kept))
    step = processes // math.gcd(group_size, processes)
    return min(target, math.ceil(want / step) * step)


def prompts_of(inputs: list[dict]) -> list:
    """The prompts TRL 1.16 builds from dataset rows in `_generate_and_score_completions` (no environments,
    no tools): the conversational `prompt`, with the row's `image`/`images` put into its messages."""
    from trl.data_utils import prepare_multimodal_messages

    prompts = [x["prompt"] for x in inputs]
    if "images" in inputs[0]:
        images = [x.get("images") for x in inputs]
    elif "image" in inputs[0]:
        images = [[x.get("image")] if x.get("image") is not None else None for x in inputs]
    else:
        images = None
    if images is not None and all(i == [] for i in images):
        images = None
    if images is not None:
        prompts = [prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, images, strict=True)]
    return prompts


class _Cache:
    """What TRL's `_generate` and `_calculate_rewards` return, for the selected rows of one generation batch."""

    def __init__(self, records: list[dict], rewards: torch.Tensor):
        has = lambda key: any(r[key] is not None for r in records)  # noqa: E731
        self.generated = (
            [r["prompt_ids"] for r in records],
            [r["completion_ids"] for r in records],
            None,  # tool_mask: no tools
            [r["completion"] for r in records],
            [r["logprobs"] for r in records] if has("logprobs") else None,
            {},  # extra_fields: no rollout_func
            [r["images"] for r in records] if has("images") else None,
            [],  # tool_images
        )
        self.rewards = rewards


class DynamicSamplingMixin:
    """DAPO's dynamic sampling and a generation budget on a GRPOTrainer (module docstring)."""

    def __init__(self, *args, dynamic_sampling_cfg=None, **kwargs):
        cfg = dict(dynamic_sampling_cfg or {})
        self._rc_ds_enabled = bool(cfg.get("enabled"))
        self._rc_ds_max_extra = int(cfg.get("max_extra_rounds") or 0)
        self._rc_ds_metric = cfg.get("metric")
        self._rc_ds_budget = cfg.get("max_completions")
        self._rc_ds = {"extra_rounds": 0, "prompts": 0, "completions": 0, "filtered": 0, "groups": 0, "short": 0}
        self._rc_ds_cache: _Cache | None = None
        self._rc_ds_dataset = None
        self._rc_ds_drawer: GroupedSampler | None = None
        super().__init__(*args, **kwargs)
        if self._rc_ds_enabled:
            if self.rollout_func is not None or self.tools or self.environment_factories is not None:
                raise ConfigError(
                    "algo.dynamic_sampling.enabled=true does not work with tools, environments or rollout_func "
                    "(their rows carry fields it does not keep); turn it off for this trainer"
                )
            from datasets import IterableDataset

            if isinstance(self.train_dataset, IterableDataset | torch.utils.data.IterableDataset):
                raise ConfigError(
                    "algo.dynamic_sampling.enabled=true needs a dataset with random access for its extra rounds, "
                    "not an iterable one; load the data as a datasets.Dataset or turn it off"
                )
            if self._rc_ds_metric is not None and self._rc_ds_metric not in self.reward_func_names:
                raise ConfigError(
                    f"algo.dynamic_sampling.metric={self._rc_ds_metric}: no such reward (have "
                    f"{self.reward_func_names}); use one of them, or null for the weighted total"
                )
        if self._rc_ds_budget is not None:
            self.add_callback(_BudgetStop(self))

    # ------------------------------------------------------------------------------ state
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, str | os.PathLike):
            path = Path(resume_from_checkpoint) / STATE_FILE
            if path.is_file():
                import json

                self._rc_ds.update(json.loads(path.read_text()))
                log.info("dynamic sampling state restored from %s: %s", resume_from_checkpoint, self._rc_ds)
            else:
                log.warning("no %s in %s: dynamic sampling counts start from zero", STATE_FILE, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        if self.args.should_save:
            from reinforce_cot.rundir import write_json

            # written first: a checkpoint with trainer_state.json (written last) always has it
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            write_json(Path(folder) / STATE_FILE, self._rc_ds)
        return super()._save_checkpoint(model, trial)

    def log(self, logs, *args, **kwargs):
        if self.model.training:
            logs = {
                **logs,
                "dynamic_sampling/prompts": self._rc_ds["prompts"],
                "dynamic_sampling/completions": self._rc_ds["completions"],
            }
        return super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------------- extra prompts
    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        self._rc_ds_dataset = dataset if dataset is not None else self.train_dataset
        if isinstance(sampler, GroupedSampler):  # curriculum / prioritized: their pool and weights
            self._rc_ds_drawer = sampler
        else:  # TRL's RepeatSampler: uniform over the dataset
            self._rc_ds_drawer = GroupedSampler(
                self._rc_ds_dataset,
                mini_repeat_count=self.num_generations,
                batch_size=self.args.generation_batch_size // self.num_generations,
                seed=self.args.seed,
            )
        return sampler

    def _rc_extra_rows(self, prompts: int, exclude: set[int]) -> list[dict]:
        """Dataset rows of one extra round for this process: `prompts` new prompts, each num_generations times,
        in TRL's layout (the round's global batch cut into equal contiguous per-process slices)."""
        from accelerate.utils import broadcast_object_list

        drawer = self._rc_ds_drawer
        chunk = [None]
        if self.accelerator.is_main_process:
            chunk = [drawer.draw(drawer.position, key=self._rc_ds["extra_rounds"], exclude=exclude, size=prompts)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(chunk)
        self._rc_ds["extra_rounds"] += 1
        exclude.update(chunk[0])
        layout = [i for i in chunk[0] for _ in range(self.num_generations)]
        local = len(layout) // self.accelerator.num_processes
        mine = layout[self.accelerator.process_index * local : (self.accelerator.process_index + 1) * local]
        rows = {i: self._rc_ds_dataset[i] for i in set(mine)}
        return [dict(rows[i]) for i in mine]

    # ------------------------------------------------------------------------- the hooks
    def _generate(self, prompts):
        if self._rc_ds_cache is not None:
            return self._rc_ds_cache.generated
        return super()._generate(prompts)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._rc_ds_cache is not None:
            return self._rc_ds_cache.rewards
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            return super()._generate_and_score_completions(inputs)
        if not self._rc_ds_enabled:
            self._rc_count(len(inputs))
            return super()._generate_and_score_completions(inputs)
        selected, cache = self._rc_select(inputs)
        self._rc_ds_cache = cache
        try:
            return super()._generate_and_score_completions(selected)
        finally:
            self._rc_ds_cache = None

    def _rc_count(self, local_rows: int) -> None:
        rows = local_rows * self.accelerator.num_processes
        self._rc_ds["completions"] += rows
        self._rc_ds["prompts"] += rows // self.num_generations

    def _rc_metric(self, rewards: torch.Tensor) -> torch.Tensor:
        """Per row: the weighted total reward (what TRL's advantage uses), or one reward's column."""
        if self._rc_ds_metric is not None:
            return rewards[:, self.reward_func_names.index(self._rc_ds_metric)]
        total = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
        total[torch.isnan(rewards).all(dim=1)] = torch.nan
        return total

    def _rc_select(self, inputs: list[dict]) -> tuple[list[dict], _Cache]:
        """Run the rounds; return this process's selected rows and the cache TRL's pass will read."""
        from accelerate.utils import gather_object

        G, P = self.num_generations, self.accelerator.num_processes
        target = len(inputs) * P // G
        unit = keep_unit(G, P, self.args.steps_per_generation)
        rounds: list[tuple[list[dict], torch.Tensor]] = []  # per round: every process's records, rewards
        kept: list[tuple[int, int]] = []  # (round, group) of informative groups, in generation order
        exclude: set[int] = set()
        rows, generated = inputs, 0
        for r in range(1 + self._rc_ds_max_extra):
            if r:
                rows = self._rc_extra_rows(extra_size(target - len(kept), len(kept), generated, target, G, P), exclude)
            self._rc_count(len(rows))
            prompts = prompts_of(rows)
            out = super()._generate(prompts)
            prompt_ids, completion_ids, tool_mask, completions, logprobs, extra, images, _ = out
            rewards = self._calculate_rewards(rows, prompts, completions, completion_ids)  # gathered
            records = [
                {
                    "input": rows[i],
                    "prompt_ids": prompt_ids[i],
                    "completion_ids": completion_ids[i],
                    "completion": completions[i],
                    "logprobs": logprobs[i] if logprobs is not None else None,
                    "images": images[i] if images is not None else None,
                }
                for i in range(len(rows))
            ]
            rounds.append((gather_object(records) if P > 1 else records, rewards))
            good = informative(self._rc_metric(rewards), G)
            kept += [(r, g) for g in torch.nonzero(good).flatten().tolist()]
            generated += len(good)
            if len(kept) >= target:
                break
        n = groups_to_train(len(kept), target, unit)
        chosen = kept[:n] if n else [(0, g) for g in range(target)]  # none informative: round 1, as TRL would
        self._rc_ds["groups"] += generated
        self._rc_ds["filtered"] += generated - len(kept)
        self._rc_ds["short"] += int(n < target)
        m = self._metrics["train"]
        m["dynamic_sampling/filtered_fraction"].append(1 - len(kept) / generated)
        m["dynamic_sampling/extra_rounds"].append(len(rounds) - 1)
        m["dynamic_sampling/kept_groups"].append(n)
        m["dynamic_sampling/short"].append(float(n < target))
        if n < target:
            log.info(
                "dynamic sampling: %d informative groups of %d after %d extra rounds; training on %d",
                len(kept), target, len(rounds) - 1, n or target,
            )  # fmt: skip

        flat = [(r, g * G + j) for r, g in chosen for j in range(G)]  # global rows, in trained order
        share = len(flat) // P
        mine = flat[self.accelerator.process_index * share : (self.accelerator.process_index + 1) * share]
        if P > 1:
            sizes = gather_object([len(mine)])
            if len(set(sizes)) != 1:  # cannot happen by construction; never train on mismatched batches
                raise RuntimeError(f"dynamic sampling: processes would train {sizes} rows")
        records = [rounds[r][0][i] for r, i in mine]
        rewards = torch.cat([rounds[r][1][g * G : (g + 1) * G] for r, g in chosen])
        return [rec["input"] for rec in records], _Cache(records, rewards)


class _BudgetStop(TrainerCallback):
    """Stops training at the first generation boundary once `max_completions` have been generated (a new
    generation batch would be needed next), and saves a checkpoint there as max_steps would."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        every = args.steps_per_generation * t.num_iterations
        if t._rc_ds["completions"] >= t._rc_ds_budget and t._step % every == 0:
            log.info(
                "generation budget reached: %d completions >= max_completions %d at step %d",
                t._rc_ds["completions"], t._rc_ds_budget, state.global_step,
            )  # fmt: skip
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"
        return control


def with_dynamic_sampling(trainer_factory, dynamic_sampling_cfg):
    """`trainer_factory` (a partial of GRPOTrainer or a subclass) with `DynamicSamplingMixin` on top."""
    return with_mixin(trainer_factory, DynamicSamplingMixin, dynamic_sampling_cfg=dynamic_sampling_cfg)


def needed(cfg) -> bool:
    """The algo asks for dynamic sampling or a generation budget."""
    ds = cfg.algo.get("dynamic_sampling") or {}
    return cfg.algo.kind == "rl" and bool(ds.get("enabled") or ds.get("max_completions") is not None)


def validate(cfg) -> None:
    """Fail before weights load when `algo.dynamic_sampling` cannot work as set."""
    from hydra.utils import get_object

    ds = cfg.algo.get("dynamic_sampling") or {}
    if not needed(cfg):
        return
    target = cfg.algo.trainer.get("_target_")
    from trl import GRPOTrainer

    trainer = get_object(target)
    if not (isinstance(trainer, type) and issubclass(trainer, GRPOTrainer)):
        raise ConfigError(
            f"algo.dynamic_sampling needs a GRPOTrainer-based algo (grpo, gspo, dapo, dr_grpo), not {target}; "
            "set algo.dynamic_sampling.enabled=false and max_completions=null"
        )
    rounds = ds.get("max_extra_rounds")
    if not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"algo.dynamic_sampling.max_extra_rounds={rounds}: an integer >= 0 (0: only filter)")
    metric = ds.get("metric")
    if ds.get("enabled") and metric is not None and metric not in (cfg.reward or {}):
        raise ConfigError(
            f"algo.dynamic_sampling.metric={metric}: reward= has no such component (has {list(cfg.reward or {})}); "
            "name one of them, or null for the weighted total"
        )
    budget = ds.get("max_completions")
    if budget is not None and (not isinstance(budget, int) or budget <= 0):
        raise ConfigError(f"algo.dynamic_sampling.max_completions={budget}: a positive number of completions, or null")
