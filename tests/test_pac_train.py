"""PAC on emulated devices: a forward-only pipeline with hand-off, then cached steps, equal to the
single-process reference."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from asteroid_fx.costs import analytic_costs
from asteroid_fx.finetune import prepare_finetune, reference_finetune, run_finetune
from asteroid_fx.model_spec import load_model_spec
from contracts.cluster import Cluster
from contracts.errors import RuntimeFailure
from contracts.plan import Plan, Stage
from runtime.pac_train import PAC_PLAN_FILE, PacSource, stage_segments
from solver.pac import PacPlan, predict_finetune

TINY_GPT = '''"""A tiny GPT-style decoder for tests."""
import torch
from torch import nn

VOCAB, SEQ, HIDDEN = 50, 8, 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.attn = nn.MultiheadAttention(HIDDEN, 2, batch_first=True)
        self.ffn = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, mask):
        h = self.norm(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + torch.relu(self.ffn(x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.register_buffer("mask", torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1),
                             persistent=False)

    def forward(self, ids):
        x = self.tokens(ids)
        for block in self.blocks:
            x = block(x, self.mask)
        return self.head(x)


def build_model():
    return Tiny()


def sample_batch(batch_size):
    t = torch.randint(0, VOCAB, (batch_size, SEQ + 1))
    return (t[:, :-1],), t[:, 1:]


def loss_fn(out, targets):
    return nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())
'''

CLUSTER = """devices:
  - {name: a, type: local, speed: 0.5, memory_gb: 1}
  - {name: b, type: local, speed: 0.25, memory_gb: 1}
  - {name: c, type: local, speed: 0.25, memory_gb: 1}
network:
  bandwidth_mbps: 1000
