"""Tests of runtime.replication: background replicas through the store, checkpoints, hand-over."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from contracts.plan import Plan, Stage
from runtime import protocol as proto
from runtime.checkpoint import checkpoint_file, state_from_bytes
from runtime.emulator import free_port
from runtime.protocol import Handoff, key
from runtime.recovery import resume_point
from runtime.replication import (
    WorkerHooks,
    WorkerSpec,
    abort_connections,
    announce_failure,
    external_holders,
    lower_priority,
)

PLAN = Plan("m", "c", 4, 2, 2, (Stage((0, 0), ("a",), (2,)), Stage((1, 1), ("b", "c"), (1, 1))))


@pytest.fixture()
def store() -> Iterator[dist.TCPStore]:
    yield dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, wait_for_workers=False,
                        timeout=timedelta(seconds=10))


def _wait_for(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _spec(tmp_path: Path, **kw: object) -> WorkerSpec:
    args: dict[str, object] = dict(steps=9,
        generation=0, mode="replay", plan_version=0, devices=("a", "b", "c"), stages=(0, 1, 1),
        holders={0: ("b",), 1: ()}, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1)
    args.update(kw)
    return WorkerSpec(**args)  # type: ignore[arg-type]


def _train(sender: WorkerHooks, holder: WorkerHooks, module: nn.Module,
           opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        module(torch.ones(1, 2)).sum().backward()
        opt.step()
        sender.step_done(step, module, opt)
        sender.step_committed(step, {"step": step, "loss": 0.0})
        holder.step_committed(step, {"step": step})


def test_external_holders_skip_members_of_the_same_stage() -> None:
    replicas = {"a": ("b",), "b": ("c", "a"), "c": ("b",), "x": ("a",)}
    assert external_holders(PLAN, replicas) == {0: ("b",), 1: ("a",)}
    assert external_holders(PLAN, {}) == {0: (), 1: ()}
    assert key(3, "rep", 1, 7) == "rx/3/rep/1/7"


def test_replica_reaches_its_holder_in_the_background(tmp_path: Path,
                                                      store: dist.TCPStore) -> None:
    spec = _spec(tmp_path)
    sender, holder = spec.hooks(store, 0, 3), spec.hooks(store, 1, 3)
    try:
        assert sender.sends and not holder.sends and holder.held_stages == (0,)
        module = nn.Linear(2, 2)
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        sender.restore(module, opt, 0)
        _train(sender, holder, module, opt, range(3))
        sender.flush()
        assert store.check([key(0, "step", 2)])        # rank 0 publishes committed steps
        _wait_for(lambda: 2 in holder.holder.held[0])
        assert sorted(holder.holder.held[0]) == [0, 1, 2]     # the holder keeps the three newest
        # the training thread only copied; sending ran in the background (and no replica
        # went through the store)
        assert len(sender.stats.snapshot_s) == 4 and len(sender.stats.replicate_s) == 3
        assert not store.check([key(0, "rep", 0, 2)])
        assert sender.stats.bytes_sent > 0 and {1, 2} <= set(sender.own_steps())
        own = sender.own_state(2)
        assert torch.equal(own.model["weight"], module.weight.detach())
        # checkpoints, written by the background thread, pruned to the last two
        assert checkpoint_file(tmp_path / "ckpt", 2, 0, 0).is_file()
        assert not checkpoint_file(tmp_path / "ckpt", 0, 0, 0).is_file()
        # on a failure of rank 0 the holder hands its newest replica over
        announce_failure(store, 0, [0], 3)
        _wait_for(lambda: store.check([key(0, "handoff", 1)]))
        payload = proto.get(store, key(0, "handoff", 1), Handoff)
        assert payload.held_names == {0: ("weight", "bias")}
        replica = holder.held_replica(0, 2)
        assert replica is not None and replica.step == 2
        assert torch.equal(replica.model["weight"], module.weight.detach())
        assert torch.equal(replica.optim["weight"]["momentum_buffer"],
                           opt.state[module.weight]["momentum_buffer"])
        assert payload.held_steps == {0: (0, 1, 2)}
        survivor = replace(payload, own_steps=(1, 2))    # (this holder trained no stage)
        assert resume_point(PLAN, {1: survivor}, 2) == 2
        assert resume_point(PLAN, {1: survivor}, 1) == 1
        assert resume_point(PLAN, {1: payload}, 2) is None
    finally:
        sender.close()
        holder.close()


def test_survivor_serves_parts_of_its_own_state(tmp_path: Path, store: dist.TCPStore) -> None:
    spec = _spec(tmp_path, holders={0: (), 1: ()}, checkpoint_dir=None)
    hooks = spec.hooks(store, 0, 3)
    try:
        module = nn.Linear(2, 2)
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        hooks.restore(module, opt, 0)
        for step in range(2):
            with torch.no_grad():
                module.bias.add_(1.0)
            hooks.step_done(step, module, opt)
            hooks.step_committed(step, {"step": step})
        announce_failure(store, 0, [1, 2], 3)
        _wait_for(lambda: store.check([key(0, "handoff", 0)]))
        payload = proto.get(store, key(0, "handoff", 0), Handoff)
        assert {0, 1} <= set(payload.own_steps)
        assert set(payload.own_names) == {"weight", "bias"}
        assert payload.held_steps == {}
        to = proto.Keys(1).restore_part("a", 0)
        proto.put(store, key(0, "want", 0, 0), proto.StateRequest(step=0, to=to,
                                                                  names=("bias",)))
        _wait_for(lambda: store.check([to]))
        part = state_from_bytes(proto.get_bytes(store, to))
        assert part.step == 0 and set(part.model) == {"bias"}
        assert torch.allclose(part.model["bias"], module.bias.detach() - 1.0)
    finally:
        hooks.close()


def _handoff(rank: int, stage: int, own: tuple[int, ...],
             held: dict[int, tuple[int, ...]] | None = None) -> Handoff:
    return Handoff(rank=rank, device="abc"[rank], stage=stage, own_steps=own, own_names=(),
                   held_steps=held or {})


def test_resume_point_is_the_newest_common_step() -> None:
    own = {0: _handoff(0, 0, (4, 5)), 1: _handoff(1, 1, (4, 5))}
    assert resume_point(PLAN, own, 5) == 5
    lagging = {0: _handoff(0, 0, (4, 5), {1: (3, 4)})}
    assert resume_point(PLAN, lagging, 5) == 4
    assert resume_point(PLAN, {0: _handoff(0, 0, (4, 5))}, 5) is None


def test_replicate_every_k_steps(tmp_path: Path, store: dist.TCPStore) -> None:
    spec = _spec(tmp_path, replicate_every=3, checkpoint_dir=None)
    assert [s for s in range(7) if spec.replicates(s)] == [2, 5]
    sender, holder = spec.hooks(store, 0, 3), spec.hooks(store, 1, 3)
    try:
        module = nn.Linear(2, 2)
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        sender.restore(module, opt, 0)
        _train(sender, holder, module, opt, range(5))
        sender.flush()
        assert len(sender.stats.replicate_s) == 1
        _wait_for(lambda: 2 in holder.holder.held[0])
        _train(sender, holder, module, opt, range(5, 9))
        sender.flush()
        # the training thread copied only the replicated steps 2 and 5 and the last one, 8
        # (and the start state); they stay among the own snapshots for a roll-back
        own = sender.own_steps()
        assert {2, 5, 8} <= set(own) and not {0, 1, 3, 4, 6, 7} & set(own)
        assert len(sender.stats.snapshot_s) == 4 and len(sender.snapshots.slots) <= 4
    finally:
        sender.close()
        holder.close()


def test_abort_connections_wakes_a_blocked_receive() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(client.recv(10)), daemon=True)
    reader.start()
    time.sleep(0.05)
    assert reader.is_alive()
    port = client.getsockname()[1]
    assert abort_connections(store_port=port, only_ports={port}) == 0   # the store: kept
    assert abort_connections(store_port=-1, only_ports={port}) == 2   # both ends are ours
    reader.join(timeout=5)
    assert not reader.is_alive() and got == [b""]
    for s in (client, peer, server):
        s.close()


def test_replication_threads_run_at_idle_priority() -> None:
    seen: dict[str, object] = {}

    def body() -> None:
        seen["lowered"] = lower_priority()
        seen["policy"] = os.sched_getscheduler(0)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen["lowered"] is True and seen["policy"] == os.SCHED_IDLE
    assert os.sched_getscheduler(0) != os.SCHED_IDLE     # only the calling thread


def test_handoff_watcher_blocks_and_ends_on_close(tmp_path: Path,
                                                  store: dist.TCPStore) -> None:
    hooks = _spec(tmp_path, holders={0: (), 1: ()}, checkpoint_dir=None).hooks(store, 0, 3)

    def watchers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "asteroid-fx-handoff"]

    try:
        assert watchers()
        hooks.close()
        _wait_for(lambda: not watchers())
        assert not store.check([key(0, "handoff", 0)])   # closed: no hand-over published
    finally:
        hooks.close()
