"""What the training runtime costs on this host beyond a model's layer times (measured, cached).

[Note: runtime overhead]
A cost table times layers back to back on warm caches (cost_models.profile). A training
stage pays more per micro-batch than the sum of its layers: it calls its module and the
loss, launches the autograd engine, and computes right after it waited for a message or
for the step's collectives, with caches gone cold. Each device also pays, once per round,
the round's own bookkeeping: ``zero_grad``, putting the module in train mode, walking the
schedule, the optimizer's fixed cost. On rounds of tens of milliseconds this is noise; on
a small model it is most of the round (the bundled 7-layer MLP at batch 16: 0.37 ms
predicted from its layers, 0.75-0.83 ms measured on this project's 2-core host, its
forward 0.24-0.26 ms of CPU in the runtime against 0.11 ms back to back).

These costs belong to the runtime on a host, not to a model, so they are measured once
per host and torch version on a probe: a small MLP (``PROBE_SOURCE``) is profiled as any
model is (its layer times), written as a one-stage package and trained as a user's run
trains it (``run --emulate``, one ``local`` device of speed 1.0, one micro-batch per
round, so every stage call comes cold after the step's collectives, as a pipeline
stage's comes after a wait). Then

* ``forward_s = max(0, runtime CPU per forward - the table's forward)``, the same for
  ``backward_s`` (the runtime's CPU time of the computing thread, as the table's);
* ``round_s = max(0, round - (forward + backward) - optimizer step)`` from the wall
  clock, scaled by the CPU share the computing thread got (CPU / wall of its forward and
  backward), so a busy host does not inflate it.

``CostTable.runtime_overhead`` carries them; the latency model adds ``forward_s`` /
``backward_s`` to every stage's ``E_f`` / ``E_b`` per micro-batch and ``round_s`` to its
``T_a`` (solver/timing.py), each divided by the device's speed like the layer times.
The default cost path (``asteroid_fx.cost_source``) and ``asteroid-fx profile`` attach
the host's figures to a table measured here. Devices that take a measured column of
another type use that column's own figures (zero unless measured there: ``calibrate``
fits what is left from a run). The loss is in ``forward_s`` of every stage, although only
the last stage computes it: a few microseconds on this host.
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from contracts.errors import AsteroidError, CostModelError
from contracts.table import CostTable, RuntimeOverhead

__all__ = ["measure", "measure_here", "host_runtime_overhead", "HostOverhead", "PROBE_KEY",
           "PROBE_SOURCE", "profile_probe", "probe_plan", "collective_s"]

log = logging.getLogger(__name__)

PROBE_KEY = "probe-mlp4x32-b4-m1-emulated-v5"
"""What the cached figures were measured with (part of the cache key)."""

PROBE_SOURCE = '''"""The asteroid-fx runtime-overhead probe: 4 Linear layers of width 32.

Written by asteroid_fx.runtime_overhead.
"""

import torch
from torch import nn


def build_model():
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def sample_batch(batch_size):
    return (torch.randn(batch_size, 32),), torch.randint(0, 10, (batch_size,))
'''
"""The probe's model file."""

_ONE_DEVICE = ("devices:\n  - {name: probe, type: local, speed: 1.0, memory_gb: 1}\n"
               "network:\n  bandwidth_mbps: 1000\n")
#: two devices that together take 1.5 cores (the emulator's share of a 2-core host: no
#: common slow-down factor), for the all-reduce's per-message cost
_TWO_DEVICE_SPEED = 0.75
_TWO_DEVICES = "".join(["devices:\n"] + [
    f"  - {{name: {n}, type: local, speed: {_TWO_DEVICE_SPEED}, memory_gb: 1}}\n"
    for n in "ab"] + ["network:\n  bandwidth_mbps: 1000\n"])
_MICRO_BATCH = 4
_STEPS = 60