"""


PIPELINED_PHASE1 = Plan(model_hash="h", cluster_hash="c", batch_size=6, micro_batch_size=3,
                        num_micro_batches=2, num_layers=3,
                        stages=(Stage((0, 0), ("a",), (3,)),
                                Stage((1, 2), ("b", "c"), (2, 1))))
"""Segment 0 on a, segments 1-2 on b + c (2/1), two micro-batches of 3: a hand-off."""


def prepare_tiny(tmp_path: Path, epochs: int, *, pipelined: bool = False,
                 cache: str = "auto", cache_dtype: str | None = None,
                 cache_store: str = "memory") -> tuple[Any, Cluster, Any, Path, PacPlan, Path]:
    """``(spec, cluster, costs, out, plan, cluster_file)``: the tiny GPT on a, b, c,
    prepared for ``epochs`` epochs of 2 mini-batches of 6 (adapter rank 4); with
    ``pipelined``, phase 1 is :data:`PIPELINED_PHASE1`; ``cache``: the placement mode;
    ``cache_dtype``: the cache's dtype; ``cache_store``: memory, disk or auto, or
    ``mixed``: b and c keep their caches on disk, a in memory."""
    model_file = tmp_path / "tiny.py"
    model_file.write_text(TINY_GPT)
    cluster_file = tmp_path / "c.yaml"
    cluster_file.write_text(CLUSTER)
    spec = load_model_spec(str(model_file))
    cluster = Cluster.from_yaml(cluster_file)
    costs = analytic_costs(spec.build_model(), spec.example_inputs(2)[0], model_name=spec.name)
    out = tmp_path / "pac"
    plan = prepare_finetune(spec, cluster, costs, out, batch_size=6, epochs=epochs,
                            num_samples=12, rank=4, cache=cache, cache_dtype=cache_dtype,
                            cache_store="disk" if cache_store == "mixed" else cache_store)
    if pipelined or cache_store == "mixed":
        plan = replace(plan, phase1=PIPELINED_PHASE1 if pipelined else plan.phase1,
                       cache_disk=("b", "c") if cache_store == "mixed" else plan.cache_disk)
        plan = replace(plan, predicted=predict_finetune(plan, costs, cluster))
        plan.save(out / PAC_PLAN_FILE)
    return spec, cluster, costs, out, plan, cluster_file


def assert_matches_reference(losses: list[float], spec: Any, epochs: int,
                             cache_dtype: str | None = None) -> list[float]:
    """The run's losses equal the single-process reference within 1e-4 relative; returns
    the reference."""
    reference = reference_finetune(spec, batch_size=6, epochs=epochs, num_samples=12, rank=4,
                                   seed=0, lr=0.05, cache_dtype=cache_dtype)
    assert len(losses) == len(reference) == 2 * epochs
    for got, want in zip(losses, reference, strict=True):
        assert abs(got - want) <= 1e-4 * abs(want)
    return reference


@pytest.mark.parametrize("pipelined, cache, cache_dtype, store",
                         [(False, "auto", None, "memory"), (False, "local", None, "memory"),
                          (True, "auto", None, "memory"), (True, "auto", "bfloat16", "mixed")],
                         ids=["planned", "local-cache", "pipeline-handoff",
                              "bfloat16-mixed-disk-cache"])
def test_emulated_pac_equals_the_reference(tmp_path: Path, pipelined: bool, cache: str,
                                           cache_dtype: str | None, store: str) -> None:
    spec, _cluster, _costs, out, plan, cluster_file = prepare_tiny(tmp_path, 2,
                                                                   pipelined=pipelined,
                                                                   cache=cache,
                                                                   cache_dtype=cache_dtype,
                                                                   cache_store=store)
    assert plan.cache_store == ("mixed" if store == "mixed" else "memory")
    if cache_dtype is not None:     # the entries are rounded: half the bytes of float32's
        assert 2 * plan.model.entry_bytes == plan.model.made_bytes
    if cache == "local":
        assert plan.cache == "local"
    if pipelined:
        assert stage_segments(PacSource(str(out)).pac_plan(), 1) == [1, 2]
    metrics = tmp_path / "m.jsonl"
    result = run_finetune(out, cluster_file, seed=0, lr=0.05, metrics=metrics, timeout_s=300)
    reference = assert_matches_reference(result.losses, spec, 2, cache_dtype)
    assert reference[-1] != reference[0]          # the adapters did train
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1, 1, 2, 2]
    assert [r["cache_hit_rate"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    entry = plan.model.entry_bytes
    # every device caches the rows the plan places on it in phase 2 (2 mini-batches)
    held = {d: sum(b - a for a, b in rs) for d, rs in zip(plan.devices, plan.homes(2),
                                                          strict=True)}
    assert rows[-1]["cache_bytes"] == {d: 2 * held[d] * entry for d in plan.devices}
    assert sum(held.values()) == plan.batch_size
    assert all(v > 0 for v in rows[-1]["peak_memory_bytes"].values())
    # a disk cache holds none of its rows in memory: the peak with the cache is the peak
    with_cache, peak = rows[-1]["peak_with_cache_bytes"], rows[-1]["peak_memory_bytes"]
    for d in plan.devices:
        if plan.on_disk(d):
            assert with_cache[d] == peak[d]
        else:
            assert with_cache[d] > 2 * held[d] * entry
    summary = result.summary(plan.steps_per_epoch).splitlines()
    assert [line.split(":")[0].strip() for line in summary if "on disk" in line] == \
        list(plan.cache_disk)
    # epoch-1 rows carry each phase-1 device's forward and sample-making seconds
    p1_devices = set(plan.phase1.devices)
    for r in rows[:2]:
        assert {d for d, v in r["phase1_forward_s"].items() if v > 0} == p1_devices
        assert set(r["phase1_samples_s"]) == set(plan.devices)
        assert r["phase1_s"] > 0
    assert "phase1_forward_s" not in rows[-1]
    # every step carries each device's CPU seconds of its step besides the all-reduce
    for r in rows:
        assert set(r["phase2_cpu_s"]) == set(plan.devices)
        assert all(v > 0 for v in r["phase2_cpu_s"].values())
    # and the result each device's time in the phase-2 all-reduces (epochs 2+)
    assert set(result.allreduce_s) == set(plan.devices)
    assert all(v > 0 for v in result.allreduce_s.values())
    assert PacPlan.load(out / PAC_PLAN_FILE) == plan


@pytest.mark.parametrize("cache", ["auto", "local", "disk"])
def test_a_device_lost_in_phase_2_loses_only_its_share(tmp_path: Path, cache: str) -> None:
    spec, _cluster, _costs, out, plan, cluster_file = prepare_tiny(
        tmp_path, 3, cache="local" if cache == "disk" else cache,
        cache_store="disk" if cache == "disk" else "memory")
    assert set(plan.fallback) == {"a", "b", "c"}
    assert sum(plan.fallback["c"]) == dict(zip(plan.devices, plan.shares, strict=True))["c"]
    metrics = tmp_path / "m.jsonl"
    result = run_finetune(out, cluster_file, seed=0, lr=0.05, metrics=metrics, timeout_s=300,
                          fail="c@3")
    assert_matches_reference(result.losses, spec, 3)
    (event,) = result.recoveries
    assert event["failed"] == ["c"] and event["at_step"] == 3
    rows = [json.loads(line) for line in metrics.read_text().splitlines()
            if '"step"' in line]
    assert [r["step"] for r in rows] == list(range(6))
    after = rows[3]
    assert set(after["cache_bytes"]) == {"a", "b"}
    # only the rows cached on c are recomputed (c's own when the cache is local); c's rows
    # cached on another device reach their new trainer from there
    on_c = sum(b - a for a, b in plan.homes(2)[plan.devices.index("c")])
    assert cache == "auto" or on_c == dict(zip(plan.devices, plan.shares, strict=True))["c"]
    assert after["cache_hit_rate"] == pytest.approx(1 - on_c / 6)
    assert rows[5]["cache_hit_rate"] == 1.0           # mini-batch 1's rows too, by then


def _regroup_worker(rank: int, port: int, results: Any) -> None:
    """One rank of three for ``test_a_survivor_blocked_on_another_survivor_regroups``."""
    import os
    import time
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist

    from runtime.comm import Comm
    from runtime.pac_train import _default_store, _Group, _regroup

    store = dist.TCPStore("127.0.0.1", port, 3, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3,
                            timeout=timedelta(seconds=120))
    comm = Comm(rank, torch.device("cpu"), timeout_s=120)    # holds the group, as in a run
    group = _Group(("a", "b", "c"), (((0, 2),), ((2, 4),), ((4, 6),)), rank, (0, 1, 2))
    pac: Any = SimpleNamespace(devices=("a", "b", "c"), fallback={"c": (1, 1)})
    config: Any = SimpleNamespace(timeout_s=120.0)
    dist.barrier()
    if rank == 2:
        time.sleep(1.0)
        os._exit(1)                 # the lost device
    began = time.perf_counter()
    try:
        # a waits on b, b on c: only b sees c go
        dist.recv(torch.zeros(3), src=rank + 1)
        results.put((rank, {"error": "the receive did not fail"}))
        return
    except RuntimeError:
        failed_s = time.perf_counter() - began
    try:
        fresh, lost, detect_s = _regroup(_default_store(), 1, group, pac, config)
    except RuntimeFailure as exc:
        results.put((rank, {"error": str(exc)}))
        return
    total = torch.ones(1)
    dist.all_reduce(total)          # the survivors' new group works
    results.put((rank, {"lost": lost, "failed_s": failed_s, "detect_s": detect_s,
                        "devices": list(fresh.devices), "sum": float(total)}))
    del comm
    dist.destroy_process_group()


def test_a_survivor_blocked_on_another_survivor_regroups() -> None:
    # the flake "phase 2 lost devices ['a', 'c']" for a run that lost c alone: a waited on
    # b, which saw c go and waited in _regroup for a to announce itself, with its broken
    # group's connections open (a Comm held the group), until DETECT_S ran out
    import time

    from runtime.pac_train import DETECT_S
    from tests.ranks import spawn_ranks

    began = time.perf_counter()
    out, _ = spawn_ranks(_regroup_worker, 3, reports=2, timeout_s=DETECT_S * 2 + 30)
    for rank in (0, 1):
        assert "error" not in out[rank], out
        assert out[rank]["lost"] == ["c"]
        assert out[rank]["devices"] == ["a", "b"]
        assert out[rank]["sum"] == 2.0
        assert out[rank]["detect_s"] < DETECT_S / 3, out
    # a saw the failure through b, long before any timeout
    assert out[0]["failed_s"] < DETECT_S / 3, out
    assert time.perf_counter() - began < DETECT_S


def test_a_device_lost_after_phase_1_in_epoch_1_is_recovered(tmp_path: Path) -> None:
    spec, _cluster, _costs, out, plan, cluster_file = prepare_tiny(tmp_path, 2)
    metrics = tmp_path / "m.jsonl"
    # adapter step 1 of epoch 1: phase 1 has filled the whole cache by then
    result = run_finetune(out, cluster_file, seed=0, lr=0.05, metrics=metrics, timeout_s=300,
                          fail="c@a1")
    assert_matches_reference(result.losses, spec, 2)
    (event,) = result.recoveries
    assert event["phase"] == 2 and event["failed"] == ["c"] and event["at_step"] == 1
    assert event["lost_steps"] == 0 and set(event["rows"]) == {"a", "b"}
    rows = [json.loads(line) for line in metrics.read_text().splitlines()
            if '"step"' in line]
    assert [r["step"] for r in rows] == list(range(4))
    assert [r["phase"] for r in rows] == [1, 1, 2, 2]
    assert set(rows[1]["cache_bytes"]) == {"a", "b"}
    on_c = sum(b - a for a, b in plan.homes(2)[plan.devices.index("c")])
    # c fails in mini-batch 1's step: that step is re-done on a and b, which cache its rows
    # then; mini-batch 0's rows cached on c are recomputed in epoch 2's first step (step
    # 2), and every row of mini-batch 1 hits in step 3
    assert rows[2]["cache_hit_rate"] == pytest.approx(1 - on_c / 6)
    assert rows[3]["cache_hit_rate"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert-small", "llama-small"])
def test_hugging_face_models_equal_the_reference(tmp_path: Path, name: str) -> None:
    pytest.importorskip("transformers")
    cluster_file = tmp_path / "c.yaml"
    cluster_file.write_text(CLUSTER)
    spec = load_model_spec(f"builtin:{name}")
    cluster = Cluster.from_yaml(cluster_file)
    costs = analytic_costs(spec.build_model(), spec.example_inputs(2)[0], model_name=spec.name)
    prepare_finetune(spec, cluster, costs, tmp_path / "pac", batch_size=3, epochs=2,
                     num_samples=3, rank=2)
    result = run_finetune(tmp_path / "pac", cluster_file, seed=0, lr=0.05, timeout_s=600)
    reference = reference_finetune(spec, batch_size=3, epochs=2, num_samples=3, rank=2,
                                   seed=0, lr=0.05)
    for got, want in zip(result.losses, reference, strict=True):
        assert abs(got - want) <= 1e-4 * abs(want)


def test_a_disk_cache_reads_the_rows_asked_for_ahead(tmp_path: Path) -> None:
    from runtime.activation_cache import ActivationCache
    from runtime.pac_train import _ReadAhead

    cache = ActivationCache.on_disk(str(tmp_path))
    cache.put(0, (torch.arange(12.0).reshape(4, 3),))
    ahead = _ReadAhead(cache)
    ahead.post([1, 2])
    got, size = ahead.take([1, 2])
    assert sorted(got) == [1, 2] and size == 2 * 3 * 4
    assert torch.equal(got[2][0], torch.tensor([[6.0, 7.0, 8.0]]))
    assert ahead.take([1, 2]) == ({}, 0)           # taken once
    ahead.post([3])
    assert ahead.take([0, 3]) == ({}, 0)           # asked under another grouping
    ahead.post([0, 9])                             # 9 is not cached: read where needed
    assert sorted(ahead.take([0, 9])[0]) == [0]
    ahead.close()
    in_memory = _ReadAhead(ActivationCache())      # rows in memory are not read ahead
    in_memory.post([0])
    assert in_memory.take([0]) == ({}, 0)
    in_memory.close()


def test_gradients_travel_in_float64_with_the_slots_and_come_back_in_their_dtype() -> None:
    from runtime.pac_train import SLOTS, cat_rows, take_gradients, wire_tensor

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    grads = [torch.randn(3, 2), torch.randn(4)]
    slots = torch.arange(2 * SLOTS, dtype=torch.float64).view(2, SLOTS)
    flat = wire_tensor(grads, slots)
    assert flat.dtype == torch.float64 and flat.numel() == 6 + 4 + 2 * SLOTS
    back = take_gradients(params, flat * 2)            # the sum over two equal ranks
    torch.testing.assert_close(back.view(2, SLOTS), slots * 2)
    for p, g in zip(params, grads, strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, g * 2)
    rows = [(torch.full((1, 2), float(i)), torch.full((1, 3), -float(i))) for i in range(3)]
    a, b = cat_rows(rows)
    assert a[:, 0].tolist() == [0.0, 1.0, 2.0] and b.shape == (3, 3)


def test_phase_1_messages_have_tags_of_their_own() -> None:
    from runtime.comm import message_tag
    from runtime.pac_train import PHASE1_TAG_BASE, phase1_tag

    tags = [phase1_tag(kind, m) for kind in ("act", "tap", "fix") for m in range(512)]
    assert len(set(tags)) == len(tags)            # a receive matches only its message
    assert min(tags) >= PHASE1_TAG_BASE > message_tag("b", 100_000)
    with pytest.raises(RuntimeFailure, match=r"unknown phase-1 channel 'act2'; one of"):
        phase1_tag("act2", 0)


def test_a_frozen_head_is_loaded_when_phase_2_starts(tmp_path: Path) -> None:
    import torch

    from runtime.pac_train import build_device_model, load_head

    _spec, _cluster, _costs, out, plan, _cluster_file = prepare_tiny(tmp_path, 1)
    source = PacSource(str(out))
    everything = list(range(len(plan.model.taps)))
    whole = build_device_model(source, everything)
    late = build_device_model(source, everything, head=False)
    # phase 1 holds no head: only the segments and the adapters
    assert sum(p.numel() for p in late.parameters()) < sum(p.numel() for p in
                                                           whole.parameters())
    load_head(source, late)
    assert not any(p.requires_grad for p in late.head.parameters())
    ids = torch.randint(0, 50, (2, 8))
    entry = whole.backbone(ids)
    assert torch.equal(late.train_forward(entry), whole.train_forward(entry))
