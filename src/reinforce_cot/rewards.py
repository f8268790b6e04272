"""Reward functions: one contract, `fn(completions, **columns) -> list[float | None]`.

`completions` are TRL's (conversational: a list of messages per completion, or plain strings); every
other dataset column (`answer`, `difficulty`, `id`, ...) arrives as a keyword list, plus `prompts`,
`completion_ids` and `trainer_state`. None means "cannot be verified" and TRL leaves it out of the mean.
Each configured component is logged on its own as `rewards/<name>/mean`.

Wiring lives in `conf/reward/`: each component file is `{name: {fn: {_target_, _partial_}, weight}}`
and a composite (`r1`, `kimi_length`) is a defaults list of components. `build(cfg.reward)` returns the
functions (named after their config key, which is what TRL logs) and their weights.

- accuracy: the answer in the last `<answer>...</answer>` (else the last `\\boxed{}`) against the `answer`
  column: numbers by value, choice letters exactly, anything else through math-verify, so that
  `(a+2)(a-2)` equals `a^2-4`. math-verify times out with SIGALRM, which only works in a process's main
  thread: elsewhere (TRL runs async reward functions on an event-loop thread) the comparison runs in a
  pebble worker process that is killed on timeout.
- format: DeepSeek-R1's `<think>...</think><answer>...</answer>` structure.
- length (Kimi k1.5, sec. 2.3.3): within the group of one prompt, lambda_i = 0.5 - (len_i - min)/(max - min);
  lambda_i when correct, min(0, lambda_i) when wrong, 0 for all when max == min; gathered over processes
  first; 0 until `warmup_steps`.

>>> accuracy_reward(["<think>1, 2</think><answer>2</answer>", "<answer>3</answer>"], answer=["2", "2"])
[1.0, 0.0]
>>> accuracy_reward(["so \\\\boxed{(a+2)(a-2)}"], answer=["a^2-4"])
[1.0]
>>> format_reward(["<think>a</think><answer>2</answer>", "2"])
[1.0, 0.0]
>>> ids = [[0] * 10, [0] * 30, [0] * 20]  # token ids: lengths 10, 30, 20; the last answer is wrong
>>> kimi_length_reward(["<answer>2</answer>"] * 2 + ["<answer>1</answer>"], answer=["2"] * 3, completion_ids=ids)
[0.5, -0.5, 0.0]
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import multiprocessing
import re
import threading
from typing import Any

log = logging.getLogger(__name__)

# an answer holds no "<answer>" itself: a stray opening tag inside the reasoning ("... <answer>2, 3 ...
# </think><answer>2</answer>") must not swallow the text up to the real one
ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
CHOICE_RE = re.compile(r"^\(?([A-Za-z])[\).:]?$")
NUMBER_RE = re.compile(r"^[-+]?(\d+(,\d{3})*(\.\d+)?|\.\d+)([eE][-+]?\d+)?$")
VERIFY_TIMEOUT_S = 5


def completion_text(completion: Any) -> str:
    """The text of one completion, conversational (list of messages) or plain."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] if isinstance(m["content"], str) else "" for m in completion)


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` (nested braces allowed); None if there is none.

    >>> last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}")
    '\\frac{1}{2}'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer>, else of the last \\boxed{}, stripped; None if neither.

    >>> extract_answer("<think>so <answer>2, 3. 1.</think><answer>2</answer>"), extract_answer("<answer> 7 </answer>")
    ('2', '7')
    """
    found = ANSWER_RE.findall(text)
    if found:
        inner = found[-1].strip()
        return last_boxed(inner) or inner  # "<answer>\boxed{3}</answer>" is common for math models
    return last_boxed(text)


def _number(s: str) -> float | None:
    """A plain number's value, else None.

    >>> _number("1,000"), _number("-2.5e3"), _number(".5"), _number("e2"), _number("3x")
    (1000.0, -2500.0, 0.5, None, None)
    """
    return float(s.replace(",", "")) if NUMBER_RE.match(s) else None


def answers_match(predicted: str | None, gold: str) -> bool:
    """Numbers by value ('3.0' == '3', '1,000' == '1000'), a choice letter exactly ('(B)' == 'b'), equal
    strings after whitespace normalisation, else math-verify's symbolic equivalence."""
    if predicted is None:
        return False
    p, g = " ".join(predicted.split()), " ".join(str(gold).split())
    if p == g:
        return True
    gn, pn = _number(g), _number(p)
    if gn is not None and pn is not None:
        return pn == gn
    gc = CHOICE_RE.match(g)
    if gc:
        pc = CHOICE_RE.match(p)
        return pc is not None and pc.group(1).lower() == gc.group(1).lower()
    if not p:
        return False
    return math_equal(g, p)


# ------------------------------------------------------------------- math-verify, thread-safe
def _math_verify(gold: str, pred: str, timeout: int | None) -> bool:
    from math_verify import parse, verify

    wrap = lambda s: s if "$" in s or "\\(" in s or "\\[" in s else f"${s}$"  # noqa: E731
    g = parse(wrap(gold), parsing_timeout=timeout)
    q = parse(wrap(pred), parsing_timeout=timeout)
    return bool(g and q and verify(g, q, timeout_seconds=timeout))


def _verify_without_alarm(gold: str, pred: str) -> bool:
    """Runs in the helper process, which pebble kills on timeout: math-verify's own alarm is off there."""
    import logging as _logging

    _logging.getLogger("math_verify").setLevel(_logging.ERROR)  # its "timeout disabled" warning, once per call
    return _math_verify(gold, pred, timeout=None)


def _import_math_verify() -> None:
    import math_verify  # noqa: F401


_pool = None
_pool_lock = threading.Lock()


def _helper_pool():
    """One worker process for math-verify outside the main thread; pebble kills a task that overruns and
    starts a fresh worker (a sympy call stuck in C code ignores anything gentler than a signal)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from pebble import ProcessPool

            # spawn, not fork: forking a process that runs threads (torch, TRL) can deadlock the child
            # the initializer imports math-verify (sympy: seconds on a busy machine) before any task, whose
            # timeout then measures the comparison alone, not the worker's start
            _pool = ProcessPool(
                max_workers=1, initializer=_import_math_verify, context=multiprocessing.get_context("spawn")
            )
            atexit.register(_pool.stop)
        return _pool


def math_equal(gold: str, pred: str, timeout: int = VERIFY_TIMEOUT_S) -> bool:
    """Symbolic equivalence by math-verify, bounded by `timeout` seconds in any thread.

    In a main thread math-verify's own SIGALRM timeout applies. In any other thread (a thread pool,
    an async reward loop) signals cannot be used, so the comparison runs in a helper process that is
    killed when it overruns; a timeout or a failure counts as not equal.
    """
    if threading.current_thread() is threading.main_thread():
        try:
            return _math_verify(gold, pred, timeout)
        except Exception:  # math-verify raises on malformed LaTeX: that is a wrong answer, not a crash
            return False
    try:
        return _helper_pool().schedule(_verify_without_alarm, (gold, pred), timeout=timeout).result()
    except concurrent.futures.TimeoutError:
        log.warning("math-verify took over %d s on %r vs %r: counted wrong", timeout, gold[:80], pred[:80])
        return False
    except Exception:
        return False


# ----------------------------------------------------------------------------------- rewards
def accuracy_reward(completions: list, answer: list[str], trainer_state=None, **_: Any) -> list[float | None]:
    """1.0 when the extracted answer matches the `answer` column, else 0.0; None without a gold answer.

    A training batch (one with a `trainer_state`) where every reward is 0 although most completions are
    well formatted is logged as a warning: that is what a broken extraction or a mislabelled answer
    column looks like. (Evaluation scores one prompt's samples at a time, where all-wrong is common.)
    """
    texts = [completion_text(c) for c in completions]
    out: list[float | None] = []
    for text, gold in zip(texts, answer):
        if gold is None or gold == "":
            out.append(None)
        else:
            out.append(float(answers_match(extract_answer(text), gold)))
    scored = [x for x in out if x is not None]
    if trainer_state is not None and scored and not any(scored):
        formatted = sum(format_reward(texts))
        if formatted >= max(1, len(texts) / 2):
            i = next(i for i, x in enumerate(out) if x is not None)
            log.warning(
                "accuracy: every reward in the batch of step %s is 0 although %d/%d completions are well "
                "formatted; check the answer column and the extraction, e.g. gold %r vs extracted %r",
                getattr(trainer_state, "global_step", "?"),
                formatted,
                len(texts),
                answer[i],
                extract_answer(texts[i]),
            )
    return out


def format_reward(completions: list, **_: Any) -> list[float | None]:
    """1.0 for exactly `<think>...</think><answer>...</answer>`, else 0.0 (DeepSeek-R1's format reward)."""
    return [float(bool(FORMAT_RE.match(completion_text(c)))) for c in completions]


def _gather(local: list) -> tuple[list, int]:
    """Every process's list, concatenated in rank order (TRL's order of the global batch), and where
    this process's part starts. Without torch.distributed: the list itself."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return local, 0
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local, 0
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    start = sum(len(p) for p in parts[: dist.get_rank()])
    return [x for p in parts for x in p], start


def _groups(keys: list, group_size: int | None) -> list[range]:
    """Index ranges of the groups: fixed chunks of `group_size` (TRL's view(-1, num_generations)), or
    without it runs of the same prompt key."""
    if group_size:
        if len(keys) % group_size:
            raise ValueError(f"length reward: batch of {len(keys)} is not a multiple of group_size {group_size}")
        return [range(i, i + group_size) for i in range(0, len(keys), group_size)]
    out, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            out.append(range(start, i))
            start = i
    return out


def length_values(lengths: list[int], correct: list[bool]) -> list[float]:
    """Kimi k1.5's length reward for one group.

    >>> length_values([10, 20, 30], [True, True, False])
    [0.5, 0.0, -0.5]
    >>> length_values([10, 30], [False, False]), length_values([7, 7], [True, False])
    ([0.0, -0.5], [0.0, 0.0])
    """
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [v if ok else min(0.0, v) for v, ok in zip(lam, correct)]


def warmup_start(warmup_steps: float, max_steps: int) -> float:
    """The step the length reward starts at: `warmup_steps` itself, or for a float in (0, 1) that fraction
    of the run's max_steps (so one recipe fits any run length).

    >>> warmup_start(100, 300), warmup_start(0.5, 300), warmup_start(0, 300)
    (100, 150.0, 0)
    """
    return warmup_steps * max_steps if isinstance(warmup_steps, float) and 0 < warmup_steps < 1 else warmup_steps


def kimi_length_reward(
    completions: list,
    answer: list[str],
    completion_ids: list | None = None,
    prompts: list | None = None,
    id: list | None = None,  # noqa: A002 - the dataset column's name
    trainer_state=None,
    warmup_steps: float = 0,
    group_size: int | None = None,
    **_: Any,
) -> list[float | None]:
    """Kimi k1.5's length penalty against overthinking (see `length_values`), per prompt group.

    Lengths are token counts (`completion_ids`, what TRL passes) or characters. A group is the
    `group_size` (= num_generations) consecutive completions of TRL's global generation batch; with
    several processes the lengths are all-gathered first, since TRL gives each process a contiguous
    slice and a group may straddle two. Returns 0 for every completion until global step
    `warmup_steps` (a step, or a fraction of max_steps; Kimi switched it on after a phase of plain RL,
    having found that it slows training early on).
    """
    n = len(completions)
    step = getattr(trainer_state, "global_step", None)
    if step is not None and step < warmup_start(warmup_steps, getattr(trainer_state, "max_steps", 0)):
        return [0.0] * n
    texts = [completion_text(c) for c in completions]
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(t) for t in texts]
    correct = [answers_match(extract_answer(t), g) for t, g in zip(texts, answer)]
    keys = list(id) if id is not None else [repr(p) for p in (prompts or [None] * n)]
    rows, start = _gather(list(zip(keys, lengths, correct)))
    keys_all = [r[0] for r in rows]
    values = [0.0] * len(rows)
    for g in _groups(keys_all, group_size):
        if len(set(keys_all[i] for i in g)) > 1:
            log.warning("length reward: a group of %d mixes prompts %s", len(g), sorted(set(keys_all[i] for i in g)))
        for i, v in zip(g, length_values([rows[i][1] for i in g], [rows[i][2] for i in g])):
            values[i] = v
    return values[start : start + n]


def check(cfg, rows) -> None:
    """Fail before weights load when a configured reward cannot run: its function does not exist, or the
    data (a split: reinforce_cot.data) lacks a column it reads (`columns:` in its config file)."""
    from hydra.utils import instantiate

    from reinforce_cot import data
    from reinforce_cot.errors import ConfigError

    if cfg.algo.kind != "rl":
        return
    for name, spec in (cfg.reward or {}).items():
        target = (spec.get("fn") or {}).get("_target_")
        try:
            # resolves the target without calling it; hydra.utils.get_object would also log an error line
            instantiate(spec.fn, _partial_=True)
        except Exception:
            raise ConfigError(
                f"reward.{name}.fn._target_={target}: no such function; fix the path in conf/reward/ "
                "(module.function, importable)"
            ) from None
        for col in spec.get("columns") or []:
            if not any(v not in (None, "") for v in data.column(rows, col) or []):
                raise ConfigError(
                    f"reward.{name} reads the '{col}' column, which data={data.title(cfg.data)} lacks "
                    f"(columns: {data.columns(rows)}); map it (data.fields.{col}=<column>) or drop the reward"
                )


def build(reward_cfg) -> tuple[list, list[float]]:
    """Instantiate the configured components: (functions named after their keys, weights)."""
    from hydra.utils import instantiate

    funcs, weights = [], []
    for name, spec in (reward_cfg or {}).items():
        fn = instantiate(spec.fn)

        def named(*args, _fn=fn, **kwargs):
            return _fn(*args, **kwargs)

        named.__name__ = named.__qualname__ = name
        funcs.append(named)
        weights.append(float(spec.weight))
    return funcs, weights
