"""Typed errors of asteroid-fx: every user-facing failure is an ``AsteroidError``."""

from __future__ import annotations

from typing import Any

__all__ = [
    "absent",
    "read_text",
    "read_json",
    "AsteroidError",
    "ModelSpecError",
    "TraceError",
    "ModelOutputError",
    "ClusterError",
    "CostModelError",
    "PlanError",
    "PartitionError",
    "ScheduleError",
    "DeadlockError",
    "RuntimeFailure",
    "StageFailure",
    "ProtocolError",
    "AuthenticationError",
    "ReplannerUnavailable",
    "AdapterError",
    "DatasetError",
    "OutputError",
]

# [Note: dependency-free errors]
# This module imports nothing but the standard library so that every layer (``solver``,
# which never imports torch, ``runtime``, which must run on a bare board, the cost models
# and the front end) raises the same typed errors; ``asteroid_fx.errors`` re-exports them
# as public API.


class AsteroidError(Exception):
    """Base class of every error asteroid-fx raises for bad input or failed work.

    The message always names the offending value and, where there is one, the fix.
    """


class ModelSpecError(AsteroidError, ValueError):
    """A MODEL_SPEC could not be loaded (missing file, missing ``build_model`` ...)."""


class TraceError(AsteroidError):
    """torch.fx could not trace the model; the message names module, line and fix."""


class ModelOutputError(TraceError, TypeError):
    """The model returns something other than tensors in tuples, lists and mappings; the
    message names the type and where in the output it is."""


class ClusterError(AsteroidError, ValueError):
    """A cluster description is malformed (unknown device type, bad bandwidth ...)."""


class CostModelError(AsteroidError, ValueError):
    """A cost table is malformed, inconsistent, or could not be measured."""


class PlanError(AsteroidError, ValueError):
    """No plan fits, or a plan is malformed / inconsistent with its inputs."""


class PartitionError(AsteroidError):
    """A model cannot be split as the plan asks (non-tensor at a cut, ...)."""


class ScheduleError(AsteroidError, ValueError):
    """A pipeline schedule is malformed (unmatched send/recv, wrong order ...)."""


class DeadlockError(ScheduleError):
    """Dry-running a schedule found a deadlock; the message holds a step x rank grid."""


class RuntimeFailure(AsteroidError):
    """Distributed training failed; the message names rank, step and action."""


class StageFailure(RuntimeFailure):
    """One stage's worker raised or died."""


class ProtocolError(RuntimeFailure):
    """A message between processes (c10d store, result queue) is malformed or not the kind
    expected; the message names the key and what was found. Nothing in it was executed."""


class AuthenticationError(RuntimeFailure):
    """A process could not prove the job's shared token (``--token``, ``ASTEROID_TOKEN`` or
    ``DIR/token``), or the job could not prove it to the process: it was refused."""


class ReplannerUnavailable(RuntimeFailure):
    """Recovery needs a re-planner (``runtime.replanning.Replanner``) and has none, e.g. on
    a device-only install; the message names what to install or pass."""


class AdapterError(AsteroidError, ValueError):
    """Parallel adapters cannot be attached as asked (no layer to tap, rank <= 0, a tapped
    tensor of another shape than the head's input ...)."""


class DatasetError(ModelSpecError):
    """A model file's ``dataset()`` is not a finite indexable dataset of ``(inputs,
    target)`` samples (no ``__len__``, empty, wrong item shape ...)."""


class OutputError(AsteroidError, ValueError):
    """A path to write cannot be written (a directory where a file is asked, a parent
    directory that cannot be made ...); the CLI checks its outputs before any work."""


def absent(path: object, directory: bool = False) -> str:
    """Why ``path`` cannot be read as a file (or, with ``directory``, as a directory), for
    an error message: "is a directory", "is a file, not a directory" or "does not exist"."""
    from pathlib import Path

    p = Path(str(path))
    if directory:
        return "is a file, not a directory" if p.exists() else "does not exist"
    return "is a directory, not a file" if p.is_dir() else "does not exist"


def read_text(path: object, error: type[AsteroidError], what: str, fix: str) -> str:
    """The text of the file ``path``; ``error`` (``"{what} 'PATH' does not exist; {fix}"``,
    or "is a directory", or "is not text") where it cannot be read as one."""
    from pathlib import Path

    p = Path(str(path))
    if not p.is_file():
        raise error(f"{what} {str(p)!r} {absent(p)}; {fix}")
    try:
        return p.read_text()
    except UnicodeDecodeError as exc:
        raise error(f"{what} {str(p)!r} is not text (UTF-8): {exc}; {fix}") from None


def read_json(path: object, error: type[AsteroidError], what: str, fix: str) -> Any:
    """The JSON data of the file ``path``: ``read_text``, then ``parse_json`` naming the
    file (``"{what} 'PATH' is not valid JSON: ...; {fix}"``)."""
    from pathlib import Path

    return parse_json(read_text(path, error, what, fix), error,
                      f"{what} {str(Path(str(path)))!r}", fix)


MALFORMED = (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError)
"""What parsing a contract's JSON/YAML data can raise on a value of the wrong type or size
(a list where a mapping is due, ``Infinity`` where an int is, nesting too deep): the
``from_dict`` methods turn each into their typed error."""


def parse_json(text: object, error: type[AsteroidError], what: str, fix: str) -> Any:
    """``json.loads(text)``; ``error`` (``"{what} is not valid JSON: ...; {fix}"``) where
    ``text`` is not a string of JSON, or is nested too deeply to parse."""
    import json

    if not isinstance(text, (str, bytes, bytearray)):
        raise error(f"{what} must be JSON text, got {type(text).__name__}; {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc}; {fix}") from None
    except (RecursionError, UnicodeDecodeError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise error(f"{what} is not valid JSON ({why}); {fix}") from None

