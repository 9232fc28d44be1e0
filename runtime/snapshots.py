"""A rank's own snapshots of its committed stage state (see [Note: replication off the
critical path] in runtime.replication): reused flat buffers, which steps they hold, and the
previous generation's, which a survivor restores from without any transfer."""

from __future__ import annotations

import threading
import time

import torch

from contracts.errors import RuntimeFailure
from runtime.checkpoint import StageState, StateBuffer

__all__ = ["Slot", "Snapshots"]


class Slot:
    """One snapshot buffer and whether its background job is finished."""

    def __init__(self) -> None:
        self.buffer = StateBuffer()
        self.idle = threading.Event()
        self.idle.set()


class Snapshots:
    """This rank's own snapshots in one generation. The buffers (``slots``) carry over from
    the ``previous`` generation's, whose snapshots of committed steps stay readable (a
    survivor restores from them, and its watcher may still serve them)."""

    def __init__(self, previous: Snapshots | None = None, *, rank: int = 0,
                 device: str = "", times_s: list[float] | None = None) -> None:
        self.rank = rank
        self.device = device
        self.slots: list[Slot] = [] if previous is None else previous.slots
        self.previous_current: dict[int, Slot] = ({} if previous is None
                                                  else dict(previous.current))
        self.previous_committed = [] if previous is None else list(previous.committed)
        self.current: dict[int, Slot] = {}     # step -> slot (this generation)
        self.committed: list[int] = []         # newest committed steps (the last four)
        self.replicated: list[int] = []        # committed steps whose state was replicated
        #: seconds of each snapshot (the training thread's copy)
        self.times_s: list[float] = [] if times_s is None else times_s
        self.lock = threading.Lock()

    def commit(self, step: int, replicated: bool) -> None:
        """Round ``step`` is committed (``replicated``: its state goes to the holders)."""
        with self.lock:
            self.committed.append(step)
            del self.committed[:-4]
            if replicated:
                self.replicated.append(step)
                del self.replicated[:-4]

    def last_committed(self) -> int | None:
        with self.lock:
            return self.committed[-1] if self.committed else None

    def _keep(self) -> set[int]:
        return set(self.committed[-2:]) | set(self.replicated[-2:])

    def _acquire(self, previous_serving: bool) -> Slot:
        keep = self._keep()
        busy = {id(s) for st, s in self.current.items() if st in keep}
        if previous_serving:
            # the previous generation's watcher may still read these snapshots
            busy |= {id(s) for s in self.previous_current.values()}
        for slot in self.slots:
            if id(slot) not in busy and slot.idle.is_set():
                with self.lock:
                    for st in [st for st, s in self.current.items() if s is slot]:
                        del self.current[st]
                return slot
        slot = Slot()
        self.slots.append(slot)
        return slot

    def take(self, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
             *, previous_serving: bool = False) -> Slot:
        """Copy the live state after ``step`` into a free buffer (the training thread)."""
        began = time.perf_counter()
        slot = self._acquire(previous_serving)
        slot.buffer.capture(module, optimizer, step)
        with self.lock:
            self.current[step] = slot
        self.times_s.append(time.perf_counter() - began)
        return slot

    def has(self, step: int) -> bool:
        with self.lock:
            return step in self.current

    def own_steps(self) -> list[int]:
        """Committed steps of which this rank still holds its own snapshot."""
        with self.lock:
            last = self.committed[-1] if self.committed else -2
            return sorted(st for st in self.current if st <= last)

    def newest_names(self) -> tuple[str, ...]:
        """The state names of the newest snapshot (none before the first)."""
        with self.lock:
            current = dict(self.current)
        return tuple(current[max(current)].buffer.names) if current else ()

    def own_state(self, step: int, names: list[str] | None = None) -> StageState:
        """This rank's own snapshot of committed ``step`` (views; copy before the next step)."""
        return self.current[step].buffer.state(names)

    def previous_own(self, step: int, names: list[str]) -> StageState:
        """Part of the previous generation's own snapshot of committed ``step``."""
        slot = self.previous_current.get(step)
        if slot is not None and step <= max(self.previous_committed, default=-2):
            return slot.buffer.state(names)
        raise RuntimeFailure(f"rank {self.rank} ({self.device}) has no own snapshot of step "
                             f"{step} to restore {names[:3]}...")
