"""Where a command's cost table comes from: a file, this host measured (cached), or FLOPs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from contracts.errors import CostModelError

__all__ = [
    "CHOICES",
    "CostChoice",
    "cache_dir",
    "cached_measurement",
    "cache_key",
    "measures_by_default",
    "default_batch_sizes",
    "resolve_costs",
    "with_host_overhead",
]

log = logging.getLogger(__name__)

CHOICES = ("auto", "measure", "analytic")
"""``--costs`` words; anything else is a path to a ``costs.json``."""

MAX_PROFILE_BATCH = 32
"""The largest batch size the default measurement adds (besides 1, 2, 4, 8)."""

Progress = Callable[[int, int, str], None]
T = TypeVar("T")

PROFILER_KEY = "chain/thread-cpu-time/less-timing-overhead/min-50ms/copy-in-place-only"
"""What the cached measurements were made with (part of the cache key): a change of the
profiler's method invalidates the cache."""


def code_digest(*packages: str) -> str:
    """A digest of the Python sources of ``packages`` (importable names), part of a cache
    key: a measurement made by other code (a new version, or an edit under development
    that kept ``PROFILER_KEY``) is measured again rather than read back. A benchmark's
    cache once kept a table from a development version of the profiler whose backward
    was 3x too small, under an unchanged key (docs/latency-model.md)."""
    import importlib.util

    digest = hashlib.sha256()
    for name in packages:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is None:
            digest.update(f"{name}:?".encode())
            continue
        where = Path(origin)
        files = sorted(where.parent.glob("*.py")) if where.name == "__init__.py" else [where]
        for file in files:
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CostChoice:
    """The table a command plans with, and one line saying where it came from."""

    table: Any  # contracts.table.CostTable
    how: str  # "file", "measured", "cached" or "analytic"
    detail: str
    #: the model's trace (``asteroid_fx.trace.LayerGraph``) the table was made on or checked
    #: against: partition it instead of tracing again
    graph: Any = None


