"""The one JSONL writer in reinforce_cot: a resumable store of generations, and whole files of records.

Why: a stage that samples thousands of completions can be killed at any point (a preempted Slurm job,
a server that dies). A `Store` keeps one JSON line per prompt, appended and flushed as soon as that
prompt's completions arrive, under a key naming the prompt (`row_key`) and the request (the backend's
fingerprint: n, temperature, template, length, model). A rerun skips the keys already there, so a killed
job restarts where it stopped and loses nothing; a line cut short by the crash is skipped and its prompt
redone. A prompt whose generation failed (a malformed server response) is kept as a `"status": "failed"`
line with its error and comes back as `[]`, never silently dropped; a rerun re-asks it only when told to.

    store = Store("out/greedy.jsonl")
    todo = store.todo(keys)                  # indices of the keys not done yet
    with store.appending() as write:
        write({"key": keys[i], "status": "ok", "completions": [...]})
    store.completions(keys)                  # one list per key, [] where failed or missing

`write_jsonl` writes a whole file of records at once through the same lines (evaluation's
samples.jsonl, curation's audit of every sample), atomically; `read_jsonl` reads either kind back.
Datasets a stage hands to a later one are parquet instead (data.write_dataset).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def row_key(row: dict) -> str:
    """A stable identity for a prompt: its id (if any) and a hash of its question, answer and image
    pixels, so that a JSONL written for other data with the same ids is never mistaken for this one.

    >>> row_key({"id": "a", "question": "2 + 2?", "answer": "4"})
    'a#7438014947'
    """
    h = hashlib.sha1(json.dumps([row["question"], str(row.get("answer"))]).encode())
    for image in row.get("images") or []:
        h.update(image.tobytes())
    return f"{row['id']}#{h.hexdigest()[:10]}" if row.get("id") is not None else h.hexdigest()[:16]


class _Lines:
    """JSON lines appended to `path`, each flushed: a killed process leaves every finished line on disk.
    The file is opened at the first line, so a run that writes nothing leaves no file behind."""

    def __init__(self, path: Path):
        self.path, self.f = path, None

    def write(self, rec: dict) -> None:
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            cut = self.path.exists() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
            self.f = self.path.open("a")
            if cut:  # a half-written last line: start ours on a fresh line
                self.f.write("\n")
        self.f.write(json.dumps(rec, default=str) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSONL file, in order ([] when there is no file). A line cut short by a crash is
    skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            log.warning("%s:%d: unreadable line (cut short by a crash?) skipped", path, lineno)
    return out


def write_jsonl(path: str | Path, records) -> Path:
    """`records` as a JSONL file, written under a temporary name first: a file that exists is complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by a crash: never appended to
    lines = _Lines(tmp)
    try:
        for rec in records:
            lines.write(rec)
    finally:
        lines.close()
    if not tmp.exists():  # no records: an empty file
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    tmp.replace(path)
    return path


class Store:
    """A resumable JSONL of generations: one record per key (the last line for a key wins)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def done(self) -> dict[str, dict]:
        """The records by key; a line without a key counts as cut short (its prompt is redone)."""
        return {rec["key"]: rec for rec in read_jsonl(self.path) if "key" in rec}

    def todo(self, keys: list[str], retry_failed: bool = False) -> list[int]:
        """Indices of the keys not in the file yet (and, with `retry_failed`, of those that failed)."""
        done = self.done()
        todo = [i for i, k in enumerate(keys) if k not in done or (retry_failed and done[k].get("status") != "ok")]
        if len(todo) < len(keys):
            log.info("%s: %d of %d prompts already done, generating the other %d", self.path,
                     len(keys) - len(todo), len(keys), len(todo))  # fmt: skip
        return todo

    @contextlib.contextmanager
    def appending(self) -> Iterator:
        """`write(record)`, appending one flushed line per record; the file closes on leaving the block."""
        lines = _Lines(self.path)
        try:
            yield lines.write
        finally:
            lines.close()

    def completions(self, keys: list[str]) -> list[list[str]]:
        """Each key's completions: [] for a prompt that failed or is not in the file."""
        done = self.done()
        return [done[k]["completions"] if k in done and done[k].get("status") == "ok" else [] for k in keys]
