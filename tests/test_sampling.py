"""Curriculum and prioritized samplers: TRL's group layout, draws that follow their definitions, identical
draws on every process, state that survives a checkpoint, and the wiring into a real GRPO run."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from datasets import Dataset
from torch.utils.data import BatchSampler

from reinforce_cot import sampling
from reinforce_cot.errors import ConfigError
from tests.helpers import ROOT, free_port, run_in_process

N = 30


def _data(n=N):
    rows = [{"id": f"p{i}", "difficulty": i % 3, "pass_rate": 1 - (i % 10) / 10} for i in range(n)]
    return Dataset.from_list(rows)


def _chunks(sampler, per_chunk):
    seq = list(sampler)
    return [seq[i : i + per_chunk] for i in range(0, len(seq), per_chunk)]


@pytest.mark.parametrize("cls", [sampling.CurriculumSampler, sampling.PrioritizedSampler])
def test_layout_is_trls_repeat_sampler_layout(cls):
    from trl.trainer.utils import RepeatSampler

    ds = _data()
    kw = dict(mini_repeat_count=4, batch_size=3, repeat_count=2)
    s = cls(ds, seed=1, ids=list(ds["id"]), **kw)
    assert len(s) == len(RepeatSampler(ds, **kw))
    chunks = _chunks(s, 3 * 4 * 2)
    assert len(chunks) == N // 3
    for chunk in chunks:
        once = chunk[: 3 * 4]
        assert chunk == once * 2  # the chunk repeated for steps_per_generation x num_iterations
        prompts = once[::4]
        assert len(set(prompts)) == 3  # distinct prompts per generation round
        assert once == [p for p in prompts for _ in range(4)]  # each repeated num_generations times


def test_curriculum_draws_only_from_the_easiest_fraction_on_the_linear_schedule():
    ds = _data()
    s = sampling.CurriculumSampler(
        ds, mini_repeat_count=2, batch_size=2, seed=0, total_chunks=N // 2, start=0.2, full_at=0.5
    )
    for position, chunk in enumerate(_chunks(s, 4)):
        p = position / (N // 2)
        open_fraction = 0.2 + 0.8 * min(1.0, p / 0.5)  # the definition, written out independently
        allowed = math.ceil(open_fraction * N - 1e-9)
        hardest_allowed = sorted(ds["difficulty"])[allowed - 1]
        for i in set(chunk):
            assert ds[i]["difficulty"] <= hardest_allowed, (position, i)
        if p == 0:
            assert {ds[i]["difficulty"] for i in chunk} == {0}  # the first 20 % are all level 0
    late = [ds[i]["difficulty"] for c in _chunks(s, 4)[N // 4 :] for i in c]
    assert 2 in late  # hard prompts come in once the schedule has opened everything
    # ties within a level in a seeded random order: the open 20 % (6 of the 10 level-0 prompts) is a random
    # subset of the level, the same for the same seed and another for another seed
    level0 = {i for i in range(N) if ds[i]["difficulty"] == 0}
    other = sampling.CurriculumSampler(ds, 2, 2, seed=1, total_chunks=N // 2, start=0.2, full_at=0.5)
    again = sampling.CurriculumSampler(ds, 2, 2, seed=0, total_chunks=N // 2, start=0.2, full_at=0.5)
    assert set(s.pool(0)) < level0 and set(other.pool(0)) < level0 and len(s.pool(0)) == 6
    assert s.pool(0) == again.pool(0) and set(s.pool(0)) != set(other.pool(0))


def test_curriculum_by_pass_rate_starts_with_the_highest_pass_rates():
    ds = _data()
    s = sampling.CurriculumSampler(
        ds, 2, 3, seed=0, total_chunks=10, column="pass_rate", higher_is_easier=True, start=0.2, full_at=1.0
    )
    first = set(_chunks(s, 6)[0])
    assert min(ds[i]["pass_rate"] for i in first) >= 0.9  # 20 % of 30 = 6 easiest: pass rates 1.0 and 0.9


@pytest.mark.parametrize(
    ("schedule", "p", "expected"),
    [
        ("linear", 0.0, 0.25),
        ("linear", 0.25, 0.625),
        ("linear", 0.9, 1.0),
        ("sqrt", 0.0, 0.25),
        ("sqrt", 0.25, math.sqrt(0.25**2 + (1 - 0.25**2) * 0.5)),
        ("step", 0.0, 1 / 3),  # one of three difficulty levels open
        ("step", 0.25, 2 / 3),
        ("step", 0.5, 1.0),
    ],
)
def test_schedules(schedule, p, expected):
    s = sampling.CurriculumSampler(_data(), 2, 2, schedule=schedule, start=0.25, full_at=0.5)
    assert s.fraction(p) == pytest.approx(expected)


def test_prioritized_frequencies_are_proportional_to_one_minus_success():
    ds = _data(4)
    s = sampling.PrioritizedSampler(ds, mini_repeat_count=2, batch_size=1, seed=0, ids=list(ds["id"]), floor=0.01)
    # success rates 0, 0.5, 0.75, 1 from observed accuracy rewards (successes / attempts)
    s.update(["p1", "p1", "p2", "p2", "p2", "p2", "p3", "p3"], [1, 0, 1, 1, 1, 0, 1, 1])
    assert s.success == [0.0, 0.5, 0.75, 1.0] and s.attempts == [0, 2, 4, 2]
    draws = Counter(s.draw(pos)[0] for pos in range(20000))
    w = [1.0, 0.5, 0.25, 0.01]  # max(1 - s_i, floor)
    for i in range(4):
        assert draws[i] / 20000 == pytest.approx(w[i] / sum(w), abs=0.012), (i, draws)


def test_prioritized_ema_and_unverifiable_rewards():
    ds = _data(3)
    s = sampling.PrioritizedSampler(ds, 2, 1, ids=list(ds["id"]), alpha=0.5, init_success=0.2)
    s.update(["p0", "p0", "p1"], [1.0, 1.0, float("nan")])
    assert s.success == [0.5 * 0.2 + 0.5 * 1.0, 0.2, 0.2]  # NaN (None reward) is not an attempt
    assert s.attempts == [2, 0, 0]


def test_every_process_draws_the_same_chunks_and_gets_its_own_slice():
    from accelerate.data_loader import BatchSamplerShard

    ds = _data()
    kw = dict(mini_repeat_count=4, batch_size=4, repeat_count=1, seed=3, ids=list(ds["id"]))
    ranks = [sampling.PrioritizedSampler(ds, **kw) for _ in range(2)]
    for r in ranks:  # the same gathered rewards reach every process
        r.update(["p0", "p1", "p2"], [1.0, 1.0, 0.0])
    shards = [
        list(BatchSamplerShard(BatchSampler(r, 8, False), num_processes=2, process_index=k))
        for k, r in enumerate(ranks)
    ]
    global_order = list(sampling.PrioritizedSampler(ds, **kw))  # an undisturbed copy for reference
    assert global_order != list(ranks[0])  # (the updates changed the weights)
    chunk0 = [i for k in range(2) for i in shards[k][0]]  # rank 0 then rank 1: one generation round
    assert len(set(chunk0)) == 4 and chunk0 == [p for p in chunk0[::4] for _ in range(4)]


def test_state_survives_save_and_restore(tmp_path):
    ds = _data()
    kw = dict(mini_repeat_count=2, batch_size=3, seed=5, total_chunks=20, ids=list(ds["id"]), prioritize=True)
    a = sampling.CurriculumSampler(ds, **kw)
    it = iter(a)
    for _ in range(2 * 6 + 1):  # two chunks and into the third
        next(it)
    a.update(["p0", "p3", "p3"], [1.0, 0.0, 1.0])
    a.save(tmp_path / "checkpoint-7")
    state = json.loads((tmp_path / "checkpoint-7" / sampling.STATE_FILE).read_text())
    assert state["position"] == 2 and state["attempts"][3] == 2 and state["success"][0] == 1.0
    b = sampling.CurriculumSampler(ds, **kw)
    assert b.load(tmp_path / "checkpoint-7")
    assert b.state_dict() == a.state_dict()
    assert [b.draw(p) for p in range(2, 10)] == [a.draw(p) for p in range(2, 10)]
    fresh = sampling.CurriculumSampler(ds, **kw)
    assert [fresh.draw(p) for p in range(2, 10)] != [a.draw(p) for p in range(2, 10)]  # the state matters
    with pytest.raises(ConfigError, match="resume with the same data and sampler"):
        sampling.PrioritizedSampler(ds, 2, 3, ids=list(ds["id"])).load(tmp_path / "checkpoint-7")


def test_curriculum_needs_its_column():
    ds = Dataset.from_list([{"id": "a", "question": "q"}] * 4)
    with pytest.raises(ConfigError, match="no 'difficulty' column"):
        sampling.CurriculumSampler(ds, 2, 2)


# ------------------------------------------------------------------------------- through the recipe
def _jsonl(tmp_path, with_difficulty: bool):
    path = tmp_path / "d.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    if with_difficulty:
        for r in rows:
            r["difficulty"] = 1
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return ["data=jsonl", "data.modality=text", "model=tiny_lm", f"data.train.path={path}", f"data.test.path={path}"]


def test_curriculum_on_data_without_difficulty_fails_at_data_load(tmp_path):
    with pytest.raises(ConfigError, match="sampler=curriculum reads the 'difficulty' column, which data=jsonl lacks"):
        run_in_process(tmp_path, "recipe=single", "algo=grpo", "sampler=curriculum", *_jsonl(tmp_path, False))
    assert not (tmp_path / "run").exists()  # before anything is written, so before any weights load


def test_prioritized_without_the_accuracy_reward_fails_at_data_load(tmp_path):
    with pytest.raises(ConfigError, match="updates success rates from the 'accuracy' reward, which reward= lacks"):
        run_in_process(
            tmp_path, "recipe=single", "algo=grpo", "sampler=prioritized", "reward=format", *_jsonl(tmp_path, True)
        )


@pytest.mark.slow  # 4 GRPO steps, then 2 more after a resume, in process: ~15 s
def test_prioritized_grpo_saves_its_state_and_resumes_it(tmp_path, caplog, sft_checkpoint):
    steps = 4
    common = [
        "recipe=single",
        "algo=grpo",
        "sampler=prioritized",
        "debug=smoke",
        f"model.init_from={sft_checkpoint}",
        f"algo.args.max_steps={steps}",
        "algo.args.steps_per_generation=1",  # a new generation round (chunk of 2 prompts) every step
        "algo.args.save_steps=2",
        "algo.args.save_total_limit=null",
        "eval.k=0",
    ]
    run = run_in_process(tmp_path, *common)
    ckpt = run.dir / "ckpt" / "01_grpo"
    at2 = json.loads((ckpt / "checkpoint-2" / sampling.STATE_FILE).read_text())
    at4 = json.loads((ckpt / "checkpoint-4" / sampling.STATE_FILE).read_text())
    assert sum(at2["attempts"]) == 2 * 16 and sum(at4["attempts"]) == 4 * 16  # every scored completion
    logged = {k for h in run.result("01_grpo.json")["log_history"] for k in h}
    assert {"sampler/mean_success", "sampler/prompts_seen", "rewards/accuracy/mean"} <= logged

    # cut the run back to checkpoint-2 and resume: the success rates must carry over
    import shutil

    shutil.rmtree(ckpt / "checkpoint-4")
    shutil.rmtree(ckpt / "final")
    (run.dir / "result" / "01_grpo.json").unlink()
    caplog.set_level("INFO")
    run_in_process(tmp_path, f"resume={run.dir}")
    assert "sampler state restored from" in caplog.text
    resumed = json.loads((ckpt / "checkpoint-4" / sampling.STATE_FILE).read_text())
    assert sum(resumed["attempts"]) == 4 * 16  # 2 restored rounds + 2 new ones, not 2


@pytest.mark.slow  # torchrun, 2 processes, 4 GRPO steps: ~20 s
def test_two_processes_draw_the_same_groups_and_share_success_rates(tmp_path, sft_checkpoint):
    """torchrun with 2 gloo processes: each process gets half of every generation batch (one group
    straddles both), the sampler draws the same chunk on both, the length reward is computed on whole
    groups, and the success rates count every completion of every group once.

    torchrun directly, not hardware=cpu_ddp2: that preset validates in a 1-process parent first, where
    TRL rejects a per-device batch (6) that num_generations (4) does not divide, though 2 x 6 = 12 is fine."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "train.py"), "recipe=single", "algo=grpo", "debug=smoke", "hardware.num_processes=2",
        f"model.init_from={sft_checkpoint}", "sampler=prioritized", "reward=kimi_length",
        "algo.args.per_device_train_batch_size=6", "algo.args.num_generations=4",  # 12 per round: 3 groups, 6 per process
        "algo.args.steps_per_generation=1", "algo.args.max_steps=4", "eval.max_prompts=4", "eval.k=0",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((run_dir / "ckpt" / "01_grpo" / "checkpoint-4" / sampling.STATE_FILE).read_text())
    assert sum(state["attempts"]) == 4 * 12  # every completion of both processes, once
    assert all(a % 4 == 0 for a in state["attempts"])  # whole groups: both processes drew the same prompts
    log = (run_dir / "output.log").read_text()
    assert "mixes prompts" not in log
    history = json.loads((run_dir / "result" / "01_grpo.json").read_text())["log_history"]
    assert [h["rewards/length/std"] > 0 for h in history if "rewards/length/std" in h].count(True) >= 1
