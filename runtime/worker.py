"""The device process's side of a local job: join with the token, train, report, and (with
recovery) go on into the next generation."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from contracts.allocator import tune_allocator
from runtime import protocol as proto
from runtime.comm import CommFailure
from runtime.heartbeat import process_state
from runtime.memory import freeze_startup
from runtime.results import ResultWriter
from runtime.shaping import CommThreads
from runtime.train import DirectorySource, StageSource, TrainConfig, WorkerResult, train_device
from runtime.trust import join_job

__all__ = ["worker_main", "is_secondary"]

log = logging.getLogger(__name__)


def worker_main(rank: int, world: int, port: int, source: StageSource, config: TrainConfig,
                cgroup: str | None, results: ResultWriter, recovery: Any = None, token: str = "",
                body: Callable[..., WorkerResult] = train_device,
                environ: dict[str, str] | None = None, launcher: int | None = None) -> None:
    """Body of one device process; reports ("step"|"ok"|"error", rank, payload).

    The process first proves the job's ``token`` on the launcher's store
    (``runtime.trust.join_job``) and then uses only the job's prefixed store; a finished
    rank's result travels as ``runtime.protocol.encode_result`` bytes.

    With ``recovery`` (a ``runtime.replication.WorkerSpec``) the process beats,
    checkpoints and replicates through its hooks and joins the process group of its
    generation; when a round fails it reports ("interrupted", (generation, rank), ...),
    hands its state over, and (replay) waits for its place in the next generation. When a
    device leaves gracefully (SIGTERM) every rank reports ("left", (generation, rank), step)
    after that committed step and does the same. ``launcher``: the launcher's process id
    (the worker's parent is the forkserver): the worker ends when it is gone
    ([Note: orphaned workers])."""
    if environ is not None:     # the launcher's, as a spawned process would have it
        os.environ.clear()
        os.environ.update(environ)
    hooks: Any = None
    comm_threads = CommThreads()
    try:
        _exit_with_launcher(launcher)
        torch.set_num_threads(1)
        tune_allocator()
        client = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                               timeout=timedelta(seconds=config.timeout_s))
        store = join_job(client, token, rank, timeout_s=config.timeout_s,
                         where=f"the launcher at 127.0.0.1:{port}")
        if recovery is not None and recovery.mode == "replay":
            from runtime.replication import install_leave_handler

            install_leave_handler()   # SIGTERM: leave gracefully after the current round
        # every import done: later collections skip what exists now (a recovery's
        # new generation then starts without a 0.2 s full collection)
        freeze_startup()
        while True:
            # the process in its CPU group, its communication threads in the group's
            # sibling ([Note: communication threads] in runtime.shaping)
            comm_threads.follow(cgroup)
            group_store: Any = store
            if recovery is not None:
                hooks = recovery.hooks(store, rank, world)
                group_store = dist.PrefixStore(
                    proto.Keys(recovery.generation).process_group(), store)
            dist.init_process_group("gloo", store=group_store, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=config.timeout_s))
            def report(record: dict[str, Any], r: int = rank) -> None:
                results.put(("step", r, record))

            result: WorkerResult | None = None
            try:
                result = body(source, rank, config, hooks=hooks, report=report)
            except Exception as exc:
                if hooks is None:
                    raise
                results.put(("interrupted", (recovery.generation, rank),
                             (f"{type(exc).__name__}: {exc}", is_secondary(exc))))
            if result is None or result.ended_after is not None:
                # outside the except block: the traceback (and with it the failed round's
                # process groups) is released, so destroying the group closes its sockets
                # and unblocks peers still waiting on this rank. A graceful leave ends the
                # generation after a committed round: wake the launcher (it reads the marker)
                if result is not None:
                    results.put(("left", (recovery.generation, rank), result.ended_after))
                assignment = hooks.next_generation()
                if assignment is None:
                    _exit_handed_over(results)
                    return
                rank, world = assignment.rank, assignment.world
                source = DirectorySource(assignment.directory)
                config, recovery = assignment.config, assignment.spec
                cgroup = assignment.cgroup
                continue
            results.put(("ok", rank, proto.encode_result(result)))
            dist.barrier()   # nobody tears its sockets down while a peer still reads
            dist.destroy_process_group()
            if hooks is not None:   # replica channels' threads may still be blocked
                hooks.close()
                _exit_handed_over(results)
            return
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher as data
        results.put(("error", rank, (f"{type(exc).__name__}: {exc}", is_secondary(exc))))
        if hooks is not None:    # threads of replica channels may still run: no teardown
            _exit_handed_over(results, 1)
        raise SystemExit(1) from None
    finally:        # (a process's exit does not wait for the channel's thread)
        results.close()


def _exit_handed_over(results: ResultWriter, code: int = 0) -> None:
    """End a worker whose work is done and handed over (training finished, or told to exit
    after a failure or a graceful leave) with code 0: close its result channel, flush the
    log, then ``os._exit(code)``.
    A normal interpreter exit would destroy torch.distributed objects whose threads (a
    replica channel's send or receive left blocked when the group was shut down) still run,
    which aborts the process ("terminate called without an active exception", code -6)."""
    results.close()     # every message put so far reaches the launcher
    exit_without_teardown(code)


def exit_without_teardown(code: int) -> NoReturn:
    """Flush the log and the standard streams, then ``os._exit(code)``: the process ends
    without the interpreter's teardown (see :func:`_exit_handed_over`)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _exit_with_launcher(launcher: int | None, interval_s: float = 0.5) -> None:
    """End this worker when the launcher dies (so a killed launcher leaves no orphans).

    [Note: orphaned workers]
    A worker's parent is the forkserver (``runtime.supervisor``), not the launcher, and a
    launcher killed with SIGKILL (or, before the CLI handled it, SIGTERM) left the
    forkserver alive: the workers, which watched their parent, trained on for minutes
    (100,000 steps at a third of a core each) under PID 1. Now each watches the launcher
    itself (``launcher``, else its parent) and its parent: when either is gone it ends the
    forkserver too (this job's own, which would otherwise wait forever) and exits."""
    parent = os.getppid()
    watched = launcher if launcher is not None else parent

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):   # (another user's: a reused pid)
            return True
        # (a killed launcher its parent has not reaped yet is a zombie)
        return process_state(pid) in ("gone", "zombie")

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent or gone(watched):
                if os.getppid() == parent and parent != watched:
                    try:        # the forkserver of a dead launcher serves nobody
                        os.kill(parent, signal.SIGTERM)
                    except OSError:
                        pass
                os._exit(70)

    threading.Thread(target=watch, name="asteroid-fx-parent-watch", daemon=True).start()


_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
              "connection closed")


def is_secondary(exc: BaseException) -> bool:
    """Whether ``exc`` is only the echo of another rank's failure (a broken link)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, CommFailure) or any(s in str(seen) for s in _PEER_GONE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


