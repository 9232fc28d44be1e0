"""Typed errors of asteroid-fx (public API; they live in :mod:`contracts.errors`)."""

from __future__ import annotations

from contracts.errors import (
    AdapterError,
    AsteroidError,
    AuthenticationError,
    ClusterError,
    CostModelError,
    DatasetError,
    DeadlockError,
    ModelOutputError,
    ModelSpecError,
    OutputError,
    PartitionError,
    PlanError,
    ProtocolError,
    ReplannerUnavailable,
    RuntimeFailure,
    ScheduleError,
    StageFailure,
    TraceError,
)

__all__ = [
    "AdapterError",
    "AsteroidError",
    "AuthenticationError",
    "ClusterError",
    "CostModelError",
    "DatasetError",
    "DeadlockError",
    "ModelOutputError",
    "ModelSpecError",
    "OutputError",
    "PartitionError",
    "PlanError",
    "ProtocolError",
    "ReplannerUnavailable",
    "RuntimeFailure",
    "ScheduleError",
    "StageFailure",
    "TraceError",
]
