"""Tests of ``contracts.files``: files written whole or not at all."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from contracts.errors import OutputError
from contracts.files import write_bytes, write_text


def _hidden(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_a_new_file_is_written_with_the_umask_s_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "plan.json", "{}\n")
    finally:
        os.umask(old)
    path = tmp_path / "plan.json"
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _hidden(tmp_path) == []


def test_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "costs.json"
    path.write_text("old")
    path.chmod(0o600)
    write_text(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (ENOSPC at the flush) keeps the old plan whole: the old code truncated it
    first."""
    path = tmp_path / "plan.json"
    path.write_text("the old plan")

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write plan '.*plan\.json': No space left "
                                          r"on device; nothing was written \(an existing "
                                          r"file is kept\)"):
        write_text(path, "x" * 10_000, "plan")
    assert path.read_text() == "the old plan"
    assert _hidden(tmp_path) == []


def test_a_missing_directory_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"cannot write cost table .*nowhere.*No such file"):
        write_bytes(tmp_path / "nowhere" / "costs.json", b"{}", "cost table")


def test_a_symbolic_link_stays_and_its_target_changes(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_device_is_written_directly_not_replaced() -> None:
    """``/dev/full`` stays a device (os.replace would have put a file in its place) and its
    ENOSPC is an OutputError."""
    with pytest.raises(OutputError, match=r"cannot write plan '/dev/full': No space left"):
        write_text("/dev/full", "{}", "plan")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_the_contracts_save_through_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan and CostTable ``save`` (and PacPlan's, the same call) keep an old file when
    the write fails."""
    from contracts.plan import Plan
    from contracts.table import CostTable
    from solver.api import plan
    from tests.solver_cases import make_cluster, uniform_costs

    costs = uniform_costs(4)
    result = plan(costs, make_cluster([1.0, 0.5]), 4)
    for obj, name in ((result, "plan.json"), (costs, "costs.json")):
        path = tmp_path / name
        obj.save(path)
        before = path.read_text()

        def refuse(*_: Any) -> None:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", refuse)
            with pytest.raises(OutputError, match="quota"):
                obj.save(path)
        assert path.read_text() == before
        assert _hidden(tmp_path) == []
    assert Plan.load(tmp_path / "plan.json") == result
    assert CostTable.load(tmp_path / "costs.json") == costs
