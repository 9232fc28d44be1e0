"""A rank's side of a failure or a leave (see [Note: replication off the critical path] and
[Note: graceful leave] in runtime.replication): publish the hand-over, shut the failed
group's connections, serve the launcher's requests for parts of this rank's state, and wait
for the place in the next generation."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch.distributed as dist

from contracts.errors import ProtocolError
from runtime import protocol as proto
from runtime.checkpoint import header_names, state_to_bytes
from runtime.faults import fault_point
from runtime.replica_transfer import CHANNEL_TIMEOUT, ReplicaHolder
from runtime.snapshots import Snapshots

__all__ = ["Handover", "REQUESTS_WAIT_S", "LEAVE_WAIT_S", "LEAVE_HANDOFF_S"]

log = logging.getLogger(__name__)

#: seconds a survivor waits at most to answer the launcher's requests before moving on
REQUESTS_WAIT_S = 30.0
#: seconds a device that leaves gracefully waits at most for the launcher's answer (its
#: ``exit``) after handing over, before it exits anyway
LEAVE_WAIT_S = 60.0
#: seconds a rank's watcher waits, after a device left, for the training thread's hand-over
LEAVE_HANDOFF_S = 5.0
#: the watcher looks for the launcher's next request after this many seconds, doubling
#: up to ``REQUEST_POLL_MAX_S`` while none comes (see [Note: no polling on a starved host])
REQUEST_POLL_MIN_S = 0.002
REQUEST_POLL_MAX_S = 0.016

# [Note: no polling on a starved host]
# A survivor waiting for its assignment blocks in the store's ``wait`` (the server answers
# when the key is set) instead of polling ``check`` every 2 ms, and its watcher, which must
# also notice when it is closed, looks for the launcher's next request at most every 16 ms
# while none comes (2 ms again right after one): with four survivors the two 2 ms polls
# were some 4000 store requests a second, all served by the launcher's store thread while
# the launcher re-plans, on a host whose CPU a hog or other jobs already take. (A store
# ``wait`` that times out is not used in a loop: c10d logs every timeout.)


def _arrives(store: dist.Store, key: str, timeout: timedelta) -> bool:
    """Whether ``key`` is set within ``timeout`` (a blocking wait, no polling)."""
    try:
        store.wait([key], timeout)
        return True
    except RuntimeError:      # DistStoreError: timed out
        return False


class Handover:
    """Hand-over of one rank in one generation. In replay mode (``watch``) a watcher thread
    ("asteroid-fx-handoff") blocks on the rank's wake key; on ``recover`` it publishes the
    hand-over, shuts the failed group's connections down (``abort``) and then serves the
    launcher's requests until ``closed`` and every announced request is answered."""

    def __init__(self, *, store: dist.Store, keys: proto.Keys, rank: int, device: str,
                 stage: int, stages: Sequence[int], snapshots: Snapshots,
                 holder: ReplicaHolder, closed: threading.Event, start_step: int,
                 abort: Callable[[], int], watch: bool) -> None:
        self.store = store
        self.keys = keys
        self.rank = rank
        self.device = device
        self.stage = stage
        self.stages = tuple(stages)
        self.snapshots = snapshots
        self.holder = holder
        self.start_step = start_step
        self._closed = closed
        self._abort_connections = abort
        self.lock = threading.Lock()
        self.handed = False
        self.left = False          # left the group: a late watcher must not abort later ones
        self.leaving = False       # this device leaves (graceful, SIGTERM)
        self.served = 0            # requests answered by the watcher
        self.serve_until = 0       # requests announced by the launcher
        if watch:
            self._watch_store = proto.clone_store(store)
            threading.Thread(target=self._watch, name="asteroid-fx-handoff",
                             daemon=True).start()

    def publish(self, store: dist.Store | None = None) -> None:
        """Publish (once) which own steps this rank keeps and the replicas it holds of the
        stages that lost every device."""
        store = store or self.store
        with self.lock:
            if self.handed:
                return
            self.handed = True
        last = self.snapshots.last_committed()
        failed_step = last + 1 if last is not None else self.start_step
        fault_point("recovery", self.device, failed_step)   # tests only: runtime.faults
        notice = proto.get_if_present(store, self.keys.recover(), proto.RecoverNotice)
        failed = set() if notice is None else set(notice.failed)
        ranks_of: dict[int, set[int]] = {}
        for r, s in enumerate(self.stages):
            ranks_of.setdefault(s, set()).add(r)
        self.holder.settle({s for s in self.holder.stages if ranks_of[s] <= failed})
        held_steps: dict[int, tuple[int, ...]] = {}
        held_names: dict[int, tuple[str, ...]] = {}
        for stage, have in self.holder.steps().items():
            if have:
                held_steps[stage] = tuple(sorted(have))
                held_names[stage] = tuple(header_names(have[max(have)].header))
        proto.put(store, self.keys.handoff(self.rank), proto.Handoff(
            rank=self.rank, device=self.device, stage=self.stage,
            own_steps=tuple(self.snapshots.own_steps()),
            own_names=self.snapshots.newest_names(), held_steps=held_steps,
            held_names=held_names))

    def abort(self) -> None:
        """Shut the failed group's connections down (not after this rank left it)."""
        with self.lock:
            if self.left:
                return
            count = self._abort_connections()
        log.debug("rank %d shut down %d connection(s) of the failed group", self.rank, count)

    def mark_left(self) -> None:
        with self.lock:
            self.left = True

    def serving(self) -> bool:
        """Whether the watcher still has announced requests to answer."""
        return self.served < self.serve_until

    def _watch(self) -> None:
        """Replay: on ``recover`` hand over and abort the old group's connections; then serve
        the launcher's requests for parts of this rank's own state."""
        store = self._watch_store
        try:
            # blocks without polling until the launcher or close() sets the wake key
            store.wait([self.keys.wake(self.rank)], CHANNEL_TIMEOUT)
            if self._closed.is_set() or not store.check([self.keys.recover()]):
                return
            if int(store.add(self.keys.left_count(), 0)) > 0:
                # a graceful leave: the training thread hands over itself once it has
                # committed the leaver's last step (a hand-over from here could come first
                # and miss that step); wait for it, bounded
                until = time.monotonic() + LEAVE_HANDOFF_S
                while (not self.handed and not self._closed.is_set()
                       and time.monotonic() < until):
                    time.sleep(0.002)
                if not self.handed:
                    log.warning("rank %d (%s): a device left, but this rank did not hand over "
                                "within %.0f s; handing over what it has", self.rank,
                                self.device, LEAVE_HANDOFF_S)
            self.publish(store)
            self.abort()
            until = float("inf")
            pause = REQUEST_POLL_MIN_S
            # after close(), go on until every request the launcher announced is answered
            while not self._closed.is_set() or (self.served < self.serve_until
                                                and time.monotonic() < until):
                if self._closed.is_set() and until == float("inf"):
                    until = time.monotonic() + REQUESTS_WAIT_S
                want = self.keys.want(self.rank, self.served)
                request = proto.get_if_present(store, want, proto.StateRequest)
                if request is None:
                    time.sleep(pause)
                    pause = min(REQUEST_POLL_MAX_S, 2 * pause)
                    continue
                if not self.keys.is_answer_key(request.to):
                    raise ProtocolError(f"store key {want!r}: a request to write to "
                                        f"{request.to!r}, which is not an answer key")
                proto.put_bytes(store, request.to, self.answer(request))
                self.served += 1
                pause = REQUEST_POLL_MIN_S
        except ProtocolError as exc:
            log.error("rank %d (%s) stops serving the launcher: %s", self.rank, self.device,
                      exc)
        except Exception as exc:  # noqa: BLE001 - the launcher went away
            log.debug("rank %d: hand-over watcher ends: %s", self.rank, exc)

    def answer(self, request: proto.StateRequest) -> bytes:
        """Bytes of a held replica (``request.held``: the stage) or of part of this rank's
        own snapshot (``request.names``; all names when None) of ``request.step``."""
        if request.held is not None:
            return self.holder.held[request.held][request.step].to_bytes()
        names = None if request.names is None else list(request.names)
        return state_to_bytes(self.snapshots.own_state(request.step, names))

    def announce_waiting(self) -> None:
        """Tell the launcher that this rank left the failed round and waits
        (``rx/<g>/waiting/<rank>``)."""
        proto.put(self.store, self.keys.waiting(self.rank), proto.Waiting(self.rank))

    def await_assignment(self, limit_s: float, close: Callable[[], None]
                         ) -> proto.Assignment | None:
        """Wait (after ``announce_waiting``) for this rank's assignment in the next
        generation or its exit order (then, before ``close``, answer every request
        announced for this rank's state); None: exit."""
        wanted = self.keys.next(self.device)
        if self.leaving:
            limit_s = min(limit_s, LEAVE_WAIT_S)
        if not _arrives(self.store, wanted, timedelta(seconds=limit_s)):
            if self.leaving:
                log.warning("device %s left, but the launcher did not collect its state "
                            "within %.0f s: exiting anyway", self.device, limit_s)
                close()
            return None
        assignment = proto.get(self.store, wanted, proto.Assignment, proto.ExitOrder)
        # the watcher answers every request for this rank's state before it stops; a
        # process that leaves waits for that, one that goes on does not
        self.serve_until = assignment.requests
        if isinstance(assignment, proto.ExitOrder):
            until = time.monotonic() + REQUESTS_WAIT_S
            while self.served < self.serve_until and time.monotonic() < until:
                time.sleep(0.002)
            if self.served < self.serve_until:
                log.warning("device %s answered %d of %d request(s) for its state within "
                            "%.0f s; exiting", self.device, self.served, self.serve_until,
                            REQUESTS_WAIT_S)
            elif self.leaving:
                log.info("device %s handed its state over (%d request(s)) and exits",
                         self.device, self.served)
        close()
        return None if isinstance(assignment, proto.ExitOrder) else assignment
