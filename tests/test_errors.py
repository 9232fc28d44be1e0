"""Tests of contracts.errors and the lazy public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import asteroid_fx as afx
from asteroid_fx import errors


def test_hierarchy() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.AsteroidError)
        assert getattr(afx, name) is cls
    assert issubclass(errors.PlanError, ValueError)
    assert issubclass(errors.DeadlockError, errors.ScheduleError)


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        afx.nope  # noqa: B018


def test_solver_and_plain_data_never_import_torch() -> None:
    code = (
        "import sys, contracts.errors, contracts.cluster, contracts.plan, contracts.table, "
        "contracts.devices; import asteroid_fx; afx = asteroid_fx; afx.Cluster; afx.Plan; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_public_functions_are_not_shadowed_by_submodules() -> None:
    code = (
        "import asteroid_fx.partition, asteroid_fx.trace, asteroid_fx as afx, types, sys; "
        "sys.exit(0 if callable(afx.partition) and callable(afx.trace) "
        "and not isinstance(afx.trace, types.ModuleType) else 1)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_absent_says_what_is_there_instead(tmp_path: Path) -> None:
    from contracts.errors import absent

    (tmp_path / "f").write_text("x")
    assert absent(tmp_path) == "is a directory, not a file"
    assert absent(tmp_path / "nope") == "does not exist"
    assert absent(tmp_path / "f", directory=True) == "is a file, not a directory"
    assert absent(tmp_path / "nope", directory=True) == "does not exist"


def test_files_that_are_not_text_or_json_are_typed_errors(tmp_path: Path) -> None:
    from contracts.cluster import Cluster
    from contracts.errors import ClusterError, CostModelError, PlanError
    from contracts.pac_plan import PacPlan
    from contracts.plan import Plan
    from contracts.table import CostTable

    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ClusterError, match="is not text"):
        Cluster.from_yaml(binary)
    with pytest.raises(PlanError, match="is not text"):
        Plan.load(binary)
    with pytest.raises(PlanError, match="is not text"):
        PacPlan.load(binary)
    with pytest.raises(CostModelError, match="is not text"):
        CostTable.load(binary)
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"version": 1, "devic')
    with pytest.raises(PlanError, match="PAC plan '.*truncated.json' is not valid JSON"):
        PacPlan.load(truncated)
    with pytest.raises(PlanError, match="plan file '.*truncated.json' is not valid JSON"):
        Plan.load(truncated)    # (the message named no file)
    with pytest.raises(CostModelError, match="truncated.json. is not valid JSON"):
        CostTable.load(truncated)
    with pytest.raises(ClusterError, match="is a directory, not a file"):
        Cluster.from_yaml(tmp_path)
