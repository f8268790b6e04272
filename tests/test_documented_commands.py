"""Documentation that runs: every `python train.py ...` command written in the docs composes and validates.

Where commands are harvested: README.md, slurm/*.md, experiments/**/README.md, the comment lines of
conf/**/*.yaml (file headers) and the module docstrings of src/. A command runs from `python train.py` to
the end of its line, joined over `\\` continuations, with a trailing `# comment` dropped (shlex rules,
so quoted overrides stay whole); inside inline code (`python train.py ...`) it ends at the backtick.

How each is checked, in-process and without training (so all of them take seconds): Hydra's compose API
builds the config from the command's overrides, `recipes.compose_stages` builds every stage, and each
stage goes through `recipes.validate_stage`, the checks a real run makes before loading weights. The commands
share most of their compositions and stages (the quickstart's SFT stage is in dozens of them): each distinct
composition is made once per process, and each distinct stage config validated once. A sweep
(`-m`) is expanded with Hydra's own override parser so that every value of every swept key is
validated (job i takes value i of each key, cycling). Where the command needs a GPU (a stage with
`use_cpu` false), this machine pretends to have one (tests/pretend_gpu.py: torch.cuda, vllm and
bitsandbytes present, the Qwen2.5-VL configs in a local hub cache); its memory is the preset's.

What cannot be validated is skipped with a reason (pytest's SKIPPED lines, `-ra`), never silently:
`<...>` and `$VAR` placeholders other than a checkpoint (a `model.init_from` placeholder becomes the tiny
model's own folder), elided arguments (`...`), syntax summaries (`[key=value]`), and resumes of run dirs
that exist only after a run. A command that fails here is a documentation bug or a rule bug: fix one.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from reinforce_cot import recipes
from tests import pretend_gpu

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
COMMAND = "python train.py"
# (pattern on the whole command, why it cannot be validated as written); checked in this order
UNVALIDATABLE = [
    (re.compile(r"\[(group|key)=\w+"), "a syntax summary, not a command"),
    (re.compile(r"(?<![\w.])(\.\.\.|…)(?![\w.])"), "elides arguments (...)"),
    (re.compile(r"(^|\s)resume="), "resumes a run dir that exists only after a run"),
    (re.compile(r"<[^>]*>"), "a <placeholder> the reader fills in"),
    (
        re.compile(r"\$(?!\{(rc|oc)\.)\{?[A-Za-z_]\w*"),
        "a $shell variable",
    ),  # ${oc.env:...}, ${rc....}: Hydra's resolvers, validated
]
# a placeholder in these keys is given a real value, so the rest of the command is still validated
CHECKPOINT_PLACEHOLDER = re.compile(r"^(model\.init_from)=(.*(<[^>]*>|\$\{?[A-Za-z_]\w*).*)$")


@pytest.fixture(autouse=True)
def _forget_pretended_gpus():
    yield
    pretend_gpu.forget()


@pytest.fixture(scope="module", autouse=True)
def _compose_once():
    """Each distinct composition once per process (~600 compose calls, ~370 distinct, ~0.2 s each): Hydra's
    composition depends only on the config tree and the overrides, so a copy of the first is the same config."""
    from hydra._internal.hydra import Hydra

    composed, original = {}, Hydra.compose_config

    def once(self, config_name, overrides, run_mode, *args, **kwargs):
        key = (config_name, tuple(overrides), run_mode, args, tuple(sorted(kwargs.items())))
        if key not in composed:
            composed[key] = original(self, config_name, overrides, run_mode, *args, **kwargs)
        return copy.deepcopy(composed[key])  # callers change what they get (stage ids, run-dir paths)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Hydra, "compose_config", once)
        yield


VALIDATED: set[str] = set()  # stage configs (and whether GPUs were pretended) that passed recipes.validate_stage


# ------------------------------------------------------------------------------------------ harvesting
def _doc_lines():
    """(file:line, text) for every line of prose in which commands are written."""
    files = [
        ROOT / "README.md",
        *sorted((ROOT / "slurm").glob("*.md")),
        *sorted((ROOT / "experiments").rglob("README.md")),
    ]
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            yield f"{f.relative_to(ROOT)}:{i}", line
    for f in sorted(CONF.rglob("*.yaml")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if line.lstrip().startswith("#"):
                yield f"{f.relative_to(ROOT)}:{i}", line.lstrip()[1:]
    for f in sorted((ROOT / "src").rglob("*.py")):
        tree = ast.parse(f.read_text())
        doc = ast.get_docstring(tree, clean=False)
        if doc:
            first = tree.body[0].lineno
            for i, line in enumerate(doc.splitlines()):
                yield f"{f.relative_to(ROOT)}:{first + i}", line


def harvest(lines=None) -> list[tuple[str, str]]:
    """(where, command text after `python train.py`) for every documented command, in file order."""
    lines = list(_doc_lines() if lines is None else lines)
    out = []
    for n, (where, line) in enumerate(lines):
        start = line.find(COMMAND)
        while start >= 0:
            rest = line[start + len(COMMAND) :]
            if line[:start].endswith("`"):  # inline code: the command ends at the closing backtick
                rest = rest.split("`", 1)[0]
            else:
                k = n
                while (
                    rest.rstrip().endswith("\\")
                    and k + 1 < len(lines)
                    and lines[k + 1][0].split(":")[0] == where.split(":")[0]
                ):
                    k += 1
                    rest = rest.rstrip()[:-1].rstrip() + " " + lines[k][1].strip()
            out.append((where, rest.strip()))
            start = line.find(COMMAND, start + len(COMMAND))
    return out


def as_overrides(text: str) -> tuple[bool, list[str]]:
    """(multirun, overrides) of a command's text: shell words, `# comment` dropped, `-m` taken out."""
    words = shlex.split(text, comments=True)
    multirun = any(w in ("-m", "--multirun") for w in words)
    return multirun, [w for w in words if w not in ("-m", "--multirun")]


