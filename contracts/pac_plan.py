"""The plan of a PAC fine-tuning run as plain data (``pac_plan.json``), read on the devices.

Made by ``solver.pac.plan_finetune`` (see [Note: PAC phases] there); frozen dataclasses
with an exact JSON round trip. Imports only the standard library and ``contracts.plan``, and
runs on Python 3.8 (a device reads it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Tuple

from contracts.errors import MALFORMED, PlanError, parse_json, read_json
from contracts.files import write_text
from contracts.plan import Plan

__all__ = ["PacModel", "PacPrediction", "PacPlan", "PAC_PLAN_VERSION", "CACHE_PLACEMENTS",
           "CACHE_STORES", "Ranges"]

PAC_PLAN_VERSION = 1

CACHE_PLACEMENTS = ("local", "sharded")
"""``local``: every device caches exactly the rows it trains on; ``sharded``: some rows are
cached on other devices, in phase 1 (handed to their phase-2 holder when phase 1 ends) or in
phase 2 too (streamed to the trainer every step); see ``PacPlan.homes``."""

CACHE_STORES = ("memory", "disk", "mixed")
"""``PacPlan.cache_store``: ``memory``: every device keeps its cache rows as tensors;
``disk``: every device in an unnamed file of its local storage
(``runtime.activation_cache.DiskRows``), read back for every phase-2 step, so that the
cache costs storage reads instead of memory; ``mixed``: the devices of
``PacPlan.cache_disk`` on disk, the others in memory."""

Ranges = Tuple[Tuple[Tuple[int, int], ...], ...]
"""Per device (in ``PacPlan.devices`` order): half-open row ranges of every mini-batch."""


@dataclass(frozen=True)
class PacModel:
    """What the planner knows of the adapter model besides the cost table (plain data).

    ``taps``: tapped layer indices; ``entry_bytes``: one sample's cache entry;
    ``trainable_bytes``: adapter (and trainable head) parameter bytes; ``adapter_flops``:
    forward FLOPs of the adapters per sample; ``train_head``: whether the head trains;
    ``step_fit``: ``(intercept_s, per_sample_s)`` of one whole phase-2 step besides its
    all-reduce (entry from the cache rows, side path, head, loss, backward, gradients
    packed and unpacked, optimizer step) measured on the profiling host, one thread
    (``(0, 0)``: not measured, the step is modelled from the cost table); ``sample_s``:
    seconds to make one sample (``dataset()[i]`` or the seeded ``sample_batch(1)``) on the
    profiling host, which phase 1's first stage pays (0: not measured);
    ``allreduce_bytes``: bytes one phase-2 step all-reduces (the runtime sums the adapter
    gradients in float64, so that every step equals the single-process reference; 0: the
    ``trainable_bytes``); ``step_saved_bytes``: per sample, what autograd saves in a
    phase-2 step's forward (side path, head and loss; weights and the entry itself
    excluded), as the runtime counts it (0: not measured, the head's ``activation_bytes``
    from the cost table stand in); ``made_entry_bytes``: one sample's entry as the backbone
    makes it, before the cache rounds it to its dtype (0: the same as ``entry_bytes``);
    ``segment_cold_s``: per backbone segment, the seconds a forward call of one sample
    takes beyond a warm one when the segment's weights are no longer in the cache, as
    phase 1 calls it after each wait (measured on the profiling host; empty: none);
    ``write_s_per_byte`` / ``read_s_per_byte``: seconds per byte to write cache rows to a
    file and to read them back (from the page cache) on the profiling host, one thread,
    which a disk cache (``PacPlan.cache_store``) pays (0: not measured).
    """

    taps: tuple[int, ...]
    entry_bytes: int
    trainable_bytes: int
    adapter_flops: float
    train_head: bool = False
    step_fit: tuple[float, float] = (0.0, 0.0)
    sample_s: float = 0.0
    allreduce_bytes: int = 0
    step_saved_bytes: int = 0
    made_entry_bytes: int = 0
    segment_cold_s: tuple[float, ...] = ()
    write_s_per_byte: float = 0.0
    read_s_per_byte: float = 0.0

    @property
    def made_bytes(self) -> int:
        """Bytes of one sample's entry as the backbone makes it."""
        return self.made_entry_bytes or self.entry_bytes

    @property
    def wire_bytes(self) -> int:
        """Bytes of one phase-2 all-reduce."""
        return self.allreduce_bytes or self.trainable_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"taps": list(self.taps), "entry_bytes": self.entry_bytes,
                "trainable_bytes": self.trainable_bytes, "adapter_flops": self.adapter_flops,
                "train_head": self.train_head, "step_fit": list(self.step_fit),
                "sample_s": self.sample_s, "allreduce_bytes": self.allreduce_bytes,
                "step_saved_bytes": self.step_saved_bytes,
                "made_entry_bytes": self.made_entry_bytes,
                "segment_cold_s": list(self.segment_cold_s),
                "write_s_per_byte": self.write_s_per_byte,
                "read_s_per_byte": self.read_s_per_byte}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PacModel:
        fit = data.get("step_fit", (0.0, 0.0))
        return cls(taps=tuple(int(t) for t in data["taps"]),
                   entry_bytes=int(data["entry_bytes"]),
                   trainable_bytes=int(data["trainable_bytes"]),
                   adapter_flops=float(data["adapter_flops"]),
                   train_head=bool(data.get("train_head", False)),
                   step_fit=(float(fit[0]), float(fit[1])),
                   sample_s=float(data.get("sample_s", 0.0)),
                   allreduce_bytes=int(data.get("allreduce_bytes", 0)),
                   step_saved_bytes=int(data.get("step_saved_bytes", 0)),
                   made_entry_bytes=int(data.get("made_entry_bytes", 0)),
                   segment_cold_s=tuple(float(v) for v in data.get("segment_cold_s", ())),
                   write_s_per_byte=float(data.get("write_s_per_byte", 0.0)),
                   read_s_per_byte=float(data.get("read_s_per_byte", 0.0)))


