"""Prompt samplers for GRPO/RLOO: curriculum (easy -> hard) and prioritized (by running failure rate).

Kimi k1.5 (sec. 2.3.4) draws RL prompts in two ways besides uniformly:

- curriculum: start on easy prompts and move to hard ones. Prompts are ordered easy -> hard by a column
  (`difficulty`, or `pass_rate` from the `curate` stage with `higher_is_easier=true`); at training
  progress p (generation rounds done / planned) the draw comes from the easiest fraction f(p) of them:
  linear f = start + (1 - start) min(1, p / full_at); sqrt f = min(1, sqrt(start^2 + (1 - start^2) p / full_at))
  (competence-based curriculum, Platanios et al. 2019); step unlocks one level of the column at a time.
- prioritized: prompt i is drawn with probability proportional to max(1 - s_i, floor), s_i its running
  success rate (successes / attempts, or an EMA with `alpha`), updated online from the accuracy rewards
  of every GRPO/RLOO generation round. `curriculum` with `prioritize=true` weights its pool the same way.

Both keep TRL's RepeatSampler layout, which GRPO's group advantages rely on: one chunk of
generation_batch_size / num_generations distinct prompts per generation round, each index repeated
num_generations times, the chunk repeated num_iterations x steps_per_generation times. Each chunk is
drawn with a generator seeded by (seed, chunk position), so every process draws the same chunk, and the
success rates are updated from the rewards gathered over all processes, so they stay identical too.

State (epoch, chunk position, attempts, successes, success rates) is written to
`checkpoint-*/sampler_state.json` before the rest of the checkpoint and read back on resume. The
dataloader prefetches one batch, so a round's prompts are drawn with the success rates of one round
earlier; after a resume the next round is drawn with the checkpoint's rates, so a resumed prioritized
run may draw differently from an uninterrupted one (curriculum draws depend only on seed and position).

Wiring: `conf/sampler/*.yaml` name the class (`_target_`); `training.train_stage` swaps TRL's sampler
for it through `with_sampler`, a subclass of the configured trainer overriding `_get_train_sampler`.

    python train.py recipe=single algo=grpo sampler=curriculum sampler.schedule=sqrt
    python train.py recipe=single algo=grpo sampler=prioritized sampler.alpha=0.3
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from torch.utils.data import Sampler

from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)
STATE_FILE = "sampler_state.json"


class GroupedSampler(Sampler):
    """TRL's RepeatSampler layout with a pluggable choice of each chunk's prompts (uniform here).

    Subclasses override `pool` (which prompts may be drawn at a training position) and `weights`.
    The first five arguments are RepeatSampler's (the trainer fills them); `total_chunks` is the number
    of generation rounds planned (for schedules), `ids` the rows' ids (to map rewards back to prompts);
    `alpha`, `floor`, `init_success`, `init_column` shape the success rates; `success_reward` and `name`
    are read by the trainer wiring and the messages.
    """

    def __init__(
        self,
        data_source,
        mini_repeat_count: int,
        batch_size: int,
        repeat_count: int = 1,
        seed: int = 0,
        total_chunks: int | None = None,
        ids: list | None = None,
        alpha: float | None = None,
        floor: float = 0.01,
        init_success: float = 0.0,
        init_column: str | None = None,
        success_reward: str | None = None,
        name: str = "",
    ):
        self.data_source = data_source
        self.n = len(data_source)
        self.mini_repeat_count, self.batch_size, self.repeat_count = mini_repeat_count, batch_size, repeat_count
        self.seed = seed
        self.chunks_per_epoch = self.n // batch_size
        if self.chunks_per_epoch == 0:
            raise ConfigError(
                f"sampler={name or type(self).__name__}: {self.n} prompts cannot fill one generation round of "
                f"{batch_size} distinct prompts; add data or lower the generation batch"
            )
        self.total_chunks = total_chunks or self.chunks_per_epoch
        self.alpha, self.floor = alpha, floor
        self.epoch = 0
        self.position = 0  # chunks drawn before the current one (over all epochs)
        self.index_of = {key: i for i, key in enumerate(ids)} if ids is not None else None
        self.attempts = [0] * self.n
        self.successes = [0.0] * self.n
        if init_column:
            self.success = [float(x) for x in _column(data_source, init_column)]
        else:
            self.success = [float(init_success)] * self.n

    # -------------------------------------------------------------------------------- drawing
    def __len__(self) -> int:
        return self.chunks_per_epoch * self.batch_size * self.mini_repeat_count * self.repeat_count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def progress(self, position: int) -> float:
        """Fraction of the planned generation rounds done before chunk `position`."""
        return min(1.0, position / max(1, self.total_chunks))

    def pool(self, position: int) -> list[int]:
        """Indices that may be drawn for chunk `position`."""
        return list(range(self.n))

    def weights(self, pool: list[int]) -> torch.Tensor | None:
        """Relative draw probabilities over `pool`; None = uniform."""
        return None

    def priority(self, pool: list[int]) -> torch.Tensor:
        """max(1 - s_i, floor) over `pool`: Kimi's prioritized sampling weights."""
        return torch.tensor([max(1.0 - self.success[i], self.floor) for i in pool], dtype=torch.float64)

    def draw(
        self,
        position: int,
        key: int | None = None,
        exclude: set[int] | frozenset = frozenset(),
        size: int | None = None,
    ) -> list[int]:
        """The chunk at `position`: batch_size distinct prompts from the pool.

        With `key`, an extra chunk of `size` prompts (default batch_size) from the same pool and weights but
        with its own generator (the extra rounds of `dynamic_sampling`, numbered by key; negative seeds never
        meet a position's); `exclude` leaves out prompts already drawn, as long as the pool keeps enough others."""
        size = size or self.batch_size
        base = self.seed * 1_000_003
        gen = torch.Generator().manual_seed(base + position if key is None else -1 - (base + key))
        pool = self.pool(position)
        rest = [i for i in pool if i not in exclude] if exclude else pool
        pool = rest if len(rest) >= size else pool
        w = self.weights(pool)
        if w is None:
            picks = torch.randperm(len(pool), generator=gen)[:size]
        else:
            picks = torch.multinomial(w, size, replacement=False, generator=gen)
        return [pool[i] for i in picks.tolist()]

    def __iter__(self):
        for c in range(self.chunks_per_epoch):
            self.position = self.epoch * self.chunks_per_epoch + c
            chunk = self.draw(self.position)
            for _ in range(self.repeat_count):
                for index in chunk:
                    for _ in range(self.mini_repeat_count):
                        yield index
        self.epoch += 1  # also right when the trainer's set_epoch does not reach this sampler

    # ------------------------------------------------------------------------- online updates
    def update(self, keys: list, rewards: list[float]) -> None:
        """Fold one generation round's accuracy rewards (one per completion, keys = the rows' ids) into
        the per-prompt success rates. NaN rewards (unverifiable) are skipped."""
        per: dict[int, list[float]] = {}
        for key, r in zip(keys, rewards):
            if r is None or (isinstance(r, float) and math.isnan(r)):
                continue
            i = self.index_of[key] if self.index_of is not None else int(key)
            per.setdefault(i, []).append(float(r))
        for i, rs in per.items():
            self.attempts[i] += len(rs)
            self.successes[i] += sum(rs)
            batch_rate = sum(rs) / len(rs)
            if self.alpha is None:
                self.success[i] = self.successes[i] / self.attempts[i]
            else:
                self.success[i] = (1 - self.alpha) * self.success[i] + self.alpha * batch_rate

    def stats(self) -> dict[str, float]:
        """Scalars logged with the trainer's metrics (sampler/...)."""
        seen = [s for s, a in zip(self.success, self.attempts) if a]
        return {
            "sampler/pool_fraction": len(self.pool(self.position)) / self.n,
            "sampler/prompts_seen": len(seen) / self.n,
            "sampler/mean_success": sum(seen) / len(seen) if seen else 0.0,
        }

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "class": type(self).__name__,
            "n": self.n,
            "epoch": self.epoch,
            "position": self.position,
            "attempts": self.attempts,
            "successes": self.successes,
            "success": self.success,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != self.n or state.get("class") != type(self).__name__:
            raise ConfigError(
                f"sampler state is for {state.get('class')} over {state.get('n')} prompts, not "
                f"{type(self).__name__} over {self.n}; resume with the same data and sampler"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.attempts, self.successes = list(state["attempts"]), list(state["successes"])
        self.success = [float(x) for x in state["success"]]

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tmp = Path(folder) / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state_dict()))
        os.replace(tmp, Path(folder) / STATE_FILE)  # whole file or none

    def load(self, folder: str | Path) -> bool:
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            return False
        self.load_state_dict(json.loads(path.read_text()))
        return True


