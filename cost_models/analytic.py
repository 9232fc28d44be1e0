"""Analytic cost tables: per-layer roofline times from FLOP and byte counts, no timing runs.

[Note: analytic roofline]
For every layer of the traced :class:`~cost_models.graph.LayerGraph` the forward time on
the reference host is ``intercept + per_sample * b`` with

* ``per_sample = max(compute, bytes_moved / host_mem_bw)`` with
  ``compute = (fwd_flops - norm_flops) / host_flops + norm_flops / (host_flops * norm_eff)``
  (FLOPs and activation bytes per sample from :mod:`cost_models.flops`), and
* ``intercept = ops * OP_OVERHEAD_S + weight_bytes / host_mem_bw`` (a fixed launch
  overhead per op that does work, plus reading the weights once per call).

Backward uses the backward FLOPs of :mod:`cost_models.flops` (2x forward for
contractions and weighted ops, 1x otherwise), twice the activation traffic (the saved
input and the output gradient are read, the input gradient written) and twice the weight
traffic (weights read, weight gradients written).

``norm_eff`` is the compute ceiling of training-mode batch normalisation relative to the
matmul rate: CPU kernels compute batch statistics far below the matmul rate (about 1/30
on an AVX-512 core; measured by :func:`cost_models.hostspeed.measure_norm_flops`), and
without it the roofline ranks BatchNorm layers as nearly free although they take about
half of a MobileNetV2 forward pass on one core. ``host_flops`` defaults to this host's
measured single-core FLOP/s (:mod:`cost_models.hostspeed`), the same figure a measured
table records, so analytic and measured tables share one time scale.
"""

from __future__ import annotations

import logging
import math
import platform

import torch

from contracts.arguments import is_number
from contracts.errors import CostModelError
from contracts.table import CostTable, LayerCost, TimeFit
from cost_models.flops import NodeCost, nodes_cost
from cost_models.graph import LayerGraph
from cost_models.hostspeed import measure_host_flops, measure_host_mem_bw, measure_norm_flops
from cost_models.optimizer import BuildOptimizer, optimizer_state_factor

__all__ = ["analytic_table", "layer_node_costs", "OP_OVERHEAD_S", "SGD_UPDATE_TRAFFIC"]

logger = logging.getLogger(__name__)

#: Seconds of fixed overhead per op that does work (dispatch + kernel launch on a CPU).
OP_OVERHEAD_S = 5e-6

SGD_UPDATE_TRAFFIC = 3.0
"""Bytes moved per parameter byte by one plain-SGD step (read weight and gradient, write
the weight): the analytic ``CostTable.update_s_per_byte`` is this over the memory
bandwidth."""


def _positive(name: str, value: float | None) -> None:
    if value is None:
        return
    if not is_number(value) or \
            not (math.isfinite(value) and value > 0):     # (a string was a raw TypeError)
        raise CostModelError(f"{name} must be a finite number > 0, got {value!r}")


def layer_node_costs(graph: LayerGraph) -> list[NodeCost]:
    """The summed :class:`~cost_models.flops.NodeCost` of every layer of ``graph``."""
    gm = graph.graph_module
    return [nodes_cost(gm, layer.node_names, graph.example_batch) for layer in graph.layers]


def analytic_table(
    graph: LayerGraph,
    model: torch.nn.Module,
    *,
    host_flops: float | None = None,
    host_mem_bw: float | None = None,
    model_name: str = "",
    norm_efficiency: float | None = None,
    optimizer: BuildOptimizer | None = None,
) -> CostTable:
    """A cost table of the traced ``graph`` of ``model`` from FLOP and byte counts (source
    ``"analytic"``; see the module note). ``asteroid_fx.analytic_costs`` traces a model and
    calls this.

    Args:
        graph: the traced layer graph of ``model`` (``asteroid_fx.trace.trace``).
        model: the model (its parameters size the optimizer state).
        host_flops: effective FLOP/s of the reference host; default: this host's single
            core, measured once per process.
        host_mem_bw: memory bandwidth of the reference host in bytes/s; default: measured.
        model_name: recorded in the table (default: the graph's name or the class name).
        norm_efficiency: training-mode batch-norm FLOP/s as a fraction of ``host_flops``;
            default: measured on this host.
        optimizer: the model file's ``build_optimizer`` (default plain SGD); one step on
            clones of the parameters measures its state per weight byte
            (``CostTable.optimizer_state_factor``, e.g. 2 for Adam).

    Returns:
        A :class:`~contracts.table.CostTable` whose layer ``i`` is layer ``i`` of the graph.

    Raises:
        CostModelError: a non-positive ``host_flops`` / ``host_mem_bw`` /
            ``norm_efficiency``.
    """
    _positive("host_flops", host_flops)
    _positive("host_mem_bw", host_mem_bw)
    _positive("norm_efficiency", norm_efficiency)
    flops_s = host_flops if host_flops is not None else measure_host_flops()
    bw = host_mem_bw if host_mem_bw is not None else measure_host_mem_bw()
    if norm_efficiency is None:
        norm_efficiency = min(1.0, measure_norm_flops() / measure_host_flops())
    norm_s = flops_s * norm_efficiency

    def compute_s(flops: float, norm: float) -> float:
        return max(0.0, flops - norm) / flops_s + norm / norm_s

    costs = layer_node_costs(graph)
    layers = []
    for layer, c in zip(graph.layers, costs):
        fwd = TimeFit(
            intercept_s=c.ops * OP_OVERHEAD_S + c.weight_bytes / bw,
            per_sample_s=max(compute_s(c.fwd_flops, c.norm_fwd_flops), c.bytes_moved / bw),
        )
        bwd = TimeFit(
            intercept_s=c.ops * OP_OVERHEAD_S + 2.0 * c.weight_bytes / bw,
            per_sample_s=max(
                compute_s(c.bwd_flops, c.norm_bwd_flops), 2.0 * c.bytes_moved / bw
            ),
        )
        layers.append(
            LayerCost(
                name=layer.name,
                op=layer.op,
                fwd=fwd,
                bwd=bwd,
                param_bytes=layer.param_bytes,
                activation_bytes=layer.activation_bytes,
                output_bytes=layer.output_bytes,
                flops=c.fwd_flops,
                buffer_bytes=layer.buffer_bytes,
            )
        )
    total = sum(c.fwd_flops for c in costs)
    logger.info(
        "analytic costs of %s: %d layers, %.3g forward FLOPs per sample",
        graph.model_name, len(layers), total,
    )
    return CostTable(
        layers=tuple(layers),
        cut_bytes=tuple(int(v) for v in graph.cut_bytes),
        tied=graph.tied,
        input_bytes=int(graph.input_bytes),
        model_name=model_name or graph.model_name or type(model).__name__,
        model_hash=graph.model_hash,
        host=platform.node(),
        host_flops=float(flops_s),
        source="analytic",
        torch_version=torch.__version__,
        batch_sizes=(),
        meta={
            "host_mem_bw": float(bw),
            "norm_efficiency": float(norm_efficiency),
            "op_overhead_s": OP_OVERHEAD_S,
            "example_batch": int(graph.example_batch),
            "bwd_flops": [c.bwd_flops for c in costs],
            "bytes_moved": [c.bytes_moved for c in costs],
        },
        update_s_per_byte=SGD_UPDATE_TRAFFIC / bw,
        optimizer_state_factor=optimizer_state_factor(model.parameters(), optimizer),
    )
