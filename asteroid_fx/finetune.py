"""``asteroid-fx finetune``: prepare, run and check PAC runs (parallel adapters, activation cache).

A PAC directory (``--out DIR``) holds ``backbone/`` (the frozen segments and the head as
a stage package, ``asteroid_fx.package``), ``pac.json`` (the adapter layout),
``adapters.weights.pt`` (the adapters' initial weights, a ``{name: tensor}`` dict),
``pac_plan.json`` (``solver.pac.PacPlan``), ``cluster.yaml`` and ``costs.json``. See
docs/finetune.md.

Seeds (as ``asteroid-fx run``): ``torch.manual_seed(seed)`` then ``build_model()`` gives
the backbone; ``torch.manual_seed(seed)`` again right before the adapters are made gives
their initial weights; samples follow [Note: fine-tuning data] in ``runtime.samples``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from asteroid_fx.adapters import parallel_adapters
from contracts.files import write_text
from contracts.plan import Plan
from cost_models.hostspeed import single_thread
from runtime.adapter_model import AdapterModel
from runtime.pac_train import ADAPTERS_FILE, BACKBONE_DIR, LAYOUT_FILE, PAC_PLAN_FILE
from runtime.samples import SampleSource
from solver.pac import (
    DEFAULT_CACHE_SLACK,
    DEFAULT_PHASE1_SLACK,
    DEFAULT_STORE_SLACK,
    PacModel,
    PacPlan,
    plan_finetune,
    replan_phase1,
)

__all__ = ["FinetuneResult", "PacReplanner", "build_adapter_model", "measure_samples",
           "measure_disk", "measure_step", "measure_step_memory", "pac_model_of", "paired_extra",
           "weights_stay_cached", "COLD_CACHE_SHARE",
           "prepare_finetune",
           "run_finetune", "reference_finetune", "DEFAULT_SAMPLES_BATCHES"]

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_BATCHES = 8
"""Without ``dataset()`` and ``--samples``, a run has this many mini-batches per epoch."""


def build_adapter_model(spec: Any, *, rank: int, seed: int, layers: Sequence[Any] | None = None,
                        train_head: bool = False, cache_dtype: str | None = None
                        ) -> tuple[torch.nn.Module, AdapterModel, Any]:
    """The seeded model, its adapter model and example inputs (see the module's seeds)."""
    from asteroid_fx.trace import trace

    torch.manual_seed(seed)
    model = spec.build()
    inputs, _ = spec.example_inputs(2)
    graph = trace(model, inputs, model_name=spec.name)
    torch.manual_seed(seed)
    pac = parallel_adapters(model, inputs, layers=layers, rank=rank, train_head=train_head,
                            graph=graph, cache_dtype=cache_dtype)
    return model, pac, inputs


WAIT_S = 0.01
"""Seconds ``measure_step`` and ``measure_cold_segments`` wait before each timed step or
cold call, as a device waits for the all-reduce (phase 2) or its input (phase 1) between
two (see [Note: a step after a wait])."""

# [Note: a step after a wait]
# A device runs one phase-2 step per all-reduce and waits for the collective in between;
# in phase 1 a stage waits for its input between two calls. The call after a wait starts
# with its caches (and the core's predictors) partly cold, more so when other work ran
# meanwhile (on the emulator: the other devices). On this project's host one gpt_small
# adapter step of 4 cached samples took 5.3 ms of CPU back to back, 5.5-5.6 ms after a 2 ms
# sleep and 6.1-6.3 ms after a 15 ms one (the forward +20 %, the backward +8 %), and the
# emulated devices measured 6.1-6.3 ms per step against the back-to-back fit's 4.95 ms.
# A one-sample forward of a segment (2 ms) took 0.1-0.3 ms more after a 2 ms sleep and
# 0.6-0.8 ms more after a 10 ms sleep with a sweep of the last-level cache, steadily (a
# sweep alone: 0.1-0.7 ms, from one measurement to the next); the emulated phase-1
# devices paid 0.5-1.2 ms per call. So ``measure_step`` times each step and
# ``measure_cold_segments`` each cold call after a pause of ``WAIT_S``, about a phase-2
# all-reduce on the emulated cluster: each is timed as the runtime runs it. A device with
# nothing else to run keeps more of its caches over a wait and pays less than this.


def _wait(seconds: float) -> None:
    """Sleep ``seconds``: the pause before a timed call (a name of its own, for tests)."""
    time.sleep(seconds)


def measure_step(pac: AdapterModel, spec: Any, *, batch_sizes: Sequence[int] = (1, 4, 8),
                 repeats: int = 5, rounds: int = 3,
                 pause_s: float = WAIT_S) -> tuple[float, float]:
    """``(intercept_s, per_sample_s)`` of one phase-2 step of ``pac`` on this host, one
    thread as a device runs (per batch size the least of ``rounds`` medians of ``repeats``
    after a warm-up, fitted as ``cost_models.profile`` fits layers), each step timed after
    a pause of ``pause_s`` ([Note: a step after a wait]); the adapters' weights are left
    unchanged. A step is what ``runtime.pac_train`` does on a device besides the
    all-reduce: its entry from the cache's per-sample rows (``cat_rows``), the side path,
    the head and the loss forward (counting what autograd saves, ``saved_storages``) and
    backward, the gradients packed for the all-reduce and unpacked from it
    (``wire_tensor``, ``take_gradients``), and the run's optimizer step
    (``make_optimizer``). Each run is timed in this thread's CPU seconds, not wall
    clock: on a shared host other jobs would otherwise stretch the fit (the fits of one
    host varied 10x with its load). Other jobs still slow the CPU itself (caches, memory
    bandwidth): single medians of one host at load 2-3 came out 13-25 % above its quiet
    figure, so the least of a few rounds is kept, the rounds interleaved over the batch
    sizes so that a busy moment does not skew one size alone."""
    from cost_models.profile import fit_time
    from runtime.memory import saved_storages
    from runtime.pac_train import SLOTS, cat_rows, take_gradients, wire_tensor
    from runtime.train import make_optimizer, resolve_loss_fn

    model_file = _ModelFile(spec)
    loss_fn = resolve_loss_fn(model_file)
    saved = {k: v.clone() for k, v in pac.trainable_state().items()}
    params = pac.trainable_parameters()
    skip = {t.untyped_storage().data_ptr() for t in [*pac.parameters(), *pac.buffers()]}
    try:
        with single_thread():
            optimizer = make_optimizer(model_file, params, 1e-3)
            slots = torch.zeros(SLOTS, dtype=torch.float64)
            made = {batch: _cached_rows(pac, spec, batch) for batch in batch_sizes}
            best = {batch: math.inf for batch in batch_sizes}
            for _, batch in itertools.product(range(rounds), batch_sizes):
                rows, targets = made[batch]
                runs = []
                for i in range(repeats + 1):
                    if pause_s > 0:
                        _wait(pause_s)
                    began = time.thread_time()
                    entry = cat_rows(rows)
                    with saved_storages(skip):       # the runtime counts them every step
                        loss = loss_fn(pac.train_forward(entry), targets)
                    loss.backward()
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                             for p in params]
                    take_gradients(params, wire_tensor(grads, slots))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if i:
                        runs.append(time.thread_time() - began)
                best[batch] = min(best[batch], statistics.median(runs))
    finally:
        pac.load_state_dict(saved, strict=False)
    fit = fit_time(list(batch_sizes), [best[b] for b in batch_sizes])
    return fit.intercept_s, fit.per_sample_s