class PrioritizedSampler(GroupedSampler):
    """Prompt i with probability proportional to max(1 - s_i, floor) (Kimi k1.5 prioritized sampling).

    `floor` keeps solved prompts drawable (and the weights defined when all are solved); `alpha=None`
    makes s_i the plain success rate over all attempts, a float an EMA that follows the current policy.
    """

    def weights(self, pool: list[int]) -> torch.Tensor:
        return self.priority(pool)


class CurriculumSampler(GroupedSampler):
    """Easy -> hard by a column on a schedule over training progress (see the module docstring)."""

    SCHEDULES = ("linear", "sqrt", "step")

    def __init__(
        self,
        data_source,
        mini_repeat_count: int,
        batch_size: int,
        repeat_count: int = 1,
        seed: int = 0,
        column: str = "difficulty",
        higher_is_easier: bool = False,
        schedule: str = "linear",
        start: float = 0.3,
        full_at: float = 0.7,
        prioritize: bool = False,
        **kwargs,
    ):
        super().__init__(data_source, mini_repeat_count, batch_size, repeat_count, seed, **kwargs)
        if schedule not in self.SCHEDULES:
            raise ConfigError(f"sampler.schedule={schedule}: unknown; use one of {list(self.SCHEDULES)}")
        if not (0 < start <= 1 and 0 < full_at <= 1):
            raise ConfigError(f"sampler.start={start}, sampler.full_at={full_at}: both must be in (0, 1]")
        self.schedule, self.start, self.full_at, self.prioritize = schedule, start, full_at, prioritize
        values = [float(v) for v in _column(data_source, column)]
        hardness = [-v if higher_is_easier else v for v in values]
        # easy first; ties in a random (seeded) order so that a partly open level is a random subset of it
        tie = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        self.order = sorted(range(self.n), key=lambda i: (hardness[i], tie[i]))
        self.levels = sorted(set(hardness))
        self.level_of = [self.levels.index(h) for h in hardness]

    def fraction(self, p: float) -> float:
        """Fraction of prompts (easiest first) open at progress p."""
        t = min(1.0, p / self.full_at)
        if self.schedule == "linear":
            return self.start + (1 - self.start) * t
        if self.schedule == "sqrt":
            return min(1.0, math.sqrt(self.start**2 + (1 - self.start**2) * t))
        open_levels = 1 + math.floor(t * (len(self.levels) - 1) + 1e-9)
        return sum(1 for lv in self.level_of if lv < open_levels) / self.n

    def pool(self, position: int) -> list[int]:
        size = max(self.batch_size, math.ceil(self.fraction(self.progress(position)) * self.n - 1e-9))
        return self.order[: min(self.n, size)]

    def weights(self, pool: list[int]) -> torch.Tensor | None:
        return self.priority(pool) if self.prioritize else None


