"""Tests of runtime.supervisor: a crash, a death or a hang stops everyone promptly with one
line naming the rank, a judge's verdict ends a watch, and no process is left behind."""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import pytest

from contracts.errors import StageFailure
from runtime.heartbeat import process_state
from runtime.supervisor import Supervisor
from runtime.train import TrainConfig, WorkerResult
from tests.ranks import blocked_in_write

CONFIG = TrainConfig(steps=1, timeout_s=60)
NAMES = ("a", "b", "c")


def _body(source: Any, rank: int, config: TrainConfig, *, hooks: Any = None,
          report: Callable[[dict[str, Any]], None] | None = None,
          acts: dict[int, str] | None = None) -> WorkerResult:
    """A device body: rank r does ``acts[r]`` ("raise", "exit", "stop", "sleep", "flood": a
    record far larger than a pipe, then sleep; "late": finish after 3 s; default: report
    one step and finish)."""
    act = (acts or {}).get(rank, "finish")
    if act == "late":
        time.sleep(3.0)
        act = "finish"
    if act == "flood" and report is not None:
        report({"step": 0, "rank": rank, "blob": "x" * 4_000_000})
    if act == "finish":
        if report is not None:
            report({"step": 0, "rank": rank})
        return WorkerResult(rank=rank, device=NAMES[rank], stage=0)
    time.sleep(0.3)
    if act == "raise":
        raise RuntimeError("boom")
    if act == "exit":
        os._exit(3)
    if act == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(120)        # "sleep": a survivor blocked in its round
    return WorkerResult(rank=rank, device=NAMES[rank], stage=0)


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    sup = Supervisor(60.0, expected=1)
    yield sup
    sup.close()
    assert sup.leftovers() == []


def _start(sup: Supervisor, acts: dict[int, str], world: int = 3) -> list[Any]:
    body = functools.partial(_body, acts=acts)
    return [sup.start(NAMES[r], r, world, None, CONFIG, body=body)  # type: ignore[arg-type]
            for r in range(world)]


def _gone(pids: Sequence[int]) -> bool:
    return all(process_state(pid) == "gone" for pid in pids)


@pytest.mark.parametrize(("act", "expected"), [
    ("raise", r"^rank 1 \(device 'b'\): RuntimeError: boom$"),
    ("exit", r"^rank 1 \(device 'b'\) died with exit code 3 before reporting$"),
    ("stop", r"^rank 1 \(device 'b'\) is stopped \(SIGSTOP\?\) for more than 1 s$"),
])
def test_a_crash_death_or_hang_stops_everyone_promptly(supervisor: Supervisor, act: str,
                                                       expected: str) -> None:
    procs = _start(supervisor, {0: "sleep", 1: act, 2: "sleep"})
    pids = [p.pid for p in procs]
    with pytest.raises(StageFailure, match=expected):
        supervisor.watch(procs, NAMES, timeout_s=60, hang_s=1.0)
    began = time.perf_counter()
    supervisor.stop()
    assert time.perf_counter() - began < 5      # the sleeping survivors are killed at once
    assert _gone(pids) and supervisor.leftovers() == []
    assert supervisor.procs == {}


def test_finished_ranks_end_by_themselves_and_report(supervisor: Supervisor) -> None:
    procs = _start(supervisor, {})
    seen: list[Any] = []
    watched = supervisor.watch(procs, NAMES, progress=seen.append, timeout_s=60)
    assert sorted(watched.done) == [0, 1, 2] and watched.verdict is None
    assert [w.device for _, w in sorted(watched.done.items())] == list(NAMES)
    assert {r["rank"] for r in seen} == {0, 1, 2}
    supervisor.stop(let_end=NAMES)
    assert supervisor.exit_codes == {"a": 0, "b": 0, "c": 0}


def test_a_rank_that_may_fail_is_lost_not_fatal(supervisor: Supervisor) -> None:
    # (alone: a finished rank's last barrier with a rank that died fails, which is an
    # error of its own; PAC's bodies that may lose a rank leave the group themselves)
    procs = _start(supervisor, {0: "exit"}, world=1)
    watched = supervisor.watch(procs, NAMES[:1], timeout_s=60, may_fail=(0,))
    assert watched.done == {} and watched.lost == {0}


def test_a_rank_killed_mid_message_does_not_silence_the_others(
        supervisor: Supervisor) -> None:
    """The CI flake of `tests/test_recovery.py` (see [Note: one pipe per process] in
    runtime.results): a rank killed while it sent a message took the shared queue's lock
    with it, and the survivors' "ok" never arrived."""
    procs = _start(supervisor, {0: "late", 1: "flood"}, world=2)
    blocked_in_write(procs[1].pid)       # the watch is not reading yet: the send blocks
    procs[1].kill()
    watched = supervisor.watch(procs, NAMES[:2], timeout_s=30, may_fail=(1,))
    assert sorted(watched.done) == [0] and watched.lost == {1}
    assert watched.done[0].device == "a"


def test_a_judges_verdict_ends_the_watch_and_survivors_can_be_kept(
        supervisor: Supervisor) -> None:
    procs = _start(supervisor, {0: "sleep", 1: "exit", 2: "sleep"})

    def judge(exited: Sequence[int], done: Collection[int]) -> tuple[int, ...] | None:
        return tuple(exited) or None

    began = time.perf_counter()
    watched = supervisor.watch(procs, NAMES, timeout_s=60, judge=judge)
    assert watched.verdict == (1,)
    assert time.perf_counter() - began < 30
    supervisor.stop(keep={"a"})          # "a" waits for its next generation
    assert list(supervisor.procs) == ["a"] and procs[0].is_alive()
    assert supervisor.exit_codes == {"b": 3}
    assert _gone([procs[1].pid, procs[2].pid])
    supervisor.stop()
    assert _gone([procs[0].pid])


def test_the_deadline_bounds_a_watch(supervisor: Supervisor) -> None:
    procs = _start(supervisor, {0: "sleep", 1: "sleep"}, world=2)
    with pytest.raises(StageFailure, match=r"^the run did not finish within 1 s$"):
        supervisor.watch(procs, NAMES[:2], timeout_s=1.0)


def test_a_taken_store_port_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # another process may bind the free port between free_port and the store's bind: the
    # launcher takes another one (and gives up, saying why, after STORE_PORT_TRIES)
    import socket

    import runtime.supervisor
    from runtime.supervisor import STORE_PORT_TRIES, LocalJob, free_port

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = int(taken.getsockname()[1])
    ports = iter([busy, free_port()])
    monkeypatch.setattr(runtime.supervisor, "free_port", lambda: next(ports))
    try:
        job = LocalJob(5.0)
        job.close()
        assert job.port != busy
        monkeypatch.setattr(runtime.supervisor, "free_port", lambda: busy)
        with pytest.raises(RuntimeError, match="EADDRINUSE"):
            LocalJob(5.0)
    finally:
        taken.close()
    assert STORE_PORT_TRIES > 1


def test_a_rank_that_reported_and_ended_is_done_not_failed(supervisor: Supervisor) -> None:
    # every rank reports a step and its result, then ends before the watch reads anything:
    # the watch reads their messages before it judges their exits (it read one step, saw
    # the processes gone and the judge blamed a rank whose "ok" was still in its pipe)
    procs = _start(supervisor, {})
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0

    def judge(exited: Sequence[int], done: Collection[int]) -> tuple[int, ...] | None:
        return tuple(exited) or None

    watched = supervisor.watch(procs, NAMES, timeout_s=30, judge=judge)
    assert watched.verdict is None and sorted(watched.done) == [0, 1, 2]
