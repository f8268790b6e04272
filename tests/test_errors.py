"""Bad input ends in one line that names the key (or row) and the fix, before any weights load.

Through the real CLI (exit code 2, `error: ...` as the last line, Hydra's own message for an unknown option):
a few commands, since each pays for a fresh interpreter. The other cases run the recipe in process
(helpers.run_in_process, as main runs it): a ConfigError with that line, raised before the run dir is
written, i.e. before any weights load (a stage loads weights only after provenance is written).
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from reinforce_cot.errors import ConfigError
from tests.helpers import run_in_process

LOADED = "loaded Qwen"  # logged when weights load: none of these may get that far


def _check(run, *needles):
    assert run.returncode == 2, run
    err = [line for line in run.stderr.splitlines() if line.strip()]
    assert err, run
    for needle in needles:
        assert needle in run.stderr, run
    assert LOADED not in run.stdout + run.stderr
    return err


def test_unknown_group_option(train):
    run = train("algo=ppo")
    assert run.returncode == 1 and LOADED not in run.stdout + run.stderr, run  # Hydra's own error and exit code
    assert "Could not find 'algo/ppo'" in run.stderr and "Available options in 'algo'" in run.stderr, run
    assert any("grpo" in line for line in run.stderr.splitlines())


def test_num_generations_must_divide_the_generation_batch(train):
    err = _check(train("recipe=single", "algo=grpo", "algo.args.num_generations=3"), "algo.args.num_generations=3")
    assert err[-1].startswith("error: ") and "use one of" in err[-1]


def test_resume_of_a_folder_that_is_not_a_run_dir(train, tmp_path):
    (tmp_path / "notarun").mkdir()  # the run dir is resolved by Hydra's run.dir resolver: CLI only
    assert "not a run dir" in _check(train(f"resume={tmp_path}/notarun"))[-1]


def _refused(tmp_path, *overrides) -> str:
    with pytest.raises(ConfigError) as e:
        run_in_process(tmp_path, *overrides)
    assert not (tmp_path / "run").exists()  # nothing written: no provenance, no weights loaded
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["algo.args.no_such_field=1"], "algo.args.no_such_field=1 reaches no stage"),
        (["recipe=single", "algo=gspo", "algo.args.steps_per_generation=1"], "steps_per_generation"),
        (["model.path={tmp}/nope"], "model.path={tmp}/nope does not exist"),
        (["data.train.n=0"], "the train split is empty"),
        (["model=tiny_lm"], "data=shapes_count has images but model=tiny_lm is text-only"),
        (["data=jsonl"], "data.test.path, data.train.path: required"),
    ],
    ids=["unknown key", "gspo on-policy", "model path", "empty dataset", "images, text model", "jsonl path"],
)
def test_bad_settings(tmp_path, overrides, needle):
    assert needle.format(tmp=tmp_path) in _refused(tmp_path, *(o.format(tmp=tmp_path) for o in overrides))


def _jsonl(tmp_path, rows):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"garbage")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    return ["data=jsonl", f"data.train.path={path}", f"data.test.path={path}", f"data.image_folder={tmp_path}/img"]


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"image": "ok.png", "question": "Q?"}, "d.jsonl:2: no 'answer' field"),
        ({"image": "gone.png", "question": "Q?", "answer": "1"}, "gone.png does not exist"),
        ({"image": "bad.png", "question": "Q?", "answer": "1"}, "bad.png is not an image"),
    ],
)
def test_jsonl_rows(tmp_path, bad, needle):
    good = {"image": "ok.png", "question": "Q?", "answer": "1"}
    assert needle in _refused(tmp_path, *_jsonl(tmp_path, [good, bad]))


def test_a_failure_that_is_not_the_configs_is_not_called_bad_input(monkeypatch):
    # TrainingArguments set up the process group while validation builds them: a rendezvous port another
    # process holds is the machine's problem, not an `error: algo=...` to fix in the command (exit 2)
    import trl

    from reinforce_cot import config
    from tests.helpers import compose_cfg

    cfg = compose_cfg("recipe=single", "algo=sft")

    def bind_fails(self):
        raise RuntimeError("The server socket has failed to listen on any local network address: EADDRINUSE")

    monkeypatch.setattr(trl.SFTConfig, "__post_init__", bind_fails)
    with pytest.raises(RuntimeError, match="EADDRINUSE") as e:
        config.validate(cfg)
    assert not isinstance(e.value, ConfigError)

    def field_refused(self):
        raise ValueError("bad field")

    monkeypatch.setattr(trl.SFTConfig, "__post_init__", field_refused)
    with pytest.raises(ConfigError, match=r"^algo=sft: bad field$"):  # the config's own refusal stays one line
        config.validate(cfg)
