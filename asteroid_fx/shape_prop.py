"""Shape propagation: run a traced graph once and record every node's value metadata."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Tuple, Union

import torch
import torch.fx as fx

from contracts.errors import TraceError

__all__ = [
    "META_KEY",
    "SAVED_KEY",
    "TensorMeta",
    "NonTensorMeta",
    "MappingMeta",
    "ValueMeta",
    "ShapeProp",
    "describe",
    "iter_tensor_metas",
]

log = logging.getLogger(__name__)

#: ``node.meta`` key holding the :data:`ValueMeta` of the node's value.
META_KEY = "asteroid.tensor_meta"
#: ``node.meta`` key holding the bytes of the node's values that autograd saves for backward
#: (only when :class:`ShapeProp` runs with ``record_saved=True``; parameters excluded).
SAVED_KEY = "asteroid.saved_bytes"


@dataclass(frozen=True)
class TensorMeta:
    """Shape, dtype and size in bytes of one tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # numel * element size of the whole tensor (all samples)
    requires_grad: bool = False


@dataclass(frozen=True)
class NonTensorMeta:
    """A value that is not a tensor (an int size, a ``torch.Size``, ``None`` ...)."""

    type_name: str
    value: Any = None  # kept only for small plain values (int, float, bool, sizes, None)


@dataclass(frozen=True)
class MappingMeta:
    """A mapping value (a dict, a Hugging Face ``ModelOutput`` ...): its keys and their values.

    ``type_name`` is the mapping's class name; ``items`` keeps the mapping's order.
    """

    type_name: str
    items: tuple[tuple[str, ValueMeta], ...]

    def keys(self) -> tuple[str, ...]:
        """The mapping's keys, in order."""
        return tuple(key for key, _ in self.items)


# A node's value: a tensor, a non-tensor, or a (possibly nested) tuple or mapping of those.
ValueMeta = Union[TensorMeta, NonTensorMeta, MappingMeta, Tuple["ValueMeta", ...]]

_PLAIN = (int, float, bool, str, type(None))


def describe(value: Any) -> ValueMeta:
    """Return the :data:`ValueMeta` of a runtime value (tuples, lists and mappings with string
    keys handled recursively)."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(
            shape=tuple(int(s) for s in value.shape),
            dtype=value.dtype,
            nbytes=value.numel() * value.element_size(),
            requires_grad=value.requires_grad,
        )
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return tuple(describe(v) for v in value)
    if isinstance(value, torch.Size):
        return NonTensorMeta("Size", tuple(int(s) for s in value))
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return MappingMeta(type(value).__name__, tuple((k, describe(v)) for k, v in value.items()))
    if isinstance(value, _PLAIN):
        return NonTensorMeta(type(value).__name__, value)
    return NonTensorMeta(type(value).__name__)


def iter_tensor_metas(meta: ValueMeta) -> Iterator[TensorMeta]:
    """Yield every :class:`TensorMeta` inside ``meta`` (depth first)."""
    if isinstance(meta, TensorMeta):
        yield meta
    elif isinstance(meta, MappingMeta):
        for _, m in meta.items:
            yield from iter_tensor_metas(m)
    elif isinstance(meta, tuple):
        for m in meta:
            yield from iter_tensor_metas(m)


class ShapeProp(fx.Interpreter):
    """Run a ``GraphModule`` on real inputs and write ``node.meta[meta_key]`` for every node.

    ``meta_key`` defaults to :data:`META_KEY` (``"asteroid.tensor_meta"``).

    With ``record_saved=True`` the run is made with autograd enabled and every node also gets
    ``node.meta[SAVED_KEY]``: the bytes of the tensors saved for backward that the node
    produced (each storage counted once, whichever node saves it; parameters are not
    counted). A saved tensor that no node produced (a model input, an operator's internal
    buffer) counts at the node that saved it. Attributing a tensor to its producer is what
    a pipeline stage pays: the stage that makes a tensor keeps it until its backward, as an
    output if a later stage is the one that saves it (solver/evaluate.py
    [Note: the memory model]). Errors are re-raised as :class:`TraceError` naming the
    failing node.

    Example::

        gm = torch.fx.symbolic_trace(model)
        ShapeProp(gm).propagate(torch.randn(2, 3, 32, 32))
        gm.graph.nodes  # each node.meta["asteroid.tensor_meta"] is set
    """

    def __init__(
        self, module: fx.GraphModule, *, record_saved: bool = False, meta_key: str = META_KEY
    ) -> None:
        super().__init__(module)
        self.extra_traceback = False  # our TraceError already names the node
        self.record_saved = record_saved
        self.meta_key = meta_key
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._seen_ptrs: set[int] = set()
        self._producer: dict[int, fx.Node] = {}  # storage pointer -> node whose value it is
        self._running: fx.Node | None = None
        self._keep: list[Any] = []  # keep saved tensors and values alive: no data_ptr reuse

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._param_ptrs and ptr not in self._seen_ptrs and storage.nbytes() > 0:
            self._seen_ptrs.add(ptr)
            node = self._producer.get(ptr, self._running)
            if node is not None:
                node.meta[SAVED_KEY] = node.meta.get(SAVED_KEY, 0) + storage.nbytes()
            self._keep.append(t)
        return t

    def _note_producer(self, n: fx.Node, result: Any) -> None:
        values = list(result.values()) if isinstance(result, Mapping) else result
        tensors = [result] if isinstance(result, torch.Tensor) else (
            [v for v in values if isinstance(v, torch.Tensor)]
            if isinstance(values, (tuple, list)) else [])
        for t in tensors:
            self._producer.setdefault(t.untyped_storage().data_ptr(), n)
        if tensors:
            self._keep.append(tensors)

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def run_node(self, n: fx.Node) -> Any:
        try:
            if self.record_saved:
                n.meta[SAVED_KEY] = 0
                self._running = n
                with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                    result = super().run_node(n)
                self._running = None
                if n.op != "placeholder":
                    self._note_producer(n, result)
            else:
                result = super().run_node(n)
        except TraceError:
            raise
        except Exception as e:
            reason = str(e).split("\n\nWhile executing")[0].strip()
            raise TraceError(
                f"shape propagation failed at node {n.format_node()}: "
                f"{type(e).__name__}: {reason}. Check that the example inputs have the shapes and "
                "dtypes the model expects (batch dimension first)."
            ) from e
        n.meta[self.meta_key] = describe(result)
        return result

    def propagate(self, *args: Any) -> Any:
        """Run the graph on ``args`` and return its output (metadata written as a side effect)."""
        self._seen_ptrs.clear()
        self._producer.clear()
        self._keep.clear()
        try:
            if self.record_saved:
                with torch.enable_grad():
                    return self.run(*args)
            with torch.no_grad():
                return self.run(*args)
        finally:
            self._keep.clear()
            self._producer.clear()
