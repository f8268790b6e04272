"""Which of your command-line overrides each recipe stage gets: one rule, checked before anything runs.

Each stage's config is composed from conf/train.yaml with, in this order:
  1. your group choices (`algo=gspo`, `debug=smoke`), except in a stage that chooses that group itself
     (the quickstart's SFT stage keeps its `algo=sft`);
  2. the stage's own overrides, from its recipe file;
  3. your other overrides (`key=value`, `~key`), in every stage whose config has that key, where they win;
     `+key=value` and `++key=value` (which add a key) in every stage;
  4. your `stages.<name>.<override>`, in that stage alone, last: `stages.rl.sampler.alpha=0.3`,
     `stages.sft.algo.args.num_train_epochs=5`, `stages.rl.algo=gspo` (replacing the stage's own choice).
An override that reaches no stage, or a targeted one naming a key its stage lacks, stops the run with one
line naming the stages and how to target one.

    python train.py algo.args.num_train_epochs=5              # both train stages of the quickstart
    python train.py stages.sft.algo.args.num_train_epochs=5   # its SFT stage only
    python train.py recipe=kimi sampler.alpha=0.3             # the rl stage, the only one with a curriculum sampler

Why keys under a group are not refused at the root: Hydra checks every override against the config your
command composes, whose groups need not be a stage's (recipe=kimi's rl stage picks sampler=curriculum, the
root has sampler=uniform, which has no `alpha`). conf/train.yaml lists `key_check: per_stage` (registered
by reinforce_cot.cli from STAGE_GROUPS and TARGET): it opens those group nodes and adds `stages: {}`, and this module checks every key against each
stage's own config instead. Entry points without stages (conf/evaluate.yaml) keep Hydra's check
(`key_check: hydra`).
"""

from __future__ import annotations

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from reinforce_cot.errors import ConfigError

# The groups a recipe stage may choose for itself (conf/train.yaml's defaults list, less recipe, whose keys
# are the same in every stage, and the global-package presets, which have no node of their own).
STAGE_GROUPS = ("model", "data", "algo", "reward", "sampler", "peft", "generation", "logger", "hardware")
TARGET = "stages"  # stages.<name>.<override>


def parse(lines: list[str]) -> list[Override]:
    """Command-line overrides as Hydra parses them (`+`, `++`, `~`, `group@pkg=`, quoting)."""
    return OverridesParser.create().parse_overrides([str(line) for line in lines])


def keys(lines: list[str]) -> list[str]:
    """The key (or group) each override sets: `+algo.args.beta=0.1` -> `algo.args.beta`."""
    return [o.key_or_group for o in parse(lines)]


def _line(o: Override, key: str) -> str:
    """`o` re-addressed to `key` (`stages.rl.sampler.alpha=0.3` -> `sampler.alpha=0.3`), prefix and value kept."""
    prefix = "~" if o.is_delete() else "++" if o.is_force_add() else "+" if o.is_add() else ""
    package = f"@{o.package}" if o.package is not None else ""
    value = f"={o.get_value_string()}" if "=" in (o.input_line or "") else ""
    return f"{prefix}{key}{package}{value}"


def has_key(cfg, key: str) -> bool:
    """Whether the dotted key is a node of cfg (a `???` or null value counts: it can be set)."""
    node = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _adds(o: Override) -> bool:
    """`+key=value` / `++key=value`: they add the key, so no config has it yet."""
    return o.is_add() or o.is_force_add()


class Plan:
    """Your overrides of one run, split by the rule above: `for_stage` gives each stage its compose list,
    `check_reached` then refuses any override no stage got."""

    def __init__(self, user: list[str], groups: set[str], stage_names: list[str], recipe: str):
        self.groups, self.recipe, self.names = set(groups), recipe, list(stage_names)
        self.common: list[Override] = []  # for every stage the rule lets them reach
        self.targeted: dict[str, list[tuple[Override, str]]] = {}  # stage name -> (override, key in the stage)
        for o in parse(user):
            if o.is_hydra_override() or o.key_or_group == "resume":
                continue
            head, _, rest = o.key_or_group.partition(".")
            name, _, key = rest.partition(".")
            if head != TARGET:
                self.common.append(o)
            elif name not in self.names:
                raise ConfigError(
                    f"{o.input_line}: recipe={recipe} has no stage '{name}'; use one of {', '.join(self.names)}"
                )
            elif not key:
                raise ConfigError(f"{o.input_line}: name a key after the stage, e.g. {TARGET}.{name}.seed=1")
            else:
                self.targeted.setdefault(name, []).append((o, key))
        self.reached: set[int] = set()  # indices into self.common of the overrides some stage got

    def _group(self, o: Override) -> bool:
        return o.key_or_group in self.groups

    def for_stage(self, name: str, own: list[str], compose) -> list[str]:
        """The override list stage `name` (with its recipe overrides `own`) is composed with. `compose(lines)`
        composes conf/train.yaml; it is called with the group choices alone, to see which keys the stage has."""
        targeted = self.targeted.get(name, [])
        target_groups = [_line(o, key) for o, key in targeted if key in self.groups]
        replaced = {key for o, key in targeted if key in self.groups}  # targeted group choices beat the stage's
        own = [o for o in parse(own) if not (self._group(o) and o.key_or_group in replaced)]
        chosen = replaced | {o.key_or_group for o in own if self._group(o)}
        mine = [i for i, o in enumerate(self.common) if self._group(o) and o.key_or_group not in chosen]
        groups = [self.common[i].input_line for i in mine] + [o.input_line for o in own if self._group(o)]
        stage = compose(groups + target_groups)
        for o in own:  # the recipe's keys are checked too: Hydra no longer refuses them at the root
            if not self._group(o) and not _adds(o) and not has_key(stage, o.key_or_group):
                raise ConfigError(
                    f"recipe={self.recipe}: stage {name}'s override {o.input_line} names no key of its config; "
                    "fix the recipe file"
                )
        for o, key in targeted:
            if key not in self.groups and not _adds(o) and not has_key(stage, key):
                raise ConfigError(f"{o.input_line}: stage {name}'s config has no {key}; fix the key")
        mine += [
            i for i, o in enumerate(self.common) if not self._group(o) and (_adds(o) or has_key(stage, o.key_or_group))
        ]
        self.reached.update(mine)
        values = [self.common[i].input_line for i in mine if not self._group(self.common[i])]
        target_values = [_line(o, key) for o, key in targeted if key not in self.groups]
        return [*groups, *target_groups, *(o.input_line for o in own if not self._group(o)), *values, *target_values]

    def check_reached(self) -> None:
        """After every stage was planned: an override no stage got is an error, never a silent no-op."""
        for i, o in enumerate(self.common):
            if i in self.reached:
                continue
            where = f"{o.input_line} reaches no stage of recipe={self.recipe}"
            head = o.key_or_group.split(".")[0]
            if self._group(o):
                raise ConfigError(
                    f"{where}: each of its stages ({', '.join(self.names)}) chooses its own {head}; "
                    f"to change one: {TARGET}.<name>.{o.input_line.lstrip('+~')}"
                )
            fix = (
                f", or pick another {head} that has it (for one stage: {TARGET}.<name>.{head}=...)"
                if head in self.groups
                else ""
            )
            raise ConfigError(
                f"{where}: none of its stages ({', '.join(self.names)}) has {o.key_or_group}; fix the key{fix}"
            )
