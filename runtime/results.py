"""Result channels: one pipe from each device process to the launcher, none shared."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["ResultReader", "ResultWriter"]

log = logging.getLogger(__name__)

_CLOSE = object()     # (ends a writer's thread)

# [Note: one pipe per process]
# The device processes once shared one ``multiprocessing.Queue``. Its writers take one
# lock (a POSIX semaphore) around every write, and a process SIGKILLed while its feeder
# thread held that lock (an injected fault, a fence by the launcher, the OOM killer) left
# it taken for good: every later message of every other process waited forever. CI saw it
# once (`tests/test_recovery.py`, restart after f2 was killed at the start of step 3; f2
# died while the record of its step 2 was on the way): each later single-device generation
# trained to the end, stopped its heartbeat, hung flushing its "ok", and was blamed by
# heartbeat 5 s later, until no device was left.
# Now each process writes to a pipe of its own, so there is no lock to lose. The launcher
# closes its copy of each write end once the process has started: a dead writer's pipe
# ends in EOF, and a message cut off by the kill is dropped instead of waited for. As
# with the queue, a thread of the writer sends, so that ``put`` never waits for the
# launcher to read (a pipe holds 64 KiB).
# What is left: a live writer stopped (SIGSTOP) in the middle of a message larger than
# the pipe would block the launcher's read of that one message.


class ResultWriter:
    """The device process's end of its channel: ``put`` hands a message to a thread that
    sends it (as ``multiprocessing.Queue`` does: ``put`` never waits for the launcher to
    read), ``close`` sends what is left and closes the pipe.

    A launcher that is gone (broken pipe) is logged, not raised: nobody is left to tell.
    Pickles as its connection (for ``Process`` arguments)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._pending: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (ResultWriter, (self._connection,))

    def put(self, message: Any) -> None:
        with self._lock:
            if self._closed:
                log.debug("the result channel is closed: %r not sent", message[:1])
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._feed, daemon=True,
                                                name="asteroid-fx-results")
                self._thread.start()
            self._pending.put(message)

    def _feed(self) -> None:
        while True:
            message = self._pending.get()
            if message is _CLOSE:
                return
            try:
                self._connection.send(message)
            except (OSError, ValueError) as exc:    # the launcher is gone
                log.debug("the launcher did not take %r: %s", message[:1], exc)

    def close(self) -> None:
        """Send every message put so far, then close the pipe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._pending.put(_CLOSE)
        if thread is not None:
            thread.join()
        self._connection.close()


class ResultReader:
    """The launcher's ends of every device process's channel (see [Note: one pipe per
    process]). ``channel`` makes one for a process about to start, ``started`` drops the
    launcher's copy of its write end, ``get`` reads whichever channel has a message."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self._readers: list[Connection] = []

    def channel(self) -> ResultWriter:
        """A new channel's write end, for one device process's arguments."""
        reader, writer = self._context.Pipe(duplex=False)
        self._readers.append(reader)
        return ResultWriter(writer)

    @staticmethod
    def started(writer: ResultWriter) -> None:
        """Close the launcher's copy of ``writer`` once its process holds its own, so that
        the process's exit ends the channel (EOF)."""
        writer.close()

    def get(self, wait_s: float = 0.0, wake: Sequence[Any] = ()) -> Any | None:
        """The next message of any channel, or None after ``wait_s`` seconds or as soon as
        one of ``wake`` (e.g. process sentinels) is ready. A channel whose process ended is
        dropped, with the message its death cut off."""
        message = self._take(0.0)
        if message is None and wait_s > 0:
            message = self._take(wait_s, wake)
        return message

    def _take(self, timeout: float, wake: Sequence[Any] = ()) -> Any | None:
        ready = set(wait([*self._readers, *wake], timeout))
        for reader in [r for r in self._readers if r in ready]:
            try:
                message: Any = reader.recv()
                return message
            except (EOFError, OSError) as exc:     # the writer ended, maybe mid-message
                if not isinstance(exc, EOFError):
                    log.debug("a device process's last message was cut off: %s", exc)
                self._readers.remove(reader)
                reader.close()
        return None

    def pending(self) -> bool:
        """Whether a channel holds an unread message (or its end) now."""
        return bool(self._readers) and bool(wait(self._readers, 0))

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers = []
