"""Tests of contracts.errors and the lazy public API."""

from __future__ import annotations

import subprocess
import sys

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
