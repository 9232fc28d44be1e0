"""The one supervisor of device processes on this host: start, watch, fence and stop them
(``run --emulate`` through ``runtime.emulator.launch_local``, and every generation of
``runtime.recovery``)."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from contracts.errors import StageFailure
from runtime import protocol as proto
from runtime.heartbeat import Blame, FailureDetector, FailureReport, blame, process_state
from runtime.results import ResultReader
from runtime.train import StageSource, TrainConfig, WorkerResult, train_device
from runtime.trust import Gatekeeper, new_token
from runtime.worker import worker_main

__all__ = ["free_port", "LocalJob", "Supervisor", "Watch", "FailureJudge", "LAST_WORDS_S",
           "HANG_S", "EXIT_WAIT_S", "HANG_TIMEOUTS"]

log = logging.getLogger(__name__)

# [Note: one supervisor]
# Every device process this host starts belongs to one ``Supervisor``: the job's store
# behind the token gate and the result channels (``LocalJob``), a table of the processes by
# name, one watch loop and one way to stop. ``watch`` reads the workers' messages (a
# process's exit wakes it at once: its sentinel is among the handles it waits on), hands
# progress on, collects results, and every tick asks a *judge* who failed:
#   * ``launch_local`` (``run --emulate``) has none: a rank that reports an error, dies
#     before reporting (after ``LAST_WORDS_S``, so that its last words can still arrive)
#     or stays stopped (SIGSTOP) for ``HANG_S`` ends the run -- after a short grace that
#     lets the root cause arrive before its echoes, the error with the smallest priority
#     (0: the rank's own failure, 1: a broken link to a failed peer) is raised as one
#     ``StageFailure`` line naming the rank and its device;
#   * recovery's judge is ``FailureJudge`` (process exits, heartbeats, graceful leaves:
#     see [Note: who failed] in runtime.heartbeat); its verdict ends the watch, and the
#     recovery fences the failed ranks and collects the survivors' hand-overs.
# Whatever ends a watch (results, a verdict, an error, the deadline, an exception of the
# caller), the caller's ``stop`` follows in a ``finally``: processes that finished or were
# told to exit may end by themselves (``EXIT_WAIT_S``; killing one early breaks its peers'
# last barrier), every other one not kept for the next generation is killed at once, each
# is joined, and its exit code is kept. ``close`` stops everything and then checks that no
# process is left (``leftovers``).

#: seconds a dead rank's last message (its error) may take to arrive before its exit
#: counts as "died before reporting"
LAST_WORDS_S = 0.5
#: seconds a rank may stay stopped (SIGSTOP) before a watch without a judge calls it hung
HANG_S = 5.0
#: seconds a process that finished or was told to exit may take to end by itself
EXIT_WAIT_S = 5.0
#: a running device whose heartbeat is silent for this many heartbeat timeouts is hung
#: (a stopped or exited one fails at once; see [Note: who failed] in runtime.heartbeat)
HANG_TIMEOUTS = 5.0
#: seconds ``stop`` waits for a killed process to be reaped
REAP_S = 10.0


#: ports ``LocalJob`` tries for its store where another process takes the free one first
STORE_PORT_TRIES = 3


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a launcher's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_PRELOAD = ["torch", "torch.distributed", "runtime.worker"]


def _context() -> Any:
    """The forkserver context with torch and the worker preloaded: a device process forks
    from a server that imported them once (about 1.7 s of CPU a process on a small host)
    instead of importing them again; :func:`runtime.worker.worker_main` takes the
    launcher's environment as it is when the process starts."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _killed_why(exitcode: int | None) -> str:
    """A hint for a device process killed by SIGKILL that nobody here sent (exit code -9):
    on Linux mostly the kernel's out-of-memory killer (a plan tampered to a batch of 10^8
    grew one worker to 11.6 GB; the message said only "exit code -9")."""
    if exitcode != -9:
        return ""
    return (" (killed by SIGKILL: on Linux usually the kernel's out-of-memory killer; see "
            "`dmesg`, and check the plan's batch and the devices' memory_gb)")


