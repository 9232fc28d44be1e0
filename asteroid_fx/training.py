"""``afx.run``: train a partition directory with the front end's re-planner handed to the
runtime, so that recovery (``fail=`` / ``leave=``) can re-plan and re-partition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asteroid_fx.replanning import Replanner
from runtime.launch import RunResult
from runtime.launch import run as run_partition
from runtime.replanning import Replanner as ReplannerProtocol

__all__ = ["run"]


def run(directory: str | Path, *, replanner: ReplannerProtocol | str | None = None,
        **options: Any) -> RunResult:
    """:func:`runtime.launch.run` (whose options these are) with ``replanner`` defaulting
    to :class:`asteroid_fx.replanning.Replanner`, the planner, cost models and partitioner
    of this package (see [Note: re-planner plugin point] in runtime.replanning)."""
    return run_partition(directory, replanner=Replanner() if replanner is None else replanner,
                         **options)
