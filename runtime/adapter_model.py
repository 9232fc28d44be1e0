"""The adapter model of PAC as plain torch: frozen segments, adapters on their taps, the head.

Built by ``asteroid_fx.parallel_adapters`` (see [Note: parallel adapters] there) on the
workstation, and rebuilt on a device from saved segment modules and ``pac.json``
(:func:`AdapterModel.from_parts`): this module imports only torch and ``contracts``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from contracts.errors import AdapterError

__all__ = ["CACHE_DTYPES", "Adapter", "AdapterModel", "cache_dtype_of", "dtype_name",
           "named_trainable"]


class Adapter(nn.Module):
    """One tapped layer's adapter: ``gate * up(relu(down(h)))`` on the last dimension."""

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.up = nn.Linear(rank, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.gate = nn.Parameter(torch.ones(1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.gate * self.up(torch.relu(self.down(hidden)))
        return out


class AdapterModel(nn.Module):
    """A frozen backbone in segments, adapters on their taps, and the head
    (see [Note: parallel adapters])."""

    def __init__(self, segments: Sequence[nn.Module], head: nn.Module,
                 adapters: Sequence[Adapter], tap_positions: Sequence[int], head_position: int,
                 taps: Sequence[int], tap_shapes: Sequence[tuple[int, ...]],
                 train_head: bool = False) -> None:
        super().__init__()
        self.segments = nn.ModuleList(segments)
        self.head = head
        self.adapters = nn.ModuleList(adapters)
        self.tap_positions = tuple(tap_positions)
        self.head_position = head_position
        self.taps = tuple(taps)
        self.tap_shapes = tuple(tap_shapes)    # per sample
        self.train_head = train_head
        for p in self.segments.parameters():
            p.requires_grad_(False)
        for p in self.head.parameters():
            p.requires_grad_(train_head)

    @property
    def rank(self) -> int:
        first: Any = self.adapters[0]
        return int(first.down.out_features)

    @property
    def num_taps(self) -> int:
        return len(self.taps)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters' parameters (and the head's when ``train_head``), in a fixed order."""
        params = list(self.adapters.parameters())
        if self.train_head:
            params += list(self.head.parameters())
        return params

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by qualified name (what fine-tuning produces)."""
        wanted = {id(p) for p in self.trainable_parameters()}
        return {k: v.detach().clone() for k, v in self.named_parameters() if id(v) in wanted}

    def drop_backbone(self) -> None:
        """Replace the frozen segments by placeholders (after phase 1: the cache serves
        every later step), so that their weights are freed."""
        self.segments = nn.ModuleList(nn.Identity() for _ in self.segments)

    def set_head(self, head: nn.Module) -> None:
        """Put ``head`` in place (frozen unless ``train_head``): a device that built the
        model without it (phase 1 never runs the head) loads it for phase 2."""
        for p in head.parameters():
            p.requires_grad_(self.train_head)
        self.head = head

    def run_segment(self, index: int, values: tuple[torch.Tensor, ...]
                    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Segment ``index`` on the tensors of the cut before it: (the cut after it, its tap);
        without gradients, on torch's folded matrix products (see [Note: frozen weights
        and matmul])."""
        segment = self.segments[index]
        with torch.no_grad(), _folded(segment):
            out = segment(*values)
        out = out if isinstance(out, tuple) else (out,)
        return out, out[self.tap_positions[index]]

    def backbone(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen backbone on the model inputs, without gradients: the cache entry."""
        values: tuple[torch.Tensor, ...] = tuple(inputs)
        taps = []
        for index in range(len(self.segments)):
            values, tap = self.run_segment(index, values)
            taps.append(tap)
        return self.cache_entry(taps, values)

    def cache_entry(self, taps: Sequence[torch.Tensor],
                    head_inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``(h_1 .. h_{k-1}, *head_inputs)``: ``h_k`` is one of the head's inputs; in the
        cache's dtype (:meth:`to_cache`)."""
        return self.to_cache((*taps[:-1], *head_inputs))

    def to_cache(self, values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``values`` as the cache keeps them: floating-point tensors in ``cache_dtype``
        (see [Note: cache dtype]), the others as they are."""
        return _floats_to(values, self.cache_dtype)

    def from_cache(self, entry: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """A cache entry in the dtype the adapters and the head compute in."""
        return _floats_to(entry, None if self.cache_dtype is None else self.compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the adapters' weights (the model's)."""
        first: Any = self.adapters[0]
        dtype: torch.dtype = first.down.weight.dtype
        return dtype

    def split_entry(self, entry: Sequence[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """Inverse of :meth:`cache_entry`: (the taps, the head's inputs)."""
        k = self.num_taps
        head_inputs = tuple(entry[k - 1:])
        return [*entry[:k - 1], head_inputs[self.head_position]], head_inputs

    def train_forward(self, entry: Sequence[torch.Tensor]) -> Any:
        """The model output from a cache entry: side path, then the head."""
        taps, head_inputs = self.split_entry(self.from_cache(entry))
        side = self.adapters[0](taps[0])
        for adapter, tap in zip(list(self.adapters)[1:], taps[1:]):
            side = side + adapter(tap)
        values = list(head_inputs)
        values[self.head_position] = values[self.head_position] + side
        return self.head(*values)

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.train_forward(self.backbone(*inputs))

    def entry_bytes(self) -> int:
        """Bytes of one sample's cache entry (from the traced shapes and dtypes)."""
        return int(sum(self.entry_sizes))

    entry_sizes: tuple[int, ...] = ()
    #: the dtype the cache keeps floating-point entries in (None: as the backbone makes them)
    cache_dtype: torch.dtype | None = None
    #: bytes of one sample's entry as the backbone makes it, before :meth:`to_cache`
    #: (workstation; 0: unknown)
    made_entry_bytes: int = 0
    #: the one-device-per-segment ``Plan`` the segments were partitioned with (workstation)
    segment_plan: Any = None

    def layout(self) -> dict[str, Any]:
        """What :meth:`from_parts` needs besides the modules (JSON-able, ``pac.json``)."""
        return {"taps": list(self.taps), "tap_positions": list(self.tap_positions),
                "head_position": self.head_position,
                "tap_shapes": [list(s) for s in self.tap_shapes],
                "rank": self.rank,
                "train_head": self.train_head, "entry_sizes": list(self.entry_sizes),
                "cache_dtype": dtype_name(self.cache_dtype)}

    @classmethod
    def from_parts(cls, segments: Sequence[nn.Module], head: nn.Module,
                   layout: dict[str, Any]) -> AdapterModel:
        """Rebuild from saved segments, head and :meth:`layout` (adapters freshly made:
        load their weights after)."""
        shapes = [tuple(int(d) for d in s) for s in layout["tap_shapes"]]
        adapters = [Adapter(shapes[-1][-1], int(layout["rank"])) for _ in shapes]
        model = cls(segments, head, adapters, layout["tap_positions"],
                    int(layout["head_position"]), layout["taps"], shapes,
                    train_head=bool(layout["train_head"]))
        model.entry_sizes = tuple(int(v) for v in layout["entry_sizes"])
        model.cache_dtype = cache_dtype_of(layout.get("cache_dtype"))
        return model


CACHE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32,
                                        "bfloat16": torch.bfloat16,
                                        "float16": torch.float16}
"""The cache dtypes one may choose (``--cache-dtype``), by name."""


def cache_dtype_of(name: str | None) -> torch.dtype | None:
    """The cache dtype named ``name`` (None: as the backbone makes its tensors).

    Raises:
        AdapterError: an unknown name.
    """
    if name is None:
        return None
    if name not in CACHE_DTYPES:
        raise AdapterError(f"unknown cache dtype {name!r}; choose one of "
                           f"{', '.join(CACHE_DTYPES)}")
    return CACHE_DTYPES[name]


def _floats_to(values: Sequence[torch.Tensor], dtype: torch.dtype | None
               ) -> tuple[torch.Tensor, ...]:
    """``values`` with the floating-point tensors in ``dtype`` (None: all as they are)."""
    if dtype is None:
        return tuple(values)
    return tuple(v.to(dtype) if v.is_floating_point() else v for v in values)


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """The name :func:`cache_dtype_of` reads back (None stays None)."""
    return None if dtype is None else str(dtype).split(".")[-1]


# [Note: cache dtype]
# The activation cache may keep its floating-point entries in a narrower dtype than the
# backbone computes in (``--cache-dtype bfloat16``): the entry is rounded once, where it is
# made (``cache_entry``, and phase 1's entry parts through ``to_cache``), and widened back
# to the adapters' dtype where a step reads it (``train_forward``). The cache, the phase-1
# hand-offs and the phase-2 row fetches then take half the bytes; a step holds the widened
# copy of its own rows besides (autograd saves it for the down-projections, so the
# planner's measured ``step_saved_bytes`` counts it). The single-process reference builds
# its entries through the same ``cache_entry``, so it rounds alike and the distributed run
# still equals it. bfloat16 keeps float32's range (8 bits of mantissa); float16 keeps 11
# bits of mantissa but overflows above 65504.


# [Note: frozen weights and matmul]
# ``torch.matmul`` of a 3-D input and a 2-D weight (``F.linear`` on an input it cannot view
# as a matrix) folds the input into one matrix product only when the weight requires grad
# (aten ``should_fold``, torch 2.x): with a frozen weight and an input whose leading
# dimensions are not contiguous it runs a batched product over the first dimension with
# the weight broadcast instead. ``nn.MultiheadAttention(batch_first=True)`` transposes
# its input to (sequence, batch, hidden) before the packed input projection, so a frozen
# attention block at micro-batch b ran 64 products of b rows each (GPT-small, sequence 64):
# segments 0-1 of examples/gpt_small.py took 11.1 ms instead of 8.2 ms at micro-batch 2
# (1.36x; 1.36x at 4, 1.22x at 8, 1.05x at 16, equal at 1: one product either way), and
# the cost table, measured with trainable weights, predicted 8.3 ms (docs/benchmarks.md,
# "PAC fine-tuning"). So a segment runs with its frozen parameters marked as requiring
# grad, under ``torch.no_grad`` (nothing is recorded, no gradient is made, the outputs
# do not require grad), and marked frozen again afterwards: the same products in one
# matrix multiplication, as in training and in the profiler.


@contextmanager
def _folded(module: nn.Module) -> Iterator[None]:
    """Mark ``module``'s frozen parameters as requiring grad for the ``with`` body (call it
    under ``torch.no_grad``; see [Note: frozen weights and matmul]); restored on exit."""
    frozen = [p for p in module.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def named_trainable(model: AdapterModel) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the trainable parameters, in :meth:`trainable_parameters`
    order."""
    wanted = {id(p): i for i, p in enumerate(model.trainable_parameters())}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in wanted]
    yield from sorted(named, key=lambda item: wanted[id(item[1])])
