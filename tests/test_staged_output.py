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


def test_a_path_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path) -> None:
    """``afx.run(metrics=DIR)`` trained to the end, then failed on the rename and left
    ``.DIR.partial`` behind; now nothing runs and nothing is left."""
    import pytest

    from contracts.errors import OutputError

    ran = []
    with pytest.raises(OutputError, match=r"metrics '.*' is a directory; give a file name, "
                                          r"e.g. '.*metrics\.jsonl'"):
        with staged_output(tmp_path):
            ran.append(1)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a file; give a path in a directory"):
        with staged_output(a_file / "m.jsonl"):
            ran.append(1)
    assert not ran and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_device_is_written_directly_and_a_link_stays(tmp_path: Path) -> None:
    """``--metrics /dev/null`` turned /dev/null into a regular file (root), a FIFO's reader
    got nothing, and a symbolic link was replaced by a file."""
    import os

    if Path("/dev/null").exists():
        with staged_output("/dev/null") as where:
            assert where == "/dev/null"
            Path(where).write_text("x\n")
        assert not Path("/dev/null").is_file()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with staged_output(fifo) as where:
        assert where == str(fifo)
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with staged_output(link) as where:
        assert where is not None
        Path(where).write_text("new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
