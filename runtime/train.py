"""The reproducible training loop of one device (seeded weights and batches, metrics)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from contracts.arguments import is_number
from contracts.errors import RuntimeFailure
from contracts.inputs import model_inputs
from contracts.plan import Plan
from runtime.comm import Comm
from runtime.executor import StageExecutor
from runtime.lowering import add_comms, recv_posts, send_releases
from runtime.memory import MemoryMeter
from runtime.schedule import compute_schedule, rank_stages
from runtime.ties import TieGroup, tie_groups, tied_parameters_of
from runtime.validate import check_schedule

__all__ = [
    "StageSource",
    "DirectorySource",
    "TrainConfig",
    "check_lr",
    "TrainHooks",
    "WorkerResult",
    "load_stage_weights",
    "model_state",
    "pace_speed",
    "compute_scale",
    "make_optimizer",
    "resolve_loss_fn",
    "train_device",
]

log = logging.getLogger(__name__)


class StageSource(Protocol):
    """Where a device gets its plan, the user's model file and its stage module."""

    def load_plan(self) -> Plan: ...

    def model_module(self) -> Any: ...

    def load_stage(self, index: int) -> torch.nn.Module: ...


@dataclass(frozen=True)
class DirectorySource:
    """A saved partition directory (read through ``runtime.stage_io``)."""

    directory: str

    def load_plan(self) -> Plan:
        from runtime.stage_io import load_plan

        return load_plan(self.directory)

    def model_module(self) -> Any:
        """The model functions (``runtime.stage_io.model_namespace``)."""
        from runtime.stage_io import model_namespace

        return model_namespace(self.directory)

    def load_stage(self, index: int) -> torch.nn.Module:
        from runtime.stage_io import load_stage

        return load_stage(self.directory, index)

    def tied_parameters(self) -> dict[str, Any]:
        from runtime.stage_io import load_partition_meta

        return dict(load_partition_meta(self.directory).tied)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a device needs besides its source (plain data: it travels as JSON in a
    ``runtime.protocol.Assignment``)."""

    steps: int = 10
    seed: int = 0
    lr: float = 0.01
    timeout_s: float = 120.0
    metrics: str | None = None             # written by rank 0
    compute_scale: float = 1.0             # time dilation (1.0 = none)
    link_bytes_s: tuple[tuple[float, ...], ...] | None = None   # [src][dst], None = no pacing
    link_latency_s: tuple[tuple[float, ...], ...] | None = None  # [src][dst] seconds, or None
    #: emulation: per rank, the bytes/s its storage reads and writes a disk cache at (the
    #: cluster's ``storage_mb_s`` over the slow-down factor; inf: not paced); None: none
    storage_bytes_s: tuple[float, ...] | None = None
    time_factor: float = 1.0               # emulation: the slow-down factor of every time
    # what metrics rows compare with: "plan" (the plan's predicted round), "emulated" (times
    # time_factor) or "calibrated" (a re-plan predicted on the run's calibrated costs)
    prediction: str = "plan"
    loss_reduction: str = "mean"
    return_state: bool = False
    start_step: int = 0                    # first step to run (> 0 after a recovery)
    append_metrics: bool = False           # keep earlier lines of ``metrics``
    #: > 0: mini-batch ``k`` is samples ``(k mod N//B)*B ...`` of ``runtime.samples`` (the
    #: model file's ``dataset()`` or per-index seeds, as PAC fine-tuning takes them) instead
    #: of ``sample_batch(B)`` seeded per step
    num_samples: int = 0

    def __post_init__(self) -> None:
        # (checked where the run is set up, not in a device process after the launch)
        check_lr(self.lr)


def check_lr(lr: object) -> None:
    """``RuntimeFailure`` unless ``lr`` is a finite learning rate >= 0."""
    if not (is_number(lr) and 0.0 <= lr < float("inf")):
        raise RuntimeFailure(f"--lr must be a learning rate >= 0, got {lr!r}")


class TrainHooks(Protocol):
    """Called by :func:`train_device` around each step (checkpoints, replicas, recovery)."""

    def restore(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                stage_index: int) -> None:
        """After the seeded initial weights are loaded: replace them (recovery)."""

    def round_started(self, step: int) -> None:
        """Every rank has passed the barrier that opens round ``step``."""

    def step_done(self, step: int, module: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> None:
        """This rank's optimizer step of round ``step`` is done (not yet committed)."""

    def step_committed(self, step: int, record: dict[str, Any],
                       compute_s: tuple[float, float] | None = None) -> None:
        """Every rank finished round ``step`` (its loss was all-reduced); ``compute_s`` is
        this rank's mean (forward, backward) seconds per micro-batch in that round."""

    def leave_requested(self) -> bool:
        """Whether this device was asked to leave gracefully (e.g. SIGTERM) after the round
        it is in."""

    def generation_ends(self, step: int, module: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, leaving: bool) -> None:
        """Round ``step`` is committed and some device (``leaving``: this one) leaves after
        it: keep and hand over this rank's state of ``step``; training stops here."""


