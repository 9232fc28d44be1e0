"""Peak memory of one device while it trains: its tensors, and what the process reserved.

[Note: measured memory]
Two numbers per device, in bytes, both above what the process held before it loaded its
stage (the interpreter, torch, gloo and the user's model file are not counted; the
stage's own weights are):

* ``peak_memory_bytes``: the most memory the stage's tensors took at once, which is what
  ``solver.evaluate`` predicts (``Prediction.peak_memory_bytes``). On CUDA it is
  ``torch.cuda.max_memory_allocated``, every tensor the caching allocator handed out. On
  CPU, where torch keeps no allocator statistics, it is a tensor-level count: parameters,
  gradients (one per trainable parameter, as backward allocates them), the optimizer's
  state tensors and buffers, plus the largest amount of *in-flight* tensor memory at any
  action boundary of a round: the tensors autograd saved for backward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters and buffers
  excluded), received inputs, outputs and gradients waiting to be used or sent, the
  mini-batch held by the first and last stages, and the flat gradient copy of the group
  all-reduce; plus every pooled wire buffer the runtime has allocated (sends pending,
  receives posted or lent out, idle pools: runtime/comm.py keeps them for the rest of the
  run, so a later round holds all of them at every boundary; they are counted once, at
  the most the round allocated, and not again as the tensors that alias them); plus the
  largest gradient that a later micro-batch's backward makes before autograd adds it to
  ``.grad`` (seen by a hook on every parameter). Other transients inside one operator
  (a convolution's scratch) are not seen: torch's profiler found the allocator's peak at
  0.91-1.08x this count on the examples (docs/latency-model.md, "Memory").
  The in-flight part is counted on the first round a process trains (the hooks cost a
  few microseconds per saved tensor and per parameter, and that round is the warm-up
  round the timing statistics leave out anyway); every round runs the same schedule.
* ``peak_reserved_bytes``: the most memory the process held for it. On CUDA,
  ``torch.cuda.max_memory_reserved`` (the caching allocator's blocks). On CPU, the
  resident anonymous memory at its high-water mark (Linux: ``VmHWM`` of
  ``/proc/self/status`` less the file-backed and shared pages resident when it is read),
  less the baseline taken when the stage was ready to train, plus the stage's tensors
  already resident then. Before the baseline, the heap's free pages go back to the OS
  (``malloc_trim``) and the high-water mark is reset (``/proc/self/clear_refs``), so the
  seeded full model that every device builds once at start-up (to copy its stage's
  initial weights) is not counted. This number includes what the tensors leave behind in
  the C heap: freed blocks the workers keep on purpose (contracts/allocator.py) and
  fragmentation, oneDNN's scratch buffers, gloo's and Python's own allocations. It costs
  one read of ``/proc/self/status`` per step. Without ``/proc`` it is None; where the
  high-water mark cannot be reset, the resident memory is sampled at every action
  boundary of the first round and at the end of every round instead.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from contracts.allocator import trim_heap

__all__ = ["MemoryMeter", "storage_bytes", "saved_storages", "read_status", "freeze_startup"]

log = logging.getLogger(__name__)

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


# [Note: garbage collection ahead]
# The meter's baseline (``MemoryMeter.start``) follows a full ``gc.collect()``, so that
# garbage in reference cycles (e.g. a failed generation's stage module, optimizer and
# executor) is gone before it is measured. In a process that imported torch that collection
# walked some 170 000 tracked objects: 0.2 s on this project's 2-core host, and 0.3 s of a
# 0.53 s recovery (detection -> first round) for a survivor under its CPU quota beside a
# one-core hog (tools/ab_recovery.py). A device process therefore collects once when it
# starts, after its imports, and freezes what survives (``freeze_startup``: modules,
# functions and classes, which live as long as the process): every later collection walks
# only the objects made since (0.3 ms instead of 200 ms with a traced stage loaded). The
# baseline is the same: nothing frozen is garbage, and all later garbage is collected.


def freeze_startup() -> None:
    """Collect all garbage and freeze every object alive now (call once, after the
    imports; see [Note: garbage collection ahead]): later collections skip them."""
    gc.collect()
    gc.freeze()


def read_status(path: str = _STATUS) -> dict[str, int] | None:
    """The resident-memory fields of ``/proc/self/status`` in bytes, or None without them."""
    out: dict[str, int] = {}
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in _FIELDS:
                    out[key] = int(value.split()[0]) * 1024   # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    if "VmHWM" not in out or "RssAnon" not in out:
        return None
    return out


def _reset_high_water(path: str = _CLEAR_REFS) -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0)."""
    try:
        with open(path, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int] | None = None) -> int:
    """Bytes of the storages behind ``tensors``, each storage once (``seen``: data
    pointers counted already, updated in place)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
    return total


@contextmanager
def saved_storages(skip: Collection[int]) -> Iterator[dict[int, int]]:
    """Count what autograd saves for backward inside the ``with`` body: the dict it yields
    fills with data pointer -> bytes of every storage saved, each once, leaving out those
    whose data pointer is in ``skip`` (weights, say)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpacked):
        yield saved


