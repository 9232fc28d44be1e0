"""Tests of runtime.results: a device process killed in the middle of a message loses only
that message; every other process's messages still arrive, and nothing waits forever."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from runtime.results import ResultReader, ResultWriter
from tests.ranks import blocked_in_write

CTX: Any = multiprocessing.get_context("forkserver")
BIG = b"x" * 4_000_000        # far more than a pipe holds: its send blocks until read


def _send(writer: ResultWriter, *messages: Any) -> None:
    for message in messages:
        writer.put(message)
    writer.close()


def _drain(reader: ResultReader, until: Any, limit_s: float = 20.0) -> list[Any]:
    seen: list[Any] = []
    deadline = time.monotonic() + limit_s
    while until not in seen and time.monotonic() < deadline:
        message = reader.get(0.05)
        if message is not None:
            seen.append(message)
    return seen


def _start(reader: ResultReader, *messages: Any) -> Any:
    writer = reader.channel()
    proc = CTX.Process(target=_send, args=(writer, *messages), daemon=True)
    proc.start()
    reader.started(writer)
    return proc


def test_a_process_killed_mid_message_loses_only_its_own_message() -> None:
    """The shared queue this replaced lost its write lock with such a process, and every
    later message of every other process waited forever (see [Note: one pipe per
    process])."""
    reader = ResultReader(CTX)
    try:
        killed = _start(reader, ("step", 1, "hello"), ("ok", 1, BIG))
        assert _drain(reader, ("step", 1, "hello")) == [("step", 1, "hello")]
        blocked_in_write(killed.pid)
        killed.kill()
        killed.join(10)
        other = _start(reader, ("step", 0, "a"), ("ok", 0, "done"))
        began = time.monotonic()
        seen = _drain(reader, ("ok", 0, "done"))
        assert seen == [("step", 0, "a"), ("ok", 0, "done")]
        assert time.monotonic() - began < 10
        other.join(10)
        assert reader.get(0.2) is None       # both channels ended; nothing is waited for
    finally:
        reader.close()


def test_messages_arrive_in_order_and_a_wake_handle_ends_the_wait() -> None:
    reader = ResultReader(CTX)
    try:
        proc = _start(reader, *[("step", 0, i) for i in range(50)])
        assert _drain(reader, ("step", 0, 49)) == [("step", 0, i) for i in range(50)]
        proc.join(10)
        assert reader.get(0.0) is None
        sleeper = CTX.Process(target=time.sleep, args=(0.3,), daemon=True)
        sleeper.start()
        began = time.monotonic()
        while reader.get(30.0, [sleeper.sentinel]) is None and sleeper.is_alive():
            pass
        assert time.monotonic() - began < 15        # woken by the exit, not the 30 s
        sleeper.join(10)
    finally:
        reader.close()


def test_a_writer_whose_launcher_is_gone_does_not_raise() -> None:
    reader = ResultReader(CTX)
    writer = reader.channel()
    reader.close()
    writer.put(("ok", 0, "nobody reads this"))     # broken pipe: logged, not raised
    writer.close()
    writer.put(("ok", 0, "closed"))                 # closed here: the same