@dataclass
class WorkerResult:
    """What one device reports after training."""

    rank: int
    device: str
    stage: int
    losses: list[float] = field(default_factory=list)
    round_times: list[float] = field(default_factory=list)
    forward_s: float = 0.0        # mean per micro-batch (after the first step)
    backward_s: float = 0.0
    #: CPU time of the computing thread per forward / backward (same micro-batches)
    forward_cpu_s: float = 0.0
    backward_cpu_s: float = 0.0
    allreduce_s: float = 0.0
    #: this rank's seconds in the round's all-reduces, per step (the steps ``allreduce_s``
    #: averages), waiting for the other ranks included
    allreduce_times: list[float] = field(default_factory=list)
    state: dict[str, torch.Tensor] | None = None
    #: training stopped after this committed step because a device left gracefully
    ended_after: int | None = None
    #: peak memory of this device's tensors and what the process reserved for them (bytes;
    #: see runtime/memory.py [Note: measured memory]), how the latter was measured, and
    #: the tensor-level count by kind (params, grads, optimizer_state, buffers, in_flight)
    peak_memory_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    reserved_method: str = "none"
    tensor_memory: dict[str, int] = field(default_factory=dict)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of ``model``'s state dict and of its non-persistent buffers: a
    stage's code keeps every buffer it reads as its own (Llama's rotary ``inv_freq``,
    which ``state_dict()`` leaves out), so the seeded model must supply them too."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, buffer in model.named_buffers():
        if name not in state:
            state[name] = buffer.detach().clone()
    return state


def load_stage_weights(stage: torch.nn.Module, full_state: dict[str, torch.Tensor],
                       index: int) -> None:
    """Copy the stage's own parameters and buffers (by qualified name) from the seeded
    full model's state dict."""
    own = stage.state_dict()
    missing = sorted(k for k in own if k not in full_state)
    if missing:
        raise RuntimeFailure(f"stage {index} has parameters {missing[:5]} that "
                             f"build_model() does not define; re-run `asteroid-fx partition` "
                             f"with the same model file")
    stage.load_state_dict({k: full_state[k] for k in own}, strict=True)


