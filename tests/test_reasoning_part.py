"""One definition of "the reasoning part" of a completion (reasoning.chain), and every consumer reading it:
evaluation's steps, curation's easy-to-hack filter, rejection sampling's SFT chains and samples.html judge the
same text the same way. A backend answering from a table stands in for a model (the consumers are what is
under test); each consumer runs for real on the same completions."""

from __future__ import annotations

import html

from reinforce_cot import curation, data, evaluation, generation, reasoning, rejection, report, rewards, sources
from tests.helpers import compose_cfg

# Every one answers 2 correctly; they differ in where (and whether) they reason.
TEXTS = [
    "<think>I count 1, 2. So 2.</think><answer>2</answer>",
    "<answer>2</answer> Because I counted two squares.",  # reasoning after the answer
    "I count 1, 2. <answer>2</answer>",  # before it, no tags
    "<think></think><answer>2</answer>",  # an empty think
    "<answer>2</answer>",  # no reasoning at all
    "<think>One.</think> aside <think>Two.</think><answer>2</answer>",  # two think blocks
]


class Table(generation.Backend):
    def generate(self, rows, n=1, temperature=0.0, template=None):
        return [[TEXTS[int(r["id"])]] * n for r in rows]


def _cfg():
    return compose_cfg("data=arithmetic", "model=tiny_lm", "reward=r1", "rejection.k=1", "rejection.temperature=1.0",
                       "curate.k=1", "curate.hack_tries=1", "curate.hack_max_reasoning_chars=0",
                       "eval.consistency=false")  # importing sentence-transformers alone takes ~6 s  # fmt: skip


def test_every_consumer_reads_the_same_reasoning(tmp_path):
    cfg = _cfg()
    rows = data.from_rows([{"id": str(i), "question": "How many?", "answer": "2"} for i in range(len(TEXTS))])
    backend = Table(data_cfg=cfg.data)
    chains = [reasoning.chain(t) for t in TEXTS]
    assert chains == ["I count 1, 2. So 2.", "Because I counted two squares.", "I count 1, 2.", "", "", "One.\nTwo."]

    # evaluation: steps of the chain
    split = cfg.data.reasoning.step_split
    _, records = evaluation.score(data.text_rows(rows), TEXTS, None, None, cfg.eval, cfg.data)
    assert [r["steps"] for r in records] == [len(reasoning.steps(c, split)) for c in chains] == [2, 1, 1, 0, 0, 2]

    # curation: with no reasoning allowed (0 characters) a correct answer is a hack exactly when the chain is
    # empty, i.e. when evaluation found no step in it
    measured = curation.measure(backend, rows, cfg.curate, tmp_path / "curate", "train")
    assert all(rewards.accuracy_reward(TEXTS, answer=["2"] * len(TEXTS)))
    assert [m["hack_correct"] == 1 for m in measured] == [r["steps"] == 0 for r in records]

    # rejection sampling: the SFT chain is the chain, and its target reads back the same reasoning
    rejection.sample(backend, rows, cfg, tmp_path / "rs")
    sft = data.text_rows(sources.load_split(str(tmp_path / "rs"), name="sft"))
    assert {r["source_id"]: r["reasoning"] for r in sft} == {str(i): c for i, c in enumerate(chains)}
    assert all(reasoning.chain(data.target(r)) == r["reasoning"] for r in sft)

    # samples.html shows that chain
    page = report.html(records, rows, tmp_path / "samples.html", "t").read_text()
    assert all(f"<pre>{html.escape(c)}</pre>" in page for c in chains if c)