@dataclass(frozen=True)
class PacPrediction:
    """Predicted seconds of one step of each phase, of each epoch, and of ``epochs`` epochs;
    per-device peak memory (bytes) and cached bytes."""

    phase1_step_s: float
    phase2_step_s: float
    allreduce_s: float
    epoch1_s: float
    epoch_s: float                   # an epoch after the first
    total_s: float
    peak_memory_bytes: Mapping[str, int]
    cache_bytes: Mapping[str, int]
    #: the closed-form phase-1 step (``phase1_step_s`` is the larger of it and the event
    #: simulation for a pipeline; see [Note: phase-1 time] in solver/pac_cost.py)
    phase1_closed_form_s: float = 0.0
    #: link seconds per phase-2 step of the rows streamed from other devices' caches
    #: (overlapped with the step before: ``phase2_step_s`` is at least this), and of the
    #: one hand-off of the rows parked elsewhere in phase 1 (in ``epoch1_s``)
    fetch_s: float = 0.0
    handoff_s: float = 0.0
    #: a disk cache: the slowest device's seconds to write its rows of one mini-batch in
    #: phase 1 (in ``phase1_step_s``) and to read them back in a phase-2 step (in
    #: ``phase2_step_s``)
    write_s: float = 0.0
    read_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"phase1_step_s": self.phase1_step_s, "phase2_step_s": self.phase2_step_s,
                "allreduce_s": self.allreduce_s, "epoch1_s": self.epoch1_s,
                "epoch_s": self.epoch_s, "total_s": self.total_s,
                "peak_memory_bytes": dict(self.peak_memory_bytes),
                "cache_bytes": dict(self.cache_bytes),
                "phase1_closed_form_s": self.phase1_closed_form_s,
                "fetch_s": self.fetch_s, "handoff_s": self.handoff_s,
                "write_s": self.write_s, "read_s": self.read_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PacPrediction:
        return cls(**{k: float(data[k]) for k in ("phase1_step_s", "phase2_step_s",
                                                  "allreduce_s", "epoch1_s", "epoch_s",
                                                  "total_s")},
                   peak_memory_bytes={k: int(v) for k, v in data["peak_memory_bytes"].items()},
                   cache_bytes={k: int(v) for k, v in data["cache_bytes"].items()},
                   phase1_closed_form_s=float(data.get("phase1_closed_form_s", 0.0)),
                   fetch_s=float(data.get("fetch_s", 0.0)),
                   handoff_s=float(data.get("handoff_s", 0.0)),
                   write_s=float(data.get("write_s", 0.0)),
                   read_s=float(data.get("read_s", 0.0)))


