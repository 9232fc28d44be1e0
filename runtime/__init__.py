"""Stage execution on torch.distributed: schedules, p2p, intra-stage data parallelism, recovery.

A device needs only this package, torch and a saved partition directory.
"""

from __future__ import annotations

__all__: list[str] = []
