"""Tests of runtime/staged_output.py: a run's metrics file is written beside its place."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.staged_output import staged_output


def test_a_finished_run_moves_its_file_into_place(tmp_path: Path) -> None:
    target = tmp_path / "m.jsonl"
    target.write_text("old\n")
    with staged_output(target) as staged:
        assert staged is not None and Path(staged).parent == tmp_path
        assert Path(staged).name != target.name
        Path(staged).write_text("new\n")
        assert target.read_text() == "old\n"        # untouched while the run goes on
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def test_a_failed_run_keeps_the_earlier_file_and_puts_its_lines_beside_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "m.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"), staged_output(target) as staged:
        assert staged is not None
        Path(staged).write_text("partial\n")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert (tmp_path / "m.failed.jsonl").read_text() == "partial\n"
    assert "m.failed.jsonl" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.failed.jsonl", "m.jsonl"]


def test_a_failed_first_run_leaves_its_lines_where_asked(tmp_path: Path) -> None:
    target = tmp_path / "m.jsonl"
    with pytest.raises(RuntimeError), staged_output(target) as staged:
        assert staged is not None
        Path(staged).write_text("partial\n")
        raise RuntimeError("boom")
    assert target.read_text() == "partial\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def test_nothing_to_stage() -> None:
    with staged_output(None) as staged:
        assert staged is None
