"""Work beside the search: a function run in a forked process on a spare core."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import time
import warnings
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
# forked process for the whole limit instead, and the search gets the whole limit too.
# The process reads the incumbent from shared memory (``Beside.offer``), offered as soon
# as any phase finds a better plan, not only when the phase ends: the phases are twice as
# long now, and on ResNet-50 x 32 Jetsons in 30 s the first good plan (0.8389 s) reached
# the bound only at 18 s that way, which left it at 3.8 % instead of 1.8 %. The process
# shares the parent's memory copy-on-write (no tables are sent, no module is imported
# again) and touches no torch: ``solver`` never imports it. Its result (a dict of floats)
# comes back by pipe (and what it has proven so far by shared memory too, ``published``,
# for the progress bar); the parent waits for it until the deadline plus ``RESULT_GRACE_S``
# at most, then kills the process whatever it is doing. A process that fails or is late
# costs the class bound only: the plan and the other bounds are the parent's.
# Measured (``tools/time_planner.py --once``, alternating with the commit before, same
# minutes): ResNet-50 x 32 Jetsons in 5 s, 32.7 % -> 12.3 %; x 64 in 30 s, 21.1 % -> 12.9 %
# (the plan 0.6584 s -> 0.6193 s: the search's phases had twice the time); x 32 in 30 s,
# 1.89 % -> 1.79 %; x 16 in 5 s, 10.8 % -> 8.0 %; the 32-device ResNet-50 fleet in 5 s,
# 300 % -> 211 %, the 16-device BERT-small fleet, 189 % -> 127 %. Tried and left: keeping
# the search's phases at their old shares and giving only its last phase the rest (64
# Jetsons in 30 s kept the 0.6584 s plan); a first bisection round at 1.5 times the
# smallest bound instead of twice it where the incumbent is still far (32 Jetsons in 5 s
# 5.3 %, but the ResNet-50 fleet 307 % and 64 Jetsons 13.9 %: cliffs either way).


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


Work = Callable[[Callable[[], float], Callable[[float], None]], Any]
"""``work(incumbent, publish)``: ``incumbent()`` reads the best value offered so far,
``publish(value)`` shows the parent a value so far (``Beside.published``)."""


class Beside:
    """``work(incumbent, publish)`` in a forked process, started at once; ``incumbent()``
    there reads the smallest value ``offer``-ed here so far, and ``publish(value)`` sets
    ``published`` here (what the work has so far: the bound, for the progress bar).
    ``result`` waits for its return value until a deadline; ``close`` ends the process
    (both are safe to call more than once)."""

    def __init__(self, work: Work, incumbent: float) -> None:
        context = multiprocessing.get_context("fork")
        self._value = context.RawValue("d", incumbent)
        self._published = context.RawValue("d", math.nan)
        reader, writer = context.Pipe(duplex=False)
        self._reader = reader
        self._proc: Any = context.Process(target=_run,
                                          args=(work, self._value, self._published, writer),
                                          name="asteroid-fx-bound", daemon=True)
        with warnings.catch_warnings():
            # (Python 3.12+ warns that forking a process with threads may deadlock the
            # child where it takes a lock another thread held: this child takes none)
            warnings.simplefilter("ignore", DeprecationWarning)
            self._proc.start()
        writer.close()
        self._done: tuple[bool, Any] | None = None

    def offer(self, value: float) -> None:
        """A better incumbent (a larger one is ignored)."""
        if value < self._value.value:
            self._value.value = value

    @property
    def published(self) -> float:
        """The last value the work published (nan before any)."""
        return float(self._published.value)

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
                # (the pipe closes as the process exits, a moment before its exit code is
                # known: wait for it, briefly)
                self._proc.join(timeout=5.0)
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


def _run(work: Work, value: Any, published: Any, writer: Any) -> None:
    """The forked process: ``work``'s return value or its error, by ``writer``."""

    def publish(found: float) -> None:
        published.value = found

    try:
        out: tuple[bool, Any] = (True, work(lambda: float(value.value), publish))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        out = (False, f"{type(exc).__name__}: {exc}")
    try:
        writer.send(out)
        writer.close()
    finally:
        os._exit(0)     # (none of the parent's exit handlers: they are the parent's)

