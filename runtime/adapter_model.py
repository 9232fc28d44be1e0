"""The adapter model of PAC as plain torch: frozen segments, adapters on their taps, the head.

Built by ``asteroid_fx.parallel_adapters`` (see [Note: parallel adapters] there) on the
workstation, and rebuilt on a device from saved segment modules and ``pac.json``
(:func:`AdapterModel.from_parts`): this module imports only torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["Adapter", "AdapterModel", "named_trainable"]


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
        """``(h_1 .. h_{k-1}, *head_inputs)``: ``h_k`` is one of the head's inputs."""
        return (*taps[:-1], *head_inputs)

    def split_entry(self, entry: Sequence[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """Inverse of :meth:`cache_entry`: (the taps, the head's inputs)."""
        k = self.num_taps
        head_inputs = tuple(entry[k - 1:])
        return [*entry[:k - 1], head_inputs[self.head_position]], head_inputs

    def train_forward(self, entry: Sequence[torch.Tensor]) -> Any:
        """The model output from a cache entry: side path, then the head."""
        taps, head_inputs = self.split_entry(entry)
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
    #: the one-device-per-segment ``Plan`` the segments were partitioned with (workstation)
    segment_plan: Any = None

    def layout(self) -> dict[str, Any]:
        """What :meth:`from_parts` needs besides the modules (JSON-able, ``pac.json``)."""
        return {"taps": list(self.taps), "tap_positions": list(self.tap_positions),
                "head_position": self.head_position,
                "tap_shapes": [list(s) for s in self.tap_shapes],
                "rank": self.rank,
                "train_head": self.train_head, "entry_sizes": list(self.entry_sizes)}

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
        return model


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