def cache_dir() -> Path:
    """``$ASTEROID_FX_CACHE``, else ``$XDG_CACHE_HOME/asteroid-fx``, else
    ``~/.cache/asteroid-fx``."""
    explicit = os.environ.get("ASTEROID_FX_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "asteroid-fx"


def measures_by_default(cluster: Any) -> bool:
    """True when the cluster has a ``local`` device: this host is one of the devices (or
    stands for them, scaled by ``speed``), so measuring it here describes them better
    than the FLOP model. Board types cannot be measured here: profile them on the board
    (``profile --device-type``) and pass the merged table."""
    return any(d.type == "local" for d in cluster.devices)


def default_batch_sizes(batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, 8 and, for larger batches, ``min(batch_size, 32)``: the fit
    ``a + b * batch`` then spans the shares that plans of this batch size use."""
    sizes = {1, 2, 4, 8}
    if batch_size > 8:
        sizes.add(min(batch_size, MAX_PROFILE_BATCH))
    return tuple(sorted(sizes))


def cache_key(payload: Any) -> str:
    """A short stable digest of a JSON-able payload (a cache file's key)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _filecache_key(path: Path | None) -> str:
    if path is None or not Path(path).is_file():
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path) -> Any:
    from contracts.table import CostTable

    try:
        return CostTable.load(path)
    except CostModelError as exc:
        log.warning("ignoring the unreadable cached cost table %s (%s); measuring again",
                    path, exc)
        return None


def _host_speeds() -> dict[str, float]:
    """This host's FLOP/s, memory bandwidth and norm efficiency, measured once per host
    and torch version and cached, so analytic tables (and the plans made from them) are
    the same on every run."""
    import torch

    from cost_models.hostspeed import measure_host_flops, measure_host_mem_bw, measure_norm_flops

    def measure() -> dict[str, float]:
        flops = measure_host_flops()
        return {"host_flops": flops, "host_mem_bw": measure_host_mem_bw(),
                "norm_efficiency": min(1.0, measure_norm_flops() / flops)}

    key = cache_key([platform.node(), torch.__version__, PROFILER_KEY])
    path = cache_dir() / f"host-{key}.json"
    return cached_measurement(
        path, measure,
        lambda data: {k: float(data[k]) for k in ("host_flops", "host_mem_bw", "norm_efficiency")},
        "host-speed")


def cached_measurement(path: Path, measure: Callable[[], Any], parse: Callable[[Any], T],
                       what: str, *, refresh: bool = False) -> T:
    """``parse`` of the JSON cached at ``path``, else of ``measure()`` (then cached there).

    An unreadable cache (``parse`` raising a lookup, value or ``CostModelError``) is
    measured again with a warning naming ``what``; a cache that cannot be written is
    a warning too, and the measurement is still returned."""
    if path.is_file() and not refresh:
        try:
            return parse(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, CostModelError):
            log.warning("ignoring the unreadable %s cache %s; measuring again", what, path)
    data = measure()
    try:
        _write_atomic(path, json.dumps(data, indent=1))
    except OSError as exc:
        log.warning("cannot cache the %s measurement in %s: %s", what, path, exc)
    return parse(data)


def _check_model(table: Any, graph: Any, spec: Any, path: Path) -> None:
    """``CostModelError`` where ``--costs`` holds another model's layers (another count);
    a warning where the model hashes differ but the counts agree (a table measured on a
    board's older torch traces the same layers under another hash)."""
    if len(table.layers) != graph.num_layers:
        raise CostModelError(
            f"--costs {str(path)!r} is a table of {table.model_name!r} with "
            f"{len(table.layers)} layers, but {spec.spec} traces to {graph.num_layers}; "
            f"profile this model: `asteroid-fx profile {spec.spec} --out costs.json`")
    if table.model_hash and graph.model_hash and table.model_hash != graph.model_hash:
        log.warning("--costs %s: its model hash %s differs from %s's %s (the layer counts "
                    "agree); check that it is this model's table", path, table.model_hash,
                    spec.spec, graph.model_hash)


def resolve_costs(spec: Any, model: Any, inputs: Any, cluster: Any,
                  choice: str | None, *, leaf_modules: Sequence[str] = (),
                  batch_size: int = 8, batch_sizes: Sequence[int] | None = None,
                  progress: Progress | None = None) -> CostChoice:
    """The cost table for ``plan`` / ``partition``.

    Args:
        spec: the loaded ``ModelSpec`` (its ``sample_batch`` and ``build_optimizer``).
        model, inputs: the built model and example inputs (batch first; a tuple, or a dict
            of keyword inputs).
        cluster: the ``Cluster`` being planned for (decides the ``auto`` default).
        choice: ``None``/``"auto"`` (measure this host when the cluster has a ``local``
            device, else analytic), ``"measure"``, ``"analytic"``, or a costs.json path.
        leaf_modules: kept whole by tracing.
        batch_size: the training batch (sets the measured batch sizes).
        batch_sizes: measure at these instead of :func:`default_batch_sizes`.
        progress: ``progress(done, total, what)`` while measuring.

    Returns:
        The table and where it came from. Measured tables are cached under
        :func:`cache_dir` by model graph hash, model file, host, torch version and batch
        sizes, so the same command plans the same way every time.
    """
    from asteroid_fx.trace import trace
    from contracts.table import CostTable

    word = (choice or "auto").strip()
    if word not in CHOICES:
        path = Path(word)
        if not path.is_file():
            raise CostModelError(
                f"--costs {word!r} is neither a file nor one of {', '.join(CHOICES)}; give a "
                f"costs.json from `asteroid-fx profile`, or `analytic` / `measure`")
        table = CostTable.load(path)
        graph = trace(model, inputs, leaf_modules=tuple(leaf_modules))
        _check_model(table, graph, spec, path)
        return CostChoice(table, "file", f"cost table {path}", graph)
    if word == "auto":
        word = "measure" if measures_by_default(cluster) else "analytic"
    graph = trace(model, inputs, leaf_modules=tuple(leaf_modules))
    if word == "analytic":
        from asteroid_fx.costs import analytic_costs

        host = _host_speeds()
        table = analytic_costs(model, inputs, graph=graph, optimizer=spec.build_optimizer,
                               host_flops=host["host_flops"], host_mem_bw=host["host_mem_bw"],
                               norm_efficiency=host["norm_efficiency"])
        why = ("" if choice == "analytic" else
               " (no local device in the cluster; profile the boards with --device-type "
               "and pass the merged table with --costs for measured times)")
        return CostChoice(table, "analytic", f"analytic costs{why}", graph)
    import torch

    sizes = tuple(batch_sizes) if batch_sizes else default_batch_sizes(batch_size)
    key = cache_key([graph.model_hash, _filecache_key(spec.path), platform.node(),
                   torch.__version__, list(sizes), PROFILER_KEY, code_digest("cost_models")])
    path = cache_dir() / "costs" / f"{spec.name.replace(':', '_').replace('/', '_')}-{key}.json"
    if path.is_file():
        cached = _load_cached(path)
        if cached is not None:
            return CostChoice(with_host_overhead(cached, progress), "cached",
                              f"measured on this host at batch sizes {list(sizes)} (cached "
                              f"in {path})", graph)
    from asteroid_fx.costs import profile

    table = profile(model, spec.sample_batch, sizes, graph=graph,
                    optimizer=spec.build_optimizer, progress=progress,
                    example_inputs=inputs)
    try:
        _write_atomic(path, table.to_json())
    except OSError as exc:
        log.warning("cannot cache the measured cost table in %s: %s", path, exc)
    return CostChoice(with_host_overhead(table, progress), "measured",
                      f"measured on this host at batch sizes {list(sizes)} (cached in {path})",
                      graph)


def with_host_overhead(table: Any, progress: Progress | None = None) -> Any:
    """``table`` with this host's runtime overhead and per-message cost
    (``asteroid_fx.runtime_overhead``, measured once per host and cached), each unless the
    table already carries one (a calibrated table keeps its fitted message overhead)."""
    from dataclasses import replace

    from asteroid_fx.runtime_overhead import host_runtime_overhead

    if not table.runtime_overhead.is_zero and table.message_overhead_s > 0:
        return table
    host = host_runtime_overhead(progress=progress)
    if table.runtime_overhead.is_zero:
        table = replace(table, runtime_overhead=host.runtime)
    if table.message_overhead_s == 0.0:
        table = replace(table, message_overhead_s=host.message_s)
    return table