class LocalJob:
    """The launcher's side of device processes on this host: the job's store on 127.0.0.1
    behind the token gate (see [Note: trust boundary] in runtime.trust), the result channels,
    spawning :func:`runtime.worker.worker_main`, and reading the workers' messages."""

    def __init__(self, timeout_s: float, token: str | None = None, *,
                 expected: int = 1) -> None:
        for attempt in range(STORE_PORT_TRIES):
            self.port = free_port()
            try:
                self._server = dist.TCPStore("127.0.0.1", self.port, expected,
                                             is_master=True, wait_for_workers=False,
                                             timeout=timedelta(seconds=timeout_s))
                break
            except RuntimeError as exc:     # (torch's DistNetworkError)
                # another process took the free port between the check and the bind
                if "EADDRINUSE" not in str(exc) or attempt + 1 == STORE_PORT_TRIES:
                    raise
        self.token = token or new_token()
        self.gate = Gatekeeper(self._server, self.token,
                               where=f"the launcher at 127.0.0.1:{self.port}")
        #: the job's keys (prefixed: see runtime.trust)
        self.store: dist.Store = self.gate.job_store
        self.ctx = _context()
        #: one pipe per device process (see [Note: one pipe per process] in runtime.results)
        self.results = ResultReader(self.ctx)

    def spawn(self, rank: int, world: int, source: StageSource, config: TrainConfig,
              cgroup: str | None, *, spec: Any = None, name: str = "",
              body: Callable[..., WorkerResult] = train_device) -> Any:
        """Start one device process (:func:`worker_main`, running ``body``) and return it."""
        channel = self.results.channel()
        proc = self.ctx.Process(target=worker_main, daemon=True,
                                name=f"asteroid-fx-{name or rank}",
                                args=(rank, world, self.port, source, config, cgroup,
                                      channel, spec, self.token, body),
                                kwargs={"environ": dict(os.environ),
                                        "launcher": os.getpid()})
        try:
            proc.start()
        finally:
            self.results.started(channel)
        return proc

    def next_message(self, procs: Sequence[Any], done: Collection[int],
                     wait_s: float = 0.02) -> tuple[str, Any, Any]:
        """The next worker message, or ("", -1, None) after ``wait_s`` or as soon as a
        worker process not in ``done`` ends (its sentinel wakes the wait: a kill is seen
        at once)."""
        handles = [p.sentinel for r, p in enumerate(procs) if r not in done]
        message: tuple[str, Any, Any] | None = self.results.get(wait_s, handles)
        return ("", -1, None) if message is None else message

    def close(self) -> None:
        """Close the result channels and stop the token gate (the processes are the
        caller's to end first)."""
        self.results.close()
        self.gate.stop()


@dataclass
class Watch:
    """What one ``Supervisor.watch`` saw: the ranks' results, the ranks lost on purpose
    (``may_fail``) and the judge's verdict, if one ended the watch."""

    done: dict[int, WorkerResult] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)
    verdict: Any = None


@dataclass
class _Errors:
    """Errors seen during a watch: (priority, one line); 0 a root cause, 1 an echo."""

    grace_s: Mapping[str, float]
    lines: list[tuple[int, str]] = field(default_factory=list)
    until: float | None = None       # monotonic end of the grace after the first error

    def add(self, kind: str, line: str, secondary: bool = False) -> None:
        self.lines.append((1 if secondary else 0, line))
        if self.until is None:
            self.until = time.monotonic() + self.grace_s.get(kind, 0.0)

    def due(self) -> bool:
        return self.until is not None and time.monotonic() >= self.until

    def first(self) -> str:
        return min(self.lines, key=lambda e: e[0])[1]


class FailureJudge:
    """Who failed among the ranks of one generation, from certain evidence only: process
    exits, heartbeats of stopped or dead processes, fatal reports, graceful leaves, and a
    running rank's heartbeat silent for ``HANG_TIMEOUTS`` timeouts (see [Note: who failed]
    in runtime.heartbeat). A verdict is a ``runtime.heartbeat.Blame`` and the leave
    markers it was based on (``left``)."""

    def __init__(self, store: dist.Store, world: int, *, generation: int,
                 heartbeat_timeout_s: float, replay: bool) -> None:
        self.store = store
        self.world = world
        self.generation = generation
        self.replay = replay
        self.hang_s = HANG_TIMEOUTS * heartbeat_timeout_s
        self.detector = FailureDetector(store, world, generation=generation,
                                        timeout_s=heartbeat_timeout_s)
        self.left: dict[int, proto.LeftMarker] = {}

    def __call__(self, exited: Sequence[int], done: Collection[int]) -> Blame | None:
        left = self._left() if self.replay else {}
        # every rank stops beating after a leave: no heartbeat verdict then
        report = FailureReport() if left else self.detector.poll()
        waiting = self._waiting(report.hung) if self.replay and report.hung else set()
        verdict = blame(report, exited=exited, left=left, done=done, waiting=waiting,
                        hang_s=self.hang_s)
        if not verdict.failed:
            return None
        self.left = left
        return verdict

    def _left(self) -> dict[int, proto.LeftMarker]:
        """Ranks that left gracefully: their ``rx/<g>/left/<rank>`` markers (one cheap
        counter read while nobody left)."""
        keys = proto.Keys(self.generation)
        if int(self.store.add(keys.left_count(), 0)) == 0:
            return {}
        out: dict[int, proto.LeftMarker] = {}
        for rank in range(self.world):
            marker = proto.get_if_present(self.store, keys.left(rank), proto.LeftMarker)
            if marker is not None:
                out[rank] = marker
        return out

    def _waiting(self, ranks: Collection[int]) -> set[int]:
        """Those of ``ranks`` that left the failed round and wait for their next
        assignment (they stopped beating on purpose)."""
        keys = proto.Keys(self.generation)
        return {r for r in ranks if self.store.check([keys.waiting(r)])}