def jobs(overrides: list[str]) -> list[list[str]]:
    """A sweep's jobs, enough that every value of every swept key is validated: job i takes value i of each."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = {
        i: [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        for i, o in enumerate(parsed)
        if o.is_sweep_override()
    }
    if not swept:
        return [overrides]
    count = max(len(v) for v in swept.values())
    return [[swept[i][j % len(swept[i])] if i in swept else o for i, o in enumerate(overrides)] for j in range(count)]


def _unvalidatable(text: str) -> str | None:
    rest = " ".join(w for w in shlex.split(text, comments=True) if not CHECKPOINT_PLACEHOLDER.match(w))
    for pattern, why in UNVALIDATABLE:
        if pattern.search(rest):
            return why
    return None


def _normal(text: str) -> str:
    try:
        return shlex.join(shlex.split(text, comments=True))
    except ValueError:  # unbalanced quotes: kept as written, and it fails below with the shell's error
        return text


WHERE: dict[str, str] = {}  # the first place each command is written
for _where, _text in harvest():
    WHERE.setdefault(_normal(_text), _where)
COMMANDS = sorted(WHERE)


# ------------------------------------------------------------------------------------------ validating
@functools.cache
def tiny_checkpoint(kind: str) -> str:
    """A real checkpoint folder (the tiny model of `kind`), for `model.init_from=<...>` placeholders."""
    from reinforce_cot import tiny

    return str(tiny.build(compose("train", overrides=[f"model=tiny_{kind}"]).model))


def _with_checkpoint(job: list[str], kind: str) -> list[str]:
    return [f"{m.group(1)}={tiny_checkpoint(kind)}" if (m := CHECKPOINT_PLACEHOLDER.match(o)) else o for o in job]


def _validate(overrides: list[str], run_dir: Path, cfg=None) -> None:
    """What a run checks before loading weights, for every stage (recipes.prepare's checks, without the data)."""
    cfg = cfg if cfg is not None else compose(config_name="train", overrides=overrides)
    import torch

    for scfg in recipes.compose_stages(cfg, overrides, run_dir).values():
        key = f"gpus={torch.cuda.is_available()}\n{OmegaConf.to_yaml(scfg)}".replace(str(run_dir), "<run dir>")
        if key not in VALIDATED:  # the same stage in another command: validated there
            recipes.validate_stage(scfg)
            VALIDATED.add(key)


# slow: each command composes 3-10 configs (a recipe's stages, each twice: reinforce_cot.overrides), ~370
# distinct compositions at ~0.1-0.3 s, ~100 s in all; the harvest-rule tests below stay in make test-fast
@pytest.mark.slow
@pytest.mark.parametrize(
    "text", COMMANDS, ids=[t or "(no overrides)" for t in COMMANDS]
)  # one test per distinct command
def test_documented_command_validates(text, tmp_path, monkeypatch):
    why = _unvalidatable(text)
    if why:
        pytest.skip(f"{WHERE[text]}: {why}")
    _, overrides = as_overrides(text)
    pretend_gpu.use_hub(monkeypatch, tmp_path / "hub")  # hub models: the real configs, offline
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in jobs(_with_checkpoint(overrides, "vlm")):
            cfg = compose(config_name="train", overrides=job)
            if cfg.model.kind == "lm" and job != (
                lm := [o.replace(tiny_checkpoint("vlm"), tiny_checkpoint("lm")) for o in job]
            ):
                job, cfg = lm, compose(config_name="train", overrides=lm)
            if not cfg.algo.args.get("use_cpu", False):  # a GPU preset: pretend this machine has the GPUs
                pretend_gpu.gpus(monkeypatch, 16)  # the largest preset: 2 nodes x 8
            _validate(job, tmp_path / "run", cfg)


# ------------------------------------------------------------------------------------------ the harvester
def test_harvest_finds_commands_in_every_kind_of_source():
    sources = {where.split(":")[0].split("/")[0] for where, _ in harvest()}
    assert {"README.md", "slurm", "experiments", "conf", "src"} <= sources
    assert len(COMMANDS) > 40


def test_harvest_rules():
    doc = [
        ("a.md:1", "    python train.py -m seed=0,1 \\"),
        ("a.md:2", "        hardware=slurm_cpu   # on Slurm"),
        ("a.md:3", "Run `python train.py algo=gspo` (the RL stage) or `python train.py`."),
        ("b.yaml:1", "   python train.py recipe=kimi \\"),
        ("c.yaml:1", "   not a continuation of b.yaml"),
    ]
    assert harvest(doc) == [
        ("a.md:1", "-m seed=0,1 hardware=slurm_cpu   # on Slurm"),
        ("a.md:3", "algo=gspo"),
        ("a.md:3", ""),
        ("b.yaml:1", "recipe=kimi \\"),
    ]
    assert as_overrides('-m algo=grpo,gspo "peft.target_parts=[language_model,vision]"  # a comment') == (
        True,
        ["algo=grpo,gspo", "peft.target_parts=[language_model,vision]"],
    )
    assert jobs(["seed=0,1,2", "algo=grpo,gspo", "merge.weights=[0.3,0.7]"]) == [
        ["seed=0", "algo=grpo", "merge.weights=[0.3,0.7]"],
        ["seed=1", "algo=gspo", "merge.weights=[0.3,0.7]"],
        ["seed=2", "algo=grpo", "merge.weights=[0.3,0.7]"],
    ]
    assert _unvalidatable("recipe=curate model.init_from=<run>/ckpt/01_sft") is None  # a checkpoint: substituted
    assert _unvalidatable("data.train.path=<run>/data/train.jsonl") == "a <placeholder> the reader fills in"
    assert _unvalidatable("-m ... hydra/launcher=slurm") == "elides arguments (...)"
    assert _unvalidatable("[group=choice] [key=value]") == "a syntax summary, not a command"
    assert (
        _unvalidatable("resume=outputs/20261122_041500_quickstart") == "resumes a run dir that exists only after a run"
    )


def test_a_command_broken_today_fails_here(tmp_path, monkeypatch):
    """The harness can fail: an rl stage whose steps_per_generation does not exceed the accumulation steps
    (the rule gspo on 1xa100 broke before its preset was fixed)."""
    from reinforce_cot.errors import ConfigError

    pretend_gpu.use_hub(monkeypatch, tmp_path / "hub")
    pretend_gpu.gpus(monkeypatch, 8)
    _, overrides = as_overrides(
        "algo=gspo hardware=1xa100 model=qwen2_5_vl_3b peft=lora hardware.steps_per_generation=4"
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigError, match="steps_per_generation"):
            _validate(overrides, tmp_path / "run")
