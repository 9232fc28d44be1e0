"""Per-layer profiler: measured forward/backward times of every traced layer on this host.

[Note: how a layer is timed]
The traced graph is split into one small ``GraphModule`` per layer (:func:`split_layers`):
layer ``i`` takes, positionally, the values it reads from earlier layers or the model
inputs and returns a tuple of the values later layers read. For every batch size the
layers run in sequence on one ``sample_batch(b)``; before layer ``i`` computes the values
later layers need, it is timed on the captured inputs:

* forward: the layer with autograd recording (as in training), median of ``repeats``
  timed calls after ``warmup`` untimed ones;
* backward: a forward with inputs that require grad (those produced by earlier layers;
  model inputs do not), then only ``torch.autograd.backward`` with random output
  gradients is timed, median of ``repeats`` after ``warmup``.

That is ``method="isolated"``: each layer runs again and again on the same inputs, so its
weights stay in the CPU cache. In training they do not: a stage streams all its layers'
weights (an MLP of 16 MB of weights at batch 8 measured 1.8x its isolated per-layer sum
forward on this project's 2-core EPYC host), and the autograd engine runs the whole
backward at once. So the default, ``method="chain"``, times every layer *in sequence*,
as training runs it: one forward pass over all layers (each layer's time read between
calls), then one backward pass in reverse layer order (each layer's
``torch.autograd.backward`` on the output gradients its consumers produced), repeated
``warmup + repeats`` times with the median per layer kept (more passes when the model is
small: at least 50 ms of timed passes per batch size, at most 200 passes; a 7-layer MLP's
pass takes 0.1-0.3 ms and five of them gave per-batch-size sums that were not even
monotone in the batch). The sum over a stage's layers then matches the stage's measured
time (see tests/test_profile.py).

Timing one layer costs something the layer does not cost inside a stage: the call of the
layer's own module (a stage makes one call for all its layers) and, for the backward,
one launch of the autograd engine (a stage's backward is one launch). Both are measured
on the smallest possible layer (:func:`_timing_overhead`: a module that returns its input,
and one backward through one multiplication) and subtracted from every layer's median
(never below zero; ``meta["timing_overhead_s"]``). On this project's 2-core host they are
3-5 us forward and 22-40 us backward per layer: 0.3-0.5 ms of the 11-layer SkipNet's
backward, and most of the difference between its per-layer sum and its measured stage.
What a stage call costs in the runtime beyond its layers is a property of the runtime on
this host, not of the model: see ``asteroid_fx.runtime_overhead``.

Calls faster than ~0.5 ms are repeated in a tight loop and averaged (isolated mode), so
that timer noise does not swamp tiny layers. Every call gets fresh clones of its inputs
(made outside the timed region), so in-place ops (``ReLU(inplace=True)``) neither fail
nor accumulate.
Everything runs with ``torch.set_num_threads(1)`` (restored afterwards): a measured table
means "one host core", as the emulator's speed 1.0 does (see :mod:`cost_models.hostspeed`).
Times are the thread's CPU time (``hostspeed.compute_clock``), not the wall clock, so a
busy host does not inflate them ([Note: CPU time, not wall time]).
The process's C allocator gets the runtime workers' settings first
(``contracts.allocator``), so both measure the same steady regime.
The optimizer step is timed too: ``optimizer(params)`` (default plain SGD, as
``asteroid-fx run``) steps over the model's parameters with random gradients, median of
``repeats``; ``CostTable.update_s_per_byte`` is that time per parameter byte (the
planner's ``T_a`` adds it per stage, ``solver.evaluate``).
Then ``time(b) = intercept + per_sample * b`` is fitted by non-negative least squares;
the raw medians are kept in ``CostTable.meta``. The model's parameters, gradients,
buffers (BatchNorm running statistics), train/eval flags and the torch RNG state are
restored afterwards.
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from contracts.allocator import tune_allocator
from contracts.arguments import is_int
from contracts.errors import AsteroidError, CostModelError
from contracts.inputs import model_inputs
from contracts.table import CostTable, LayerCost, TimeFit
from cost_models.analytic import layer_node_costs
from cost_models.batches import Inputs, check_batch
from cost_models.graph import LayerGraph
from cost_models.hostspeed import (
    compute_clock,
    measure_host_flops,
    measure_host_mem_bw,
    single_thread,
)
from cost_models.optimizer import BuildOptimizer, state_bytes
from cost_models.optimizer import build as build_optimizer

__all__ = ["profile", "split_layers", "LayerModule", "fit_time", "SampleBatch", "Progress",
           "Tracer", "profiling_device"]

logger = logging.getLogger(__name__)

SampleBatch = Callable[[int], Any]
Progress = Callable[[int, int, str], None]
#: ``tracer(model, example_inputs) -> LayerGraph``: the front end's tracing (bound to its
#: leaf modules and model name), called with the model in train mode on a checked batch.
Tracer = Callable[[torch.nn.Module, Inputs], LayerGraph]
_METHODS = ("chain", "isolated")

#: A timed call shorter than this is repeated in a loop and averaged.
_MIN_TIMED_S = 5e-4
_MAX_NUMBER = 50
#: Chain passes at one batch size add up to at least this much timed work (more passes
#: than ``repeats`` for small models, whose few-microsecond layers the host's noise swamps)
_MIN_TIMED_CHAIN_S = 0.05
_MAX_CHAIN_PASSES = 200


@dataclass(frozen=True)
class LayerModule:
    """One layer as a runnable module: ``module(*env[inputs]) -> tuple(env[outputs])``."""

    index: int
    module: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


# -- where and how it is timed ------------------------------------------------------------

# [Note: profiling on an accelerator]
# On a board with CUDA (every Jetson), `python -m asteroid_fx.device run` trains on the GPU,
# so a table measured on the board's CPU would describe the wrong processor. With
# ``device`` a CUDA device, the model (moved there for the profile, and back) and every
# batch go there. A chain pass then stamps each layer's start and end with CUDA events on
# the stream, without synchronising, and reads them when the pass is over: the layers run
# as back to back as in a training step, and a layer's time is the stream's time from the
# end of the one before to its own end, idle time included where launching its kernels
# takes longer than running them. (Synchronising around every layer, as a first version
# did, cost an H200 a launch and a round trip per layer: MobileNetV2's forward at batch 64
# came out 2.8x its training run's.) The update step and the timing overhead taken off
# every layer (an empty layer's call and one autograd launch, ``_timing_overhead``) are
# stamped the same way; the isolated method synchronises around each timed call. Even so,
# on an H200 (kernels of microseconds: launch-bound) the layers' forwards added up to about
# twice what one call of the whole model took (ResNet CIFAR and MobileNetV2 at batch 64:
# forward measured / predicted 0.51 / 0.56, backward 0.85 / 0.96; tools/check_cuda.py). So
# on CUDA the chain passes only split the time between the layers: each batch size's
# layers are scaled to add up to the whole model's forward and backward, stamped the same
# way over as many passes (``whole_model_s`` in the table's meta). On the CPU the layers
# are kept as measured (their sum was within a few % of the whole model's, docs/latency-
# model.md), and the stamps are the thread's CPU time ([Note: CPU time, not wall time]).


class _CpuStamps:
    """Stamps on the thread's CPU time."""

    def stamp(self) -> Any:
        return compute_clock()

    def seconds(self, start: Any, end: Any) -> float:
        return float(end - start)