def measure(steps: int = _STEPS) -> dict[str, Any]:
    """Measure this host's runtime overhead (see [Note: runtime overhead]): profile the
    probe, write it as a one-stage package and train it with ``run --emulate`` on one
    ``local`` device of speed 1.0, one micro-batch per round; then as one data-parallel
    stage over two devices, for the cost of a message.

    Returns:
        ``{"runtime_overhead": {...}, "message_overhead_s": float, "probe": {...}}``: the
        figures and what they were computed from.

    Raises:
        CostModelError: ``steps`` < 3, or the probe failed (the reason in the message).
    """
    if steps < 3:
        raise CostModelError(f"the runtime-overhead probe needs steps >= 3, got {steps}")
    try:
        return _measure(steps)
    except CostModelError:
        raise
    except (AsteroidError, OSError) as exc:
        raise CostModelError(f"measuring the runtime's overhead failed ({type(exc).__name__}: "
                             f"{exc}); pass --costs analytic or a costs.json to skip it, or "
                             f"--no-runtime-overhead to `profile`") from exc


def measure_here(steps: int = _STEPS, *, timeout_s: float = 120.0) -> dict[str, Any]:
    """Measure this device's runtime overhead in this process, without the workstation's
    partitioner or emulator (the device side: ``python -m asteroid_fx.device profile``):
    the probe trains as one stage in a process group of one, then as one data-parallel
    stage over two processes of this device talking over loopback (each on one core: the
    message cost at speed 1 of this device). Same figures as :func:`measure`.

    Raises:
        CostModelError: ``steps`` < 3, a process group already running here, or the probe
            failed or took longer than ``timeout_s`` (the reason in the message).
    """
    if steps < 3:
        raise CostModelError(f"the runtime-overhead probe needs steps >= 3, got {steps}")
    try:
        return _measure_here(steps, timeout_s)
    except CostModelError:
        raise
    except (AsteroidError, OSError, RuntimeError) as exc:
        raise CostModelError(f"measuring the runtime's overhead on this device failed "
                             f"({type(exc).__name__}: {exc}); pass --no-runtime-overhead to "
                             f"skip it (calibrate then fits it from a run)") from exc


