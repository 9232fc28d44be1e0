"""Planners, the round-latency and memory model, and the event simulator (never imports torch).

Import the submodules you need (``contracts.cluster``, ``contracts.plan``, ``solver.evaluate``,
``solver.api``); this package file imports nothing so the runtime can read plans cheaply.
"""

from __future__ import annotations

__all__: list[str] = []