def _unpacked(t: torch.Tensor) -> torch.Tensor:
    return t


def _state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                yield value


@dataclass
class _Round:
    """Tensors saved for backward by the micro-batches of the round being counted."""

    saved: dict[int, dict[int, int]] = field(default_factory=dict)  # mb -> {ptr: bytes}
    peak: int = 0                  # in-flight bytes besides the wire buffers
    wire: int = 0                  # the wire buffers allocated so far
    accumulating: int = 0          # the largest gradient that arrived while .grad existed
    handles: list[Any] = field(default_factory=list)


class MemoryMeter:
    """One device's memory while it trains (see [Note: measured memory]).

    Call :meth:`start` once the stage, its optimizer and its process groups are ready;
    :meth:`begin_round` / :meth:`end_round` around a round whose tensors are counted (the
    executor then calls :meth:`forward`, :meth:`backward_done` and :meth:`observe`); and
    :meth:`peaks` after every round.

    Args:
        module: the stage module (its parameters and buffers are never activations).
        optimizer: whose state tensors are counted.
        device: where the stage computes.
        status_path, clear_refs_path: the files read and written (tests point them
            elsewhere).
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, *, status_path: str = _STATUS,
                 clear_refs_path: str = _CLEAR_REFS) -> None:
        self.module = module
        self.optimizer = optimizer
        self.device = device
        self.status_path = status_path
        self.clear_refs_path = clear_refs_path
        #: how ``peak_reserved_bytes`` is measured: "cuda", "rss", "rss-sampled" or "none"
        self.reserved_method = "none"
        self.in_flight_peak = 0
        self.accumulating_peak = 0
        self._weights = {t.untyped_storage().data_ptr()
                         for t in [*module.parameters(), *module.buffers()]}
        self._round: _Round | None = None
        self._current: int | None = None
        self._baseline = 0
        self._reserved: int | None = None
        self._weight_parts: dict[str, int] | None = None
        self._state_bytes: tuple[int, int] | None = None

    # -- what the process reserved ---------------------------------------------------------
    def start(self) -> None:
        """Take the baseline: the stage's tensors held now are counted, everything else the
        process holds is not."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reserved_method = "cuda"
            return
        gc.collect()       # cheap in a device process: see [Note: garbage collection ahead]
        trim_heap()
        status = read_status(self.status_path)
        if status is None:
            self.reserved_method = "none"
            return
        resident = self.resident_bytes()
        self.reserved_method = ("rss" if _reset_high_water(self.clear_refs_path)
                                else "rss-sampled")
        self._baseline = status["RssAnon"] - resident
        self._reserved = resident

    def resident_bytes(self) -> int:
        """Bytes of the stage's tensors that live between rounds right now: parameters,
        buffers, gradients and optimizer state (a recovery may have restored the last
        two)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return storage_bytes([*self.module.parameters(), *self.module.buffers(), *grads,
                              *_state_tensors(self.optimizer)])

    def _fold(self, anon: int) -> None:
        value = anon - self._baseline
        if self._reserved is None or value > self._reserved:
            self._reserved = value

    def sample(self) -> None:
        """Read the resident memory now (only where the high-water mark cannot be reset)."""
        if self.reserved_method == "rss-sampled":
            status = read_status(self.status_path)
            if status is not None:
                self._fold(status["RssAnon"])

    def reserved_bytes(self) -> int | None:
        """``peak_reserved_bytes`` since :meth:`start` (None where not measurable)."""
        if self.reserved_method == "cuda":
            return int(torch.cuda.max_memory_reserved(self.device))
        if self.reserved_method == "none":
            return None
        status = read_status(self.status_path)
        if status is not None:
            if self.reserved_method == "rss":
                # the high-water mark counts file-backed pages too (code of torch's kernels
                # paged in by the first round): leave out those resident now
                other = status.get("RssFile", 0) + status.get("RssShmem", 0)
                self._fold(max(status["VmHWM"] - other, status["RssAnon"]))
            else:
                self._fold(status["RssAnon"])
        return self._reserved

    # -- the stage's tensors -------------------------------------------------------------------
    def begin_round(self) -> None:
        """Count the in-flight tensors of the round that starts now."""
        self._round = _Round()
        for param in self.module.parameters():
            if param.requires_grad:
                self._round.handles.append(param.register_hook(self._grad_hook(param)))

    def end_round(self) -> None:
        if self._round is not None:
            self.in_flight_peak = max(self.in_flight_peak,
                                      self._round.peak + self._round.wire)
            self.accumulating_peak = max(self.accumulating_peak, self._round.accumulating)
            for handle in self._round.handles:
                handle.remove()
        self._round = None

    def _grad_hook(self, param: torch.Tensor) -> Any:
        def hook(grad: torch.Tensor) -> None:
            # called with a micro-batch's gradient before autograd adds it to .grad: while
            # both exist the parameter's gradient takes twice its size
            if self._round is not None and param.grad is not None:
                size = grad.numel() * grad.element_size()
                self._round.accumulating = max(self._round.accumulating, size)
        return hook

    @property
    def counting(self) -> bool:
        return self._round is not None

    def _pack(self, t: torch.Tensor) -> Any:
        if self._round is not None and self._current is not None:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._weights:
                self._round.saved.setdefault(self._current, {})[ptr] = storage.nbytes()
        return t.detach()   # the packed value must not hold the tensor (reference cycle)

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @contextmanager
    def forward(self, microbatch: int) -> Iterator[None]:
        """Run micro-batch ``microbatch``'s forward inside this: what autograd saves for
        its backward is counted (only while :attr:`counting`)."""
        if self._round is None:
            yield
            return
        self._current = microbatch
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._current = None

    def backward_done(self, microbatch: int) -> None:
        """Autograd has freed what micro-batch ``microbatch`` saved."""
        if self._round is not None:
            self._round.saved.pop(microbatch, None)

    def observe(self, held: Iterable[torch.Tensor],
                wire: Iterable[torch.Tensor] = ()) -> None:
        """An action boundary, where the runtime holds ``held`` and has allocated the
        pooled ``wire`` buffers: fold the in-flight bytes."""
        if self._round is None:
            return
        self.sample()
        seen = set(self._weights)
        self._round.wire = max(self._round.wire, storage_bytes(wire, seen))
        total = 0
        for saved in self._round.saved.values():
            for ptr, nbytes in saved.items():
                if ptr not in seen:
                    seen.add(ptr)
                    total += nbytes
        total += storage_bytes(held, seen)
        self._round.peak = max(self._round.peak, total)

    def parts(self) -> dict[str, int]:
        """The tensor-level count by kind: ``params``, ``grads`` (one per trainable
        parameter), ``optimizer_state``, ``buffers``, ``in_flight`` (the largest of the
        rounds counted), ``accumulating`` (the largest gradient of a later micro-batch,
        which exists next to ``.grad`` until autograd adds it), and their ``total``."""
        if self._weight_parts is None:   # the stage's tensors keep their sizes
            params = list(self.module.parameters())
            seen: set[int] = set()
            self._weight_parts = {
                "params": storage_bytes(params, seen),
                "grads": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
                "buffers": storage_bytes(self.module.buffers(), seen),
            }
        entries = len(self.optimizer.state)   # state appears at the first step, then stays
        if self._state_bytes is None or self._state_bytes[0] != entries:
            self._state_bytes = (entries, storage_bytes(_state_tensors(self.optimizer)))
        parts = {
            "params": self._weight_parts["params"],
            "grads": self._weight_parts["grads"],
            "optimizer_state": self._state_bytes[1],
            "buffers": self._weight_parts["buffers"],
            "in_flight": self.in_flight_peak,
            "accumulating": self.accumulating_peak,
        }
        parts["total"] = sum(parts.values())
        return parts

    def peak_bytes(self) -> int:
        """``peak_memory_bytes`` so far: the CUDA allocator's peak, or the tensor count."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self.parts()["total"]

    def peaks(self) -> tuple[int, int | None]:
        """``(peak_memory_bytes, peak_reserved_bytes)`` so far."""
        return self.peak_bytes(), self.reserved_bytes()