class _ProbeSource:
    """The probe as a ``runtime.train.StageSource``: its whole model is the one stage."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self.module = types.ModuleType("asteroid_fx_runtime_probe")
        exec(compile(PROBE_SOURCE, "asteroid_fx_runtime_probe.py", "exec"), self.module.__dict__)

    def load_plan(self) -> Any:
        return self.plan

    def model_module(self) -> Any:
        return self.module

    def load_stage(self, index: int) -> Any:
        return self.module.build_model()


def _train_here(table: CostTable, devices: tuple[str, ...], rank: int, steps: int,
                store: Any, timeout_s: float) -> Any:
    """``runtime.train.train_device`` of the probe plan over ``devices`` as rank ``rank``
    of a gloo group on ``store``, on one thread (as the table was measured)."""
    import torch
    import torch.distributed as dist

    from runtime.train import TrainConfig, train_device

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=len(devices),
                            timeout=timedelta(seconds=timeout_s))
    try:
        return train_device(_ProbeSource(probe_plan(table, devices)), rank,
                            TrainConfig(steps=steps, timeout_s=timeout_s))
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def _pair_worker(rank: int, port: int, table_json: str, steps: int, timeout_s: float,
                 out: Any) -> None:
    """One of the two probe processes: its all-reduce seconds per step, or the error, on
    ``out``."""
    try:
        import torch.distributed as dist

        store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=timeout_s))
        result = _train_here(CostTable.from_json(table_json), ("a", "b"), rank, steps, store,
                             timeout_s)
        out.put((rank, [float(t) for t in result.allreduce_times], ""))
    except Exception as exc:  # reported to the parent, which raises it as CostModelError
        out.put((rank, [], f"{type(exc).__name__}: {exc}"))


def _pair_allreduce(table: CostTable, steps: int, timeout_s: float) -> float:
    """The all-reduce seconds of the probe as one data-parallel stage over two processes
    of this device (spawned here, ended here whatever happens): :func:`collective_s`."""
    import multiprocessing
    import queue as queue_module

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_pair_worker, name=f"asteroid-fx-probe-{rank}", daemon=True,
                         args=(rank, store.port, table.to_json(), steps, timeout_s, out))
             for rank in range(2)]
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.start()
        found: dict[int, list[float]] = {}
        while len(found) < 2:
            try:
                rank, seconds, error = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty:
                raise CostModelError(f"the two-process probe did not finish in {timeout_s:g} s"
                                     ) from None
            if error:
                raise CostModelError(f"probe process {rank} failed: {error}")
            found[rank] = seconds
        return collective_s(list(found.values()))
    finally:
        for proc in procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)


def _measure_here(steps: int, timeout_s: float) -> dict[str, Any]:
    import torch.distributed as dist

    if dist.is_initialized():
        raise CostModelError("cannot probe the runtime inside a running process group; "
                             "profile in a process of its own")
    with tempfile.TemporaryDirectory(prefix="asteroid-fx-probe-") as tmp:
        _spec, table = profile_probe(Path(tmp))
    one = _train_here(table, ("probe",), 0, steps, dist.HashStore(), timeout_s)
    reduce_s = _pair_allreduce(table, steps, timeout_s)
    # loopback: no wire time worth counting; each process had a core (speed 1)
    return _figures(table, one, one.round_times, reduce_s, 0.0, 1.0, steps,
                    shaping=["in-process", "in-process, two processes"])


def _measure(steps: int) -> dict[str, Any]:
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition
    from asteroid_fx.training import run
    from contracts.cluster import Cluster
    from solver.evaluate import allreduce_time

    b = _MICRO_BATCH
    with tempfile.TemporaryDirectory(prefix="asteroid-fx-probe-") as tmp:
        root = Path(tmp)
        spec, table = profile_probe(root)
        model = spec.build_model()
        inputs = spec.sample_batch(b)[0]

        def train(name: str, cluster_yaml: str, devices: tuple[str, ...]) -> Any:
            (root / f"{name}.yaml").write_text(cluster_yaml)
            plan = probe_plan(table, devices)
            stages = partition(model, inputs, plan)
            save_partition(root / name, plan, stages, model_spec=spec, onnx=False,
                           example_inputs=inputs)
            return run(root / name, emulate=root / f"{name}.yaml", steps=steps)

        one = train("one", _ONE_DEVICE, ("probe",))
        two = train("two", _TWO_DEVICES, ("a", "b"))
        cluster = Cluster.from_yaml(root / "two.yaml")
    # a ring all-reduce over two devices: 2 messages (solver.evaluate.allreduce_time), each
    # paid at the devices' speed: the table keeps it at one core (CostTable.message_cost_s)
    reduce_s = collective_s([w.allreduce_times for w in two.workers]) / two.slowdown_factor
    wire = allreduce_time(cluster, ("a", "b"), table.total_param_bytes)
    return _figures(table, one.workers[0], one.round_times, reduce_s, wire,
                    _TWO_DEVICE_SPEED, steps, shaping=[one.shaping, two.shaping])


def profile_probe(root: Path) -> tuple[Any, CostTable]:
    """The probe's model spec (its file written under ``root``) and its cost table."""
    from asteroid_fx.costs import profile
    from asteroid_fx.model_spec import load_model_spec

    (root / "probe.py").write_text(PROBE_SOURCE)
    spec = load_model_spec(str(root / "probe.py"))
    table = profile(spec.build_model(), spec.sample_batch, (_MICRO_BATCH,), repeats=9,
                    warmup=3)
    return spec, table


def probe_plan(table: CostTable, devices: tuple[str, ...]) -> Any:
    """The probe as one stage over ``devices`` (data parallel for more than one), one
    micro-batch of ``_MICRO_BATCH`` samples per device."""
    from contracts.plan import Plan, Stage

    b, n = _MICRO_BATCH, table.num_layers
    return Plan(model_hash=table.model_hash, cluster_hash="runtime-overhead-probe",
                batch_size=b * len(devices), micro_batch_size=b * len(devices),
                num_micro_batches=1, stages=(Stage((0, n - 1), devices, (b,) * len(devices)),),
                num_layers=n, model_name="probe")


# [Note: the collective alone]
# A rank's time in an all-reduce is the wait for the other ranks plus the collective. The
# probe's two ranks arrive at different moments (their rounds end on a shared host), so
# the rank that arrives last times the collective alone: per step, the smaller of the two
# times. The median over the steps is then the figure: a mean of every rank's time (as
# until 2026-12-05) counted the waits and every stall of a busy host, and the per-message
# cost it gave moved from 0.25 to 0.91 ms between probes of the same code on this
# project's 2-core host, and phase 1 of PAC fine-tuning, which sends tens of messages a
# step, was predicted 20 % too fast or too slow with it.


