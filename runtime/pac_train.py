"""One device of a PAC fine-tuning run: forward-only pipeline and cache fill, then adapter steps.

[Note: PAC run]
Every device loads the saved backbone segments of its phase-1 stage only, the head, and
the adapters' initial weights (``adapters.weights.pt``). For epoch ``e`` and mini-batch
``k`` (global step ``e * steps + k``):

* phase 1 (epoch 1, every mini-batch ``k`` before any adapter step): the devices of
  phase-1 stage ``s`` take their rows of each micro-batch (stage 0 makes them from the
  samples, [Note: fine-tuning data]; later stages receive them, re-sharded as
  ``runtime.lowering.transfers`` says), run their segments under ``torch.no_grad``, pass
  the cut on, and then send each cache-entry part (their taps; the last stage: the head's
  inputs) to the device that caches those rows in phase 1 (the trainer, or where the plan
  parks them, [Note: cache placement] in solver/pac.py; parked rows go to their phase-2
  holder when phase 1 ends, ``_rehome``). Each micro-batch's entry parts go as soon as
  it is computed, and every message has a tag of its own (``phase1_tag``: its kind and
  micro-batch), so a receive matches only its own message whatever the order of the
  asynchronous sends, and nothing waits for a send before the mini-batch ends (no
  deadlock). A stage waits for its cut pieces of two micro-batches ago before it sends
  the next (the next stage takes them in its forward, which waits for nothing else), so
  their wire buffers serve again, and a receive copies out of its buffer, which the
  sender's next message of that size reuses; only the entry parts' sends are held until
  the mini-batch ends (the owners take them after their own forward). Before 2026-12-05
  the entry parts of a whole mini-batch waited for its last activation as tensors, and
  every micro-batch had wire buffers of its own (6.4 MiB on ``fast`` of local3, see
  docs/finetune.md). When the
  cache holds the whole epoch, every device drops its backbone segments
  (``AdapterModel.drop_backbone``) and loads the head (a frozen head is not needed
  before): the frozen weights and the adapter steps' activations are never held at once,
  so a device's peak is the larger of the two, not their sum. The losses are those of
  interleaving (the backbone is frozen); step ``k`` of epoch 1 reports phase-1 mini-batch
  ``k``'s time with it.
* phase 2 (every step): the rows ``[lo, hi)`` of the mini-batch that this device trains on
  come from its cache, or from the device that caches them (``_Fetch``: sent a step ahead
  over the process group; hits either way; in epoch 1 all rows count as misses, computed
  by phase 1); the side
  path and head run forward and backward on them with the loss weighted by
  ``(hi - lo) / B``, the adapter gradients are summed over all devices
  (``Comm.all_reduce``), and every device takes the same optimizer step. So the losses
  equal single-process training of the same adapter model on the whole mini-batch.

[Note: PAC recovery]
A device lost in phase 2 loses only its share. The step's one collective fails on the
survivors; each announces itself under a new generation key in the launcher's store,
waits up to ``DETECT_S`` for the others, and the survivors start a new process group on
that prefix (one failure at a time). Everyone keeps the rows it trained on (and their
cache entries); the lost device's rows of every mini-batch are split between the others
as the plan's ``fallback`` says (made by the planner for every device: Algorithm 1 over
the fastest others, capped by the memory their own caches leave). Those rows are cache
misses once, recomputed through the whole frozen backbone (loaded from the package on
first need) and cached. The interrupted step is redone from its start (no optimizer step
was taken: the failure surfaces in the step's all-reduce), so no step is lost and the
losses still equal the reference. A ``{"event": "recovery", "phase": 2, ...}`` row goes
to the metrics.

A device lost in phase 1 is recovered too ([Note: PAC phase-1 recovery] in
runtime.pac_recovery): phase 1 runs under a watcher that shuts the group's connections
down when the loss is announced, so no survivor stays blocked on another; the survivors
take the launcher's new phase-1 plan (the runtime never plans), start a group of their
own, load the segments of their new stage, keep every cache entry they hold, recompute
the lost device's rows of the mini-batches already done (only the micro-batches that hold
them run, and only those rows are handed over, on ``fix<m>`` channels), redo the
interrupted mini-batch and the rest of the epoch on the new plan, and phase 2 runs
without the lost device (its rows split as the ``fallback`` says). The hand-off sends one
message per owner and micro-batch, so an owner of several row ranges (after a loss) gets
its rows of a micro-batch together. A ``{"event": "recovery", "phase": 1, ...}`` row goes
to the metrics. One lost device per run (in either phase).

Rank 0 writes one metrics row per step: ``phase``, ``loss``, ``round_time_s`` (and its
phase-1 and phase-2 parts, the slowest device each), the cache hit rate of the step and
the bytes cached per device.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Tuple

import torch
import torch.distributed as dist
from torch import nn

from contracts.errors import RuntimeFailure
from contracts.inputs import model_inputs
from contracts.pac_plan import PacPlan
from contracts.plan import Plan, Stage
from runtime.activation_cache import ActivationCache, DiskRows, Row
from runtime.adapter_model import AdapterModel
from runtime.comm import Comm
from runtime.comm import CommFailure as CommFailureError
from runtime.lowering import transfers
from runtime.memory import saved_storages, storage_bytes
from runtime.pac_recovery import (
    DONE_KEY,
    KILLED_KEY,
    NOTICE_POLL_S,
    FailSpec,
    notice_key,
    parse_fail,
    read_record,
)
from runtime.pacing import pace
from runtime.protocol import store_port
from runtime.replication import abort_connections
from runtime.samples import SampleSource
from runtime.train import (
    TrainConfig,
    WorkerResult,
    compute_scale,
    make_optimizer,
    pace_speed,
    resolve_loss_fn,
)

__all__ = ["PacSource", "finetune_device", "build_device_model", "load_head", "stage_segments",
           "cat_rows", "wire_tensor", "take_gradients", "SLOTS", "BACKBONE_DIR", "PAC_PLAN_FILE",
           "LAYOUT_FILE", "ADAPTERS_FILE"]

log = logging.getLogger(__name__)

BACKBONE_DIR = "backbone"
PAC_PLAN_FILE = "pac_plan.json"
LAYOUT_FILE = "pac.json"
ADAPTERS_FILE = "adapters.weights.pt"


@dataclass(frozen=True)
class PacSource:
    """A saved PAC directory (``asteroid-fx finetune --out DIR``): ``backbone/`` (the
    segments and the head as a stage package), ``pac_plan.json``, ``pac.json`` and
    ``adapters.weights.pt``."""

    directory: str
    #: "DEVICE@STEP": that device's process exits at the start of global step STEP (an
    #: emulated loss: in epoch 1 at phase-1 mini-batch STEP, see [Note: PAC phase-1
    #: recovery] in runtime.pac_recovery; later in phase 2, see [Note: PAC recovery])
    fail: str | None = None

    def pac_plan(self) -> PacPlan:
        return PacPlan.load(Path(self.directory) / PAC_PLAN_FILE)

    def load_plan(self) -> Plan:
        """A one-stage ``Plan`` over the run's devices in rank order (what the emulator
        needs to shape them)."""
        pac = self.pac_plan()
        return Plan(model_hash=pac.model_hash, cluster_hash=pac.cluster_hash,
                    batch_size=pac.batch_size, micro_batch_size=pac.batch_size,
                    num_micro_batches=1,
                    stages=(Stage((0, 0), pac.devices, pac.shares),))

    def model_module(self) -> Any:
        """The model file's functions (``sample_batch``, ``loss_fn``, ``dataset`` ...): the
        copied module, or the ``ModelSpec`` of a built-in or a ``file.py:prefix`` spec."""
        from runtime.stage_io import model_namespace

        return model_namespace(Path(self.directory) / BACKBONE_DIR)

    def load_stage(self, index: int) -> nn.Module:
        from runtime.stage_io import load_stage

        return load_stage(Path(self.directory) / BACKBONE_DIR, index)

    def layout(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((Path(self.directory) / LAYOUT_FILE).read_text())
        return data

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        weights: dict[str, torch.Tensor] = torch.load(Path(self.directory) / ADAPTERS_FILE,
                                                      weights_only=True)
        return weights


def build_device_model(source: PacSource, segments: Sequence[int],
                       head: bool = True) -> AdapterModel:
    """The adapter model with only ``segments`` of the backbone loaded (the others are
    placeholders), the head (without ``head``: a placeholder, :func:`load_head` later),
    and the adapters' initial weights."""
    layout = source.layout()
    k = len(layout["taps"])
    parts: list[nn.Module] = [source.load_stage(j) if j in segments else nn.Identity()
                              for j in range(k)]
    model = AdapterModel.from_parts(parts, source.load_stage(k) if head else nn.Identity(),
                                    layout)
    model.load_state_dict(source.adapter_weights(), strict=False)
    return model


