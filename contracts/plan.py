"""Plans: stages, device groups, shares and predictions as frozen data with JSON round-trip."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from contracts.arguments import is_int
from contracts.errors import MALFORMED, PlanError, parse_json, read_json
from contracts.files import write_text

__all__ = ["Stage", "StagePrediction", "Prediction", "PlannerInfo", "SearchBound", "Plan",
           "PLAN_VERSION", "SMALL_BUCKET_BYTES"]

PLAN_VERSION = 1

SMALL_BUCKET_BYTES = 256 << 10
"""A data-parallel stage all-reduces its gradients in buckets of at most its largest
gradient's bytes or this, whichever is larger (runtime/comm.py ``gradient_buckets``), each
through a flat copy; the memory model budgets the largest such copy
(solver/evaluate.py ``transient_gradient_bytes``)."""


MAX_BATCH_SIZE = 1 << 20
"""The largest batch size a plan may have, and the planners take: Algorithm 1 splits a
micro-batch sample by sample (``solver.split.split_shares``), so a plan's time grows with
the batch (examples/mlp.py on C-100mbps.yaml: 4.7 s at 10**5, 19.6 s at 10**6, past 90 s at
10**7); a larger batch is a ``PlanError`` up front instead of a search that seems to hang,
and a plan.json edited to a larger one is refused on load (a batch of 10**8 drove one
device process of an emulated run to 11.6 GB and the host's out-of-memory killer)."""


@dataclass(frozen=True)
class Stage:
    """Layers ``first..last`` (inclusive) on ``devices``; ``shares[i]`` samples of every
    micro-batch go to ``devices[i]`` (in that order, as contiguous sample ranges)."""

    layers: tuple[int, int]
    devices: tuple[str, ...]
    shares: tuple[int, ...]

    def __post_init__(self) -> None:
        # (built in code as well as from JSON: (0, 1, 2), (None, 6) or shares ("8",) were
        # raw ValueErrors and TypeErrors; a device named None read as 'None')
        if not (isinstance(self.layers, (tuple, list)) and len(self.layers) == 2
                and all(is_int(v) for v in self.layers)):
            raise PlanError(f"stage layers are [first, last] (two integers), got "
                            f"{self.layers!r}")
        if not all(isinstance(d, str) and d for d in self.devices):
            raise PlanError(f"stage devices are non-empty names, got {list(self.devices)!r}")
        if not all(is_int(v) for v in self.shares):
            raise PlanError(f"stage shares are whole numbers of samples, got "
                            f"{list(self.shares)!r}")
        first, last = self.layers
        if first < 0 or last < first:
            raise PlanError(f"stage layers must be [first, last] with 0 <= first <= last, "
                            f"got {list(self.layers)}")
        if not self.devices:
            raise PlanError(f"stage {list(self.layers)} has no devices")
        if len(self.devices) != len(self.shares):
            raise PlanError(f"stage {list(self.layers)} has {len(self.devices)} devices but "
                            f"{len(self.shares)} shares")
        if any(s < 1 for s in self.shares):
            raise PlanError(f"every share must be >= 1 sample, got {list(self.shares)} for "
                            f"devices {list(self.devices)}")

    @property
    def first(self) -> int:
        return self.layers[0]

    @property
    def last(self) -> int:
        return self.layers[1]

    @property
    def micro_batch_size(self) -> int:
        return sum(self.shares)

    def sample_ranges(self) -> dict[str, tuple[int, int]]:
        """Half-open sample range ``[start, stop)`` of every device within a micro-batch."""
        out: dict[str, tuple[int, int]] = {}
        start = 0
        for device, share in zip(self.devices, self.shares):
            out[device] = (start, start + share)
            start += share
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "devices": list(self.devices),
                "shares": list(self.shares)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stage:
        layers = tuple(int(v) for v in data["layers"])
        if len(layers) != 2:
            raise PlanError(f"stage layers are [first, last], got {data['layers']!r}")
        return cls(layers=(layers[0], layers[1]),
                   devices=tuple(data["devices"]),
                   shares=tuple(int(s) for s in data["shares"]))


@dataclass(frozen=True)
class StagePrediction:
    """Predicted terms of one stage (seconds): E_f/E_b include the input cut's transfer."""

    e_f: float
    e_b: float
    t_w: float
    t_e: float
    t_a: float
    compute_f: float = 0.0
    compute_b: float = 0.0
    comm_f: float = 0.0
    comm_b: float = 0.0

    @property
    def total(self) -> float:
        return self.t_w + self.t_e + self.t_a

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in
                ("e_f", "e_b", "t_w", "t_e", "t_a", "compute_f", "compute_b", "comm_f", "comm_b")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StagePrediction:
        return cls(**{k: float(v) for k, v in data.items()})


@dataclass(frozen=True)
class Prediction:
    """What the latency/memory model predicts for one plan.

    ``round_time_s`` is the closed-form round-latency model (``solver.evaluate``, the
    planners' objective). ``simulated_round_time_s``, when set, is the event simulation of
    the same plan with the same times (``solver.simulate``): it executes the schedule
    micro-batch by micro-batch, so it also sees the bubbles of a dominant stage that its
    neighbours and their transfers cannot keep busy, which the closed form misses
    (docs/latency-model.md, cause 7). A run compares its rounds with
    :attr:`expected_round_time_s`, the simulation where there is one."""

    round_time_s: float
    throughput_samples_s: float
    peak_memory_bytes: Mapping[str, int]
    memory_capacity_bytes: Mapping[str, int]
    stages: tuple[StagePrediction, ...]
    dominant_stage: int
    simulated_round_time_s: float | None = None

    @property
    def expected_round_time_s(self) -> float:
        """The round a run should measure: the simulation if there is one, else the model."""
        return (self.round_time_s if self.simulated_round_time_s is None
                else self.simulated_round_time_s)

    @property
    def fits(self) -> bool:
        return all(self.peak_memory_bytes[d] <= self.memory_capacity_bytes[d]
                   for d in self.peak_memory_bytes)

    def memory_shortfall(self) -> dict[str, int]:
        """Bytes missing per device that does not fit (empty when the plan fits)."""
        return {d: self.peak_memory_bytes[d] - self.memory_capacity_bytes[d]
                for d in self.peak_memory_bytes
                if self.peak_memory_bytes[d] > self.memory_capacity_bytes[d]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "round_time_s": self.round_time_s,
            "throughput_samples_s": self.throughput_samples_s,
            "peak_memory_bytes": dict(self.peak_memory_bytes),
            "memory_capacity_bytes": dict(self.memory_capacity_bytes),
            "stages": [s.to_dict() for s in self.stages],
            "dominant_stage": self.dominant_stage,
            **({} if self.simulated_round_time_s is None
               else {"simulated_round_time_s": self.simulated_round_time_s}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Prediction:
        return cls(
            round_time_s=float(data["round_time_s"]),
            throughput_samples_s=float(data["throughput_samples_s"]),
            peak_memory_bytes={str(k): int(v) for k, v in data["peak_memory_bytes"].items()},
            memory_capacity_bytes={str(k): int(v)
                                   for k, v in data["memory_capacity_bytes"].items()},
            stages=tuple(StagePrediction.from_dict(s) for s in data["stages"]),
            dominant_stage=int(data["dominant_stage"]),
            simulated_round_time_s=(None if data.get("simulated_round_time_s") is None
                                    else float(data["simulated_round_time_s"])),
        )


@dataclass(frozen=True)
class SearchBound:
    """What the search proved about the plan (``planner.bound`` in ``plan.json``).

    ``space`` names the plans the bound covers (``"classes"``: every group of devices in
    every order, i.e. ``planner="ilp-wide"``'s space; ``"order"``: slices of the
    capability order), over ``cuts`` candidate cut positions of ``layers - 1`` (solver.space
    [Note: candidate cuts]). ``bound_s`` is a proven lower bound on the round time of every
    plan of that space; ``gap`` = ``(round - bound) / bound`` (0.0: proven optimal).
    ``stopped`` says why the search ended early (``"time limit"``; ``"size limit"``: the
    space was too large to search without a time limit), empty when it finished.
    ``order_optimal``: the plan is at least as good as every plan of the paper's space
    (slices of the capability order), which was searched to its end.
    """

    space: str
    bound_s: float
    gap: float
    cuts: int
    layers: int
    stopped: str = ""
    order_optimal: bool = False

    @property
    def optimal(self) -> bool:
        return self.gap <= 1e-9

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space, "bound_s": self.bound_s, "gap": self.gap,
                "cuts": self.cuts, "layers": self.layers, "stopped": self.stopped,
                "order_optimal": self.order_optimal}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchBound:
        return cls(space=str(data["space"]), bound_s=float(data["bound_s"]),
                   gap=float(data["gap"]), cuts=int(data.get("cuts", 0)),
                   layers=int(data.get("layers", 0)), stopped=str(data.get("stopped", "")),
                   order_optimal=bool(data.get("order_optimal", False)))


@dataclass(frozen=True)
class PlannerInfo:
    """Which planner made the plan, how long it searched, what it proved (``bound``,
    None for planners that prove nothing) and any DP/ILP cross-check."""

    name: str
    version: str = "1"
    search_time_s: float = 0.0
    check: Mapping[str, Any] = field(default_factory=dict)
    bound: SearchBound | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version,
                               "search_time_s": self.search_time_s,
                               "check": dict(self.check)}
        if self.bound is not None:  # absent in plans of before (and of baselines)
            out["bound"] = self.bound.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlannerInfo:
        bound = data.get("bound")
        return cls(name=str(data["name"]), version=str(data.get("version", "1")),
                   search_time_s=float(data.get("search_time_s", 0.0)),
                   check=dict(data.get("check", {})),
                   bound=None if bound is None else SearchBound.from_dict(bound))


@dataclass(frozen=True)
class Plan:
    """A hybrid-pipeline plan: the single input of the runtime (``plan.json``).

    ``plan_version`` counts re-plans during one training run (0 = the initial plan).
    ``optimizer_state_factor`` is optimizer state in units of the weights (0 for plain
    SGD, 1 for momentum, 2 for Adam) and is used by the memory model.
    """

    model_hash: str
    cluster_hash: str
    batch_size: int
    micro_batch_size: int
    num_micro_batches: int
    stages: tuple[Stage, ...]
    schedule: str = "1f1b"
    predicted: Prediction | None = None
    replicas: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    planner: PlannerInfo = field(default_factory=lambda: PlannerInfo("manual"))
    num_layers: int = 0
    model_name: str = ""
    optimizer_state_factor: float = 0.0
    plan_version: int = 0

    def __post_init__(self) -> None:
        if not self.stages:
            raise PlanError("a plan needs at least one stage")
        odd = [type(st).__name__ for st in self.stages if not isinstance(st, Stage)]
        if odd:     # (a dict was AttributeError: 'dict' object has no attribute 'first')
            raise PlanError(f"a plan's stages are Stage objects, got {', '.join(odd)}; make "
                            f"them with Stage(layers, devices, shares) or Stage.from_dict")
        if self.micro_batch_size < 1 or self.num_micro_batches < 1:
            raise PlanError(f"micro_batch_size ({self.micro_batch_size}) and num_micro_batches "
                            f"({self.num_micro_batches}) must be >= 1")
        if self.batch_size > MAX_BATCH_SIZE:
            raise PlanError(f"batch_size {self.batch_size} is above {MAX_BATCH_SIZE}, the "
                            f"largest a plan may have; re-plan a smaller batch")
        if self.micro_batch_size * self.num_micro_batches != self.batch_size:
            raise PlanError(
                f"batch_size ({self.batch_size}) must equal micro_batch_size "
                f"({self.micro_batch_size}) x num_micro_batches ({self.num_micro_batches})")
        if self.schedule not in ("1f1b", "gpipe"):
            raise PlanError(f"schedule must be '1f1b' or 'gpipe', got {self.schedule!r}")
        expected = 0
        seen: set[str] = set()
        for index, stage in enumerate(self.stages):
            if stage.first != expected:
                after = ("the first stage starts at layer 0" if index == 0 else
                         f"stage {index - 1} ends at layer {expected - 1}, so it must start at "
                         f"{expected}")
                raise PlanError(f"stage {index} starts at layer {stage.first} but {after}; "
                                f"stages must cover the layers in order, each once")
            expected = stage.last + 1
            if stage.micro_batch_size != self.micro_batch_size:
                raise PlanError(f"stage {index} shares {list(stage.shares)} add up to "
                                f"{stage.micro_batch_size}, not the micro-batch size "
                                f"{self.micro_batch_size}")
            for device in stage.devices:
                if device in seen:
                    raise PlanError(f"device {device!r} appears in more than one stage")
                seen.add(device)
        if self.num_layers and expected != self.num_layers:
            raise PlanError(f"stages cover layers 0..{expected - 1} but the model has "
                            f"{self.num_layers} layers")

    # -- queries ----------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for stage in self.stages for d in stage.devices)

    def stage_of(self, device: str) -> int:
        for index, stage in enumerate(self.stages):
            if device in stage.devices:
                return index
        raise PlanError(f"device {device!r} is not in the plan; plan devices: "
                        f"{list(self.devices)}")

    def with_prediction(self, prediction: Prediction) -> Plan:
        return replace(self, predicted=prediction)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "model_name": self.model_name,
            "model_hash": self.model_hash,
            "cluster_hash": self.cluster_hash,
            "num_layers": self.num_layers,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "num_micro_batches": self.num_micro_batches,
            "schedule": self.schedule,
            "optimizer_state_factor": self.optimizer_state_factor,
            "plan_version": self.plan_version,
            "stages": [s.to_dict() for s in self.stages],
            "replicas": {k: list(v) for k, v in self.replicas.items()},
            "planner": self.planner.to_dict(),
            "predicted": None if self.predicted is None else self.predicted.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan is a JSON object, got {type(data).__name__}")
        if "stages" not in data and "layers" in data and "cut_bytes" in data:
            raise PlanError("this is a cost table, not a plan (it has layers and cut_bytes, no "
                            "stages); give the plan.json of `asteroid-fx plan`")
        if data.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise PlanError(f"plan version {data.get('version')!r} is not supported "
                            f"(expected {PLAN_VERSION}); re-run `asteroid-fx plan`")
        try:
            predicted = data.get("predicted")
            return cls(
                model_hash=str(data["model_hash"]),
                cluster_hash=str(data["cluster_hash"]),
                batch_size=int(data["batch_size"]),
                micro_batch_size=int(data["micro_batch_size"]),
                num_micro_batches=int(data["num_micro_batches"]),
                stages=tuple(Stage.from_dict(s) for s in data["stages"]),
                schedule=str(data.get("schedule", "1f1b")),
                predicted=None if predicted is None else Prediction.from_dict(predicted),
                replicas={str(k): tuple(str(x) for x in v)
                          for k, v in data.get("replicas", {}).items()},
                planner=PlannerInfo.from_dict(data.get("planner", {"name": "manual"})),
                num_layers=int(data.get("num_layers", 0)),
                model_name=str(data.get("model_name", "")),
                optimizer_state_factor=float(data.get("optimizer_state_factor", 0.0)),
                plan_version=int(data.get("plan_version", 0)),
            )
        except KeyError as exc:
            raise PlanError(f"plan is missing the field {exc.args[0]!r}") from exc
        except MALFORMED as exc:   # (a field of the wrong type or size)
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"malformed plan: {type(exc).__name__}: {exc}; re-create it with "
                            f"`asteroid-fx plan`") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(parse_json(text, PlanError, "plan",
                                        "re-create it with `asteroid-fx plan`"))

    def save(self, path: str | Path) -> None:
        """Write the JSON to ``path`` whole or not at all ([Note: whole files] in
        ``contracts.files``)."""
        write_text(path, self.to_json(), "plan")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        fix = f"create it with `asteroid-fx plan MODEL --cluster C --batch-size N --out {path}`"
        return cls.from_dict(read_json(path, PlanError, "plan file", fix))