def collective_s(per_rank: list[list[float]]) -> float:
    """The collective's own seconds from each rank's all-reduce seconds per step: per
    step the least over the ranks (the rank that arrived last waited for no one), then
    the median over the steps (see [Note: the collective alone]).

    Raises:
        CostModelError: no steps, or ranks with different numbers of steps.
    """
    counts = {len(times) for times in per_rank}
    if len(counts) != 1 or 0 in counts:
        raise CostModelError(f"the probe's ranks timed {sorted(counts)} all-reduces; each "
                             f"must time the same steps, at least one")
    return statistics.median(min(step) for step in zip(*per_rank))


def _figures(table: CostTable, worker: Any, round_times: list[float], reduce_s: float,
             wire_s: float, pair_speed: float, steps: int, **extra: Any) -> dict[str, Any]:
    """The Note's figures from the one-device run (``worker``, ``round_times``) and the
    two-device all-reduce (``reduce_s`` at ``pair_speed``, ``wire_s`` of it on the link)."""
    b = _MICRO_BATCH
    fwd = sum(lc.fwd.at(b) for lc in table.layers)
    bwd = sum(lc.bwd.at(b) for lc in table.layers)
    update = table.total_param_bytes * table.update_s_per_byte
    round_s = statistics.median(round_times[1:])
    wall = worker.forward_s + worker.backward_s
    cpu = worker.forward_cpu_s + worker.backward_cpu_s
    share = min(1.0, cpu / wall) if wall > 0 else 1.0
    overhead = RuntimeOverhead(
        forward_s=max(0.0, worker.forward_cpu_s - fwd),
        backward_s=max(0.0, worker.backward_cpu_s - bwd),
        round_s=max(0.0, (round_s - wall - update) * share))
    message = max(0.0, (reduce_s - wire_s) / 2.0) * pair_speed
    return {"runtime_overhead": overhead.to_dict(), "message_overhead_s": message, "probe": {
        "table_forward_s": fwd, "table_backward_s": bwd, "table_update_s": update,
        "forward_cpu_s": worker.forward_cpu_s, "backward_cpu_s": worker.backward_cpu_s,
        "forward_s": worker.forward_s, "backward_s": worker.backward_s,
        "round_s": round_s, "allreduce_s": reduce_s, "allreduce_wire_s": wire_s,
        "micro_batch": b, "steps": steps, **extra}}


def _cache_path() -> Path:
    import torch

    from asteroid_fx.cost_source import PROFILER_KEY, cache_dir, cache_key, code_digest

    # the probe times the runtime itself: other runtime code is measured again
    key = cache_key([platform.node(), torch.__version__, PROFILER_KEY, PROBE_KEY,
                     code_digest("cost_models", "runtime", "asteroid_fx.runtime_overhead")])
    return cache_dir() / f"runtime-overhead-{key}.json"


@dataclass(frozen=True)
class HostOverhead:
    """This host's runtime overhead and per-message cost (``measure``'s figures)."""

    runtime: RuntimeOverhead
    message_s: float


def host_runtime_overhead(*, refresh: bool = False,
                          progress: Callable[[int, int, str], None] | None = None
                          ) -> HostOverhead:
    """This host's runtime overhead and per-message cost, measured on first use (about
    20 s; ``progress(done, total, what)`` before and after) and cached under
    ``cache_dir()`` by host, torch version and method."""
    from asteroid_fx.cost_source import cached_measurement

    path = _cache_path()

    def measured() -> dict[str, Any]:
        what = "the runtime's overhead on this host (once per host; cached)"
        log.info("measuring %s in %s", what, path)
        if progress is not None:
            progress(0, 1, what)
        data = measure()
        if progress is not None:
            progress(1, 1, what)
        return data

    return cached_measurement(path, measured, _parse, "runtime-overhead", refresh=refresh)


def _parse(data: Any) -> HostOverhead:
    message = float(data["message_overhead_s"])
    if not (math.isfinite(message) and message >= 0):
        raise CostModelError(f"message_overhead_s must be finite and >= 0, got {message!r}")
    return HostOverhead(RuntimeOverhead.from_dict(data["runtime_overhead"]), message)
