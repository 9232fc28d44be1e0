"""Interpreter of one rank's action list: forward/backward, transfers, group all-reduce, step."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from contracts.errors import AsteroidError, RuntimeFailure, StageFailure
from contracts.plan import Plan
from runtime.comm import Comm, gradient_buckets
from runtime.lowering import incoming, outgoing
from runtime.memory import MemoryMeter
from runtime.schedule import Action, ActionKind, rank_stages

__all__ = ["RoundStats", "StageExecutor", "micro_batch_rows"]

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]

# [Note: loss scaling]
# Device d of the last stage sees ``share_d`` samples of every micro-batch. With a mean
# loss_fn its shard loss is a mean over ``share_d`` samples, so it is scaled by
# ``share_d / batch_size``: summed over the devices and the micro-batches this is exactly
# the mean loss over the mini-batch, and so are the gradients. A stage's gradients are then
# SUMMED (not averaged) over its device group, which gives single-device training up to float
# rounding. With ``loss_reduction="sum"`` the weight is 1 (the sum is already additive).
# BatchNorm in train mode normalises over each device's shard only (like DDP without
# SyncBatchNorm), so such models are not bit-for-bit transparent.


def micro_batch_rows(plan: Plan, microbatch: int, start: int, stop: int) -> slice:
    """Rows of the mini-batch holding samples ``[start, stop)`` of ``microbatch``."""
    base = microbatch * plan.micro_batch_size
    return slice(base + start, base + stop)


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _slice_rows(value: Any, rows: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[rows]
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_rows(v, rows) for v in value)
    raise RuntimeFailure(f"targets must be a tensor or a tuple of tensors with the batch in "
                         f"dimension 0, got {type(value).__name__}")


@dataclass
class RoundStats:
    """What one rank measured during one round (seconds)."""

    loss: float = 0.0                 # this rank's weighted share of the mini-batch loss
    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)
    allreduce_s: float = 0.0
    optimizer_s: float = 0.0


class StageExecutor:
    """Runs one rank's actions with a dispatch table; the action list is the only schedule.

    Args:
        plan: the plan (stage, share and micro-batch geometry).
        rank: this rank (``plan.devices[rank]`` is its device).
        module: this rank's stage module (calling convention of DESIGN.md).
        comm: point-to-point / all-reduce helper.
        loss_fn: ``loss_fn(outputs, targets)``; used on the last stage only.
        optimizer: steps this stage's parameters after every round.
        group: process group of the stage's devices (None when the stage has one device).
        loss_reduction: ``"mean"`` (default) or ``"sum"`` - see [Note: loss scaling].
        compute_scale: emulated slowness; after each F/B the rank sleeps
            ``(compute_scale - 1) x`` the measured compute time (1.0 = no dilation).
        memory: counts the tensors this rank holds at every action boundary of the rounds
            it is told to (``MemoryMeter.begin_round``; see runtime/memory.py).
    """

    def __init__(self, plan: Plan, rank: int, module: torch.nn.Module, comm: Comm,
                 loss_fn: LossFn, optimizer: torch.optim.Optimizer, *, group: Any = None,
                 loss_reduction: str = "mean", compute_scale: float = 1.0,
                 device: torch.device | None = None,
                 memory: MemoryMeter | None = None) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise RuntimeFailure(f"loss_reduction must be 'mean' or 'sum', got "
                                 f"{loss_reduction!r}")
        self.plan = plan
        self.rank = rank
        self.stage = rank_stages(plan)[rank]
        self.device_name = plan.devices[rank]
        self.start, self.stop = plan.stages[self.stage].sample_ranges()[self.device_name]
        self.is_first = self.stage == 0
        self.is_last = self.stage == plan.num_stages - 1
        self.module = module
        self.comm = comm
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.group = group
        first = sum(len(s.devices) for s in plan.stages[: self.stage])
        self.group_ranks = list(range(first, first + len(plan.stages[self.stage].devices)))
        share = self.stop - self.start
        self.loss_weight = share / plan.batch_size if loss_reduction == "mean" else 1.0
        self.compute_scale = compute_scale
        self.device = device or torch.device("cpu")
        self.memory = memory
        self._outgoing = sorted(outgoing(plan, rank), key=lambda t: t.start)
        self._incoming = incoming(plan, rank)
        self._dispatch: dict[ActionKind, Callable[[Action], None]] = {
            ActionKind.F: self._forward,
            ActionKind.B: self._backward,
            ActionKind.SEND_F: self._send_f,
            ActionKind.RECV_F: self._recv_f,
            ActionKind.SEND_B: self._send_b,
            ActionKind.RECV_B: self._recv_b,
        }
        self._reset_round(None, None)

    # -- state of one round ---------------------------------------------------------------
    def _reset_round(self, inputs: Sequence[torch.Tensor] | None, targets: Any) -> None:
        self._batch_inputs = inputs
        self._batch_targets = targets
        self._recv_inputs: dict[int, list[torch.Tensor]] = {}
        self._inputs: dict[int, list[torch.Tensor]] = {}
        self._outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._losses: dict[int, torch.Tensor] = {}
        self._out_grads: dict[int, list[torch.Tensor]] = {}
        self._in_grads: dict[int, list[torch.Tensor]] = {}
        self._stats = RoundStats()

    @property
    def live_microbatches(self) -> int:
        """Micro-batches whose activations this rank still holds (for tests)."""
        return len(self._outputs) + len(self._losses)

    def held_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this rank holds between actions: the mini-batch (first and last
        stage), received inputs, inputs and outputs of micro-batches awaiting backward,
        losses, gradients received or to be sent, and unflushed send buffers."""
        yield from _tensors(self._batch_inputs)
        yield from _tensors(self._batch_targets)
        for values in (self._recv_inputs, self._inputs, self._outputs, self._losses,
                       self._out_grads, self._in_grads):
            for value in values.values():
                yield from _tensors(value)
        yield from self.comm.held()

    def _observe(self, *extra: torch.Tensor) -> None:
        if self.memory is not None and self.memory.counting:
            self.memory.observe([*self.held_tensors(), *extra])

    def run_round(self, actions: Sequence[Action], step: int,
                  inputs: Sequence[torch.Tensor] | None, targets: Any,
                  releases: Mapping[int, Sequence[Action]] | None = None) -> RoundStats:
        """Run one mini-batch: every action, then the group all-reduce and optimizer step.

        ``inputs`` (stage 0) and ``targets`` (last stage) are the whole mini-batch; the rank
        slices its own rows. ``releases`` (``runtime.lowering.send_releases`` of this rank)
        frees send buffers as soon as they are known to be received; without it they are
        all awaited at the end of the round. Raises ``StageFailure`` naming rank, step and
        action.
        """
        self._reset_round(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.module.train()
        current = "start"
        try:
            self._observe()
            for index, action in enumerate(actions):
                current = str(action)
                self._dispatch[action.kind](action)
                if releases is not None and index in releases:
                    self.comm.release(releases[index])
                self._observe()
            current = "flush sends"
            self.comm.flush()
            current = "all-reduce"
            self._all_reduce_grads()
            current = "optimizer step"
            start = time.perf_counter()
            self.optimizer.step()
            self._stats.optimizer_s = time.perf_counter() - start
        except StageFailure:
            raise
        except (AsteroidError, RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise StageFailure(f"rank {self.rank} (device {self.device_name!r}, stage "
                               f"{self.stage}) failed at step {step}, action {current}: "
                               f"{type(exc).__name__}: {exc}") from exc
        stats = self._stats
        self._reset_round(None, None)
        return stats

    # -- compute ---------------------------------------------------------------------------
    def _timed(self, fn: Callable[[], None], into: list[float]) -> None:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if self.compute_scale > 1.0:
            time.sleep((self.compute_scale - 1.0) * elapsed)
        into.append(time.perf_counter() - start)

    def _forward(self, action: Action) -> None:
        m = action.microbatch
        if self.is_first:
            if self._batch_inputs is None:
                raise RuntimeFailure("stage 0 needs the mini-batch inputs")
            rows = micro_batch_rows(self.plan, m, self.start, self.stop)
            inputs = [x[rows].to(self.device) for x in self._batch_inputs]
        else:
            inputs = self._recv_inputs.pop(m)
            for x in inputs:
                if _is_float(x):
                    x.requires_grad_(True)

        def run() -> None:
            if self.memory is not None:
                with self.memory.forward(m):
                    compute()
            else:
                compute()

        def compute() -> None:
            out = self.module(*inputs)
            if self.is_last:
                rows = micro_batch_rows(self.plan, m, self.start, self.stop)
                targets = _slice_rows(self._batch_targets, rows)
                loss = self.loss_fn(out, targets)
                self._losses[m] = loss * self.loss_weight
                self._stats.loss += float(self._losses[m].detach())
            else:
                self._outputs[m] = out if isinstance(out, tuple) else (out,)
            self._inputs[m] = inputs

        self._timed(run, self._stats.forward_s)

    def _backward(self, action: Action) -> None:
        m = action.microbatch
        inputs = self._inputs.pop(m)

        def run() -> None:
            if self.is_last:
                self._losses.pop(m).backward()
            else:
                outputs = self._outputs.pop(m)
                grads = iter(self._out_grads.pop(m))
                pairs = [(o, next(grads)) for o in outputs if _is_float(o)]
                pairs = [(o, g) for o, g in pairs if o.requires_grad]
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            if not self.is_first:
                self._in_grads[m] = [x.grad if x.grad is not None else torch.zeros_like(x)
                                     for x in inputs if _is_float(x)]

        self._timed(run, self._stats.backward_s)
        if self.memory is not None:
            self.memory.backward_done(m)

    # -- communication -----------------------------------------------------------------------
    def _send_f(self, action: Action) -> None:
        outputs = self._outputs[action.microbatch]
        items = [(t.dst, [o.detach()[t.start - self.start: t.stop - self.start]
                          for o in outputs]) for t in self._outgoing]
        self.comm.send(items, "f", key=action)

    def _recv_f(self, action: Action) -> None:
        pieces = self.comm.recv([t.src for t in self._incoming], "f")
        count = len(pieces[0])
        self._recv_inputs[action.microbatch] = [
            torch.cat([p[i] for p in pieces]) if len(pieces) > 1 else pieces[0][i]
            for i in range(count)]

    def _send_b(self, action: Action) -> None:
        grads = self._in_grads.pop(action.microbatch)
        items = [(t.src, [g[t.start - self.start: t.stop - self.start] for g in grads])
                 for t in self._incoming]
        self.comm.send(items, "b", key=action)

    def _recv_b(self, action: Action) -> None:
        pieces = self.comm.recv([t.dst for t in self._outgoing], "b")
        count = len(pieces[0])
        self._out_grads[action.microbatch] = [
            torch.cat([p[i] for p in pieces]) if len(pieces) > 1 else pieces[0][i]
            for i in range(count)]

    # -- data parallelism inside the stage ---------------------------------------------------
    def _all_reduce_grads(self) -> None:
        if self.group is None or len(self.group_ranks) < 2:
            return
        start = time.perf_counter()
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        self.comm.all_reduce(gradient_buckets(grads), self.group, self.group_ranks,
                             observe=self._observe)
        self._stats.allreduce_s = time.perf_counter() - start

