"""This host's effective single-core FLOP/s and memory bandwidth, measured once per process.

[Note: one host core]
A cost table's times mean "on one core of the profiling host" (``profile`` measures with
``torch.set_num_threads(1)``), and the emulator's speed 1.0 is one host core. The host's
effective FLOP/s recorded in the table (``CostTable.host_flops``) is therefore measured on
one thread too: the median of many short timed dense ``n x n`` float32 matmuls (``2 n^3``
FLOPs each, about 0.3 ms on a 100 GFLOP/s core) after a warm-up; many short runs keep a
burst of load from other processes from moving the median. Built-in device types
(``contracts.devices``) carry their own effective FLOP/s, so ``device.flops /
host_flops`` is the device's speed against this host, and analytic and measured tables
share one time scale.

The memory bandwidth (used by the analytic roofline) is the median rate of a large
float32 tensor copy, counting the bytes read plus the bytes written. The batch-norm rate
is the effective FLOP/s (5 FLOPs per element, as :mod:`cost_models.flops` counts) of a
training-mode ``BatchNorm2d`` forward on a cache-sized activation: CPU kernels compute the
batch statistics far below the matmul rate (about 30x below on an AVX-512 core), which
the analytic roofline must know to rank layers of convolutional networks sensibly.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from contracts.errors import CostModelError

__all__ = [
    "measure_host_flops",
    "measure_host_mem_bw",
    "measure_norm_flops",
    "single_thread",
    "clear_cache",
    "compute_clock",
]

logger = logging.getLogger(__name__)

_CACHE: dict[str, float] = {}


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(1)``; restore the old count afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def compute_clock() -> float:
    """Seconds of CPU time this thread has used (``time.thread_time``).

    [Note: CPU time, not wall time]
    Measurements run on one thread (``single_thread``), and with one intra-op thread torch
    computes forward and backward on the calling thread, so the thread's CPU time is the
    time one core of this host needs. Unlike the wall clock it does not count the time the
    thread waited for the CPU while other programs ran: a table measured on a busy
    workstation describes the workstation, not its load (on this project's 2-core host at
    load 2-6, wall-clock profiles came out 0.5-2x the CPU time of the same model).
    """
    return time.thread_time()


def _median_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = compute_clock()
        fn()
        times.append(compute_clock() - start)
    return statistics.median(times)


def _check(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise CostModelError(f"{name} must be >= {minimum}, got {value!r}")


def measure_host_flops(
    *, size: int = 256, repeats: int = 51, warmup: int = 3, force: bool = False
) -> float:
    """Effective FLOP/s of one core of this host (dense float32 matmul), cached per process.

    Args:
        size: the matmul is ``size x size`` by ``size x size`` (``2 size^3`` FLOPs).
        repeats: timed runs; the median is used.
        warmup: untimed runs first.
        force: measure again even if a value is cached.

    Returns:
        FLOP/s, > 0.

    Raises:
        CostModelError: a non-positive ``size`` / ``repeats`` or a negative ``warmup``.
    """
    _check("size", size, 1)
    _check("repeats", repeats, 1)
    _check("warmup", warmup, 0)
    key = f"flops:{size}:{repeats}:{warmup}"
    if not force and key in _CACHE:
        return _CACHE[key]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    out = torch.empty(size, size)
    with single_thread(), torch.no_grad():
        seconds = _median_time(lambda: torch.mm(a, b, out=out), repeats, warmup)
    flops = 2.0 * size**3 / max(seconds, 1e-9)
    logger.info("host effective FLOP/s (1 thread, %dx%d matmul): %.3g", size, size, flops)
    _CACHE[key] = flops
    return flops


def measure_host_mem_bw(
    *, nbytes: int = 64 * 2**20, repeats: int = 5, warmup: int = 1, force: bool = False
) -> float:
    """Effective memory bandwidth of one core (bytes/s, read + write of a copy), cached.

    Args:
        nbytes: size of the copied float32 buffer (should exceed the caches).
        repeats: timed copies; the median is used.
        warmup: untimed copies first.
        force: measure again even if a value is cached.

    Raises:
        CostModelError: ``nbytes`` below 4 or non-positive ``repeats``.
    """
    _check("nbytes", nbytes, 4)
    _check("repeats", repeats, 1)
    _check("warmup", warmup, 0)
    key = f"bw:{nbytes}:{repeats}:{warmup}"
    if not force and key in _CACHE:
        return _CACHE[key]
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    with single_thread(), torch.no_grad():
        seconds = _median_time(lambda: dst.copy_(src), repeats, warmup)
    bandwidth = 2.0 * src.numel() * 4 / max(seconds, 1e-9)
    logger.info("host memory bandwidth (1 thread copy): %.3g B/s", bandwidth)
    _CACHE[key] = bandwidth
    return bandwidth


def measure_norm_flops(
    *, shape: tuple[int, int, int, int] = (8, 64, 16, 16), repeats: int = 7, warmup: int = 2,
    force: bool = False,
) -> float:
    """Effective FLOP/s of one core for training-mode ``BatchNorm2d`` (5 FLOPs/element).

    Raises:
        CostModelError: a non-positive dimension or ``repeats``, or a negative ``warmup``.
    """
    if len(shape) != 4 or any(d < 1 for d in shape):
        raise CostModelError(f"shape must be 4 positive dimensions (N, C, H, W), got {shape!r}")
    _check("repeats", repeats, 1)
    _check("warmup", warmup, 0)
    key = f"norm:{shape}:{repeats}:{warmup}"
    if not force and key in _CACHE:
        return _CACHE[key]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    norm = torch.nn.BatchNorm2d(shape[1]).train()
    with single_thread(), torch.no_grad():
        seconds = _median_time(lambda: norm(x), repeats, warmup)
    flops = 5.0 * x.numel() / max(seconds, 1e-9)
    logger.info("host batch-norm (training) FLOP/s (1 thread): %.3g", flops)
    _CACHE[key] = flops
    return flops


def clear_cache() -> None:
    """Forget the cached measurements (tests use this)."""
    _CACHE.clear()
