"""Layer-graph costs: analytic and measured per-layer times, bytes and memory, device profiles.

``contracts.table`` and ``contracts.devices`` are plain data and import no torch, so
the solver can use them; ``analytic`` and ``profile`` need torch and are imported lazily
through ``asteroid_fx``.
"""

from __future__ import annotations

__all__: list[str] = []