def _last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """This host's largest CPU cache (sysfs; ``default`` where it cannot be read)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else default


COLD_CACHE_SHARE = 0.25
"""Weights evicted between phase-1 calls are expected only where every device's copy of the
backbone together needs more than this share of the host's last-level cache
(:func:`weights_stay_cached`)."""


def weights_stay_cached(pac: AdapterModel, devices: int,
                        cache_bytes: int | None = None) -> bool:
    """Whether the backbone's weights stay in this host's last-level cache between phase
    1's calls: ``devices`` copies of every segment's weights and buffers (the most the
    emulated devices of one host hold together) within :data:`COLD_CACHE_SHARE` of the
    cache (``cache_bytes``; None: this host's, from sysfs). Then a call after a wait finds
    them warm, and no cold extras apply ([Note: cold weights in phase 1] in
    ``solver.pac_cost``)."""
    held = sum(t.numel() * t.element_size() for segment in pac.segments
               for t in [*segment.parameters(), *segment.buffers()])
    cache = _last_level_cache_bytes() if cache_bytes is None else cache_bytes
    return devices * held <= COLD_CACHE_SHARE * cache


def measure_cold_segments(pac: AdapterModel, spec: Any, *, repeats: int = 5,
                          rounds: int = 3, pause_s: float = WAIT_S) -> tuple[float, ...]:
    """Per backbone segment of ``pac``, the CPU seconds a forward of one sample takes
    beyond a warm one when it starts with the segment's weights out of the cache (after
    reading twice this host's last-level cache of other memory, and after a pause of
    ``pause_s``), as phase 1 calls it after each wait (see [Note: cold weights in phase 1]
    in ``solver.pac_cost``): per segment the median over ``rounds x repeats`` pairs of a warm
    forward and the cold one right after it (:func:`paired_extra`), one thread, never below
    0."""
    from asteroid_fx.model_spec import model_inputs

    sweep = torch.empty(2 * _last_level_cache_bytes() // 4)
    with single_thread(), torch.no_grad():
        values = model_inputs(spec.example_inputs(1)[0])
        inputs = []
        for j in range(len(pac.segments)):
            inputs.append(values)
            values, _ = pac.run_segment(j, values)

        def timed(j: int, cold: bool) -> float:
            if cold:
                if pause_s > 0:
                    _wait(pause_s)
                sweep.add_(1.0)
            began = time.thread_time()
            pac.run_segment(j, inputs[j])
            return time.thread_time() - began

        extra = []
        for j in range(len(pac.segments)):
            timed(j, False)
            extra.append(paired_extra(functools.partial(timed, j, False),
                                      functools.partial(timed, j, True), rounds * repeats))
    return tuple(extra)


def _cold_segments(pac: AdapterModel, spec: Any, devices: int) -> tuple[float, ...]:
    """``measure_cold_segments``, or nothing where the weights stay cached."""
    if weights_stay_cached(pac, devices):
        log.info("the backbone's weights (x %d devices) fit in a quarter of this host's "
                 "last-level cache: phase 1's calls find them warm, no cold extras", devices)
        return ()
    return measure_cold_segments(pac, spec)


def paired_extra(warm: Callable[[], float], cold: Callable[[], float], pairs: int) -> float:
    """The median over ``pairs`` pairs of ``cold() - warm()``, each ``cold()`` run right
    after its ``warm()``; never below 0. A busy moment of the host slows both runs of a
    pair alike, so it stays out of the difference."""
    differences = []
    for _ in range(pairs):
        before = warm()
        differences.append(cold() - before)
    return max(0.0, statistics.median(differences))


NOMINAL_DISK_S_PER_BYTE = (4e-10, 2.5e-10)
"""``(write, read)`` CPU seconds per byte of a disk cache where costs are analytic (nothing
is measured): about what ``measure_disk`` gives on the development host (files in the page
cache, 2.5 and 4 GB/s). A device's ``storage_mb_s`` adds the storage's own wait."""


def measure_disk(pac: AdapterModel, spec: Any, *, rows: int = 8, repeats: int = 5,
                 pause_s: float = WAIT_S, directory: str | None = None) -> tuple[float, float]:
    """``(write_s_per_byte, read_s_per_byte)``: this host's CPU seconds per byte to write
    ``rows`` cache rows of ``pac`` to a disk cache's file (``runtime.activation_cache.
    DiskRows`` in ``directory``, None: ``ASTEROID_CACHE_DIR`` or the system's temporary
    directory) and to read them back, one thread, medians of ``repeats`` after a warm-up,
    each read after a pause of ``pause_s`` as a phase-2 step reads its rows after the
    all-reduce ([Note: a cache on disk] in solver/pac_cost.py). The file stays in the page
    cache: storage bandwidth is the cluster's ``storage_mb_s``."""
    from runtime.activation_cache import DiskRows

    made, _ = _cached_rows(pac, spec, rows)
    made = [pac.to_cache(row) for row in made]
    size = sum(t.numel() * t.element_size() for row in made for t in row)
    store = DiskRows(directory)
    writes, reads = [], []
    try:
        with single_thread():
            for i in range(repeats + 1):
                began = time.thread_time()
                for j, row in enumerate(made):
                    store[i * rows + j] = row
                writes.append(time.thread_time() - began)
                if pause_s > 0:
                    _wait(pause_s)
                began = time.thread_time()
                for j in range(rows):
                    store[i * rows + j]
                reads.append(time.thread_time() - began)
    finally:
        store.close()
    return (statistics.median(writes[1:]) / size, statistics.median(reads[1:]) / size)


