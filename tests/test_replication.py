"""Tests of runtime.replication: replica traffic through the store, checkpoints, hand-over."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from runtime.checkpoint import checkpoint_file, state_from_bytes
from runtime.emulator import _free_port
from runtime.replication import WorkerSpec, external_holders, held_state, key
from solver.plan import Plan, Stage

PLAN = Plan("m", "c", 4, 2, 2, (Stage((0, 0), ("a",), (2,)), Stage((1, 1), ("b", "c"), (1, 1))))


def test_external_holders_skip_members_of_the_same_stage() -> None:
    replicas = {"a": ("b",), "b": ("c", "a"), "c": ("b",), "x": ("a",)}
    assert external_holders(PLAN, replicas) == {0: ("b",), 1: ("a",)}
    assert external_holders(PLAN, {}) == {0: (), 1: ()}
    assert key(3, "rep", 1, 7) == "rx/3/rep/1/7"


def test_replica_reaches_its_holder_and_the_handoff(tmp_path: Path) -> None:
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True,
                          wait_for_workers=False, timeout=timedelta(seconds=10))
    spec = WorkerSpec(generation=0, mode="replay", plan_version=0, devices=("a", "b", "c"),
                      stages=(0, 1, 1), holders={0: ("b",), 1: ()},
                      checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1)
    sender, holder = spec.hooks(store, 0, 3), spec.hooks(store, 1, 3)
    try:
        assert sender.sends and not holder.sends and holder.held_stages == (0,)
        assert sender.held_stages == ()
        module = nn.Linear(2, 2)
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        sender.restore(module, opt, 0)
        for step in range(3):
            with torch.no_grad():
                module.weight.add_(1.0)
            sender.step_done(step, module, opt)
            sender.step_committed(step, {"step": step, "loss": 0.0})
            holder.step_committed(step, {"step": step})
        assert store.check([key(0, "step", 2)])        # rank 0 publishes committed steps
        assert not store.check([key(0, "rep", 0, 0)])  # the sender drops rounds k-2
        holder.handoff()
        payload = torch.load(io.BytesIO(store.get(key(0, "handoff", 1))), weights_only=False)
        replica = held_state(payload, 0)
        assert replica is not None and replica.step == 2
        assert torch.equal(replica.model["weight"], module.weight.detach())
        assert checkpoint_file(tmp_path / "ckpt", 2, 0, 0).is_file()
        assert not checkpoint_file(tmp_path / "ckpt", 0, 0, 0).is_file()   # pruned
        own = state_from_bytes(sender._committed[1]) if sender._committed else None
        assert own is not None and own.step == 2
        assert sender.stats.bytes_sent > 0 and len(sender.stats.replicate_s) == 3
    finally:
        sender.heartbeat.stop()
        holder.heartbeat.stop()
