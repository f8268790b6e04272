"""TrainerCallbacks that every train stage adds (`attach`): what the console shows, and evaluation during training.

    python train.py                                        # quickstart: one bar per stage, eval/* every 50 RL steps
    python train.py eval.every_steps=20 eval.during_train_prompts=32
    python train.py algo.args.disable_tqdm=true            # plain progress lines on a terminal too
    tensorboard --logdir outputs                           # train/* and eval/* scalars

The console (`StageProgress`, in place of transformers' PrinterCallback / ProgressCallback, which print every
logged dict of ~30 numbers, or draw a bar that becomes a carriage-return flood in a Slurm log):
- on a terminal, one bar per stage: step/total, ETA and the few numbers `algo.progress` names as
  {label: logged metric} (RL: reward, accuracy, completion length, loss; SFT: loss, token accuracy; DPO: loss,
  reward margin, accuracy); log lines written meanwhile appear above the bar;
- elsewhere (Slurm logs, pytest, a pipe), or with `algo.args.disable_tqdm=true`: the same as one log line about
  every 5 % of the steps, with elapsed time and ETA, never a carriage return;
- every logged dict, complete, as one JSON line in output.log (logger `reinforce_cot.metrics`, which
  conf/train.yaml routes to the file only); TensorBoard and W&B get every metric from their own callbacks;
- only the main process (rank 0) draws or prints. `summary` is the stage's closing line ("[02_rl] done: ...").

Evaluation during training (`EvalDuringTraining`, on when `eval.every_steps` is set; the quickstart sets it for
its RL stage): at step 0 and every N steps the live model answers the first `eval.during_train_prompts` held-out
prompts, greedily and with `eval.k` samples at `eval.temperature`, and reinforce_cot.evaluation scores them. The
scalars go out like the trainer's own, at its global step, as `eval_<metric>` (TensorBoard and W&B:
`eval/greedy_accuracy`, `eval/pass@4`, ...; also log_history in result/<stage>.json and output.log), with
`eval_seconds`, the time it took. Generation is the hf backend (`generate`) on the unwrapped model, whatever
`generation=` the evaluate stage uses. The RNG state is restored afterwards, so training draws the same random
numbers with evaluation on or off. With N processes, each generates an equal share of the prompts (padded to
equal: under ZeRO-3 `generate` is a collective, so every process must make the same calls) and every process
gets all completions back and scores them; rank 0 logs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time

from transformers import TrainerCallback

from reinforce_cot.errors import ConfigError

log = logging.getLogger(__name__)
METRICS = logging.getLogger("reinforce_cot.metrics")  # to output.log only (conf/train.yaml hydra.job_logging)
LINES = 20  # progress lines per stage when no bar is drawn
EVAL_SCALARS = ("greedy_accuracy", "sampled_accuracy", "format_rate", "mean_completion_tokens")


def attach(trainer, cfg, sid: str, test_rows) -> None:
    """Replace transformers' console printers by `StageProgress`; add `EvalDuringTraining` when
    `eval.every_steps` is set (on `test_rows`, the stage's held-out split)."""
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK, PrinterCallback, ProgressCallback

    for cls in {PrinterCallback, ProgressCallback, DEFAULT_PROGRESS_CALLBACK}:
        trainer.remove_callback(cls)
    trainer.add_callback(StageProgress(sid, progress_keys(cfg)))
    if cfg.eval.get("every_steps"):
        trainer.add_callback(EvalDuringTraining(trainer, test_rows, cfg))
        log.info(
            "[%s] evaluating on %d held-out prompts every %d steps (eval/* scalars)",
            sid,
            min(cfg.eval.during_train_prompts, len(test_rows)),
            cfg.eval.every_steps,
        )


def progress_keys(cfg) -> dict:
    """{label: logged metric} the console shows for this stage's algo (`algo.progress`; default: the loss)."""
    return dict(cfg.algo.get("progress") or {"loss": "loss"})


def validate(cfg) -> None:
    """eval.every_steps and eval.during_train_prompts, before any weights load."""
    every, n = cfg.eval.get("every_steps"), cfg.eval.get("during_train_prompts")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"eval.every_steps={every}: must be a whole number of steps >= 1, or null (off)")
    if every is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"eval.during_train_prompts={n}: must be >= 1 (held-out prompts evaluated every N steps)")


# ------------------------------------------------------------------------------------------- console
def fmt(v) -> str:
    """A metric as the console shows it: 3 significant digits, no exponent for counts.

    >>> fmt(0.71234), fmt(26.63), fmt(1234.5), fmt(0.0001234), fmt(7)
    ('0.712', '26.6', '1234', '0.000123', '7')
    """
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def latest(history: list[dict], keys: dict) -> dict:
    """The newest value of each metric in `keys` ({label: logged name}) found in `history`, by label."""
    out = {}
    for label, key in keys.items():
        out |= next(({label: h[key]} for h in reversed(history) if key in h), {})
    return out


def _numbers(values: dict) -> str:
    return " | ".join(f"{label} {fmt(v)}" for label, v in values.items())


def _clock(seconds: float) -> str:
    """
    >>> _clock(59.4), _clock(61), _clock(3725)
    ('59s', '1m01s', '1h02m')
    """
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def summary(state, keys: dict, wall_seconds: float) -> str:
    """The stage's closing numbers: "300 steps in 281 s | reward 1.21 | acc 0.71 | len 26.6 | loss 0.012"."""
    values = latest(state.log_history, keys)
    return f"{state.global_step} steps in {wall_seconds:.0f} s" + (f" | {_numbers(values)}" if values else "")