def _cached_rows(pac: AdapterModel, spec: Any, batch_size: int
                 ) -> tuple[list[tuple[torch.Tensor, ...]], Any]:
    """``(rows, targets)`` of ``batch_size`` example samples: each sample's cache entry
    as the activation cache holds it (one row per sample), and the samples' targets."""
    from asteroid_fx.model_spec import model_inputs

    inputs, targets = spec.example_inputs(batch_size)
    with torch.no_grad():
        whole = pac.backbone(*model_inputs(inputs))
    return [tuple(t[i:i + 1] for t in whole) for i in range(batch_size)], targets


def measure_step_memory(pac: AdapterModel, spec: Any, batch_size: int = 4) -> int:
    """Per sample, the bytes autograd saves in one phase-2 step's forward of ``pac`` (the
    side path, the head and the loss on an entry of ``batch_size`` cached rows), each
    storage once and neither weights nor the entry's own rows, as ``runtime.pac_train``
    counts a step's tensors (``PacModel.step_saved_bytes``); rounded up."""
    from runtime.memory import saved_storages
    from runtime.pac_train import cat_rows
    from runtime.train import resolve_loss_fn

    loss_fn = resolve_loss_fn(_ModelFile(spec))
    rows, targets = _cached_rows(pac, spec, batch_size)
    entry = cat_rows(rows)
    skip = {t.untyped_storage().data_ptr()
            for t in [*pac.parameters(), *pac.buffers(), *entry]}
    with saved_storages(skip) as saved:
        loss = loss_fn(pac.train_forward(entry), targets)
    del loss
    return -(-sum(saved.values()) // batch_size)


def measure_samples(samples: SampleSource, count: int = 8, repeats: int = 3) -> float:
    """Seconds to make one sample of ``samples`` on this host, one thread (median of
    ``repeats`` runs over the first ``count`` samples), which phase 1's first stage pays."""
    count = max(1, min(count, samples.num_samples))
    runs = []
    with single_thread():
        for _ in range(repeats + 1):
            began = time.perf_counter()
            samples.rows(0, count)
            runs.append((time.perf_counter() - began) / count)
    return statistics.median(runs[1:])


def pac_model_of(pac: AdapterModel, step_fit: tuple[float, float] = (0.0, 0.0)) -> PacModel:
    """The planner's view of an adapter model (plain data)."""
    trainable = sum(p.numel() * p.element_size() for p in pac.trainable_parameters())
    flops = 0.0
    for shape in pac.tap_shapes:
        tokens = 1
        for d in shape[:-1]:
            tokens *= d
        flops += 2.0 * tokens * 2 * shape[-1] * pac.rank
    # runtime.pac_train sums the gradients in float64 (one all-reduce per step)
    wire = sum(p.numel() for p in pac.trainable_parameters()) * torch.float64.itemsize
    return PacModel(taps=pac.taps, entry_bytes=pac.entry_bytes(), trainable_bytes=trainable,
                    adapter_flops=flops, train_head=pac.train_head, step_fit=step_fit,
                    allreduce_bytes=wire,
                    made_entry_bytes=0 if pac.made_entry_bytes == pac.entry_bytes()
                    else pac.made_entry_bytes)


def prepare_finetune(spec: Any, cluster: Any, costs: Any, out: str | Path, *, batch_size: int,
                     epochs: int, num_samples: int | None, rank: int = 8, seed: int = 0,
                     layers: Sequence[Any] | None = None, train_head: bool = False,
                     micro_batch_size: int | None = None, token: str | None = None,
                     phase1_planner: str = "asteroid", phase1_objective: str = "memory",
                     phase1_slack: float = DEFAULT_PHASE1_SLACK, cache: str = "auto",
                     cache_slack: float = DEFAULT_CACHE_SLACK,
                     cache_dtype: str | None = None, cache_store: str = "auto",
                     store_slack: float = DEFAULT_STORE_SLACK,
                     fail: str | None = None) -> PacPlan:
    """Build the adapter model, plan both phases (``cache``, ``cache_slack``,
    ``cache_store``, ``store_slack``: where the activation cache lives,
    ``solver.pac.plan_finetune``) and write the PAC directory ``out``; ``cache_dtype``
    (``"bfloat16"`` ...): the dtype the cache keeps its entries in ([Note: cache dtype] in
    ``runtime.adapter_model``). ``fail``: the run's ``--fail``, checked against the plan
    before anything is written (``runtime.pac_recovery.parse_fail``: a step past the run
    replaced the directory's plan, then failed)."""
    from asteroid_fx.package import check_package_dir, save_partition

    # (before any work: a partition directory's costs.json, which its recovery reads, was
    # replaced by the fine-tuning model's)
    check_package_dir(out, PAC_PLAN_FILE, "fine-tuning")
    samples = SampleSource(spec, seed, num_samples if num_samples is not None else
                           _default_samples(spec, batch_size))
    _model, pac, inputs = build_adapter_model(spec, rank=rank, seed=seed, layers=layers,
                                              train_head=train_head, cache_dtype=cache_dtype)
    measured = costs.source != "analytic"
    step_fit = measure_step(pac, spec) if measured else (0.0, 0.0)
    write_s, read_s = (0.0, 0.0) if cache_store == "memory" else \
        measure_disk(pac, spec) if measured else NOMINAL_DISK_S_PER_BYTE
    model = replace(pac_model_of(pac, step_fit), write_s_per_byte=write_s,
                    read_s_per_byte=read_s,
                    sample_s=measure_samples(samples) if measured else 0.0,
                    step_saved_bytes=measure_step_memory(pac, spec),
                    segment_cold_s=_cold_segments(pac, spec, len(cluster.devices))
                    if measured else ())
    plan = plan_finetune(costs, cluster, model, batch_size=batch_size,
                         num_samples=samples.num_samples, epochs=epochs,
                         micro_batch_size=micro_batch_size, phase1_planner=phase1_planner,
                         phase1_objective=phase1_objective, phase1_slack=phase1_slack,
                         cache=cache, cache_slack=cache_slack, cache_store=cache_store,
                         store_slack=store_slack)
    if fail is not None:
        from runtime.pac_recovery import parse_fail

        parse_fail(fail, plan)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[Any] = [*pac.segments, pac.head]
    save_partition(out / BACKBONE_DIR, pac.segment_plan, parts,
                   model_spec=spec, onnx=False, example_inputs=inputs, token=token)
    write_text(out / LAYOUT_FILE, json.dumps(pac.layout(), indent=2), "adapter layout")
    torch.save(pac.trainable_state(), out / ADAPTERS_FILE)
    plan.save(out / PAC_PLAN_FILE)
    costs.save(out / "costs.json")
    write_text(out / "cluster.json", cluster.to_json(), "cluster")
    return plan


def _default_samples(spec: Any, batch_size: int) -> int | None:
    return None if callable(getattr(spec, "dataset", None)) else \
        DEFAULT_SAMPLES_BATCHES * batch_size


@dataclass
class FinetuneResult:
    """What a PAC (or full) run measured: per-step records and per-device figures."""

    method: str
    records: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    slowdown_factor: float = 1.0
    shaping: str = "none"
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)
    cache_bytes: dict[str, int] = field(default_factory=dict)
    #: peak tensors with the cache entries held at that moment (phase 1 included, where
    #: a sharded cache parks rows on other devices), per device
    peak_with_cache_bytes: dict[str, int] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    #: per device, its median seconds in the phase-2 all-reduce (epochs 2+), waiting for
    #: the others included: the smallest is about the collective alone (the device that
    #: arrived last waited for no one), the spread is the devices' uneven arrival
    allreduce_s: dict[str, float] = field(default_factory=dict)
    #: the devices that kept their cache on disk (``PacPlan.cache_disk``)
    cache_disk: tuple[str, ...] = ()

    @property
    def losses(self) -> list[float]:
        return [float(r["loss"]) for r in self.records]

    def epoch_times(self, steps_per_epoch: int) -> list[float]:
        times = [float(r["round_time_s"]) for r in self.records]
        return [sum(times[i:i + steps_per_epoch])
                for i in range(0, len(times), steps_per_epoch)]

    def summary(self, steps_per_epoch: int) -> str:
        epochs = self.epoch_times(steps_per_epoch)
        lines = [f"{self.method}: {len(self.records)} steps, loss {self.losses[0]:.6f} -> "
                 f"{self.losses[-1]:.6f}; epochs "
                 + ", ".join(f"{t:.3f} s" for t in epochs)
                 + f" (wall {self.wall_s:.1f} s, shaping {self.shaping}, slow-down factor "
                 f"{self.slowdown_factor:.2f})"]
        if self.predicted:
            f = self.slowdown_factor
            lines.append(f"predicted (x{f:.2f}): epoch 1 {self.predicted['epoch1_s'] * f:.3f} s, "
                         f"later epochs {self.predicted['epoch_s'] * f:.3f} s, total "
                         f"{self.predicted['total_s'] * f:.3f} s")
        for ev in self.recoveries:
            rows = "; ".join(f"{d} {r}" for d, r in ev.get("rows", {}).items())
            extra = (f", re-plan {ev['replan_s']:.3f} s, restore {ev['restore_s']:.3f} s, "
                     f"recompute {ev['recompute_s']:.3f} s ({ev['recomputed_rows']} rows), "
                     f"phase 1 now {ev['phase1']}" if ev.get("phase") == 1 else "")
            lines.append(f"recovery in phase {ev.get('phase', 2)} at step {ev['at_step']}: "
                         f"lost {ev['failed']}, detect {ev['detect_s']:.3f} s{extra}, total "
                         f"{ev['total_s']:.3f} s; rows now {rows}")
        for device, peak in sorted(self.peak_memory_bytes.items()):
            cached = self.cache_bytes.get(device)
            with_cache = self.peak_with_cache_bytes.get(device)
            lines.append(f"  {device}: peak tensors {peak / 2**20:.1f} MiB"
                         + ("" if cached is None else f", cache {cached / 2**20:.1f} MiB")
                         + (" on disk" if device in self.cache_disk and cached else "")
                         + ("" if with_cache is None or device in self.cache_disk else
                            f", peak with the cache {with_cache / 2**20:.1f} MiB"))
        return "\n".join(lines)


