"""Work beside the search: a function run in a forked process on a spare core."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["BESIDE", "Beside", "spare_core"]

log = logging.getLogger(__name__)

BESIDE = True
"""Whether ``solver.anytime`` may run the class bound beside the search where a time limit
is given and the host has a spare core (``spare_core``); False: one process, the bound
after the search, as before (the tests of that path set it)."""

RESULT_GRACE_S = 1.0
"""Seconds past the deadline the parent waits for the process's result: the bound checks
its deadline every few rows of a DP pass, and the result is pickled and sent."""

# [Note: the bound beside the search]
# With a time limit the class bound used to get the end of the limit, after the search
# (``CLASS_BOUND_LIMIT_SHARE``: half of it on the Jetson mixes). Both are CPU-bound and
# independent but for one number, the best round so far, which the bound takes as its
# target. Where the host has a second core (and ``fork``: Linux), the bound runs in a
# forked process for the whole limit instead, reading the incumbent from shared memory
# (``Beside.offer``), and the search gets the whole limit too. The forked process shares
# the parent's memory copy-on-write (no tables are sent, no module is imported again) and
# touches no torch: ``solver`` never imports it. Its result (a dict of floats) comes back
# by pipe; the parent waits for it until the deadline plus ``RESULT_GRACE_S`` at most,
# then kills the process whatever it is doing. A process that fails or is late costs the
# class bound only: the plan and the other bounds are the parent's.


def spare_core() -> bool:
    """Whether a process beside the search can have a core of its own (``fork`` exists and
    this process may run on two CPUs or more), and ``BESIDE`` is on."""
    if not BESIDE or sys.platform != "linux":
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus >= 2


class Beside:
    """``work(incumbent)`` in a forked process, started at once; ``incumbent()`` there reads
    the smallest value ``offer``-ed here so far. ``result`` waits for its return value
    until a deadline; ``close`` ends the process (both are safe to call more than once)."""

    def __init__(self, work: Callable[[Callable[[], float]], Any], incumbent: float) -> None:
        context = multiprocessing.get_context("fork")
        self._value = context.RawValue("d", incumbent)
        reader, writer = context.Pipe(duplex=False)
        self._reader = reader
        self._proc: Any = context.Process(target=_run, args=(work, self._value, writer),
                                          name="asteroid-fx-bound", daemon=True)
        self._proc.start()
        writer.close()
        self._done: tuple[bool, Any] | None = None

    def offer(self, value: float) -> None:
        """A better incumbent (a larger one is ignored)."""
        if value < self._value.value:
            self._value.value = value

    def result(self, deadline: float) -> tuple[bool, Any]:
        """(True, what ``work`` returned), or (False, why not) where it raised, died or was
        not done by ``deadline`` (``time.perf_counter``) plus ``RESULT_GRACE_S``."""
        if self._done is None:
            left = max(0.0, deadline + RESULT_GRACE_S - time.perf_counter())
            try:
                if self._reader.poll(left):
                    self._done = self._reader.recv()
                else:
                    self._done = (False, f"not done {RESULT_GRACE_S:g} s after the deadline")
            except (EOFError, OSError) as exc:
                self._done = (False, f"the process ended without a result "
                                     f"(exit code {self._proc.exitcode}): {exc or 'EOF'}")
            self.close()
        return self._done

    @property
    def running(self) -> bool:
        """Whether the process is still alive."""
        return bool(self._proc.is_alive())

    def close(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(timeout=10.0)
        self._reader.close()


def _run(work: Callable[[Callable[[], float]], Any], value: Any, writer: Any) -> None:
    """The forked process: ``work``'s return value or its error, by ``writer``."""
    try:
        out: tuple[bool, Any] = (True, work(lambda: float(value.value)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        out = (False, f"{type(exc).__name__}: {exc}")
    try:
        writer.send(out)
        writer.close()
    finally:
        os._exit(0)     # (none of the parent's exit handlers: they are the parent's)