class StageProgress(TrainerCallback):
    """One bar (a terminal) or a line every ~5 % of the steps (anything else); every metric to output.log.

    `keys`: {label: logged metric name} shown beside the step count. `stream`: where the bar or the
    decision "is this a terminal" goes (stderr)."""

    def __init__(self, sid: str, keys: dict, stream=None):
        self.sid, self.keys, self.stream = sid, dict(keys), stream
        self.bar, self.redirect, self.values = None, None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        stream = self.stream or sys.stderr
        self.start_step, self.t0 = state.global_step, time.monotonic()
        self.values = latest(state.log_history, self.keys)  # a resumed stage: what it had logged
        self.every = max(1, math.ceil(state.max_steps / LINES))
        self.next_line = state.global_step + self.every
        if not args.disable_tqdm and stream.isatty():
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc=f"[{self.sid}]", unit="step", file=stream
            )
            self.redirect = logging_redirect_tqdm()  # log lines go above the bar, not through it
            self.redirect.__enter__()
            self._postfix()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        METRICS.info("[%s] step %d/%d %s", self.sid, state.global_step, state.max_steps, json.dumps(logs, default=str))
        self.values |= {label: logs[key] for label, key in self.keys.items() if key in logs}
        if self.bar is not None:
            self._postfix()
        elif self.next_line <= state.global_step < state.max_steps:  # the last one is the stage's summary line
            self.next_line = (state.global_step // self.every + 1) * self.every
            log.info("[%s] %s", self.sid, self._line(state))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.redirect.__exit__(None, None, None)
            self.bar = self.redirect = None

    def _shown(self) -> str:
        return _numbers({label: self.values[label] for label in self.keys if label in self.values})

    def _postfix(self):
        self.bar.set_postfix_str(self._shown(), refresh=True)

    def _line(self, state) -> str:
        step, total = state.global_step, state.max_steps
        elapsed = time.monotonic() - self.t0
        done = step - self.start_step
        eta = elapsed / done * (total - step) if done > 0 else float("nan")
        when = f"{_clock(elapsed)}, ETA {_clock(eta) if eta == eta else '?'}"
        numbers = f" | {self._shown()}" if self.values else ""
        return f"step {step}/{total} ({100 * step / max(total, 1):.0f}%), {when}{numbers}"


# ------------------------------------------------------------------------------ evaluation during training
class EvalDuringTraining(TrainerCallback):
    """reinforce_cot.evaluation's metrics of the live model at step 0 and every `eval.every_steps` steps,
    logged as eval_<metric> at the trainer's global step (see the module docstring)."""

    def __init__(self, trainer, test_rows, cfg):
        from omegaconf import OmegaConf

        e = cfg.eval
        n = min(int(e.during_train_prompts), len(test_rows))
        self.trainer, self.every = trainer, int(e.every_steps)
        self.rows = [test_rows[i] for i in range(n)]  # decoded once, reused at every evaluation
        # no answer-only pass and no embedding model: greedy + k samples is what the curve needs
        only = {"max_prompts": n, "answer_only_template": None, "consistency": False}
        self.cfg = OmegaConf.merge(cfg, {"eval": only})

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # where the curve starts (a resumed stage has it already)
            self._evaluate(args, state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._evaluate(args, state, control)

    def _evaluate(self, args, state, control):
        t0 = time.monotonic()
        m = evaluate_live(self.trainer, self.rows, self.cfg)
        logs = {f"eval_{k}": v for k, v in m.items() if k in EVAL_SCALARS or k.startswith(("pass@", "maj@"))}
        logs["eval_seconds"] = round(time.monotonic() - t0, 2)
        # what Trainer.log does, without TRL's override of it (which would flush its buffered train metrics here)
        state.log_history.append({**logs, "step": state.global_step})
        should_log = control.should_log  # the handler clears it, and the trainer's own log of this step must stay
        self.trainer.callback_handler.on_log(args, state, control, logs=logs)
        control.should_log = should_log


def evaluate_live(trainer, rows: list[dict], cfg) -> dict:
    """evaluation.evaluate_backend on the model `trainer` is training, as it is now; the RNG and the model's
    train/eval mode are left as they were. A collective with N processes: call it on every process."""
    import torch
    from trl.models import unwrap_model_for_generation

    from reinforce_cot import evaluation, generation

    acc = trainer.accelerator
    devices = [acc.device.index or 0] if acc.device.type == "cuda" else []
    gather = getattr(trainer.args, "ds3_gather_for_generation", True)
    with (
        torch.random.fork_rng(devices=devices),
        unwrap_model_for_generation(trainer.model_wrapped, acc, gather_deepspeed3_params=gather) as model,
    ):
        was_training = model.training
        backend = generation.for_model(model, trainer.processing_class, cfg)
        shared = SharedGeneration(backend, acc.num_processes, acc.process_index)
        try:
            return evaluation.evaluate_backend(shared, rows, cfg)
        finally:
            model.train(was_training)


class SharedGeneration:
    """A backend whose `generate` each of `world` processes calls with the same rows: each generates an equal
    share (the last row repeats to pad the last share), and every process gets every completion back, in order."""

    def __init__(self, backend, world: int, rank: int):
        self.backend, self.world, self.rank = backend, world, rank
        self.tokenizer = backend.tokenizer

    def generate(self, rows, n: int = 1, temperature: float = 0.0, template: str | None = None):
        if self.world == 1:
            return self.backend.generate(rows, n=n, temperature=temperature, template=template)
        from accelerate.utils import gather_object

        share = math.ceil(len(rows) / self.world)
        mine = list(rows[self.rank * share : (self.rank + 1) * share])
        real = len(mine)
        mine += [rows[-1]] * (share - real)  # same number of generate calls on every process
        out = self.backend.generate(mine, n=n, temperature=temperature, template=template)
        return gather_object(out[:real])