def _column(data_source, name: str) -> list:
    from reinforce_cot import data

    values = data.column(data_source, name)  # from storage: a view's images are not decoded
    if values is None:
        raise ConfigError(f"sampler: the dataset has no '{name}' column (columns: {data.columns(data_source)})")
    missing = sum(v is None for v in values)
    if missing:
        raise ConfigError(f"sampler: {missing} rows have no '{name}' value; fill the column or curate the data")
    return list(values)


# ------------------------------------------------------------------------- checks at data load
def check(cfg, rows) -> None:
    """Fail at data load when the configured sampler cannot work on this split (reinforce_cot.data)."""
    from reinforce_cot import data

    s = cfg.get("sampler") or {}
    if not s.get("_target_") or (cfg.algo.kind != "rl"):
        return
    for key in [s.get("column"), s.get("init_column")]:
        values = data.column(rows, key) if key else None
        if key and (not values or any(v is None for v in values)):
            raise ConfigError(
                f"sampler={s.name} reads the '{key}' column, which data={data.title(cfg.data)} lacks"
                f" (columns: {data.columns(rows)}); add it, curate the data (stage kind curate writes difficulty and "
                f"pass_rate), or use sampler=uniform"
            )
    weighted = s.get("prioritize") or s._target_.endswith("PrioritizedSampler")
    if weighted and s.get("success_reward") not in (cfg.reward or {}):
        raise ConfigError(
            f"sampler={s.name} updates success rates from the '{s.get('success_reward')}' reward, which "
            f"reward= lacks (has {list(cfg.reward or {})}); add it or set sampler.success_reward to one of them"
        )
    if weighted:
        ids = data.column(rows, "id") or [None]
        if None in ids or len(set(ids)) != len(ids):
            raise ConfigError(
                f"sampler={s.name} tracks each prompt by its 'id' column, which data={data.title(cfg.data)} lacks or "
                "repeats; give every row a unique id"
            )