def make_optimizer(module: Any, params: list[torch.nn.Parameter],
                   lr: float) -> torch.optim.Optimizer:
    """``build_optimizer(params)`` from the model file, else plain SGD(lr).

    A stage without parameters (only activations, pooling, ...) gets an SGD over one empty
    placeholder tensor, so every stage runs the same step logic (optimizers refuse an
    empty parameter list, and so may a user's ``build_optimizer``).
    """
    if not params:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(0))], lr=lr)
    build = getattr(module, "build_optimizer", None)
    if callable(build):
        opt = build(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise RuntimeFailure(f"build_optimizer must return a torch.optim.Optimizer, got "
                                 f"{type(opt).__name__}")
        return opt
    return torch.optim.SGD(params, lr=lr)


def resolve_loss_fn(module: Any) -> Callable[[Any, Any], torch.Tensor]:
    fn = getattr(module, "loss_fn", None)
    return fn if callable(fn) else F.cross_entropy


def pace_speed(source: Any, rank: int) -> float:
    """The speed ``rank``'s compute calls are paced to (``PerRankScale``; 1.0: none)."""
    per_rank = getattr(source, "pace_speed", None)
    return float(per_rank(rank)) if callable(per_rank) else 1.0


def compute_scale(source: Any, rank: int, config: TrainConfig) -> float:
    """The time dilation of ``rank``'s compute (``PerRankScale``; else the config's)."""
    per_rank = getattr(source, "compute_scale", None)
    return float(per_rank(rank)) if callable(per_rank) else config.compute_scale


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _batch(model_file: Any, batch_size: int, config: TrainConfig, step: int,
           samples: Any) -> tuple[Any, Any]:
    """Mini-batch ``step``: seeded ``sample_batch`` (the reproducible-run contract) or, with
    ``config.num_samples``, the fine-tuning samples of [Note: fine-tuning data]."""
    if samples is None:
        torch.manual_seed(config.seed + 1 + step)
        out: tuple[Any, Any] = model_file.sample_batch(batch_size)
        return out
    k = step % samples.steps_per_epoch(batch_size)
    rows: tuple[Any, Any] = samples.rows(k * batch_size, (k + 1) * batch_size)
    return rows


def _tie_groups(source: StageSource, plan: Plan) -> list[TieGroup]:
    """The source's parameters tied across stages (none where it does not say)."""
    tied = getattr(source, "tied_parameters", None)
    return tie_groups(plan, tied()) if callable(tied) else []


def train_device(source: StageSource, rank: int, config: TrainConfig, *,
                 device: torch.device | None = None,
                 report: Callable[[dict[str, Any]], None] | None = None,
                 hooks: TrainHooks | None = None) -> WorkerResult:
    """Train this rank's stage for ``config.steps`` mini-batches (process group ready).

    Per the reproducible-run contract: ``torch.manual_seed(seed)`` then ``build_model()``
    gives the initial weights (each stage copies its own by name); mini-batch ``k`` is
    ``sample_batch(batch_size)`` right after ``torch.manual_seed(seed + 1 + k)``. The loss
    of a step is the mean loss over the whole mini-batch (summed over the last stage).
    """
    device = device or torch.device("cpu")
    plan = source.load_plan()
    stages = rank_stages(plan)
    if not dist.is_initialized() or dist.get_world_size() != len(stages):
        raise RuntimeFailure(f"the plan has {len(stages)} devices {list(plan.devices)} but "
                             f"the process group has "
                             f"{dist.get_world_size() if dist.is_initialized() else 0} ranks; "
                             f"launch one process per device")
    stage_index = stages[rank]
    model_file = source.model_module()

    torch.manual_seed(config.seed)
    full_state = model_state(model_file.build_model())
    module = source.load_stage(stage_index).to(device)
    load_stage_weights(module, full_state, stage_index)
    del full_state
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(model_file, params, config.lr)
    if hooks is not None:
        hooks.restore(module, optimizer, stage_index)

    groups: list[Any] = []
    start = 0
    for stage in plan.stages:   # every rank creates every group, in the same order
        ranks = list(range(start, start + len(stage.devices)))
        groups.append(dist.new_group(ranks) if len(ranks) > 1 else None)
        start += len(stage.devices)
    ties: list[tuple[list[torch.nn.Parameter], Any, tuple[int, ...]]] = []
    for tie in _tie_groups(source, plan):   # every rank creates every group, by name
        tie_group = dist.new_group(list(tie.ranks))
        if stage_index in tie.stages:
            ties.append((tied_parameters_of(module, tie, stage_index), tie_group, tie.ranks))

    links, latency = config.link_bytes_s, config.link_latency_s
    comm = Comm(rank, device, timeout_s=config.timeout_s,
                link_bytes_s=None if links is None else (lambda a, b: links[a][b]),
                link_latency_s=None if latency is None else (lambda a, b: latency[a][b]))
    meter = MemoryMeter(module, optimizer, device)
    executor = StageExecutor(plan, rank, module, comm, resolve_loss_fn(model_file), optimizer,
                             group=groups[stage_index], loss_reduction=config.loss_reduction,
                             compute_scale=compute_scale(source, rank, config), device=device,
                             pace=pace_speed(source, rank),
                             memory=meter, ties=ties)
    schedule = add_comms(plan, compute_schedule(plan))
    all_posts = recv_posts(plan, schedule)
    check_schedule(plan, schedule, all_posts)
    actions = schedule[rank]
    releases = send_releases(plan, schedule)[rank]
    posts = all_posts[rank]
    needs_batch = executor.is_first or executor.is_last

    result = WorkerResult(rank=rank, device=plan.devices[rank], stage=stage_index)
    forward: list[float] = []
    backward: list[float] = []
    forward_cpu: list[float] = []
    backward_cpu: list[float] = []
    allreduce: list[float] = []
    control = device if str(dist.get_backend()) == "nccl" else torch.device("cpu")
    metrics = Path(config.metrics) if config.metrics and rank == 0 else None
    if metrics is not None and not config.append_metrics:
        metrics.write_text("")
    samples = None
    if config.num_samples > 0 and needs_batch:
        from runtime.samples import SampleSource

        samples = SampleSource(model_file, config.seed, config.num_samples)
    meter.start()
    world = len(stages)
    for step in range(config.start_step, config.steps):
        inputs: Any = None
        targets: Any = None
        if needs_batch:
            inputs, targets = _batch(model_file, plan.batch_size, config, step, samples)
            inputs = model_inputs(inputs)
        dist.barrier()
        if hooks is not None:
            hooks.round_started(step)
        counting = step == config.start_step
        if counting:
            meter.begin_round()
        began = time.perf_counter()
        stats = executor.run_round(actions, step, inputs, targets, releases, posts)
        elapsed = time.perf_counter() - began
        if counting:
            meter.end_round()
        peak, reserved = meter.peaks()
        if hooks is not None:
            hooks.step_done(step, module, optimizer)
        # a graceful leave rides on the loss all-reduce, so every rank learns in the same
        # collective that this round is the last one (no rank starts the next round)
        leaving = hooks is not None and step < config.steps - 1 and hooks.leave_requested()
        loss_t = torch.tensor([stats.loss, 1.0 if leaving else 0.0], dtype=torch.float64,
                              device=control)
        # every rank's peak memory rides on the round-time all-reduce (MAX over slots that
        # only their owner fills; -1: not measured)
        time_t = torch.full((1 + 2 * world,), -1.0, dtype=torch.float64, device=control)
        time_t[0] = elapsed
        time_t[1 + rank] = float(peak)
        time_t[1 + world + rank] = -1.0 if reserved is None else float(reserved)
        dist.all_reduce(loss_t, op=dist.ReduceOp.SUM)
        dist.all_reduce(time_t, op=dist.ReduceOp.MAX)
        loss, round_time = float(loss_t[0]), float(time_t[0])
        peaks = [int(v) for v in time_t[1:].tolist()]
        leavers = int(round(float(loss_t[1])))
        result.losses.append(loss)
        result.round_times.append(round_time)
        if step > config.start_step or config.steps - config.start_step == 1:
            forward += stats.forward_s
            backward += stats.backward_s
            forward_cpu += stats.forward_cpu_s
            backward_cpu += stats.backward_cpu_s
            allreduce.append(stats.allreduce_s)
        record: dict[str, Any] = {"step": step, "loss": loss, "round_time_s": round_time,
                                  "plan_version": plan.plan_version}
        if plan.predicted is not None:
            record["predicted_round_time_s"] = (plan.predicted.expected_round_time_s
                                                * config.time_factor)
            record["prediction"] = config.prediction
        record["peak_memory_bytes"] = {d: peaks[i] for i, d in enumerate(plan.devices)}
        if any(v >= 0 for v in peaks[world:]):
            record["peak_reserved_bytes"] = {d: (peaks[world + i] if peaks[world + i] >= 0
                                                 else None)
                                             for i, d in enumerate(plan.devices)}
        if metrics is not None:
            with metrics.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        if hooks is not None:
            hooks.step_committed(step, record, (_mean(stats.forward_s),
                                                _mean(stats.backward_s)))
        if report is not None and rank == 0:
            report(record)
        log.debug("rank %d step %d loss %.6f round %.4fs", rank, step, loss, round_time)
        if leavers and hooks is not None:
            hooks.generation_ends(step, module, optimizer, leaving)
            result.ended_after = step
            break
    result.forward_s = _mean(forward)
    result.backward_s = _mean(backward)
    result.forward_cpu_s = _mean(forward_cpu)
    result.backward_cpu_s = _mean(backward_cpu)
    result.allreduce_s = _mean(allreduce)
    result.allreduce_times = allreduce
    if result.losses:        # as the last metrics line has them
        result.peak_memory_bytes, result.peak_reserved_bytes = peak, reserved
    else:
        result.peak_memory_bytes, result.peak_reserved_bytes = meter.peaks()
    result.reserved_method = meter.reserved_method
    result.tensor_memory = meter.parts()
    if config.return_state:
        result.state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return result
