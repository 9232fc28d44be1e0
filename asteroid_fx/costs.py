"""Cost tables of a model: the front end traces, the cost models count or measure.

``afx.analytic_costs`` and ``afx.profile`` take a model (and its inputs or ``sample_batch``),
trace it with :func:`asteroid_fx.trace.trace` unless a traced ``graph`` is given, and hand
the graph to :mod:`cost_models.analytic` / :mod:`cost_models.profile`, which never trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence, Union

import torch

from asteroid_fx.trace import LayerGraph, check_graph, leaf_tuple, trace
from contracts.errors import CostModelError
from contracts.table import CostTable
from cost_models.analytic import analytic_table
from cost_models.optimizer import BuildOptimizer
from cost_models.profile import Progress, SampleBatch
from cost_models.profile import profile as profile_graph

__all__ = ["analytic_costs", "profile"]

#: module types or qualified names that tracing keeps whole
LeafModules = Sequence[Union[type, str]]


def _as_inputs(example_inputs: Any) -> Any:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    raise CostModelError(
        f"example_inputs must be a tensor, a tuple of tensors or a dict of named tensors "
        f"(batch first), got {type(example_inputs).__name__}"
    )


def analytic_costs(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: LeafModules = (),
    host_flops: float | None = None,
    host_mem_bw: float | None = None,
    graph: LayerGraph | None = None,
    model_name: str = "",
    norm_efficiency: float | None = None,
    optimizer: BuildOptimizer | None = None,
) -> CostTable:
    """A cost table from FLOP and byte counts (source ``"analytic"``): ``model`` traced on
    ``example_inputs`` (a tensor, a tuple of tensors or a dict of keyword tensors, batch
    first; shapes only matter) keeping ``leaf_modules`` whole, unless ``graph`` is given.
    The other arguments are those of :func:`cost_models.analytic.analytic_table`.

    Raises:
        CostModelError: example inputs that are not tensors, or a bad host figure.
        TraceError: the model cannot be traced.
    """
    if graph is None:
        graph = trace(model, _as_inputs(example_inputs), leaf_modules=leaf_tuple(leaf_modules),
                      model_name=model_name or type(model).__name__)
    return analytic_table(check_graph(graph), model, host_flops=host_flops,
                          host_mem_bw=host_mem_bw, model_name=model_name,
                          norm_efficiency=norm_efficiency, optimizer=optimizer)


def profile(
    model: torch.nn.Module,
    sample_batch: SampleBatch,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    *,
    leaf_modules: LeafModules = (),
    repeats: int = 5,
    warmup: int = 2,
    progress: Progress | None = None,
    example_inputs: Any = None,
    graph: LayerGraph | None = None,
    model_name: str = "",
    method: str = "chain",
    optimizer: BuildOptimizer | None = None,
    device_type: str = "local",
    device: str | torch.device = "cpu",
) -> CostTable:
    """Measure every layer's forward and backward time on one core of this host (or on its
    GPU: ``device="cuda"``)
    (:func:`cost_models.profile.profile`, whose arguments these are); the model is traced
    on ``example_inputs`` (default: ``sample_batch(max(batch_sizes))``) keeping
    ``leaf_modules`` whole, unless ``graph`` is given. Layer ``i`` of the result is layer
    ``i`` of ``afx.trace(model, example_inputs)``.

    Raises:
        CostModelError: bad arguments, a ``sample_batch`` of the wrong form, or a model that
            fails to run.
        TraceError: the model cannot be traced.
    """
    name = model_name or type(model).__name__

    def tracer(module: torch.nn.Module, inputs: Any) -> LayerGraph:
        return trace(module, inputs, leaf_modules=leaf_tuple(leaf_modules), model_name=name)

    return profile_graph(model, sample_batch, batch_sizes, repeats=repeats, warmup=warmup,
                         progress=progress, example_inputs=example_inputs, graph=graph,
                         tracer=tracer, model_name=model_name, method=method,
                         optimizer=optimizer, device_type=device_type, device=device)
