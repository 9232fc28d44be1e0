"""What the cost models read of a traced model: the shape of a ``LayerGraph``.

The front end traces (``asteroid_fx.trace.trace`` makes an ``asteroid_fx.trace.LayerGraph``)
and hands the graph down; the cost models never trace. These protocols name the attributes
they use, so that ``cost_models`` needs nothing from the front end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import fx

from contracts.table import TiedWeight

__all__ = ["GraphLayer", "LayerGraph"]


class GraphLayer(Protocol):
    """One layer of a traced graph (``asteroid_fx.trace.Layer``); bytes are per sample
    except ``param_bytes`` and ``buffer_bytes``."""

    @property
    def index(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def op(self) -> str: ...
    @property
    def node_names(self) -> tuple[str, ...]: ...
    @property
    def param_bytes(self) -> int: ...
    @property
    def buffer_bytes(self) -> int: ...
    @property
    def output_bytes(self) -> int: ...
    @property
    def activation_bytes(self) -> int: ...


class LayerGraph(Protocol):
    """A traced model (``asteroid_fx.trace.LayerGraph``): the fx ``GraphModule`` whose nodes
    carry shape metadata, its layers in topological order and the bytes across each cut."""

    @property
    def graph_module(self) -> fx.GraphModule: ...
    @property
    def layers(self) -> Sequence[GraphLayer]: ...
    @property
    def cut_bytes(self) -> Sequence[int]: ...
    @property
    def input_bytes(self) -> int: ...
    @property
    def model_hash(self) -> str: ...
    @property
    def model_name(self) -> str: ...
    @property
    def example_batch(self) -> int: ...
    @property
    def tied(self) -> tuple[TiedWeight, ...]: ...

    def node_to_layer(self) -> dict[str, int]: ...