# ----------------------------------------------------------------------------- trainer wiring
class SamplerMixin:
    """Replaces TRL's RepeatSampler by the configured sampler, feeds it the gathered accuracy rewards,
    and saves/restores its state with each checkpoint."""

    def __init__(self, *args, sampler_cfg=None, **kwargs):
        self._rc_sampler_cfg = sampler_cfg
        self._rc_sampler = None
        self._rc_resume = None
        super().__init__(*args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._rc_resume = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _get_train_sampler(self, dataset=None):
        from hydra.utils import instantiate

        dataset = dataset if dataset is not None else self.train_dataset
        a = self.args
        per_chunk = self.num_iterations * a.steps_per_generation  # micro-steps served by one chunk
        if a.max_steps and a.max_steps > 0:
            total = math.ceil(a.max_steps * a.gradient_accumulation_steps / per_chunk)
        else:
            total = math.ceil(a.num_train_epochs * (len(dataset) // (a.generation_batch_size // self.num_generations)))
        ids = _column(dataset, "id") if "id" in dataset.column_names else None  # not dataset["id"]: decodes images
        self._rc_sampler = instantiate(self._rc_sampler_cfg, _convert_="all")(
            dataset,
            mini_repeat_count=self.num_generations,
            batch_size=a.generation_batch_size // self.num_generations,
            repeat_count=per_chunk,
            seed=a.seed,
            total_chunks=total,
            ids=ids,
        )
        if self._rc_resume and self._rc_sampler.load(self._rc_resume):
            log.info("sampler state restored from %s (epoch %d)", self._rc_resume, self._rc_sampler.epoch)
        elif self._rc_resume:
            log.warning("no %s in %s: the sampler starts fresh", STATE_FILE, self._rc_resume)
        return self._rc_sampler

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # gathered
        name = (self._rc_sampler_cfg or {}).get("success_reward")
        if self._rc_sampler is not None and name in self.reward_func_names and self.model.training:
            from accelerate.utils import gather_object

            keys = gather_object([x["id"] for x in inputs])  # rank order = the order of the gathered rewards
            col = self.reward_func_names.index(name)
            self._rc_sampler.update(keys, rewards[:, col].tolist())
        return rewards

    def _save_checkpoint(self, model, trial):
        if self._rc_sampler is not None and self.args.should_save:
            # written first: a checkpoint with trainer_state.json (written last) always has it
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            self._rc_sampler.save(folder)
        return super()._save_checkpoint(model, trial)

    def log(self, logs, *args, **kwargs):
        if self._rc_sampler is not None and self.model.training:
            logs = {**logs, **self._rc_sampler.stats()}
        return super().log(logs, *args, **kwargs)


def with_mixin(trainer_factory, mixin: type, **kwargs):
    """`trainer_factory` (a TRL trainer class, or a partial of one) as a subclass with `mixin` first in its MRO,
    bound to the same arguments plus `kwargs` (the mixin's own): how every trainer extension here is composed."""
    import functools

    func = trainer_factory.func if isinstance(trainer_factory, functools.partial) else trainer_factory
    bound = trainer_factory.keywords if isinstance(trainer_factory, functools.partial) else {}
    cls = type(f"{func.__name__}With{mixin.__name__.removesuffix('Mixin')}", (mixin, func), {})
    return functools.partial(cls, **bound, **kwargs)


def with_sampler(trainer_factory, sampler_cfg):
    """`trainer_factory` (a partial of a TRL trainer class) with the configured sampler swapped in."""
    return with_mixin(trainer_factory, SamplerMixin, sampler_cfg=sampler_cfg)
