"""Typed errors of asteroid-fx (public API; they live in :mod:`contracts.errors`)."""

from __future__ import annotations

from contracts.errors import (
    AsteroidError,
    AuthenticationError,
    ClusterError,
    CostModelError,
    DeadlockError,
    ModelOutputError,
    ModelSpecError,
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
    "AsteroidError",
    "AuthenticationError",
    "ClusterError",
    "CostModelError",
    "DeadlockError",
    "ModelOutputError",
    "ModelSpecError",
    "PartitionError",
    "PlanError",
    "ProtocolError",
    "ReplannerUnavailable",
    "RuntimeFailure",
    "ScheduleError",
    "StageFailure",
    "TraceError",
]