def run_finetune(directory: str | Path, cluster: str | Path, *, seed: int = 0, lr: float = 0.01,
                 metrics: str | Path | None = None, timeout_s: float = 1800.0,
                 progress: Callable[[Mapping[str, Any]], None] | None = None,
                 token: str | None = None, fail: str | None = None) -> FinetuneResult:
    """Run a PAC directory on an emulated ``cluster`` (one process per device); ``fail``
    ("DEVICE@STEP") ends that device's process at the start of step STEP to exercise
    recovery: in epoch 1 during phase 1 (mini-batch STEP; the launcher re-plans phase 1 on
    the survivors with :class:`PacReplanner`, [Note: PAC phase-1 recovery] in
    ``runtime.pac_recovery``), later at a phase-2 step ([Note: PAC recovery] in
    ``runtime.pac_train``).

    Raises:
        RuntimeFailure: a bad ``fail`` (one line, before anything starts), or the run failed.
    """
    from runtime.emulator import emulate
    from runtime.pac_recovery import Phase1Recovery, parse_fail
    from runtime.pac_train import PacSource, finetune_device
    from runtime.staged_output import staged_output
    from runtime.train import TrainConfig

    source = PacSource(str(directory), fail=fail)
    plan = source.pac_plan()
    spec = parse_fail(fail, plan)
    may_fail = [] if spec is None else [plan.devices.index(spec.device)]
    on_lost = Phase1Recovery(plan, PacReplanner(directory)) \
        if spec is not None and spec.in_phase1(plan) else None
    records: list[dict[str, Any]] = []

    def on_step(record: Mapping[str, Any]) -> None:
        records.append(dict(record))
        if progress is not None:
            progress(record)

    started = time.perf_counter()
    with staged_output(metrics) as staged:     # a failed run keeps the metrics one had
        config = TrainConfig(steps=plan.epochs * plan.steps_per_epoch, seed=seed, lr=lr,
                             metrics=staged, timeout_s=300.0)
        result = emulate(source, cluster, config, progress=on_step, timeout_s=timeout_s,
                         token=token, body=finetune_device, may_fail=may_fail,
                         on_lost=on_lost)
    records.sort(key=lambda r: int(r["step"]))
    last = records[-1] if records else {}
    recoveries = []
    if metrics is not None and Path(metrics).is_file():
        recoveries = [json.loads(line) for line in Path(metrics).read_text().splitlines()
                      if '"event"' in line]
    factor = result.setup.factor if result.setup is not None else 1.0
    return FinetuneResult(method="pac", records=records,
                          wall_s=time.perf_counter() - started, slowdown_factor=factor,
                          shaping=result.shaping,
                          peak_memory_bytes=dict(last.get("peak_memory_bytes", {})),
                          cache_bytes=dict(last.get("cache_bytes", {})),
                          peak_with_cache_bytes=dict(last.get("peak_with_cache_bytes", {})),
                          predicted={} if plan.predicted is None else plan.predicted.to_dict(),
                          recoveries=recoveries, cache_disk=plan.cache_disk,
                          allreduce_s={w.device: statistics.median(w.allreduce_times)
                                       for w in result.workers if w.allreduce_times})


