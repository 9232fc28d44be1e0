"""Process-wide CPU allocator settings shared by the profiler and the training workers."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["tune_allocator", "trim_heap", "ENV_VAR"]

log = logging.getLogger(__name__)

ENV_VAR = "ASTEROID_FX_MALLOC"
"""Set to ``0`` to leave the C allocator as it is."""

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30

_done = False

# [Note: why tune the allocator]
# Training allocates and frees the same large tensors (gradients, activations of a few MB)
# every micro-batch. glibc serves blocks above its mmap threshold (128 KiB at start,
# raised only gradually as blocks are freed) with fresh mmap()s, so every such block is
# page-faulted and zero-filled again: on this project's 2-core host the backward pass of a
# 16 MB MLP at batch 32 took 44 ms for its first ~20-30 steps and 27 ms afterwards.
# Raising the mmap and trim thresholds once makes every step run in the steady regime
# from the first one; the price is that the process keeps its peak heap instead of
# returning it to the OS between steps. That heap is 1.1-1.9x the peak of the tensors,
# which is what the memory model budgets (fragmentation: docs/latency-model.md, "Memory";
# workers report it as peak_reserved_bytes).
# The profiler applies the same setting so that a cost table and a training run measure
# the same regime.


def tune_allocator() -> bool:
    """Raise glibc's mmap / trim thresholds once per process; False where not applicable.

    A no-op (returns False) on non-glibc systems or when ``ASTEROID_FX_MALLOC=0``.
    """
    global _done
    if _done:
        return True
    if os.environ.get(ENV_VAR, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here; allocator left as is")
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    _done = ok
    if not ok:
        log.debug("mallopt refused the thresholds; allocator left as is")
    return ok


def trim_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``); False where
    there is no glibc. ``runtime.memory`` calls it before taking a memory baseline, so
    that memory freed during start-up is not silently reused by training."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True
