"""The resumable JSONL store every backend writes through (reinforce_cot.generation.store): results on disk as
they arrive, a rerun that asks only for what is missing, failed prompts kept as failed, a line cut short by a
crash redone, and whole files written atomically. A backend that answers from a table stands in for a model:
what is under test is the store and Backend.generate_to_jsonl, which it runs for real."""

from __future__ import annotations

import json
import logging

import pytest
from omegaconf import OmegaConf

from reinforce_cot.generation import Backend, GenerationError, read_jsonl, write_jsonl

DATA = OmegaConf.create({"modality": "text", "prompt_template": "{question}", "system_prompt": None})
ROWS = [{"id": f"r{i}", "question": f"{i} + 1?", "answer": str(i + 1)} for i in range(6)]


class Table(Backend):
    """Answers `<answer>{answer}</answer>` n times, two prompts per `generate` call; records what it was asked
    for, and fails on call `fail_at` (1-based) the way a killed job stops mid-stage."""

    chunk_prompts = 2

    def __init__(self, fail_at: int | None = None):
        super().__init__(data_cfg=DATA)
        self.asked: list[str] = []
        self.calls, self.fail_at = 0, fail_at

    def generate(self, rows, n=1, temperature=0.0, template=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed")
        self.asked += [r["id"] for r in rows]
        return [[f"<answer>{r['answer']}</answer>"] * n for r in rows]


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_each_chunk_is_on_disk_before_the_next_and_a_rerun_asks_only_for_the_rest(tmp_path):
    out = tmp_path / "g.jsonl"
    with pytest.raises(RuntimeError, match="killed"):
        Table(fail_at=2).generate_to_jsonl(ROWS, out, n=2, temperature=1.0)
    first = _lines(out)
    assert [json.loads(x)["id"] for x in first] == ["r0", "r1"]  # the first chunk survived the crash

    again = Table()
    result = again.generate_to_jsonl(ROWS, out, n=2, temperature=1.0)
    assert again.asked == ["r2", "r3", "r4", "r5"]  # only what was missing
    assert result == [[f"<answer>{i + 1}</answer>"] * 2 for i in range(6)]
    after = _lines(out)
    assert after[:2] == first and len({json.loads(x)["key"] for x in after}) == len(after) == 6

    other = Table()
    other.generate_to_jsonl(ROWS, out, n=1, temperature=1.0)  # another request: nothing reused
    assert other.asked == [r["id"] for r in ROWS]


class HalfFailing(Table):
    """Its server answers the odd prompts with garbage: those are emitted as failed, with the error."""

    def produce(self, rows, idx, n, temperature, template, emit):
        for i in idx:
            self.asked.append(rows[i]["id"])
            if i % 2:
                emit(i, [], status="failed", error="response is not JSON")
            else:
                emit(i, [f"<answer>{rows[i]['answer']}</answer>"] * n)


def test_failed_prompts_are_kept_as_failed_and_asked_again_only_when_told(tmp_path):
    out = tmp_path / "g.jsonl"
    backend = HalfFailing()
    result = backend.generate_to_jsonl(ROWS, out)
    assert result == [["<answer>1</answer>"], [], ["<answer>3</answer>"], [], ["<answer>5</answer>"], []]
    recs = read_jsonl(out)
    assert [r["status"] for r in recs] == ["ok", "failed"] * 3  # kept, not dropped
    assert {r["error"] for r in recs if r["status"] == "failed"} == {"response is not JSON"}

    backend.asked.clear()
    assert backend.generate_to_jsonl(ROWS, out) == result and backend.asked == []  # a rerun skips them too
    backend.generate_to_jsonl(ROWS, out, retry_failed=True)
    assert backend.asked == ["r1", "r3", "r5"]  # ... unless asked


def test_a_line_cut_short_by_a_crash_is_redone_on_a_fresh_line(tmp_path, caplog):
    out = tmp_path / "g.jsonl"
    Table().generate_to_jsonl(ROWS[:3], out)
    lines = _lines(out)
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # the third record was being written
    backend = Table()
    with caplog.at_level(logging.WARNING, logger="reinforce_cot.generation.store"):
        result = backend.generate_to_jsonl(ROWS[:3], out)
    assert backend.asked == ["r2"] and result == [[f"<answer>{i + 1}</answer>"] for i in range(3)]
    assert "g.jsonl:3: unreadable line" in caplog.text
    assert _lines(out)[3] == lines[2]  # a whole line after the stub, not glued to it


def test_a_backend_that_cannot_start_writes_nothing_and_a_stop_says_what_is_kept(tmp_path):
    class Down(Table):
        def ready(self):
            raise GenerationError("generation.base_url=http://x/v1: no server answers there")

    with pytest.raises(GenerationError, match="^generation.base_url=http://x/v1: no server answers there$"):
        Down().generate_to_jsonl(ROWS, tmp_path / "g.jsonl")
    assert not (tmp_path / "g.jsonl").exists()

    class Dies(Table):
        def generate(self, rows, n=1, temperature=0.0, template=None):
            if self.calls == 1:
                raise GenerationError("the server stopped answering")
            return super().generate(rows, n, temperature, template)

    out = tmp_path / "h.jsonl"
    with pytest.raises(GenerationError) as e:
        Dies().generate_to_jsonl(ROWS, out)
    assert str(e.value) == f"the server stopped answering; 2 prompts are kept in {out}, and a rerun skips them"


def test_whole_files_are_written_atomically_and_read_back(tmp_path):
    path = tmp_path / "sub" / "samples.jsonl"
    recs = [{"id": 1, "path": tmp_path}, {"id": 2, "text": "é\nline"}]
    write_jsonl(path, recs)
    assert read_jsonl(path) == [{"id": 1, "path": str(tmp_path)}, {"id": 2, "text": "é\nline"}]

    def broken():
        yield {"id": 3}
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]  # the complete file stays as it was
    write_jsonl(path, [])  # no records: an empty file, and the leftover .tmp is gone
    assert path.read_text() == "" and sorted(p.name for p in path.parent.iterdir()) == ["samples.jsonl"]
    assert read_jsonl(tmp_path / "missing.jsonl") == []