@dataclass(frozen=True)
class PacPlan:
    """Both phases of a PAC run (``pac_plan.json``).

    ``phase1`` is a ``Plan`` over the backbone's segments (layer ``j`` = segment ``j``);
    ``devices``/``shares``: phase 2's devices in rank order and the samples of every
    mini-batch each trains on (contiguous ranges in that order), which are also the
    samples whose cache entries it holds.
    """

    model: PacModel
    batch_size: int
    num_samples: int
    steps_per_epoch: int
    epochs: int
    phase1: Plan
    devices: tuple[str, ...]
    shares: tuple[int, ...]
    cache: str = "local"
    predicted: PacPrediction | None = None
    model_hash: str = ""
    cluster_hash: str = ""
    #: when a device is lost in phase 2: how many of its rows each other device (in
    #: ``devices`` order) takes over; everyone keeps its own rows (and cache)
    fallback: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    version: int = PAC_PLAN_VERSION
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: ``cache="sharded"``: for a trainer whose rows are not all cached on itself, how many
    #: of its rows of every mini-batch each device (``devices`` order) caches in phase 1
    #: (while the backbone is held; handed to the phase-2 holders when phase 1 ends) and in
    #: phase 2 (a row held on another device is fetched by the trainer every step). A
    #: trainer that is not a key caches its own rows in that phase.
    cache_phase1: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    cache_phase2: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    #: the devices that keep their cache rows on disk (the others: in memory); such a
    #: device holds exactly its own rows in both phases (see ``cache_store``)
    cache_disk: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.devices) != len(self.shares) or not self.devices:
            raise PlanError(f"phase 2 needs one share per device, got devices "
                            f"{list(self.devices)} and shares {list(self.shares)}")
        if sum(self.shares) != self.batch_size or any(s < 1 for s in self.shares):
            raise PlanError(f"phase-2 shares {list(self.shares)} must be >= 1 and add up to "
                            f"the batch size {self.batch_size}")
        if self.cache not in CACHE_PLACEMENTS:
            raise PlanError(f"cache placement {self.cache!r} is not one of "
                            f"{list(CACHE_PLACEMENTS)}")
        unknown = [d for d in self.cache_disk if d not in self.devices]
        if unknown or len(set(self.cache_disk)) != len(self.cache_disk):
            raise PlanError(f"cache_disk {list(self.cache_disk)} must name distinct devices "
                            f"of {list(self.devices)}; re-plan")
        for d in self.cache_disk:
            i = self.devices.index(d)
            own = tuple(s if j == i else 0 for j, s in enumerate(self.shares))
            if any(self.holders(d, phase) != own or
                   any(self.holders(t, phase)[i] for t in self.devices if t != d)
                   for phase in (1, 2)):
                raise PlanError(f"device {d!r} keeps its cache on disk, so it holds exactly "
                                f"its own rows in both phases; re-plan")
        for what, holders in (("cache_phase1", self.cache_phase1),
                              ("cache_phase2", self.cache_phase2)):
            for trainer, counts in holders.items():
                share = dict(zip(self.devices, self.shares)).get(trainer)
                if share is None or len(counts) != len(self.devices) or \
                        any(c < 0 for c in counts) or sum(counts) != share:
                    raise PlanError(f"{what}[{trainer!r}] = {list(counts)} must be a trainer "
                                    f"of {list(self.devices)} with one count >= 0 per device "
                                    f"adding up to its share {share}; re-plan")
        sharded = any(self._moved(t) for t in self.devices)
        if sharded != (self.cache == "sharded"):
            raise PlanError(f"cache placement {self.cache!r} but "
                            f"{'some' if sharded else 'no'} rows are held off their trainer; "
                            f"use cache={'sharded' if sharded else 'local'!r}")
        missing = [d for d in self.phase1.devices if d not in self.devices]
        if missing:
            raise PlanError(f"phase-1 devices {missing} are not phase-2 devices "
                            f"{list(self.devices)}")

    @property
    def cache_store(self) -> str:
        """``memory``, ``disk`` or ``mixed`` (``CACHE_STORES``): where the devices keep
        their cache rows (``cache_disk``)."""
        if not self.cache_disk:
            return "memory"
        return "disk" if len(self.cache_disk) == len(self.devices) else "mixed"

    def on_disk(self, device: str) -> bool:
        """Whether ``device`` keeps its cache rows on disk."""
        return device in self.cache_disk

    def sample_range(self, device: str) -> tuple[int, int]:
        """Half-open rows ``[start, stop)`` of every mini-batch that ``device`` trains on."""
        start = 0
        for d, share in zip(self.devices, self.shares):
            if d == device:
                return start, start + share
            start += share
        raise PlanError(f"device {device!r} is not in the plan ({list(self.devices)})")

    def _moved(self, trainer: str) -> bool:
        i = self.devices.index(trainer)
        share = self.shares[i]
        return any(h.get(trainer, ())[i:i + 1] not in ((), (share,))
                   for h in (self.cache_phase1, self.cache_phase2))

    def holders(self, trainer: str, phase: int) -> tuple[int, ...]:
        """Rows of ``trainer``'s share of every mini-batch that each device caches in
        ``phase`` (1 or 2), in ``devices`` order."""
        table = self.cache_phase1 if phase == 1 else self.cache_phase2
        if trainer in table:
            return tuple(table[trainer])
        return tuple(s if d == trainer else 0 for d, s in zip(self.devices, self.shares))

    def homes(self, phase: int) -> Ranges:
        """Per device: the row ranges of every mini-batch whose cache entries it holds in
        ``phase`` (1 or 2). Within a trainer's range its own rows come first, then those
        of the other holders in ``devices`` order (the same layout in both phases, so a
        row held on one device in both phases stays there)."""
        out: list[list[tuple[int, int]]] = [[] for _ in self.devices]
        for t, trainer in enumerate(self.devices):
            start = self.sample_range(trainer)[0]
            counts = self.holders(trainer, phase)
            for h in [t] + [i for i in range(len(self.devices)) if i != t]:
                if counts[h]:
                    out[h].append((start, start + counts[h]))
                    start += counts[h]
        return tuple(tuple(r) for r in out)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model.to_dict(),
                "batch_size": self.batch_size, "num_samples": self.num_samples,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs,
                "phase1": self.phase1.to_dict(), "devices": list(self.devices),
                "shares": list(self.shares), "cache": self.cache,
                "cache_store": self.cache_store, "cache_disk": list(self.cache_disk),
                "predicted": None if self.predicted is None else self.predicted.to_dict(),
                "model_hash": self.model_hash, "cluster_hash": self.cluster_hash,
                "fallback": {d: list(v) for d, v in self.fallback.items()},
                "cache_phase1": {d: list(v) for d, v in self.cache_phase1.items()},
                "cache_phase2": {d: list(v) for d, v in self.cache_phase2.items()},
                "meta": dict(self.meta)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PacPlan:
        try:
            pred = data.get("predicted")
            return cls(model=PacModel.from_dict(data["model"]),
                       batch_size=int(data["batch_size"]),
                       num_samples=int(data["num_samples"]),
                       steps_per_epoch=int(data["steps_per_epoch"]),
                       epochs=int(data["epochs"]), phase1=Plan.from_dict(data["phase1"]),
                       devices=tuple(data["devices"]),
                       shares=tuple(int(s) for s in data["shares"]),
                       cache=str(data.get("cache", "local")),
                       cache_disk=tuple(str(d) for d in data.get("cache_disk", ())),
                       predicted=None if pred is None else PacPrediction.from_dict(pred),
                       model_hash=str(data.get("model_hash", "")),
                       cluster_hash=str(data.get("cluster_hash", "")),
                       fallback={str(d): tuple(int(x) for x in v)
                                 for d, v in data.get("fallback", {}).items()},
                       version=int(data.get("version", PAC_PLAN_VERSION)),
                       meta=dict(data.get("meta", {})),
                       cache_phase1={str(d): tuple(int(x) for x in v)
                                     for d, v in data.get("cache_phase1", {}).items()},
                       cache_phase2={str(d): tuple(int(x) for x in v)
                                     for d, v in data.get("cache_phase2", {}).items()})
        except MALFORMED as exc:   # (a field missing, or of the wrong type or size)
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"malformed PAC plan: {type(exc).__name__}: {exc}; re-plan with "
                            f"`asteroid-fx finetune`") from None

    @classmethod
    def from_json(cls, text: str) -> PacPlan:
        return cls.from_dict(parse_json(text, PlanError, "PAC plan",
                                        "re-plan with `asteroid-fx finetune`"))

    def save(self, path: str | Path) -> None:
        """Write the JSON to ``path`` whole or not at all ([Note: whole files] in
        ``contracts.files``)."""
        write_text(path, self.to_json(), "PAC plan")

    @classmethod
    def load(cls, path: str | Path) -> PacPlan:
        fix = "create it with `asteroid-fx finetune MODEL --cluster C --batch-size N --out DIR`"
        return cls.from_dict(read_json(path, PlanError, "PAC plan", fix))
