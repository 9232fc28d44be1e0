"""Why nothing fits: a ``PlanError`` naming the device closest to fitting and what it lacks."""

from __future__ import annotations

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan, Stage
from contracts.table import CostTable
from solver.evaluate import LayerSums, evaluate

__all__ = ["no_fit_error"]


def no_fit_error(costs: CostTable, cluster: Cluster, batch_size: int,
                 optimizer_state_factor: float = 0.0, planner: str = "asteroid") -> PlanError:
    """A ``PlanError`` naming the device closest to fitting and the bytes it lacks.

    The diagnosis uses the most memory-friendly plan shape: micro-batches of one sample,
    one device per stage on every device, layers split to balance memory per capacity.
    """
    usable = {d.name: cluster.usable_bytes(d.name) for d in cluster.devices}
    devices = sorted(cluster.devices, key=lambda d: -usable[d.name])
    sums = LayerSums.of(costs)
    n_layers = costs.num_layers
    k = min(len(devices), n_layers)
    need = [sums.params(i, i) * (2 + optimizer_state_factor) + sums.activations(i, i) * k
            for i in range(n_layers)]
    total_need = sum(need)
    total_cap = sum(usable[d.name] for d in devices[:k])
    # greedy contiguous split: fill each device up to its fraction of the total
    stages = []
    first = 0
    acc = 0.0
    for s, device in enumerate(devices[:k]):
        target = total_need * sum(usable[d.name] for d in devices[:s + 1]) / total_cap
        last = first
        acc += need[first]
        while last + 1 < n_layers - (k - s - 1) and acc + need[last + 1] <= target:
            last += 1
            acc += need[last]
        if s == k - 1:
            last = n_layers - 1
        stages.append(Stage((first, last), (device.name,), (1,)))
        first = last + 1
    plan = Plan(model_hash=costs.model_hash, cluster_hash=cluster.cluster_hash,
                batch_size=batch_size, micro_batch_size=1, num_micro_batches=batch_size,
                stages=tuple(stages), optimizer_state_factor=optimizer_state_factor)
    shortfall = evaluate(plan, costs, cluster).memory_shortfall()
    if shortfall:
        name, short = min(shortfall.items(), key=lambda kv: kv[1])
        where = (f"device {name!r} is {short} bytes ({short / 2**20:.1f} MiB) short even "
                 f"with micro-batches of one sample and one device per stage")
    else:
        where = "every device would fit only with a plan shape outside this planner's space"
    below = sorted(d.name for d in cluster.devices if usable[d.name] <= 0)
    if below:      # (their usable memory is negative: a sum of it misleads)
        where += (f"; {', '.join(map(repr, below))} ha{'s' if len(below) == 1 else 've'} "
                  f"no memory beyond the runtime's workspace (workspace_mb in the cluster "
                  f"file)")
    return PlanError(
        f"no plan of planner {planner!r} fits in memory for batch size {batch_size}: {where}; "
        f"the model needs about {total_need / 2**20:.1f} MiB of weights, gradients, optimizer "
        f"state and activations against {max(total_cap, 0) / 2**20:.1f} MiB on the cluster. "
        f"Use a smaller batch or micro-batch size, a lighter optimizer, or add devices with "
        f"more memory")
