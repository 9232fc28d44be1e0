"""Spawned processes of one gloo group for tests (each gets its rank, a free port and a queue),
and a wait for a process that blocks in a pipe write."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_ranks(target: Any, world: int, extra: tuple[Any, ...] = (), reports: int | None = None,
                timeout_s: float = 120) -> tuple[dict[int, Any], list[int | None]]:
    """Run ``target(rank, port, results, *extra)`` in ``world`` spawned processes: the first
    ``reports`` (default ``world``) (rank, report) pairs they put on ``results``, and their
    exit codes (a process still alive 10 s after the reports is killed)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, port, results, *extra))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    try:
        out = dict(results.get(timeout=timeout_s)
                   for _ in range(world if reports is None else reports))
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return out, [proc.exitcode for proc in procs]


def blocked_in_write(pid: int, limit_s: float = 10.0) -> None:
    """Wait until a thread of ``pid`` sleeps in a pipe write (or ``limit_s``, where wchan is
    hidden)."""
    tasks = Path(f"/proc/{pid}/task")
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if any("pipe_write" in (task / "wchan").read_text() for task in tasks.iterdir()):
                return
        except OSError:
            break
        time.sleep(0.02)
    time.sleep(1.0)