class PacReplanner:
    """The front end's phase-1 re-planner (``runtime.pac_recovery.Phase1Replanner``) for a PAC
    directory: ``solver.pac.replan_phase1`` on the directory's cost table and cluster,
    both loaded (and the planner imported) when it is made, before the run starts."""

    def __init__(self, directory: str | Path) -> None:
        from contracts.cluster import Cluster
        from contracts.errors import RuntimeFailure
        from contracts.table import CostTable

        path = Path(directory)
        missing = [n for n in ("costs.json", "cluster.json") if not (path / n).is_file()]
        if missing:
            raise RuntimeFailure(f"the PAC directory {path} has no {' or '.join(missing)}, "
                                 f"which re-planning phase 1 after a lost device needs; "
                                 f"write it again with `asteroid-fx finetune --out`")
        self.costs = CostTable.load(path / "costs.json")
        self.cluster = Cluster.from_json((path / "cluster.json").read_text())

    def replan_phase1(self, pac: PacPlan, failed: Sequence[str]) -> Plan:
        return replan_phase1(pac, self.costs, self.cluster, failed)


def reference_finetune(spec: Any, *, batch_size: int, epochs: int, num_samples: int | None,
                       rank: int = 8, seed: int = 0, lr: float = 0.01,
                       layers: Sequence[Any] | None = None, train_head: bool = False,
                       cache_dtype: str | None = None) -> list[float]:
    """Per-step losses of single-process PAC training of the same adapter model on the same
    samples (the check the distributed run must equal up to float rounding), its cache
    entries rounded to ``cache_dtype`` as the run's are."""
    from runtime.train import make_optimizer, resolve_loss_fn

    samples = SampleSource(spec, seed, num_samples if num_samples is not None else
                           _default_samples(spec, batch_size))
    steps = samples.steps_per_epoch(batch_size)
    _model, pac, _inputs = build_adapter_model(spec, rank=rank, seed=seed, layers=layers,
                                               train_head=train_head, cache_dtype=cache_dtype)
    module = _ModelFile(spec)
    optimizer = make_optimizer(module, pac.trainable_parameters(), lr)
    loss_fn = resolve_loss_fn(module)
    from asteroid_fx.model_spec import model_inputs

    cache: dict[int, tuple[torch.Tensor, ...]] = {}
    losses = []
    for _epoch in range(epochs):
        for k in range(steps):
            inputs, targets = samples.rows(k * batch_size, (k + 1) * batch_size)
            if k not in cache:
                cache[k] = pac.backbone(*model_inputs(inputs))
            loss = loss_fn(pac.train_forward(cache[k]), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return losses


class _ModelFile:
    """A ``ModelSpec`` seen as a model file module (``loss_fn``, ``build_optimizer``)."""

    def __init__(self, spec: Any) -> None:
        self.loss_fn = spec.loss_fn
        if spec.build_optimizer is not None:
            self.build_optimizer = spec.build_optimizer