class Supervisor:
    """Device processes on this host, by name: start, watch, fence, stop (see
    [Note: one supervisor]). ``store``, ``token`` and ``gate`` are the job's."""

    def __init__(self, timeout_s: float, token: str | None = None, *,
                 expected: int = 1) -> None:
        #: the store, token gate, result channels and spawning
        self.job = LocalJob(timeout_s, token, expected=expected)
        self.procs: dict[str, Any] = {}                  # name -> process
        #: exit codes of the processes stopped so far, by name
        self.exit_codes: dict[str, int | None] = {}
        self._started: list[int] = []                    # PIDs of every process started

    @property
    def store(self) -> dist.Store:
        return self.job.store

    @property
    def token(self) -> str:
        return self.job.token

    @property
    def gate(self) -> Gatekeeper:
        return self.job.gate

    def start(self, name: str, rank: int, world: int, source: StageSource,
              config: TrainConfig, cgroup: str | None = None, *, spec: Any = None,
              body: Callable[..., WorkerResult] = train_device, label: str = "") -> Any:
        """Start the device process ``name`` as ``rank`` of ``world`` (the OS sees it as
        ``asteroid-fx-<label or name>``)."""
        proc = self.job.spawn(rank, world, source, config, cgroup, spec=spec,
                              name=label or name, body=body)
        self.procs[name] = proc
        self._started.append(proc.pid)
        return proc

    @staticmethod
    def fence(proc: Any) -> None:
        """Kill ``proc`` (SIGKILL: also a stopped one) if it still runs."""
        if proc.is_alive():
            proc.kill()

    def watch(self, procs: Sequence[Any], names: Sequence[str], *,
              progress: Callable[[Mapping[str, Any]], None] | None = None,
              timeout_s: float = 600.0,
              judge: Callable[[Sequence[int], Collection[int]], Any] | None = None,
              grace_s: Mapping[str, float] | None = None,
              may_fail: Collection[int] = (), generation: int | None = None,
              hang_s: float = HANG_S,
              on_lost: Callable[[int], None] | None = None) -> Watch:
        """Watch ``procs`` (rank -> process; ``names`` their devices) until every rank
        reported its result, or ``judge`` (called every tick with the ranks whose process
        ended before reporting, and the finished ranks) returns a verdict.

        Without a judge a rank whose process ended before reporting (``LAST_WORDS_S``
        later), or that stays stopped for ``hang_s``, fails the watch; ranks in
        ``may_fail`` may end without failing it (they are ``lost``; ``on_lost`` is called
        with each such rank as soon as its process is seen gone, so that a body that
        recovers by itself can be helped by the launcher, e.g. with a re-plan, see
        runtime.pac_recovery). ``grace_s``: per kind
        of failure ("error", "interrupted", "died", "hung"), the seconds to wait after the
        first one for the root cause before raising (default: 1 s after an error, 0.5 s
        after a death). ``generation``: "interrupted" reports of other generations are old
        news.

        Raises:
            StageFailure: a rank failed (one line: the root cause, its rank and device),
                or the watch did not end within ``timeout_s``.
            AuthenticationError: a process failed to prove the job's token.
        """
        world = len(procs)
        errors = _Errors({"error": 1.0, "died": 0.5, "hung": 0.5} if grace_s is None
                         else grace_s)
        out = Watch()
        reported: set[int] = set()
        dead_since: dict[int, float] = {}
        stopped_since: dict[int, float] = {}
        deadline = time.monotonic() + timeout_s
        next_check = 0.0      # of stopped processes (reads /proc: every 0.2 s)
        while len(out.done) + len(out.lost) < world:
            kind, rank, payload = self.job.next_message(procs, out.done)
            if kind == "step":
                if progress is not None:
                    progress(payload)
            elif kind == "ok":
                out.done[rank] = proto.decode_result(payload, f"the result of rank {rank}")
                continue
            elif kind == "interrupted" and (generation is None or rank[0] == generation):
                message, secondary = payload
                reported.add(rank[1])
                errors.add(kind, f"rank {rank[1]} (device {names[rank[1]]!r}): {message}",
                           secondary)
            elif kind == "error":
                message, secondary = payload
                line = f"rank {rank} (device {names[rank]!r}): {message}"
                if not errors.grace_s.get(kind, 0.0):   # (recovery: no hand-over follows)
                    raise StageFailure(line)
                reported.add(rank)
                errors.add(kind, line, secondary)
            # ("left", ...) only wakes the wait: the store's markers say who left
            self.gate.raise_if_refused()
            now = time.monotonic()
            exited = [r for r, p in enumerate(procs) if r not in out.done and not p.is_alive()]
            if exited and self.job.results.pending():
                # a rank that reported and ended may have its "ok" still unread behind its
                # last step: its messages first, then its exit (judged as a failure where
                # the launcher was slow to read, under load: a survivor that finished the
                # run after a recovery was blamed for "failing during" the step after it)
                continue
            if judge is not None:
                verdict = judge(exited, out.done)
                if verdict is not None:
                    out.verdict = verdict
                    return out
            else:
                for r in exited:
                    if r in reported:
                        continue
                    if r in may_fail:
                        reported.add(r)
                        out.lost.add(r)
                        if on_lost is not None:
                            on_lost(r)
                    elif now - dead_since.setdefault(r, now) > LAST_WORDS_S:
                        reported.add(r)
                        errors.add("died", f"rank {r} (device {names[r]!r}) died with exit "
                                           f"code {procs[r].exitcode} before reporting"
                                           + _killed_why(procs[r].exitcode))
                checked = now >= next_check
                if checked:
                    next_check = now + 0.2
                for r, proc in enumerate(procs):
                    if not checked or r in reported or r in out.done or r in exited:
                        continue
                    if process_state(proc.pid) != "stopped":
                        stopped_since.pop(r, None)
                    elif now - stopped_since.setdefault(r, now) > hang_s:
                        reported.add(r)
                        errors.add("hung", f"rank {r} (device {names[r]!r}) is stopped "
                                           f"(SIGSTOP?) for more than {hang_s:.0f} s")
            if errors.due():
                raise StageFailure(errors.first())
            if now > deadline:
                raise StageFailure(errors.first() if errors.lines else
                                   f"the run did not finish within {timeout_s:.0f} s")
        if errors.lines:
            raise StageFailure(errors.first())
        return out

    def stop(self, names: Collection[str] | None = None, *, keep: Collection[str] = (),
             let_end: Collection[str] = (), wait_s: float = EXIT_WAIT_S) -> None:
        """End the processes ``names`` (default: all) but those in ``keep``: those in
        ``let_end`` (they finished, or were told to exit) may first end by themselves
        within ``wait_s``; every other one is killed at once. Each is joined, its exit
        code kept in ``exit_codes``, and it leaves the table."""
        chosen = [n for n in (self.procs if names is None else names)
                  if n in self.procs and n not in keep]
        for name in chosen:          # kill first: the others stop promptly, together
            if name not in let_end:
                self._end(name)
        until = time.monotonic() + wait_s
        for name in chosen:
            if name in let_end:
                self.procs[name].join(timeout=max(0.0, until - time.monotonic()))
                self._end(name)
        for name in chosen:
            self.procs.pop(name).join(timeout=REAP_S)

    def _end(self, name: str) -> None:
        """Keep the exit code of a process that ended by itself; kill one that runs."""
        proc = self.procs[name]
        if proc.is_alive():
            proc.kill()
        else:
            self.exit_codes[name] = proc.exitcode

    def leftovers(self) -> list[int]:
        """PIDs of processes this supervisor started and no longer keeps (stopped, or
        never in its table) that still exist: none after ``stop`` and ``close``."""
        kept = {p.pid for p in self.procs.values()}
        return [pid for pid in self._started
                if pid not in kept and process_state(pid) != "gone"]

    def close(self) -> None:
        """Stop every process, then the store's token gate and the result channels; log any
        process left behind (there should be none)."""
        try:
            self.stop()
            left = self.leftovers()
            if left:
                log.warning("device processes %s are still there after the stop", left)
        finally:
            self.job.close()