def load_head(source: PacSource, model: AdapterModel) -> None:
    """Load the (frozen) head into a model built without it (phase 1 never runs the head:
    a device loads it when phase 2 starts and its backbone segments are gone)."""
    model.set_head(source.load_stage(len(model.taps)))


def stage_segments(pac: PacPlan, rank: int) -> list[int]:
    """The backbone segments rank ``rank`` runs in phase 1 (none when it has no stage)."""
    me = pac.devices[rank]
    if me not in pac.phase1.devices:
        return []
    stage = pac.phase1.stages[pac.phase1.stage_of(me)]
    return list(range(stage.first, stage.last + 1))


def cat_rows(pieces: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Tensors of several rows (or row ranges) of one structure concatenated along
    dimension 0: a phase-2 step's entry from its cache rows, a cut from its pieces."""
    return tuple(torch.cat([p[i] for p in pieces], dim=0) for i in range(len(pieces[0])))


def wire_tensor(grads: Sequence[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
    """A phase-2 step's one all-reduce tensor: every trainable gradient in float64, then
    the metrics ``slots`` ([Note: PAC run])."""
    return torch.cat([g.reshape(-1).double() for g in grads] + [slots.reshape(-1)])


def take_gradients(params: Sequence[torch.Tensor], flat: torch.Tensor) -> torch.Tensor:
    """Set every parameter's gradient from the summed :func:`wire_tensor` (in its own
    dtype); returns the slots part."""
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
    return flat[offset:]


class _Phase1:
    """This rank's part of the forward-only pipeline ``plan`` among the members of ``group``
    (see [Note: PAC run]); the cache-entry parts go to the members that train on the rows
    (``group.homes``: the trainers' rows, or the devices the plan parks them on, which
    after a lost device are more than one range per member)."""

    def __init__(self, plan: Plan, group: _Group, model: AdapterModel, comm: Comm,
                 samples: SampleSource, batch_size: int, scale: float = 1.0,
                 paced: float = 1.0) -> None:
        self.plan, self.group, self.model, self.comm = plan, group, model, comm
        self.samples, self.batch_size, self.scale = samples, batch_size, scale
        self.pace = paced
        self.rank = group.rank
        #: seconds of the last :meth:`run`: this rank's segments (dilation included) and
        #: making its samples (stage 0)
        self.compute_s = 0.0
        self.samples_s = 0.0
        #: CPU seconds of this rank's segments in the last run (not stretched by a CPU cap
        #: or by other jobs waiting for the core: what the cost table measured)
        self.compute_cpu_s = 0.0
        #: the most bytes of activations this rank held at once in phase 1 (received
        #: inputs, outputs, entry parts waiting for their owner or for the cache, and the
        #: wire buffers of its messages), and the most with the cache entries it held at
        #: that moment
        self.in_flight_peak = 0
        self.cached_peak = 0
        self.rank_of = {d: i for i, d in enumerate(group.devices)}
        me = group.devices[group.rank]
        self.stage = plan.stage_of(me) if me in plan.devices else None
        self.global_of = [self.rank_of[d] for d in plan.devices]

    def _my_rows(self, stage: int, device: str, m: int) -> tuple[int, int]:
        lo, hi = self.plan.stages[stage].sample_ranges()[device]
        mb = self.plan.micro_batch_size
        return m * mb + lo, m * mb + hi

    def micro_batches(self, wanted: Sequence[tuple[int, int]] | None) -> list[int]:
        """The micro-batches that hold any of the ``wanted`` rows (all without)."""
        mb = self.plan.micro_batch_size
        return [m for m in range(self.plan.num_micro_batches)
                if wanted is None or any(max(a, m * mb) < min(b, (m + 1) * mb)
                                         for a, b in wanted)]

    def segments_for(self, lo: int, hi: int, owner: int,
                     wanted: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
        """The row ranges of ``[lo, hi)`` that ``owner`` trains on (and that are
        ``wanted``), in the order both the sender and the owner walk them."""
        out = []
        for o_lo, o_hi in self.group.homes[owner]:
            a, b = max(lo, o_lo), min(hi, o_hi)
            for w_lo, w_hi in ((a, b),) if wanted is None else wanted:
                c, d = max(a, w_lo), min(b, w_hi)
                if c < d:
                    out.append((c, d))
        return out

    def run(self, step: int, cache: ActivationCache,
            wanted: Sequence[tuple[int, int]] | None = None) -> None:
        """Run this rank's stage on mini-batch ``step``, hand the entry parts over, and put
        this rank's rows of it into ``cache``. With ``wanted`` (row ranges of the
        mini-batch) only the micro-batches that hold them run, and only those rows are
        handed over and cached (the lost device's rows, [Note: PAC phase-1 recovery])."""
        local: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.compute_s = self.samples_s = self.compute_cpu_s = 0.0
        channel = "tap" if wanted is None else "fix"
        if self.stage is not None:
            self._forward(self.stage, step, local, wanted, channel, cache)
        self._collect(step, local, cache, wanted, channel)

    def _note(self, held: Sequence[torch.Tensor], cache: ActivationCache) -> None:
        """Count what this rank holds now: ``held`` (activations, entry parts), the wire
        buffers, and (for the peak with the cache) the entries cached so far."""
        now = storage_bytes(list(held) + self.comm.held())
        self.in_flight_peak = max(self.in_flight_peak, now)
        self.cached_peak = max(self.cached_peak, now + cache.resident_bytes)

    def _forward(self, s: int, step: int, local: dict[tuple[int, int], tuple[torch.Tensor, ...]],
                 wanted: Sequence[tuple[int, int]] | None, channel: str,
                 cache: ActivationCache) -> None:
        plan = self.plan
        stage = plan.stages[s]
        me = self.group.devices[self.rank]
        batch_start = step * self.batch_size
        incoming = [] if s == 0 else sorted(
            (t for t in transfers(plan, s - 1) if self.global_of[t.dst] == self.rank),
            key=lambda t: t.start)
        outgoing = [] if s == plan.num_stages - 1 else [
            t for t in transfers(plan, s) if self.global_of[t.src] == self.rank]
        last_segment = len(self.model.taps) - 1
        sent: list[tuple[str, int]] = []     # keys of the cut pieces sent, in order
        for m in self.micro_batches(wanted):
            # the cut pieces sent two micro-batches ago have been taken (the next stage
            # waits for nothing but cut pieces in its forward): their buffers serve again
            self.comm.release(sent[:-1])
            del sent[:-1]
            lo, hi = self._my_rows(s, me, m)
            values: tuple[torch.Tensor, ...]
            if s == 0:
                making = time.perf_counter()
                inputs, _ = self.samples.rows(batch_start + lo, batch_start + hi)
                values = model_inputs(inputs)
                self.samples_s += time.perf_counter() - making
            else:
                got = self.comm.recv([self.global_of[t.src] for t in incoming], "act",
                                     tag=phase1_tag("act", m))
                values = cat_rows(got)
            taps = []
            computing, cpu = time.perf_counter(), time.thread_time()
            for j in range(stage.first, stage.last + 1):
                values, tap = self.model.run_segment(j, values)
                taps.append(tap)
            self.compute_cpu_s += time.thread_time() - cpu
            _dilate(computing, self.scale)       # the compute only, not the waits
            pace(computing, cpu, self.pace)
            self.compute_s += time.perf_counter() - computing
            part = self.model.cache_entry(taps, values) if stage.last == last_segment \
                else self.model.to_cache(taps)
            for t in outgoing:
                a, b = t.start - (lo - m * plan.micro_batch_size), \
                    t.stop - (lo - m * plan.micro_batch_size)
                self.comm.send([(self.global_of[t.dst], [v[a:b] for v in values])], "act",
                               key=("act", m), tag=phase1_tag("act", m))
            if outgoing:
                sent.append(("act", m))
            handoff: list[tuple[int, tuple[torch.Tensor, ...]]] = []
            for owner in range(self.group.world):
                pieces = self.segments_for(lo, hi, owner, wanted)
                if not pieces:
                    continue     # one message per owner: its rows of this micro-batch
                if owner == self.rank:     # its own storage: the cache keeps only these
                    local[(s, m)] = tuple(torch.cat([v[a - lo:b - lo] for a, b in pieces])
                                          for v in part)
                elif len(pieces) == 1:     # views: the send copies them into its buffer
                    a, b = pieces[0]
                    handoff.append((owner, tuple(v[a - lo:b - lo] for v in part)))
                else:
                    handoff.append((owner, tuple(torch.cat([v[a - lo:b - lo]
                                                            for a, b in pieces])
                                                 for v in part)))
            self._note([t for rows in local.values() for t in rows]
                       + [t for _o, rows in handoff for t in rows] + list(values) + list(part)
                       + taps, cache)
            # each micro-batch's entry parts go at once (their own tags: no order to keep,
            # [Note: PAC run]); the send copies them into its wire buffer, held until the
            # mini-batch ends (the owner takes them after its own forward)
            for owner, rows in handoff:
                self.comm.send([(owner, list(rows))], f"{channel}{_count(rows)}",
                               tag=phase1_tag(channel, m))

    def _collect(self, step: int, local: dict[tuple[int, int], tuple[torch.Tensor, ...]],
                 cache: ActivationCache, wanted: Sequence[tuple[int, int]] | None,
                 channel: str) -> None:
        parts: dict[int, list[torch.Tensor]] = {}      # row -> its entry, stage by stage
        for s, stage in enumerate(self.plan.stages):
            for m in self.micro_batches(wanted):
                for device in stage.devices:
                    lo, hi = self._my_rows(s, device, m)
                    pieces = self.segments_for(lo, hi, self.rank, wanted)
                    if not pieces:
                        continue
                    sender = self.rank_of[device]
                    if sender == self.rank:
                        got = local.pop((s, m))
                    else:     # a copy: the wire buffer goes back to its pool at once
                        got = tuple(self.comm.recv(
                            [sender], f"{channel}{sum(b - a for a, b in pieces)}",
                            tag=phase1_tag(channel, m))[0])
                    offset = 0
                    for a, b in pieces:
                        for i in range(a, b):
                            row = offset + i - a
                            parts.setdefault(i, []).extend(t[row:row + 1] for t in got)
                        offset += b - a
        start = step * self.batch_size
        # this mini-batch's rows, whole, before the cache takes them (a disk cache then
        # holds none of them in memory)
        self._note([t for entry in parts.values() for t in entry], cache)
        for i, entry in parts.items():
            cache.put(start + i, tuple(entry))
        # the entries of this mini-batch are in the cache now, with the wire buffers
        self._note([], cache)
        self.comm.flush()


def phase1_tag(channel: str, microbatch: int) -> int:
    """The tag of phase 1's message of ``channel`` (``act``: a cut piece; ``tap``: an entry
    part for its owner; ``fix``: a recomputed one after a loss) for ``microbatch``: one of
    its own per message kind and micro-batch, above the pipeline's
    (``runtime.comm.message_tag``), so that a receive matches only its message whatever
    the order of the sends ([Note: PAC run])."""
    kinds = ("act", "tap", "fix")
    if channel not in kinds:
        raise RuntimeFailure(f"unknown phase-1 channel {channel!r}; one of {kinds}")
    return PHASE1_TAG_BASE + len(kinds) * microbatch + kinds.index(channel)


PHASE1_TAG_BASE = 1 << 28
"""Tags of phase 1's messages start here (the pipeline's ``message_tag`` are ``2**20 +
2 m``)."""


def _count(rows: Sequence[torch.Tensor]) -> int:
    return int(rows[0].shape[0])


SLOTS = 12  # per rank in a phase-2 step's all-reduce: loss, hits, misses, phase 1 s,
#             phase 2 s, peak bytes, cache bytes, peak bytes with the cache, phase-1
#             forward s, phase-1 samples s, phase-1 forward CPU s, phase-2 CPU s


def _dilate(began: float, scale: float) -> None:
    """Time dilation of the emulator (speed < 1 without cgroups): sleep (scale - 1) x the
    compute just done."""
    if scale > 1.0:
        time.sleep((scale - 1.0) * (time.perf_counter() - began))


Ranges = Tuple[Tuple[Tuple[int, int], ...], ...]


def _runs(rows: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Sorted row indices as half-open ranges of consecutive rows."""
    out: list[tuple[int, int]] = []
    for i in sorted(rows):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return tuple(out)


def _members(ranges: Sequence[tuple[int, int]]) -> list[int]:
    return [i for a, b in ranges for i in range(a, b)]


@dataclass
class _Group:
    """The devices of the current generation and this rank's place in it;
    ``ranges[i]``: the row ranges of every mini-batch that member ``i`` trains on;
    ``homes[i]``: those whose cache entries it holds now (phase 1: where the hand-off
    goes; phase 2: what it streams to their trainers); ``later[i]``: those it holds in
    phase 2 (the plan's ``homes(2)``; see [Note: cache placement] in solver/pac.py)."""

    devices: tuple[str, ...]
    ranges: Ranges
    rank: int
    old_ranks: tuple[int, ...]        # rank in the launch of every member
    homes: Ranges = ()
    later: Ranges = ()

    def __post_init__(self) -> None:
        self.homes = self.homes or self.ranges
        self.later = self.later or self.homes

    @property
    def world(self) -> int:
        return len(self.devices)

    def rows(self, batch_size: int, step: int) -> list[int]:
        """Global sample indices this rank trains on in mini-batch ``step``."""
        return [step * batch_size + i for a, b in self.ranges[self.rank] for i in range(a, b)]

    def trainer_of(self, row: int) -> int:
        return next(m for m, rs in enumerate(self.ranges) if any(a <= row < b for a, b in rs))

    def without(self, lost: str, extra: Sequence[int]) -> _Group:
        """The group after ``lost`` (``rank`` and ``old_ranks`` still this group's): its
        rows go to the others, ``extra[i]`` each (in member order), everyone keeps the rows
        it had, and rows cached on ``lost`` (now or in phase 2) are cached by their new
        trainer (they are recomputed there: [Note: PAC recovery])."""
        index = self.devices.index(lost)
        lost_rows = _members(self.ranges[index])
        devices, ranges, taken = [], [], 0
        for device, own, more in zip((d for d in self.devices if d != lost),
                                     (r for i, r in enumerate(self.ranges) if i != index),
                                     extra):
            rows = lost_rows[taken:taken + more]
            taken += more
            devices.append(device)
            ranges.append(own + ((rows[0], rows[-1] + 1),) if rows else own)
        new = _Group(tuple(devices), tuple(ranges), 0, ())

        def moved(homes: Ranges) -> Ranges:
            held: list[list[int]] = [[] for _ in devices]
            for m, rs in enumerate(homes):
                for i in _members(rs):
                    held[new.trainer_of(i) if m == index else
                         devices.index(self.devices[m])].append(i)
            return tuple(_runs(h) for h in held)

        return _Group(tuple(devices), tuple(ranges), self.rank, self.old_ranks,
                      moved(self.homes), moved(self.later))


def _within(ranges: Sequence[tuple[int, int]], held: Sequence[tuple[int, int]]) -> list[int]:
    """Rows of ``ranges`` (in their order) that lie in ``held``."""
    return [i for i in _members(ranges) if any(a <= i < b for a, b in held)]


def _split(tensors: Sequence[torch.Tensor], count: int) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t[i:i + 1] for t in tensors) for i in range(count)]


def _rehome(group: _Group, comm: Comm, cache: ActivationCache, batch: int, steps: int
            ) -> tuple[_Group, int]:
    """When phase 1 ends: hand every cache entry this device holds for another phase-2
    holder to it and take those parked elsewhere for this device (``group.homes`` ->
    ``group.later``; [Note: cache placement] in solver/pac.py), one message per pair and
    mini-batch. Returns the group in its phase-2 placement and the most bytes of entries
    and wire buffers held at once on the way."""
    if group.homes == group.later:
        return group, cache.resident_bytes
    me = group.rank
    peers = [m for m in range(group.world) if m != me]
    out = {m: _within(group.homes[me], group.later[m]) for m in peers}
    into = {m: _within(group.homes[m], group.later[me]) for m in peers}
    most = cache.resident_bytes
    for k in range(steps):
        base = k * batch
        gone = [base + i for rows in out.values() for i in rows]
        for m, rows in out.items():      # the send copies the rows into its wire buffer
            if rows:
                comm.send([(m, list(cat_rows([cache.rows[base + i] for i in rows])))], "rehome")
        cache.drop(gone, [base + i for i in range(batch) if base + i not in gone])
        for m, rows in into.items():
            if rows:
                got = comm.recv([m], "rehome")[0]
                for i, row in zip(rows, _split(got, len(rows))):
                    cache.put(base + i, row)
        most = max(most, cache.resident_bytes + storage_bytes(comm.held()))
        comm.flush()
    return replace(group, homes=group.later), most


class _ReadAhead:
    """Phase 2 with the cache on disk: the next step's rows are read in a thread while this
    step computes and all-reduces, so the storage's latency hides behind them ([Note: a
    cache on disk] in solver/pac_cost.py); rows asked for under another grouping (a lost
    device) are read again where the step needs them."""

    def __init__(self, cache: ActivationCache) -> None:
        self.cache = cache
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="afx-read-ahead") \
            if isinstance(cache.rows, DiskRows) else None
        self.pending: tuple[tuple[int, ...], Future[dict[int, Row]]] | None = None

    def post(self, rows: Sequence[int]) -> None:
        """Start reading ``rows`` (those this device caches)."""
        if self.pool is None or not rows:
            return
        key = tuple(rows)
        self.pending = (key, self.pool.submit(self._read, key))

    def _read(self, key: tuple[int, ...]) -> dict[int, Row]:
        return {i: self.cache.rows[i] for i in key if i in self.cache.rows}

    def take(self, rows: Sequence[int]) -> tuple[dict[int, Row], int]:
        """The rows read ahead for a step of ``rows`` and their bytes (none: not asked
        for, or for other rows)."""
        if self.pending is None:
            return {}, 0
        key, future = self.pending
        self.pending = None
        if key != tuple(rows):
            return {}, 0
        got = future.result()
        return got, storage_bytes([t for row in got.values() for t in row])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class _Fetch:
    """Phase 2 with a sharded cache: each step, this device sends the rows it caches for
    other trainers (posted a step ahead, so the link overlaps the step before) and
    receives its own rows cached elsewhere ([Note: cache placement] in solver/pac.py)."""

    def __init__(self, group: _Group, comm: Comm, cache: ActivationCache, batch: int,
                 steps: int, total: int) -> None:
        self.group, self.comm, self.cache = group, comm, cache
        self.batch, self.steps, self.total = batch, steps, total
        me = group.rank
        peers = [m for m in range(group.world) if m != me]
        self.out = {m: rows for m in peers
                    if (rows := _within(group.ranges[m], group.homes[me]))}
        self.into = {m: rows for m in peers
                     if (rows := _within(group.ranges[me], group.homes[m]))}
        self.posted: set[int] = set()

    def post(self, step: int) -> None:
        if step in self.posted or step >= self.total or not self.out:
            return
        base = (step % self.steps) * self.batch
        for m, rows in self.out.items():
            missing = self.cache.missing([base + i for i in rows])
            if missing:
                raise RuntimeFailure(f"rows {missing[:4]} that {self.group.devices[m]!r} "
                                     f"trains on are not in this device's cache")
            entry = cat_rows([self.cache.rows[base + i] for i in rows])
            self.comm.send([(m, list(entry))], "fetch", key=("fetch", step))
        self.posted.add(step)

    def take(self, step: int) -> dict[int, tuple[torch.Tensor, ...]]:
        base = (step % self.steps) * self.batch
        got: dict[int, tuple[torch.Tensor, ...]] = {}
        for m, rows in self.into.items():
            tensors = self.comm.recv([m], "fetch")[0]
            for i, row in zip(rows, _split(tensors, len(rows))):
                got[base + i] = row
        return got

    def release(self, step: int) -> None:
        if step in self.posted:
            self.comm.release([("fetch", step)])


def _comm(rank: int, config: TrainConfig, old_ranks: Sequence[int]) -> Comm:
    links, latency = config.link_bytes_s, config.link_latency_s
    old = list(old_ranks)
    return Comm(rank, torch.device("cpu"), timeout_s=config.timeout_s,
                link_bytes_s=None if links is None else
                (lambda a, b: links[old[a]][old[b]]),
                link_latency_s=None if latency is None else
                (lambda a, b: latency[old[a]][old[b]]))


DETECT_S = 30.0
"""How long survivors of a failed phase-2 step wait for each other to announce themselves.
They stop waiting as soon as all but one have (one loss at a time), so this bounds only a
second loss's detection; 5 s was too short on a loaded 2-core host, where a survivor
blocked on a peer other than the lost one saw the failure more than 5 s after the others
(the suite with other jobs running, 2026-12-05: 'phase 2 lost devices ['a', 'c']' for a
run that lost 'c' alone). The cause was not the wait's length: such a survivor saw the
failure only once the other survivor's connections closed, and they stayed open while that
one waited (`_regroup` now shuts them down first; `tests/test_pac_train.py` has the three
ranks of that run)."""


def _regroup(store: Any, generation: int, group: _Group, pac: PacPlan,
             config: TrainConfig) -> tuple[_Group, list[str], float]:
    """After a failed collective: find the survivors through the launcher's store, start
    their process group, and take the plan's fallback shares without the lost device
    (see [Note: PAC recovery]). Returns the new group, the lost devices and the seconds
    spent detecting."""
    began = time.perf_counter()
    me = group.old_ranks[group.rank]
    prefix = f"asteroid-fx/pac/gen{generation}"
    store.set(f"{prefix}/alive/{me}", "1")
    # a survivor blocked in the collective on this rank, not on the lost one, sees the
    # failure only when this rank's connections close: destroying the group does not close
    # them while anything (the Comm, a pending work, this exception's frames) holds it, so
    # shut them down, as phase 1 does ([Note: PAC phase-1 recovery])
    count = abort_connections(store_port(store))
    log.debug("phase-2 regroup: %d connections shut down", count)
    expected = [f"{prefix}/alive/{r}" for r in group.old_ranks]
    alive: list[int] = []
    deadline = time.monotonic() + DETECT_S
    while time.monotonic() < deadline:
        alive = [r for r, key in zip(group.old_ranks, expected)
                 if store.check([key])]
        if len(alive) >= group.world - 1:      # one failure at a time
            break
        time.sleep(0.05)
    lost = [pac.devices[r] for r in group.old_ranks if r not in alive]
    if len(lost) != 1 or lost[0] not in pac.fallback:
        raise RuntimeFailure(f"phase 2 lost devices {lost}; PAC recovers from one lost "
                             f"device whose samples the others can cache "
                             f"(fallback shares for {sorted(pac.fallback)})")
    try:
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - the broken group may refuse a clean teardown
        log.debug("destroying the failed process group: %s", exc)
    fresh = group.without(lost[0], pac.fallback[lost[0]])
    old_ranks = tuple(r for r in group.old_ranks if r in alive)
    rank = old_ranks.index(me)
    dist.init_process_group("gloo", store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=len(fresh.devices),
                            timeout=timedelta(seconds=config.timeout_s))
    return (replace(fresh, rank=rank, old_ranks=old_ranks), lost,
            time.perf_counter() - began)


def finetune_device(source: Any, rank: int, config: TrainConfig, *, hooks: Any = None,
                    report: Callable[[dict[str, Any]], None] | None = None) -> WorkerResult:
    """Run this rank's part of the PAC plan in ``source`` (process group ready); see
    [Note: PAC run], [Note: PAC recovery] and [Note: PAC phase-1 recovery].
    ``config.steps`` is ignored: the plan's epochs decide."""
    if hooks is not None:
        raise RuntimeFailure("PAC fine-tuning takes no recovery hooks; it recovers a lost "
                             "device by itself (PacSource.fail, runtime.pac_recovery)")
    inner = getattr(source, "inner", source)
    pac = inner.pac_plan()
    world = len(pac.devices)
    if not dist.is_initialized() or dist.get_world_size() != world:
        raise RuntimeFailure(f"the PAC plan has {world} devices {list(pac.devices)}; launch "
                             f"one process per device")
    store = _default_store()
    fail = parse_fail(getattr(inner, "fail", None), pac)
    model_file = inner.model_module()
    samples = SampleSource(model_file, config.seed, pac.num_samples)
    group = _Group(tuple(pac.devices), tuple((pac.sample_range(d),) for d in pac.devices),
                   rank, tuple(range(world)), pac.homes(1), pac.homes(2))
    comm = _comm(rank, config, group.old_ranks)
    scale = compute_scale(source, rank, config)
    paced = pace_speed(source, rank)
    segments = stage_segments(pac, rank)
    # a frozen head is not needed before phase 2: loaded when the backbone goes, so the
    # two are never held at once (a trained head is in the optimizer from the start)
    early_head = pac.model.train_head
    model = build_device_model(inner, segments, head=early_head)
    full: AdapterModel | None = None      # the whole backbone, loaded to recompute rows
    params = model.trainable_parameters()
    optimizer = make_optimizer(model_file, params, config.lr)
    loss_fn = resolve_loss_fn(model_file)
    # a disk cache's file goes in ASTEROID_CACHE_DIR, else the system's temporary directory
    # (on the emulator paced to the device's storage bandwidth)
    cache = ActivationCache.on_disk(
        None, None if config.storage_bytes_s is None else config.storage_bytes_s[rank]) \
        if pac.on_disk(pac.devices[rank]) else ActivationCache()
    targets_of: dict[tuple[int, ...], Any] = {}
    metrics = Path(config.metrics) if config.metrics else None
    if metrics is not None and rank == 0 and not config.append_metrics:
        metrics.write_text("")
    steps, batch = pac.steps_per_epoch, pac.batch_size
    # phase 1 first, for every mini-batch of epoch 1 (see [Note: PAC run]); then the
    # backbone goes: phase 2 holds only the head, the adapters and the cache
    p1 = _Phase1Run(pac=pac, inner=inner, config=config, store=_job_store(store), model=model,
                    samples=samples, cache=cache, scale=scale, paced=paced, group=group,
                    comm=comm,
                    fail=fail, segments=segments)
    phase1_s = _fill_cache(p1)
    group, comm, generation = p1.group, p1.comm, p1.generation
    if p1.event is not None and metrics is not None and group.rank == 0:
        with metrics.open("a") as fh:
            fh.write(json.dumps(p1.event) + "\n")
    weights = storage_bytes(list(model.parameters()) + list(model.buffers()))
    peak = weights + p1.in_flight_peak
    # with the cache: phase 1's tensors with the entries this device held at that moment
    peak_cached = weights + max(p1.cached_peak, cache.resident_bytes)
    model.drop_backbone()
    if not early_head:
        load_head(inner, model)
    fixed = storage_bytes(list(model.parameters()) + list(model.buffers()))
    # the rows parked here in phase 1 go to their phase-2 holders, once; each phase gets a
    # communicator of its own, so that no idle wire buffer of phase 1 outlives it
    p1.comm = comm = _comm(group.rank, config, group.old_ranks)
    group, moved_peak = _rehome(group, comm, cache, batch, steps)
    comm = _comm(group.rank, config, group.old_ranks)
    peak_cached = max(peak_cached, fixed + moved_peak)
    weight_ptrs = {t.untyped_storage().data_ptr()
                   for t in [*model.parameters(), *model.buffers()]}
    peak = max(peak, fixed)
    fetch = _Fetch(group, comm, cache, batch, steps, pac.epochs * steps)
    ahead = _ReadAhead(cache)
    # a step's peak tensors, with and without the cache: the rows read ahead during a step
    # are held beside it (counted when the next step takes them)
    step_peaks = (0, 0)
    me = pac.devices[rank]
    first_stage = pac.phase1.stage_of(me) if me in pac.phase1.devices else 0
    result = WorkerResult(rank=rank, device=me, stage=first_stage)
    step = 0
    cpu_after = 0.0     # CPU of the previous step's part after its all-reduce
    reduce_times: list[float] = []
    last_end = time.perf_counter()
    while step < pac.epochs * steps:
        epoch, k = divmod(step, steps)
        if fail is not None and me == fail.device and step == fail.step:
            os._exit(1)       # the emulated loss of this device (--fail DEVICE@STEP)
        try:
            if epoch == 0:
                dist.barrier()
                last_end = time.perf_counter()
            began = last_end
            rows = group.rows(batch, k)
            hits_before, misses_before = cache.hits, cache.misses
            if fetch.group is not group:         # a new generation after a lost device
                fetch = _Fetch(group, comm, cache, batch, steps, pac.epochs * steps)
            fetch.post(step)
            fetch.post(step + 1)                 # prefetch: overlaps this step
            remote = fetch.take(step)            # rows cached on other devices
            new = cache.missing([i for i in rows if i not in remote])
            if new:        # rows taken over from a lost device (or cached on it)
                full = full or build_device_model(inner, list(range(len(model.taps))))
                for i in new:
                    inputs, _ = samples.rows(i, i + 1)
                    cache.put(i, full.backbone(*model_inputs(inputs)))
            cpu_began = time.thread_time()
            read, read_bytes = ahead.take(rows)
            peak = max(peak, step_peaks[0] + read_bytes)
            peak_cached = max(peak_cached, step_peaks[1] + read_bytes)
            entry = cat_rows([remote[i] if i in remote else read[i] if i in read
                              else cache.rows[i] for i in rows])
            del read
            if step + 1 < pac.epochs * steps:
                ahead.post(group.rows(batch, (step + 1) % steps))
            if epoch == 0:
                cache.count(0, len(rows))    # computed by phase 1 for this step
                began -= phase1_s[k][0]
            else:
                cache.count(len(rows) - len(new), len(new))
            p1_done, p1_cpu = time.perf_counter(), time.thread_time()
            key = tuple(rows)
            if key not in targets_of:     # kept beside the cache: made once
                targets_of[key] = samples.take(rows)[1]
            targets = targets_of[key]
            # each storage once, weights excluded, as runtime.memory counts them
            with saved_storages(weight_ptrs) as saved:
                out = model.train_forward(entry)
                loss = loss_fn(out, targets) * (len(rows) / batch)
            loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            state = [t for st in optimizer.state.values() for t in st.values()
                     if isinstance(t, torch.Tensor)]
            seen: set[int] = set()
            held = storage_bytes(entry, seen)
            held += sum(b for ptr, b in saved.items() if ptr not in seen)
            step_peak = fixed + storage_bytes(grads) + storage_bytes(state) + held \
                + (0 if full is None else storage_bytes(list(full.segments.parameters())))
            peak = max(peak, step_peak)
            step_cached = step_peak + storage_bytes(comm.held()) + cache.resident_bytes
            peak_cached = max(peak_cached, step_cached)
            step_peaks = (step_peak, step_cached)
            _dilate(p1_done, scale)
            pace(p1_done, p1_cpu, paced)
            computed = time.perf_counter()
            # this thread's CPU for the step besides the all-reduce (what step_fit times):
            # its entry, forward and backward, and the previous step's gradient unpacking
            # and optimizer step (this step's come after its slots are summed)
            local_cpu = time.thread_time() - cpu_began + cpu_after
            # one collective per step: the gradients and every rank's metrics slots (SUM)
            slots = torch.zeros((group.world, SLOTS), dtype=torch.float64)
            slots[group.rank] = torch.tensor(
                [float(loss.detach()), float(cache.hits - hits_before),
                 float(cache.misses - misses_before), p1_done - began, computed - p1_done,
                 float(peak), float(cache.bytes), float(peak_cached)]
                + (list(phase1_s[k][1:]) if epoch == 0 else [0.0, 0.0, 0.0]) + [local_cpu])
            flat = wire_tensor(grads, slots)
            reducing = time.perf_counter()
            comm.all_reduce([[flat]], None, list(range(group.world)))
            if epoch > 0:    # this device's wait for the others and the collective itself
                reduce_times.append(time.perf_counter() - reducing)
        except (RuntimeError, CommFailureError) as exc:
            # in phase 2, or in epoch 1 after phase 1 ended everywhere (the cache is full:
            # the same recovery, the step redone on the survivors)
            log.warning("phase-2 step %d failed (%s); regrouping", step, exc)
            optimizer.zero_grad(set_to_none=True)
            generation += 1
            failed_at = time.perf_counter()
            group, lost, detect_s = _regroup(store, generation, group, pac, config)
            comm = _comm(group.rank, config, group.old_ranks)
            event = {"event": "recovery", "phase": 2, "failed": lost, "at_step": step,
                     "detect_s": detect_s, "total_s": time.perf_counter() - failed_at,
                     "lost_steps": 0,
                     "rows": {d: [list(r) for r in rs]
                              for d, rs in zip(group.devices, group.ranges)}}
            if metrics is not None and group.rank == 0:
                with metrics.open("a") as fh:
                    fh.write(json.dumps(event) + "\n")
            last_end = time.perf_counter()
            continue
        stepping, cpu_began = time.perf_counter(), time.thread_time()
        slots = take_gradients(params, flat).view(group.world, SLOTS)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu_after = time.thread_time() - cpu_began
        pace(stepping, cpu_began, paced)
        fetch.release(step)       # received before the all-reduce everyone joined
        ended = time.perf_counter()
        total = slots.sum(dim=0)
        worst = slots.max(dim=0).values
        served = float(total[1] + total[2])
        record: dict[str, Any] = {
            "step": step, "epoch": epoch, "phase": 1 if epoch == 0 else 2,
            "loss": float(total[0]), "round_time_s": ended - began,
            "phase1_s": float(worst[3]), "phase2_s": float(worst[4]),
            "cache_hit_rate": float(total[1]) / served if served else 0.0,
            "cache_bytes": {d: int(slots[i, 6]) for i, d in enumerate(group.devices)},
            "peak_memory_bytes": {d: int(slots[i, 5]) for i, d in enumerate(group.devices)},
            "peak_with_cache_bytes": {d: int(slots[i, 7]) for i, d in enumerate(group.devices)},
            "plan_version": generation,
            # this device's CPU seconds of the step besides the all-reduce (see above)
            "phase2_cpu_s": {d: float(slots[i, 11]) for i, d in enumerate(group.devices)},
        }
        if epoch == 0:     # this device's segments (forward) and sample making, seconds
            record["phase1_forward_s"] = {d: float(slots[i, 8])
                                          for i, d in enumerate(group.devices)}
            record["phase1_samples_s"] = {d: float(slots[i, 9])
                                          for i, d in enumerate(group.devices)}
            record["phase1_forward_cpu_s"] = {d: float(slots[i, 10])
                                              for i, d in enumerate(group.devices)}
        if pac.predicted is not None:
            pred = pac.predicted
            record["predicted_round_time_s"] = config.time_factor * (
                pred.phase2_step_s + (pred.phase1_step_s if epoch == 0 else 0.0))
            record["prediction"] = config.prediction
        result.losses.append(record["loss"])
        result.round_times.append(record["round_time_s"])
        if group.rank == 0:
            if metrics is not None:
                with metrics.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if report is not None:
                report(record)
        last_end = ended
        step += 1
    ahead.close()
    result.peak_memory_bytes = peak
    # the all-reduces of epochs 2+ (seconds, waiting included), as runtime.train reports a
    # training stage's: per step, and their mean
    result.allreduce_times = reduce_times
    result.allreduce_s = statistics.fmean(reduce_times) if reduce_times else 0.0
    result.tensor_memory = {"cache_bytes": cache.bytes, "cache_hits": cache.hits,
                            "cache_misses": cache.misses}
    if config.return_state:
        result.state = model.trainable_state()
    return result


@dataclass
class _Phase1Run:
    """What phase 1 needs on this rank, and what it leaves for phase 2 (the current group,
    its communicator and generation, and the recovery event if a device was lost)."""

    pac: PacPlan
    inner: Any
    config: TrainConfig
    store: Any
    model: AdapterModel
    samples: SampleSource
    cache: ActivationCache
    scale: float
    paced: float
    group: _Group
    comm: Comm
    fail: FailSpec | None
    segments: list[int]
    generation: int = 0
    event: dict[str, Any] | None = None
    in_flight_peak: int = 0
    cached_peak: int = 0


class _NoticeWatch:
    """During phase 1: when the loss notice appears in the store, shut this process's
    process-group connections down, so that a receive from a survivor that is itself
    recovering fails at once (see [Note: PAC phase-1 recovery])."""

    def __init__(self, store: Any, key: str) -> None:
        self.store, self.key = store, key
        self.fired_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asteroid-fx-pac-notice",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(NOTICE_POLL_S):
            try:
                seen = self.store.check([self.key])
            except RuntimeError as exc:     # the store is gone: the run is ending anyway
                log.debug("phase-1 notice watch ends: %s", exc)
                return
            if seen and not self._stop.is_set():
                self.fired_at = time.time()
                count = abort_connections(store_port(self.store))
                log.info("phase-1 loss notice: %d connections shut down", count)
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def _fill_cache(run: _Phase1Run) -> list[tuple[float, float, float, float]]:
    """Phase 1 for every mini-batch of the epoch (each after a barrier, one more barrier
    at the end): this rank's cache entries into ``run.cache``; a device lost on the way is
    recovered ([Note: PAC phase-1 recovery]). Returns ``(wall, forward, samples, forward
    CPU)`` seconds of each mini-batch on this rank (see :class:`_Phase1`)."""
    pac, steps = run.pac, run.pac.steps_per_epoch
    phase1 = _Phase1(pac.phase1, run.group, run.model, run.comm, run.samples,
                     pac.batch_size, run.scale, run.paced)
    me = run.group.devices[run.group.rank]
    seconds = [(0.0, 0.0, 0.0, 0.0)] * steps
    done = 0            # mini-batches whose rows this rank holds completely
    watch: _NoticeWatch | None = _NoticeWatch(run.store, notice_key(1))
    try:
        while True:
            try:
                for k in range(done, steps):
                    dist.barrier()
                    if run.fail is not None and run.fail.device == me and \
                            run.fail.in_phase1(pac) and run.fail.step == k:
                        run.store.set(KILLED_KEY, repr(time.time()))
                        os._exit(1)      # the emulated loss of this device (--fail)
                    began = time.perf_counter()
                    phase1.run(k, run.cache)
                    seconds[k] = (time.perf_counter() - began, phase1.compute_s,
                                  phase1.samples_s, phase1.compute_cpu_s)
                    done = k + 1
                dist.barrier()    # every mini-batch done everywhere: a loss surfaces here too
                break
            except (RuntimeError, CommFailureError) as exc:
                detected_at = time.time()
                if run.event is not None or watch is None:
                    raise RuntimeFailure(f"phase 1 failed again after recovering from "
                                         f"{run.event['failed'] if run.event else []}: "
                                         f"PAC recovers one lost device per run ({exc})"
                                         ) from None
                log.warning("phase-1 mini-batch %d failed (%s); recovering", done, exc)
                run.store.set(notice_key(1), json.dumps({"by": me, "at": detected_at}))
                watch.stop()
                watch = None
                run.in_flight_peak = max(run.in_flight_peak, phase1.in_flight_peak)
                run.cached_peak = max(run.cached_peak, phase1.cached_peak)
                phase1 = _recover_phase1(run, done, detected_at)
                done = int(run.event["resume_step"]) if run.event else done
    finally:
        if watch is not None:
            watch.stop()
    run.in_flight_peak = max(run.in_flight_peak, phase1.in_flight_peak)
    run.cached_peak = max(run.cached_peak, phase1.cached_peak)
    run.store.add(DONE_KEY, 1)
    return seconds


def _recover_phase1(run: _Phase1Run, done: int, detected_at: float) -> _Phase1:
    """The survivors' side of [Note: PAC phase-1 recovery]: the launcher's re-plan, a process
    group of the survivors, this rank's new segments, the first mini-batch not every
    survivor holds, and the lost device's rows of the mini-batches before it recomputed
    through the new pipeline. Sets ``run.event`` (the metrics row) and returns the new
    phase-1 runner."""
    run.comm.abandon()
    try:
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - the broken group may refuse a clean teardown
        log.debug("destroying the failed process group: %s", exc)
    record = read_record(run.store, 1)
    got_plan_at = time.time()
    old = run.group
    me = old.devices[old.rank]
    failed = [str(d) for d in record["failed"]]
    lost = failed[0]
    if me in failed or lost not in old.devices or lost not in run.pac.fallback:
        raise RuntimeFailure(f"phase 1 lost {failed}; PAC recovers one lost device whose "
                             f"samples the others can cache (fallback shares for "
                             f"{sorted(run.pac.fallback)})")
    plan = Plan.from_dict(record["phase1"])
    fresh = old.without(lost, run.pac.fallback[lost])
    devices, ranges = fresh.devices, fresh.ranges
    old_ranks = tuple(r for r, d in zip(old.old_ranks, old.devices) if d != lost)
    rank = old_ranks.index(old.old_ranks[old.rank])
    run.generation += 1
    prefix = f"asteroid-fx/pac/gen{run.generation}"
    dist.init_process_group("gloo", store=dist.PrefixStore(prefix, run.store), rank=rank,
                            world_size=len(devices),
                            timeout=timedelta(seconds=run.config.timeout_s))
    run.group = replace(fresh, rank=rank, old_ranks=old_ranks)
    run.comm = _comm(rank, run.config, old_ranks)
    segments = [] if me not in plan.devices else list(range(
        plan.stages[plan.stage_of(me)].first, plan.stages[plan.stage_of(me)].last + 1))
    _swap_segments(run, segments)
    new = _Phase1(plan, run.group, run.model, run.comm, run.samples, run.pac.batch_size,
                  run.scale, run.paced)
    sync = torch.tensor([-float(done), detected_at, got_plan_at], dtype=torch.float64)
    dist.all_reduce(sync, op=dist.ReduceOp.MAX)
    resume = int(-sync[0].item())
    ready_at = time.time()
    lost_rows = old.homes[old.devices.index(lost)]     # the entries it held
    for j in range(resume):       # the lost device's cache entries of the done mini-batches
        new.run(j, run.cache, wanted=lost_rows)
    resumed_at = time.time()
    killed_at = float(run.store.get(KILLED_KEY).decode()) if run.store.check([KILLED_KEY]) \
        else float(record["seen_at"])
    last_detect, last_plan = float(sync[1]), float(sync[2])
    run.event = {
        "event": "recovery", "phase": 1, "failed": failed, "at_step": done,
        "resume_step": resume, "detect_s": last_detect - killed_at,
        "replan_s": float(record["replan_s"]), "plan_wait_s": last_plan - last_detect,
        "restore_s": ready_at - last_plan, "recompute_s": resumed_at - ready_at,
        "total_s": resumed_at - killed_at, "lost_steps": 0,
        "replanned": bool(record.get("replanned", True)),
        "recomputed_rows": resume * sum(b - a for a, b in lost_rows),
        "phase1": [{"segments": [st.first, st.last], "devices": list(st.devices),
                    "shares": list(st.shares)} for st in plan.stages],
        "micro_batch": [plan.micro_batch_size, plan.num_micro_batches],
        "rows": {d: [list(r) for r in rs] for d, rs in zip(devices, ranges)},
    }
    log.warning("phase 1 recovered from losing %s: resuming at mini-batch %d after %.3f s",
                lost, resume, resumed_at - killed_at)
    return new


def _swap_segments(run: _Phase1Run, segments: Sequence[int]) -> None:
    """Load the backbone segments this rank runs under the new phase-1 plan and drop the
    others it no longer runs."""
    for j in sorted(set(run.segments) | set(segments)):
        if j in segments and j not in run.segments:
            module = run.inner.load_stage(j)
            module.requires_grad_(False)
            run.model.segments[j] = module
        elif j not in segments:
            run.model.segments[j] = nn.Identity()
    run.segments = list(segments)


def _job_store(default: Any) -> Any:
    """The job's store, where the launcher writes (``runtime.pac_recovery``): torch keeps
    the default group's store as a ``PrefixStore("<group name>/", store given)``, so the
    store the worker gave ``init_process_group`` is its ``underlying_store``."""
    if isinstance(default, dist.PrefixStore):
        return default.underlying_store
    return default


def _default_store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()
