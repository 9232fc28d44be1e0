"""Pacing an emulated device's compute: a call that ran faster than its speed sleeps to it.

[Note: pacing]
A cgroup quota caps a device's CPU time per CFS period (runtime/shaping.py), but a device
that waited (for a message, for the others' all-reduce) starts the next period with its
whole quota unspent: a computation shorter than the quota runs at a full core's speed,
``1 / speed`` times faster than the device it emulates. PAC's phase 1 sends one sample a
micro-batch, and a slow device's forward of it is shorter than its quota: the slow
devices' forwards measured 31-43 % under their prediction (2026-12-05), and phase 1 as a
whole up to 21 % under. So each compute call of a capped device (the executor's forward
and backward, PAC's segments and its phase-2 step) ends no earlier than its thread's CPU
seconds over the device's speed: :func:`pace` sleeps the rest. It never shortens a call
the quota or a busy host already stretched, and it adds nothing at speed 1.
"""

from __future__ import annotations

import time

__all__ = ["pace"]


def pace(began: float, began_cpu: float, speed: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``began`` plus this thread's CPU
    seconds since ``began_cpu`` (``time.thread_time()``) over ``speed``; nothing at
    ``speed >= 1`` or where that time has passed."""
    if speed >= 1.0:
        return
    rest = (time.thread_time() - began_cpu) / speed - (time.perf_counter() - began)
    if rest > 0.0:
        time.sleep(rest)
