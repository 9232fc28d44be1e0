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
from runtime.comm import Comm, gradient_buckets, message_tag
from runtime.faults import fault_point
from runtime.lowering import incoming, outgoing
from runtime.memory import MemoryMeter
from runtime.pacing import pace
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


def _split_rows(value: Any, rows: Sequence[slice], micro_batches: int, micro_batch_size: int,
                share: slice, device: torch.device) -> list[Any]:
    """``_slice_rows(value, r, device)`` for every ``r`` of ``rows`` (a rank's rows of each
    micro-batch). A contiguous tensor of the whole mini-batch is moved once and cut in one
    call: the pieces are views of it with the sizes, strides and offsets of the slices,
    so every loss or module computes on the same tensors."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 \
            and value.shape[0] == micro_batches * micro_batch_size:
        moved = value.to(device)
        if moved.is_contiguous():
            grid = moved.view(micro_batches, micro_batch_size, *moved.shape[1:])
            return list(grid[:, share].unbind(0))
    return [_slice_rows(value, r, device) for r in rows]


def _slice_rows(value: Any, rows: slice, device: torch.device) -> Any:
    """Rows ``rows`` of the targets ``value`` (a tensor, or a tuple or list of them), on
    ``device``: the model's output is there (a CUDA stage's loss needs CUDA targets)."""
    if isinstance(value, torch.Tensor):
        return value[rows].to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_rows(v, rows, device) for v in value)
    raise RuntimeFailure(f"targets must be a tensor or a tuple of tensors with the batch in "
                         f"dimension 0, got {type(value).__name__}")


# [Note: the round's program]
# ``run_round`` interprets a program compiled once from the rank's action list (and its
# send releases and receive posts): per action, the bound handler with its argument, the
# sends it releases and the receives to post before it. Nothing per message is looked up,
# formatted, inferred or logged in the step loop: peers and row slices are fixed at
# construction, shapes travel once (runtime/comm.py [Note: message format]), the memory
# meter only runs in the rounds it counts, and the action is named only when one fails.


# [Note: the loss's weight]
# The last stage's loss is ``loss_fn(out, targets) * loss_weight`` ([Note: loss scaling]).
# The weight is not multiplied in autograd's graph, where it cost a multiplication and a
# node per micro-batch, plus a ``float`` of the product: the backward starts from the
# gradient that the multiplication's backward would have passed on, ``ones * weight`` (the
# same multiplication, made once and cached), and the round's loss is the stacked raw
# losses times the weight (the same multiplication of each element, one call), added in
# micro-batch order as before. Both are the same floats, so gradients and losses are bit
# for bit unchanged. A loss that is not one element is refused, as ``float`` refused it.
#
# [Note: launching backward]
# ``torch.autograd.backward`` (and ``Tensor.backward``, which calls it) wraps the C++
# engine in Python that checks for functorch transforms and ``__torch_function__``
# subclasses, makes and shape-checks the gradient tensors (``ones_like`` of a loss) and
# copies the ``contextvars`` context into the engine's thread-local storage for device
# threads. Per backward on this host that is 20-30 us of CPU hot and 30-50 us as a
# pipeline stage runs it (woken from a wait, caches cold), once per micro-batch on every
# stage. A CPU stage whose roots are plain tensors calls the engine itself with the same
# arguments that ``torch.autograd.backward`` passes it (no graph kept or created, no
# ``inputs``, gradients accumulated) and gradients it already has: the received ones, or
# for the loss a cached tensor of ones of the loss's shape and dtype (the engine reads it
# and never writes it: it is held here, so it is never stolen). The engine itself checks
# the gradients' shapes, dtypes and devices against the roots' and that the roots need a
# gradient, so the errors are the same. The arithmetic is the same, so losses and
# gradients are bit for bit those of ``torch.autograd.backward``; any other stage (CUDA, a
# tensor subclass, a torch without the engine object) goes through
# ``torch.autograd.backward``.

_ENGINE: Any = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)


def _run_backward(roots: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  direct: bool) -> None:
    """Backward from ``roots`` with gradients ``grads`` (see [Note: launching backward])."""
    if direct and _ENGINE is not None and all(type(t) is torch.Tensor for t in roots):
        _ENGINE.run_backward(tuple(roots), tuple(grads), False, False, (),
                             allow_unreachable=True, accumulate_grad=True)
    else:
        torch.autograd.backward(list(roots), list(grads))


@dataclass(frozen=True)
class _Step:
    """One action of the compiled program."""

    run: Callable[[Any], None]
    arg: Any
    release: list[Action] | None
    post: list[tuple[list[int], str, int]]
    action: Action


@dataclass
class RoundStats:
    """What one rank measured during one round (seconds)."""

    loss: float = 0.0                 # this rank's weighted share of the mini-batch loss
    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)
    #: CPU time of the computing thread per forward / backward: with ``forward_s`` it tells
    #: computing from waiting for a core (a device held to a quota, or sharing the host)
    forward_cpu_s: list[float] = field(default_factory=list)
    backward_cpu_s: list[float] = field(default_factory=list)
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
        pace: a cgroup-capped rank's speed: each F/B ends no earlier than its CPU time over
            it (runtime/pacing.py; 1.0 = no pacing).
        memory: counts the tensors this rank holds at every action boundary of the rounds
            it is told to (``MemoryMeter.begin_round``; see runtime/memory.py).
        ties: this rank's copies of parameters tied across stages, each with the process
            group and ranks of every holding stage: their gradients are summed over those
            ranks instead of over ``group`` (see [Note: tied weights across stages] in
            runtime/ties.py).
    """

    def __init__(self, plan: Plan, rank: int, module: torch.nn.Module, comm: Comm,
                 loss_fn: LossFn, optimizer: torch.optim.Optimizer, *, group: Any = None,
                 loss_reduction: str = "mean", compute_scale: float = 1.0,
                 device: torch.device | None = None,
                 memory: MemoryMeter | None = None,
                 ties: Sequence[tuple[Sequence[torch.nn.Parameter], Any, Sequence[int]]] = (),
                 pace: float = 1.0) -> None:
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
        self.pace = pace
        self.device = device or torch.device("cpu")
        self.memory = memory
        self.ties = [(list(params), tie_group, list(ranks)) for params, tie_group, ranks in ties
                     if params]
        tied_ids = {id(p) for params, _, _ in self.ties for p in params}
        self._own_params = [p for p in module.parameters()
                            if p.requires_grad and id(p) not in tied_ids]
        # the engine is called directly on CPU only (see [Note: launching backward])
        self._direct_backward = self.device.type == "cpu"
        self._loss_seed: torch.Tensor | None = None
        self._outgoing = sorted(outgoing(plan, rank), key=lambda t: t.start)
        self._incoming = incoming(plan, rank)
        # hoisted out of the step loop: peers, row slices (None: the whole share)
        self._f_peers = [t.src for t in self._incoming]      # activations come from
        self._b_peers = [t.dst for t in self._outgoing]      # gradients come from
        self._f_slices = [(t.dst, self._share_rows(t.start, t.stop)) for t in self._outgoing]
        self._b_slices = [(t.src, self._share_rows(t.start, t.stop)) for t in self._incoming]
        self._rows = [micro_batch_rows(plan, m, self.start, self.stop)
                      for m in range(plan.num_micro_batches)]
        # what a micro-batch's backward hands back to the comm pools: the keys of what
        # this rank receives for it (activations unless it is the first stage, gradients
        # unless it is the last)
        self._recycled = [tuple(key for key, received in ((("f", m), not self.is_first),
                                                          (("b", m), not self.is_last))
                                if received)
                          for m in range(plan.num_micro_batches)]
        self._program: list[_Step] = []
        self._program_key: tuple[Any, Any, Any] | None = None
        self._counting = False
        self._step = -1             # the round being run (fault injection names it)
        self._reset_round(None, None)

    def _share_rows(self, start: int, stop: int) -> slice | None:
        if (start, stop) == (self.start, self.stop):
            return None
        return slice(start - self.start, stop - self.start)

    # -- state of one round ---------------------------------------------------------------
    def _reset_round(self, inputs: Sequence[torch.Tensor] | None, targets: Any) -> None:
        self._batch_inputs = inputs
        self._batch_targets = targets
        # this rank's rows of every micro-batch, cut once per round (None: not given)
        self._input_rows: list[list[torch.Tensor]] | None = None
        self._target_rows: list[Any] | None = None
        # the last stage's losses before their weight (see [Note: the loss's weight])
        self._raw_losses: list[torch.Tensor] = []
        self._recv_inputs: dict[int, list[torch.Tensor]] = {}
        self._inputs: dict[int, list[torch.Tensor]] = {}
        self._outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._losses: dict[int, torch.Tensor] = {}
        self._out_grads: dict[int, list[torch.Tensor]] = {}
        self._in_grads: dict[int, list[torch.Tensor]] = {}
        self._stats = RoundStats()

    def _cut_batch(self) -> None:
        """This rank's rows of every micro-batch of the round's inputs (first stage) and
        targets (last stage), cut once (see ``_split_rows``)."""
        inputs, targets = self._batch_inputs, self._batch_targets
        if inputs is not None and self.is_first:
            per_input = [self._split(x) for x in inputs]
            self._input_rows = ([list(pieces) for pieces in zip(*per_input)] if per_input
                                else [[] for _ in self._rows])
        if targets is not None and self.is_last:
            self._target_rows = self._split(targets)

    def _split(self, value: Any) -> list[Any]:
        return _split_rows(value, self._rows, self.plan.num_micro_batches,
                           self.plan.micro_batch_size, slice(self.start, self.stop),
                           self.device)

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
        yield from _tensors(self._input_rows)
        yield from _tensors(self._target_rows)
        for values in (self._recv_inputs, self._inputs, self._outputs, self._losses,
                       self._out_grads, self._in_grads):
            for value in values.values():
                yield from _tensors(value)
        yield from self.comm.held()

    def _observe(self, *extra: torch.Tensor) -> None:
        if self.memory is not None and self.memory.counting:
            self.memory.observe([*self.held_tensors(), *extra], self.comm.wire_buffers())

    def _compile(self, actions: Sequence[Action],
                 releases: Mapping[int, Sequence[Action]] | None,
                 posts: Mapping[int, Sequence[Action]] | None) -> list[_Step]:
        """The round's program: for every action its bound handler and argument, the sends
        it releases and the receives posted before it (see [Note: the round's program])."""
        handlers: dict[ActionKind, Callable[[Any], None]] = {
            ActionKind.F: self._forward,
            ActionKind.B: self._backward,
            ActionKind.SEND_F: self._send_f,
            ActionKind.RECV_F: self._recv_f,
            ActionKind.SEND_B: self._send_b,
            ActionKind.RECV_B: self._recv_b,
        }
        program = []
        for index, action in enumerate(actions):
            kind, m = action.kind, action.microbatch
            arg: Any = m
            if kind is ActionKind.SEND_F:
                arg = (m, action, message_tag("f", m))
            elif kind is ActionKind.SEND_B:
                arg = (m, action, message_tag("b", m))
            elif kind is ActionKind.RECV_F:
                arg = (m, ("f", m), message_tag("f", m))
            elif kind is ActionKind.RECV_B:
                arg = (m, ("b", m), message_tag("b", m))
            post = []
            for recv in (posts or {}).get(index, ()):
                if recv.kind is ActionKind.RECV_F:
                    post.append((self._f_peers, "f", message_tag("f", recv.microbatch)))
                elif recv.kind is ActionKind.RECV_B:
                    post.append((self._b_peers, "b", message_tag("b", recv.microbatch)))
            release = list(releases[index]) if releases is not None and index in releases \
                else None
            program.append(_Step(handlers[kind], arg, release, post, action))
        return program

    def run_round(self, actions: Sequence[Action], step: int,
                  inputs: Sequence[torch.Tensor] | None, targets: Any,
                  releases: Mapping[int, Sequence[Action]] | None = None,
                  posts: Mapping[int, Sequence[Action]] | None = None) -> RoundStats:
        """Run one mini-batch: every action, then the group all-reduce and optimizer step.

        ``inputs`` (stage 0) and ``targets`` (last stage) are the whole mini-batch; the rank
        slices its own rows. ``releases`` (``runtime.lowering.send_releases`` of this rank)
        frees send buffers as soon as they are known to be received; without it they are
        all awaited at the end of the round. ``posts`` (``runtime.lowering.recv_posts`` of
        this rank) posts receives ahead of their RECV action; without it each receive is
        posted when its RECV waits. The program is compiled once per (actions, releases,
        posts) objects, which must not change in place between rounds. Raises
        ``StageFailure`` naming rank, step and action.
        """
        key = (actions, releases, posts)
        if (self._program_key is None
                or any(a is not b for a, b in zip(key, self._program_key))):
            self._program = self._compile(actions, releases, posts)
            self._program_key = key
        self._reset_round(inputs, targets)
        self._step = step
        self.optimizer.zero_grad(set_to_none=True)
        self.module.train()
        comm = self.comm
        counting = self.memory is not None and self.memory.counting
        self._counting = counting
        current = "start"
        entry: _Step | None = None
        try:
            self._cut_batch()
            if counting:
                self._observe()
            for entry in self._program:
                for peers, channel, tag in entry.post:
                    comm.post_recv(peers, channel, tag)
                entry.run(entry.arg)
                if entry.release is not None:
                    comm.release(entry.release)
                if counting:
                    self._observe()
            entry = None
            current = "loss"
            self._add_losses()
            current = "flush sends"
            comm.flush()
            current = "all-reduce"
            self._all_reduce_grads()
            current = "optimizer step"
            start = time.perf_counter()
            self.optimizer.step()
            self._stats.optimizer_s = time.perf_counter() - start
        except StageFailure:
            raise
        except (AsteroidError, RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
            if entry is not None:
                current = str(entry.action)
            raise StageFailure(f"rank {self.rank} (device {self.device_name!r}, stage "
                               f"{self.stage}) failed at step {step}, action {current}: "
                               f"{type(exc).__name__}: {exc}") from exc
        stats = self._stats
        self._reset_round(None, None)
        return stats

    # -- compute ---------------------------------------------------------------------------
    def _add_losses(self) -> None:
        """The round's loss: the weighted losses of its micro-batches, added in order."""
        raw = self._raw_losses
        if raw:
            with torch.no_grad():
                weighted = (torch.stack(raw).reshape(-1) * self.loss_weight).tolist()
            for value in weighted:
                self._stats.loss += value

    def _dilate(self, start: float, into: list[float], cpu_start: float,
                cpu_into: list[float]) -> None:
        cpu_into.append(time.thread_time() - cpu_start)
        if self.compute_scale > 1.0:
            time.sleep((self.compute_scale - 1.0) * (time.perf_counter() - start))
        pace(start, cpu_start, self.pace)
        into.append(time.perf_counter() - start)

    def _forward(self, m: int) -> None:
        fault_point("forward", self.device_name, self._step)   # tests only: see runtime.faults
        if self.is_first:
            if self._input_rows is None:
                raise RuntimeFailure("stage 0 needs the mini-batch inputs")
            inputs = self._input_rows[m]
        else:
            inputs = self._recv_inputs.pop(m)
            for x in inputs:
                if _is_float(x):
                    x.requires_grad_(True)
        start, cpu_start = time.perf_counter(), time.thread_time()
        memory = self.memory if self._counting else None
        if memory is not None:
            with memory.forward(m):
                out = self.module(*inputs)
        else:
            out = self.module(*inputs)
        if self.is_last:
            if self._target_rows is None:
                raise RuntimeFailure("the last stage needs the mini-batch targets")
            loss = self.loss_fn(out, self._target_rows[m])
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                       else type(loss).__name__)
                raise RuntimeFailure(f"loss_fn must return a tensor of one element, got "
                                     f"{got}")
            self._losses[m] = loss
            self._raw_losses.append(loss.detach())
        else:
            self._outputs[m] = out if isinstance(out, tuple) else (out,)
        self._inputs[m] = inputs
        self._dilate(start, self._stats.forward_s, cpu_start, self._stats.forward_cpu_s)

    def _backward(self, m: int) -> None:
        fault_point("backward", self.device_name, self._step)
        inputs = self._inputs.pop(m)
        start, cpu_start = time.perf_counter(), time.thread_time()
        if self.is_last:
            loss = self._losses.pop(m)
            seed = self._loss_seed
            if (seed is None or seed.shape != loss.shape or seed.dtype != loss.dtype
                    or seed.device != loss.device):
                # what autograd computed from ones through the weight's multiplication
                # (see [Note: the loss's weight])
                seed = torch.ones_like(loss, memory_format=torch.preserve_format)
                seed = self._loss_seed = seed * self.loss_weight
            _run_backward((loss,), (seed,), self._direct_backward)
            del loss
        else:
            outputs = self._outputs.pop(m)
            grads = iter(self._out_grads.pop(m))
            pairs = [(o, next(grads)) for o in outputs if _is_float(o)]
            pairs = [(o, g) for o, g in pairs if o.requires_grad]
            if pairs:
                _run_backward([o for o, _ in pairs], [g for _, g in pairs],
                              self._direct_backward)
        if not self.is_first:
            self._in_grads[m] = [x.grad if x.grad is not None else torch.zeros_like(x)
                                 for x in inputs if _is_float(x)]
        del inputs
        self._dilate(start, self._stats.backward_s, cpu_start, self._stats.backward_cpu_s)
        # the micro-batch's received activations and gradients are no longer used
        for key in self._recycled[m]:
            self.comm.recycle(key)
        if self.memory is not None:
            self.memory.backward_done(m)

    # -- communication -----------------------------------------------------------------------
    def _send_f(self, arg: tuple[int, Action, int]) -> None:
        m, action, tag = arg
        outputs = self._outputs[m]
        items = [(dst, [o.detach()[rows] if rows is not None else o.detach()
                        for o in outputs]) for dst, rows in self._f_slices]
        self.comm.send(items, "f", key=action, tag=tag)

    def _received(self, pieces: list[list[torch.Tensor]], key: tuple[str, int]
                  ) -> list[torch.Tensor]:
        if len(pieces) == 1:
            return pieces[0]
        joined = [torch.cat([p[i] for p in pieces]) for i in range(len(pieces[0]))]
        self.comm.recycle(key)
        return joined

    def _recv_f(self, arg: tuple[int, tuple[str, int], int]) -> None:
        m, key, tag = arg
        pieces = self.comm.recv(self._f_peers, "f", tag, key=key)
        self._recv_inputs[m] = pieces[0] if len(pieces) == 1 else self._received(pieces, key)

    def _send_b(self, arg: tuple[int, Action, int]) -> None:
        m, action, tag = arg
        grads = self._in_grads.pop(m)
        items = [(src, [g[rows] if rows is not None else g for g in grads])
                 for src, rows in self._b_slices]
        self.comm.send(items, "b", key=action, tag=tag)

    def _recv_b(self, arg: tuple[int, tuple[str, int], int]) -> None:
        m, key, tag = arg
        pieces = self.comm.recv(self._b_peers, "b", tag, key=key)
        self._out_grads[m] = pieces[0] if len(pieces) == 1 else self._received(pieces, key)

    # -- data parallelism inside the stage ---------------------------------------------------
    def _all_reduce_grads(self) -> None:
        grouped = self.group is not None and len(self.group_ranks) > 1
        if not grouped and not self.ties:
            return
        fault_point("allreduce", self.device_name, self._step)
        start = time.perf_counter()
        if grouped:
            self._sum_grads(self._own_params, self.group, self.group_ranks)
        for params, tie_group, ranks in self.ties:    # in the same order on every holder
            self._sum_grads(params, tie_group, ranks)
        self._stats.allreduce_s = time.perf_counter() - start

    def _sum_grads(self, params: Sequence[torch.nn.Parameter], group: Any,
                   ranks: Sequence[int]) -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            self.comm.all_reduce(gradient_buckets(grads), group, ranks, observe=self._observe)