class _CudaStamps:
    """Stamps as CUDA events on the current stream, read after the work is done."""

    def stamp(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3


_stamps: _CpuStamps | _CudaStamps = _CpuStamps()
"""The stamps of the profile under way (``profile`` sets them for its device)."""


def _now() -> float:
    """A clock reading for a timed call that is read at once (isolated method): the CPU
    time, or on CUDA the wall clock after synchronising."""
    if isinstance(_stamps, _CudaStamps):
        torch.cuda.synchronize()
        return time.perf_counter()
    return compute_clock()


def _span(marks: tuple[Any, Any] | None) -> float:
    return 0.0 if marks is None else _stamps.seconds(*marks)


def profiling_device(device: str | torch.device | None) -> torch.device:
    """The device a profile runs on: ``None`` or ``"auto"`` is CUDA where available (as
    ``python -m asteroid_fx.device run`` trains there), else the CPU.

    Raises:
        CostModelError: an unknown device, or CUDA asked for where there is none.
    """
    if device is None or device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CostModelError(f"unknown profiling device {device!r}; use cpu, cuda, cuda:N "
                             f"or auto") from exc
    if chosen.type not in ("cpu", "cuda"):
        raise CostModelError(f"profiling device {device!r} is not supported; use cpu, cuda, "
                             f"cuda:N or auto")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise CostModelError(f"profiling device {device!r}: this torch "
                             f"({torch.__version__}) sees no CUDA device; use --device cpu")
    return chosen


def _to(values: Sequence[Any], device: torch.device) -> tuple[Any, ...]:
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


# -- splitting ----------------------------------------------------------------------------


def _assign_all_nodes(graph: LayerGraph) -> dict[str, int]:
    """Node name -> layer index, with nodes outside every layer put in their first user's."""
    assign = dict(graph.node_to_layer())
    nodes = list(graph.graph_module.graph.nodes)
    for node in reversed(nodes):
        if node.op in ("placeholder", "output") or node.name in assign:
            continue
        users = [assign[u.name] for u in node.users if u.name in assign]
        assign[node.name] = min(users) if users else len(graph.layers) - 1
    return assign


def split_layers(graph: LayerGraph) -> list[LayerModule]:
    """One :class:`LayerModule` per layer of ``graph`` (sharing the model's parameters).

    Raises:
        CostModelError: a layer reads a value produced by a later layer.
    """
    gm = graph.graph_module
    assign = _assign_all_nodes(graph)
    per_layer: list[list[fx.Node]] = [[] for _ in graph.layers]
    for node in gm.graph.nodes:
        if node.name in assign and node.op not in ("placeholder", "output"):
            per_layer[assign[node.name]].append(node)
    result = []
    for index, members in enumerate(per_layer):
        names = {n.name for n in members}
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inputs: list[str] = []
        for node in members:
            for arg in node.all_input_nodes:
                if arg.name in names or arg in env:
                    continue
                if arg.op != "placeholder" and assign.get(arg.name, -1) > index:
                    raise CostModelError(
                        f"layer {index} reads {arg.name!r} from the later layer "
                        f"{assign[arg.name]}; the layer graph is not in topological order"
                    )
                env[arg] = sub.placeholder(arg.name)
                inputs.append(arg.name)
            env[node] = sub.node_copy(node, env.__getitem__)
        outputs = [
            n.name for n in members if any(u.name not in names for u in n.users)
        ]
        by_name = {n.name: n for n in members}
        sub.output(tuple(env[by_name[o]] for o in outputs))
        result.append(LayerModule(index, fx.GraphModule(gm, sub), tuple(inputs), tuple(outputs)))
    return result


def _last_uses(layers: Sequence[LayerModule]) -> dict[str, int]:
    last: dict[str, int] = {}
    for layer in layers:
        for name in layer.inputs:
            last[name] = layer.index
    return last


# -- fitting ------------------------------------------------------------------------------


def fit_time(batch_sizes: Sequence[int], seconds: Sequence[float]) -> TimeFit:
    """Non-negative least-squares fit of ``seconds ~ intercept + per_sample * batch``.

    With a single batch size the whole time is per sample.

    Raises:
        CostModelError: mismatched lengths, no points, or a negative / non-finite time.
    """
    if len(batch_sizes) != len(seconds) or not batch_sizes:
        raise CostModelError(
            f"need one time per batch size, got {len(seconds)} times for "
            f"{len(batch_sizes)} batch sizes"
        )
    if any(not math.isfinite(t) or t < 0 for t in seconds):
        raise CostModelError(f"measured times must be finite and >= 0, got {list(seconds)}")
    xs = [float(b) for b in batch_sizes]
    ys = [float(t) for t in seconds]
    if len(set(xs)) == 1:
        return TimeFit(0.0, max(0.0, statistics.fmean(ys) / xs[0]))

    def sse(a: float, c: float) -> float:
        return sum((a + c * x - y) ** 2 for x, y in zip(xs, ys))

    n = len(xs)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    candidates = [(my - slope * mx, slope)]  # unconstrained
    candidates.append((0.0, sum(x * y for x, y in zip(xs, ys))
                       / sum(x * x for x in xs)))  # intercept 0
    candidates.append((sum(ys) / n, 0.0))  # slope 0
    candidates.append((0.0, 0.0))
    feasible = [(a, c) for a, c in candidates if a >= 0 and c >= 0]
    a, c = min(feasible, key=lambda ac: sse(*ac))
    return TimeFit(max(0.0, a), max(0.0, c))


# -- timing -------------------------------------------------------------------------------


def _float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def _fresh(args: Sequence[Any]) -> list[Any]:
    """Clones of the tensor arguments (of a leaf that requires grad: a non-leaf copy)."""
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _grad_tensors(outputs: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(outputs)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


def _time_calls(
    run_once: Callable[[int], float], repeats: int, warmup: int
) -> float:
    """Median per-call seconds; ``run_once(number)`` returns the seconds of ``number`` calls."""
    number = 1
    samples: list[float] = []
    for i in range(warmup + repeats):
        elapsed = run_once(number)
        if i == 0 and warmup > 0:
            per_call = max(elapsed, 1e-9)
            if per_call < _MIN_TIMED_S:
                number = min(_MAX_NUMBER, math.ceil(_MIN_TIMED_S / per_call))
            continue
        if i >= warmup:
            samples.append(elapsed / number)
    return statistics.median(samples)


class _LayerTimer:
    """Times one layer's forward and backward on captured inputs."""

    def __init__(self, layer: LayerModule, args: Sequence[Any], grad_mask: Sequence[bool]):
        self.layer = layer
        self.leaves = [
            a.detach().requires_grad_(True) if g and _float_tensor(a) else a
            for a, g in zip(args, grad_mask)
        ]
        self.params = [p for p in layer.module.parameters() if p.requires_grad]

    def _args(self) -> list[Any]:
        return _fresh(self.leaves)

    def forward(self, number: int) -> float:
        calls = [self._args() for _ in range(number)]
        with torch.enable_grad():
            start = _now()
            for args in calls:
                self.layer.module(*args)
            return _now() - start

    def backward(self, number: int) -> float:
        with torch.enable_grad():
            outputs = self.layer.module(*self._args())
            tensors = _grad_tensors(outputs)
            grads = [torch.randn_like(t) for t in tensors]
            for p in self.params:
                p.grad = None
            for leaf in self.leaves:
                if isinstance(leaf, torch.Tensor):
                    leaf.grad = None
            start = _now()
            for k in range(number):
                torch.autograd.backward(tensors, grads, retain_graph=k < number - 1)
            return _now() - start

    def needs_backward(self) -> bool:
        with torch.enable_grad():
            return bool(_grad_tensors(self.layer.module(*self._args())))


def _prewarm_autograd() -> None:
    """One tiny backward with explicit gradients: torch imports lazily on the first one."""
    with torch.enable_grad():
        x = torch.ones(2, requires_grad=True)
        torch.autograd.backward([x * 2.0], [torch.ones(2)])


# -- inputs -------------------------------------------------------------------------------


def _check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Iterable):
        raise CostModelError(f"batch_sizes must be a list of batch sizes, e.g. (1, 2, 4, 8), "
                             f"got {batch_sizes!r}")
    values = tuple(batch_sizes)
    if not values:
        raise CostModelError(
            "batch_sizes is empty; give at least one positive batch size, e.g. (1, 2, 4, 8)"
        )
    for b in values:
        if not is_int(b) or b <= 0:
            raise CostModelError(
                f"batch sizes must be positive integers, got {b!r} in {list(values)}"
            )
    return tuple(sorted(set(values)))


def _draw_for(sample_batch: SampleBatch, b: int,
              placeholders: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """``sample_batch(b)``'s inputs, one per model input and in the traced graph's order
    (CostModelError otherwise)."""
    inputs = model_inputs(_draw(sample_batch, b))
    if len(inputs) != len(placeholders):
        raise CostModelError(
            f"sample_batch({b}) returned {len(inputs)} inputs but the model takes "
            f"{len(placeholders)} ({', '.join(placeholders)})"
        )
    return inputs


def _draw(sample_batch: SampleBatch, b: int) -> Inputs:
    try:
        result = sample_batch(b)
    except AsteroidError:
        raise
    except Exception as exc:
        raise CostModelError(
            f"sample_batch({b}) raised {type(exc).__name__}: {exc}"
        ) from exc
    inputs, _targets = check_batch(result, b, where=f"sample_batch({b})",
                                   error=CostModelError)
    return inputs


# -- the profiler -------------------------------------------------------------------------


class _ModelState:
    """Saves and restores parameters' grads, buffers and train/eval flags of modules."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.flags = [(m, m.training) for root in modules for m in root.modules()]
        self.grads = [(p, p.grad) for root in modules for p in root.parameters()]
        self.buffers = [
            (b, b.detach().clone()) for root in modules for b in root.buffers()
        ]

    def restore(self) -> None:
        for module, training in self.flags:
            module.training = training
        for param, grad in self.grads:
            param.grad = grad
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.copy_(saved)


def _run_model(model: torch.nn.Module, inputs: Inputs) -> None:
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                model(**inputs)
            else:
                model(*inputs)
    except Exception as exc:
        shapes = [tuple(x.shape) for x in model_inputs(inputs)]
        raise CostModelError(
            f"the model failed to run on inputs of shapes {shapes}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def profile(
    model: torch.nn.Module,
    sample_batch: SampleBatch,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    *,
    repeats: int = 5,
    warmup: int = 2,
    progress: Progress | None = None,
    example_inputs: Inputs | torch.Tensor | None = None,
    graph: LayerGraph | None = None,
    tracer: Tracer | None = None,
    model_name: str = "",
    method: str = "chain",
    optimizer: BuildOptimizer | None = None,
    device_type: str = "local",
    device: str | torch.device = "cpu",
) -> CostTable:
    """Measure every layer's forward and backward time on one core of this host, or on
    its GPU (``device``).

    See the module note for the method. Layer ``i`` of the result is layer ``i`` of
    ``graph``, or of ``tracer(model, example_inputs)``: the cost models never trace
    themselves (``asteroid_fx.profile`` passes ``asteroid_fx.trace.trace`` as the tracer).

    Args:
        model: the model; it is put in train mode while measuring and restored afterwards.
        sample_batch: ``sample_batch(b) -> (inputs, targets)``, ``inputs`` a tuple of
            tensors whose first dimension is ``b``.
        batch_sizes: batch sizes to measure at (positive integers).
        repeats: timed runs per layer and batch size (the median is used).
        warmup: untimed runs before them.
        progress: called as ``progress(done, total, what)`` after each pass over the layers
            (chain) or each layer measured (isolated).
        example_inputs: inputs used for tracing (default: ``sample_batch(max(batch_sizes))``).
        graph: the traced layer graph of ``model``.
        tracer: traces ``model`` on the example inputs when ``graph`` is None.
        model_name: recorded in the table (default: the class name).
        method: ``"chain"`` (layers timed in sequence, as training runs them; default) or
            ``"isolated"`` (each layer repeated on its own, warm caches).
        optimizer: ``optimizer(params)`` builds the optimizer whose step is timed
            (default: ``torch.optim.SGD(params, lr=0.01)``); its state per parameter
            byte is recorded as ``CostTable.optimizer_state_factor``.
        device_type: the device type this host is (``asteroid-fx profile --device-type``,
            e.g. ``jetson-nano`` when run on a Nano); ``"local"`` for the workstation.
            A labelled table's times are taken as they are for devices of that type, and
            ``asteroid-fx costs merge`` joins tables of several types.
        device: where the layers run: ``"cpu"`` (one core, the default), ``"cuda"`` /
            ``"cuda:N"`` (a copy of the model on that GPU, timed between synchronisations:
            [Note: profiling on an accelerator]) or ``"auto"`` (CUDA where available).

    Returns:
        A :class:`~contracts.table.CostTable` with source ``"measured"``.

    Raises:
        CostModelError: bad ``batch_sizes`` / ``repeats`` / ``warmup``, a ``sample_batch``
            of the wrong form, a model that fails to run (with the exception text), or
            neither ``graph`` nor ``tracer``.
        TraceError: ``tracer`` cannot trace the model.
    """
    sizes = _check_batch_sizes(batch_sizes)
    if progress is not None and not callable(progress):   # (was a TypeError mid-profile)
        raise CostModelError(f"progress must be a callable (done, total, what) or None, got "
                             f"{progress!r}")
    if not is_int(repeats) or repeats < 1:
        raise CostModelError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not is_int(warmup) or warmup < 0:
        raise CostModelError(f"warmup must be an integer >= 0, got {warmup!r}")
    if method not in _METHODS:
        raise CostModelError(
            f"unknown profiling method {method!r}; use one of {', '.join(_METHODS)}")
    _check_device_type(device_type)
    where = profiling_device(device)
    if graph is None and tracer is None:
        raise CostModelError("profile needs the model's traced graph (graph=) or a tracer "
                             "(tracer=); asteroid_fx.profile traces the model for you")
    started = time.perf_counter()
    tune_allocator()
    name = model_name or type(model).__name__
    state = _ModelState(model)
    try:
        with torch.random.fork_rng(devices=[where] if where.type == "cuda" else []):
            torch.manual_seed(0)
            model.train()
            if example_inputs is None:
                example_inputs = _draw(sample_batch, max(sizes))
            elif isinstance(example_inputs, torch.Tensor):
                example_inputs = (example_inputs,)
            elif not isinstance(example_inputs, Mapping):
                example_inputs = tuple(example_inputs)
            # a model already on a GPU runs (and is traced) there: its inputs go with it
            on = next(iter(model.parameters()), torch.empty(0)).device
            if on.type != "cpu":
                example_inputs = ({k: _to((v,), on)[0] for k, v in example_inputs.items()}
                                  if isinstance(example_inputs, Mapping)
                                  else _to(example_inputs, on))
            _run_model(model, example_inputs)
            if graph is None:
                if tracer is None:   # checked above; keeps the type checker informed
                    raise CostModelError("profile needs graph= or tracer=")
                graph = tracer(model, example_inputs)
            host_flops = measure_host_flops()
            host_bw = measure_host_mem_bw()
            gm = graph.graph_module
            home = next(iter(gm.parameters()), torch.empty(0)).device
            gm_state = _ModelState(gm)
            global _stamps
            try:
                gm.to(where)  # and back below: the caller's model shares these modules
                gm.train()
                _stamps = _CpuStamps() if where.type == "cpu" else _CudaStamps()
                with single_thread():
                    measure = _measure_chain if method == "chain" else _measure
                    fwd, bwd, wholes = measure(graph, sample_batch, sizes, repeats, warmup,
                                               progress, where)
                    eps_f, eps_b = _timing_overhead(repeats, warmup, where)
                    fwd = _less(fwd, eps_f)
                    bwd = _less(bwd, eps_b)
                    if wholes is not None:
                        fwd = _to_whole(fwd, [f for f, _ in wholes])
                        bwd = _to_whole(bwd, [b for _, b in wholes])
                    update_s, osf = _measure_update(gm, optimizer, repeats, warmup)
                    workspace = _cuda_workspace(where) if where.type == "cuda" else None
            finally:
                _stamps = _CpuStamps()
                gm.to(home)
                gm_state.restore()
    finally:
        state.restore()
    costs = layer_node_costs(graph)
    layers = []
    for i, layer in enumerate(graph.layers):
        layers.append(
            LayerCost(
                name=layer.name,
                op=layer.op,
                fwd=fit_time(sizes, fwd[i]),
                bwd=fit_time(sizes, bwd[i]),
                param_bytes=layer.param_bytes,
                activation_bytes=layer.activation_bytes,
                output_bytes=layer.output_bytes,
                flops=costs[i].fwd_flops,
                buffer_bytes=layer.buffer_bytes,
            )
        )
    param_bytes = sum(layer.param_bytes for layer in layers)
    wall = time.perf_counter() - started
    logger.info("profiled %s: %d layers at batch sizes %s in %.1f s",
                name, len(layers), list(sizes), wall)
    return CostTable(
        layers=tuple(layers),
        cut_bytes=tuple(int(v) for v in graph.cut_bytes),
        tied=graph.tied,
        input_bytes=int(graph.input_bytes),
        model_name=model_name or graph.model_name or name,
        model_hash=graph.model_hash,
        host=platform.node(),
        host_flops=float(host_flops),
        source="measured",
        torch_version=torch.__version__,
        batch_sizes=sizes,
        meta={
            "fwd_median_s": fwd,
            "bwd_median_s": bwd,
            "repeats": repeats,
            "warmup": warmup,
            "num_threads": 1,
            "method": method,
            "update_s": update_s,
            "timing_overhead_s": [eps_f, eps_b],
            "whole_model_s": wholes,
            "host_mem_bw": float(host_bw),
            "device": str(where) if where.type == "cpu" else
            f"{where} ({torch.cuda.get_device_name(where)})",
            "profile_wall_s": wall,
        },
        update_s_per_byte=update_s / param_bytes if param_bytes > 0 else 0.0,
        optimizer_state_factor=osf,
        device_type=device_type,
        workspace_bytes=workspace,
    )


def _check_device_type(device_type: str) -> None:
    """``CostModelError`` unless ``device_type`` is ``local`` or a built-in board type."""
    from contracts.devices import DEVICE_TYPES

    if device_type != "custom" and device_type in DEVICE_TYPES:
        return
    known = ", ".join(sorted(t for t in DEVICE_TYPES if t != "custom"))
    raise CostModelError(f"unknown --device-type {device_type!r}; use one of: {known} "
                         f"(the type this device is, as in cluster.yaml)")


def _measure(
    graph: LayerGraph,
    sample_batch: SampleBatch,
    sizes: tuple[int, ...],
    repeats: int,
    warmup: int,
    progress: Progress | None,
    device: torch.device,
) -> tuple[list[list[float]], list[list[float]], None]:
    """Median forward / backward seconds, ``[layer][batch size index]``."""
    layers = split_layers(graph)
    last_use = _last_uses(layers)
    placeholders = [n.name for n in graph.graph_module.graph.nodes if n.op == "placeholder"]
    fwd = [[0.0] * len(sizes) for _ in layers]
    bwd = [[0.0] * len(sizes) for _ in layers]
    total = len(sizes) * len(layers)
    done = 0
    _prewarm_autograd()
    if progress is not None:
        progress(0, total, "starting")
    for j, b in enumerate(sizes):
        inputs = _to(_draw_for(sample_batch, b, placeholders), device)
        env: dict[str, Any] = dict(zip(placeholders, inputs))
        for layer in layers:
            args = [env[n] for n in layer.inputs]
            mask = [n not in placeholders for n in layer.inputs]
            name = graph.layers[layer.index].name
            try:
                timer = _LayerTimer(layer, args, mask)
                fwd[layer.index][j] = _time_calls(timer.forward, repeats, warmup)
                if timer.needs_backward():
                    bwd[layer.index][j] = _time_calls(timer.backward, repeats, warmup)
                with torch.no_grad():
                    outputs = layer.module(*args)
            except AsteroidError:
                raise
            except Exception as exc:
                raise CostModelError(
                    f"the model failed to run at layer {layer.index} ({name!r}) on a batch "
                    f"of {b}: {type(exc).__name__}: {exc}"
                ) from exc
            for out_name, value in zip(layer.outputs, outputs):
                env[out_name] = value
            for n in layer.inputs:
                if last_use.get(n) == layer.index:
                    env.pop(n, None)
            done += 1
            if progress is not None:
                progress(done, total, f"batch {b}: layer {layer.index} {name}")
    return fwd, bwd, None


def _measure_chain(
    graph: LayerGraph,
    sample_batch: SampleBatch,
    sizes: tuple[int, ...],
    repeats: int,
    warmup: int,
    progress: Progress | None,
    device: torch.device,
) -> tuple[list[list[float]], list[list[float]], list[tuple[float, float]] | None]:
    """Median forward / backward seconds, ``[layer][batch size index]``, timed in sequence,
    and on CUDA the whole model's forward and backward per batch size (else None).

    Each pass: forward through all layers (a layer's inputs produced by earlier layers
    enter as fresh leaves that require grad, cloned outside the timed region so in-place
    layers stay legal), then backward in reverse layer order, each layer getting the sum
    of the gradients its consumers left on its outputs (random for the model's outputs).
    """
    layers = split_layers(graph)
    placeholders = [n.name for n in graph.graph_module.graph.nodes if n.op == "placeholder"]
    fwd = [[0.0] * len(sizes) for _ in layers]
    bwd = [[0.0] * len(sizes) for _ in layers]
    passes = warmup + repeats
    total = len(sizes) * passes
    in_place = in_place_layers(layers)
    wholes: list[tuple[float, float]] = []
    _prewarm_autograd()
    # Gradients accumulate over the passes, as over the micro-batches of a round (the
    # steady state of M > 1), in tensors of our own: the caller's .grad objects stay as
    # they were (the profiler's _ModelState puts them back).
    for p in graph.graph_module.parameters():
        p.grad = None
    if progress is not None:
        progress(0, total, "starting")
    for j, b in enumerate(sizes):
        inputs = _to(_draw_for(sample_batch, b, placeholders), device)
        f_samples: list[list[float]] = [[] for _ in layers]
        b_samples: list[list[float]] = [[] for _ in layers]
        timed = repeats
        run = shown = 0
        while run < warmup + timed:
            f_times, b_times = _chain_pass(graph, layers, placeholders, inputs, b, in_place)
            if run == warmup:
                # a short pass is all noise at `repeats` samples: take more of them, up
                # to _MIN_TIMED_CHAIN_S of passes (the median is kept either way)
                took = sum(f_times) + sum(b_times)
                timed = max(repeats, min(_MAX_CHAIN_PASSES,
                                         math.ceil(_MIN_TIMED_CHAIN_S / max(took, 1e-9))))
            if run >= warmup:
                for i in range(len(layers)):
                    f_samples[i].append(f_times[i])
                    b_samples[i].append(b_times[i])
            run += 1
            # progress in units of the planned `passes` per batch size (short passes are
            # taken more often: each unit then stands for several of them)
            units = passes * run // (warmup + timed)
            if progress is not None and units > shown:
                shown = units
                progress(j * passes + units, total,
                         f"batch {b}: pass {run}/{warmup + timed} over {len(layers)} layers")
        for i in range(len(layers)):
            fwd[i][j] = statistics.median(f_samples[i])
            bwd[i][j] = statistics.median(b_samples[i])
        if device.type == "cuda":
            passes_f, passes_b = zip(*(_whole_pass(graph.graph_module, inputs)
                                       for _ in range(warmup + timed)))
            wholes.append((statistics.median(passes_f[warmup:]),
                           statistics.median(passes_b[warmup:])))
    return fwd, bwd, (wholes or None)


def _cuda_workspace(device: torch.device) -> int | None:
    """The bytes a training process holds on ``device`` whatever it trains: cuBLAS's
    workspaces (one per thread that runs matrix products, here the forward's and autograd's
    backward thread), which torch allocates through its caching allocator on first use and
    keeps. Measured as what a matrix product's forward and backward leave allocated once
    its tensors are gone, after releasing the workspaces; None where this torch cannot
    release them (the figure would be 0 however large they are)."""
    release = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if release is None:
        return None
    torch.cuda.synchronize(device)
    release()
    before = torch.cuda.memory_allocated(device)
    a = torch.randn(64, 64, device=device, requires_grad=True)
    w = torch.randn(64, 64, device=device, requires_grad=True)
    (a @ w).sum().backward()
    del a, w
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.memory_allocated(device) - before)


def _whole_pass(module: torch.nn.Module, inputs: Sequence[Any]) -> tuple[float, float]:
    """The forward and backward seconds of the whole model on ``inputs`` (stamped, as a
    training step runs them; the gradients accumulate as in the chain passes)."""
    with torch.enable_grad():
        start = _stamps.stamp()
        out = module(*inputs)
        middle = _stamps.stamp()
        tensors = _grad_tensors(out)
        grads = [torch.randn_like(t) for t in tensors]
        begin = _stamps.stamp()
        if tensors:
            torch.autograd.backward(tensors, grads)
        end = _stamps.stamp()
    return _span((start, middle)), _span((begin, end))


def _to_whole(times: list[list[float]], wholes: Sequence[float]) -> list[list[float]]:
    """``times[layer][size]`` scaled, per batch size, so that the layers add up to the whole
    model's pass at that size ([Note: profiling on an accelerator])."""
    out = [list(row) for row in times]
    for j, whole in enumerate(wholes):
        total = sum(row[j] for row in times)
        if total > 0.0:
            for row in out:
                row[j] *= whole / total
    return out


def _chain_pass(graph: LayerGraph, layers: Sequence[LayerModule], placeholders: Sequence[str],
                inputs: Sequence[torch.Tensor], b: int,
                in_place: set[int]) -> tuple[list[float], list[float]]:
    """One timed forward pass then one timed backward pass over every layer.

    A layer's tensor inputs are copied (outside the timed region) only for the layers in
    ``in_place`` (see :func:`in_place_layers`); a layer that fails uncopied is added to it
    and run again copied. The copies would otherwise hold a second copy of every
    activation: EfficientNet's chain pass at batch 16 held 2 GB."""
    env: dict[str, Any] = dict(zip(placeholders, inputs))
    leaves: list[list[tuple[str, torch.Tensor]]] = []
    outputs: list[tuple[Any, ...]] = []
    f_marks: list[tuple[Any, Any] | None] = [None] * len(layers)
    b_marks: list[tuple[Any, Any] | None] = [None] * len(layers)
    with torch.enable_grad():
        for layer in layers:
            mine: list[tuple[str, torch.Tensor]] = []
            for name in layer.inputs:
                if name not in placeholders and _float_tensor(env[name]):
                    mine.append((name, env[name].detach().requires_grad_(True)))
            leaf_of = dict(mine)
            try:
                out = None
                while out is None:
                    copy = layer.index in in_place
                    args = [_layer_arg(env[n], leaf_of.get(n), copy) for n in layer.inputs]
                    try:
                        start = _stamps.stamp()
                        out = layer.module(*args)
                        f_marks[layer.index] = (start, _stamps.stamp())
                    except RuntimeError:
                        if copy:
                            raise
                        in_place.add(layer.index)  # an in-place op the scan did not see
            except AsteroidError:
                raise
            except Exception as exc:
                raise CostModelError(
                    f"the model failed to run at layer {layer.index} "
                    f"({graph.layers[layer.index].name!r}) on a batch of {b}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            outs = tuple(out)
            for out_name, value in zip(layer.outputs, outs):
                env[out_name] = value
            leaves.append(mine)
            outputs.append(outs)
        grads: dict[str, torch.Tensor] = {}
        for layer in reversed(layers):
            pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
            for out_name, value in zip(layer.outputs, outputs[layer.index]):
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    grad = grads.pop(out_name, None)
                    pairs.append((value, torch.randn_like(value) if grad is None else grad))
            if pairs:
                start = _stamps.stamp()
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
                b_marks[layer.index] = (start, _stamps.stamp())
            outputs[layer.index] = ()
            for name in layer.outputs:  # its activations go as backward passes them
                env.pop(name, None)
            for name, leaf in leaves[layer.index]:
                if leaf.grad is not None:
                    grads[name] = leaf.grad if name not in grads else grads[name] + leaf.grad
            leaves[layer.index] = []
    return [_span(m) for m in f_marks], [_span(m) for m in b_marks]


def _layer_arg(value: Any, leaf: torch.Tensor | None, copy: bool) -> Any:
    """What a chain pass hands a layer for one input: the fresh leaf that requires grad (for
    a float tensor made by an earlier layer) or the value itself, copied when ``copy``."""
    arg = value if leaf is None else leaf
    return arg.clone() if copy and isinstance(arg, torch.Tensor) else arg


_IN_PLACE_OPERATORS = frozenset({"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod",
                                 "ipow", "iand", "ior", "ixor", "ilshift", "irshift",
                                 "imatmul"})


def in_place_layers(layers: Sequence[LayerModule]) -> set[int]:
    """Indices of the layers with an operation that may write to its input: a method or
    function whose name ends in one underscore (``add_``, ``torch.relu_``), an augmented
    assignment (``operator.iadd``), ``inplace=True``, a module with ``inplace`` set, or an
    aten overload whose schema is mutable (graphs captured by ``torch.export``)."""
    found = set()
    for layer in layers:
        gm = layer.module
        for node in gm.graph.nodes:
            target = node.target
            name = target if isinstance(target, str) else getattr(target, "__name__", "")
            schema = getattr(target, "_schema", None)
            if (node.kwargs.get("inplace") is True
                    or (node.op in ("call_function", "call_method") and name.endswith("_")
                        and not name.startswith("__") and not name.endswith("__"))
                    or (node.op == "call_function" and name in _IN_PLACE_OPERATORS)
                    or (node.op == "call_module"
                        and getattr(gm.get_submodule(str(target)), "inplace", False) is True)
                    or (schema is not None and getattr(schema, "is_mutable", False))):
                found.add(layer.index)
                break
    return found


def _identity_layer() -> fx.GraphModule:
    """A layer module that computes nothing (what :func:`split_layers` makes, minus ops)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output((x,))
    return fx.GraphModule(torch.nn.Module(), graph)


def _timing_overhead(repeats: int, warmup: int,
                     device: torch.device | None = None) -> tuple[float, float]:
    """(forward, backward) seconds that timing one layer adds to its own work: the layer
    module's call, and one ``torch.autograd.backward`` launch on the smallest graph."""
    ident = _identity_layer()
    x = torch.ones(1, device=device)
    passes = warmup + max(repeats, 5) * 4
    marks: list[tuple[tuple[Any, Any], tuple[Any, Any]]] = []
    with torch.enable_grad():
        for run in range(passes):
            leaf = x.clone().requires_grad_(True)
            start = _stamps.stamp()
            out = ident(leaf)
            f = (start, _stamps.stamp())
            y = out[0] * 1.0
            g = torch.ones_like(y)
            start = _stamps.stamp()
            torch.autograd.backward([y], [g])
            b = (start, _stamps.stamp())
            if run >= warmup:
                marks.append((f, b))
    return (statistics.median(_span(f) for f, _ in marks),
            statistics.median(_span(b) for _, b in marks))


def _less(times: list[list[float]], overhead: float) -> list[list[float]]:
    """``times`` less the per-call ``overhead`` of timing them (a layer never measured,
    0.0, stays 0.0; nothing goes below 0)."""
    return [[max(0.0, t - overhead) if t > 0.0 else 0.0 for t in row] for row in times]


def _measure_update(module: torch.nn.Module, optimizer: BuildOptimizer | None, repeats: int,
                    warmup: int) -> tuple[float, float]:
    """Median seconds of one optimizer step over ``module``'s parameters (restored after),
    and the optimizer's state in units of the weights (``cost_models.optimizer``)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return 0.0, 0.0
    saved = [p.detach().clone() for p in params]
    opt = build_optimizer(optimizer, params)
    try:
        for p in params:
            p.grad = torch.randn_like(p)
        marks = []
        for run in range(warmup + repeats):
            start = _stamps.stamp()
            opt.step()
            if run >= warmup:
                marks.append((start, _stamps.stamp()))
        samples = [_span(m) for m in marks]
        weights = sum(p.numel() * p.element_size() for p in params)
        return statistics.median(samples), state_bytes(opt) / weights
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
                p.grad = None
