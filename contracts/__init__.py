"""Plain data every layer shares: errors, ``Plan``, ``Cluster``, the cost table, device types.

The bottom package of asteroid-fx: it imports the standard library only (``Cluster.from_yaml``
imports pyyaml inside the function, on first use), runs on Python >= 3.8, and every other
package may import it: front end -> {cost_models, solver, runtime} -> contracts. Import the
submodules you need (``contracts.errors``, ``contracts.plan``, ``contracts.cluster``,
``contracts.table``, ``contracts.devices``, ``contracts.inputs``, ``contracts.allocator``).
"""

from __future__ import annotations

__all__: list[str] = []
