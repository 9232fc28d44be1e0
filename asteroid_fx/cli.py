"""The ``asteroid-fx`` command line (trace, profile, plan, partition, run, plot and more)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from contracts.errors import AsteroidError

__all__ = ["app", "main"]

log = logging.getLogger(__name__)

app = typer.Typer(
    name="asteroid-fx",
    help="Plan, partition and run hybrid-pipeline training across heterogeneous devices.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,     # plain click help: wraps to the terminal, flags without <bool>
)

# Tables are wide: when stdout is not a terminal (a file, a pipe, CI) do not squeeze them,
# unless $COLUMNS says how wide to be; on a terminal they fold to its width. Lines of text
# are not folded (soft_wrap): a path in "wrote ..." stays whole on a narrow console.
_SIZED = "COLUMNS" in os.environ
console = Console(width=None if sys.stdout.isatty() or _SIZED else 160, soft_wrap=True)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() or _SIZED else 400,
                      soft_wrap=True)

_state: dict[str, bool] = {"debug": False}

T = TypeVar("T")

ModelArg = Annotated[
    str,
    typer.Argument(help="path/to/model.py, path/to/model.py:prefix, or builtin:NAME"),
]
ClusterOpt = Annotated[
    Path, typer.Option("--cluster", "-c", help="cluster.yaml describing devices and links")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="samples per training round")]
MicroOpt = Annotated[int | None, typer.Option(
    "--micro-batch", help="fix the micro-batch size (a divisor of the batch size; asteroid and "
    "ilp planners) instead of letting the planner choose it")]
PLANNERS_HELP = (
    "asteroid: the Asteroid DP, exact over every device order (default; --time-limit "
    "makes it anytime); asteroid-order: the paper's DP over the capability order only; "
    "ilp: the same space as a MILP (PuLP/CBC), a cross-check; "
    "ilp-wide: any device subset per stage (small instances only); "
    "baselines, each with its published blind spots: dp-only (DDP: the whole model on "
    "every device, equal shares), pp-equal (GPipe: one device per stage, layers balanced by "
    "time), pipedream, dapple, hetpipe, device (the best single device)"
)
PlannerOpt = Annotated[str, typer.Option("--planner", help=PLANNERS_HELP)]
TimeLimitOpt = Annotated[float | None, typer.Option(
    "--time-limit", help="seconds for the asteroid search: the best plan by then, with its "
    "proven gap (default: search to the end, exact)")]
ObjectiveOpt = Annotated[str, typer.Option(
    "--objective", help="model: the latency model's optimum (default); simulated: of the "
    "plans the asteroid search found, the one whose event simulation is fastest, where it "
    "beats the optimum's by 5% (docs/planner.md, \"Simulated alternatives\")")]


_THIRD_PARTY_LOGGERS = ("onnxscript", "onnx_ir", "onnx", "torch", "matplotlib", "PIL",
                        "pulp", "urllib3", "filelock")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("asteroid-fx")
        except PackageNotFoundError:   # run from a source tree that is not installed
            found = "unknown (not installed)"
        console.print(f"asteroid-fx {found}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks on errors")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version and exit")]
    = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else (logging.INFO if verbose else logging.WARNING),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not debug:   # -v is our progress; other libraries' INFO only with --debug
        for name in _THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _error_line(label: str, message: str) -> None:
    """Print ``label message`` as exactly one line on stderr (no markup interpretation)."""
    from rich.text import Text

    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    rank = os.environ.get("RANK") if "TORCHELASTIC_RUN_ID" in os.environ else None
    if rank is not None:   # under torchrun: one line per rank, above torchrun's own report
        label = f"[rank {rank}] {label}"
    err_console.print(Text.assemble((label, "bold red"), " ", one_line), soft_wrap=True)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn any failure into one line on stderr and a non-zero exit (traceback with --debug)."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except AsteroidError as exc:
        if _state["debug"]:
            raise
        _error_line("error:", f"{type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - the CLI must never dump a traceback by default
        if _state["debug"]:
            raise
        _error_line("internal error:",
                    f"{type(exc).__name__}: {exc} (re-run with --debug for the traceback)")
        raise typer.Exit(1) from None


def _writable(path: Path | None, option: str, example: str = "", *,
              directory: bool = False) -> None:
    """``contracts.files.check_writable``: the output checked before any work."""
    from contracts.files import check_writable

    check_writable(path, option, example, directory=directory)


def _image(path: Path | None, option: str) -> None:
    """``OutputError`` unless ``path``'s suffix is an image format matplotlib writes (checked
    before the work, as ``_writable`` is)."""
    if path is None:
        return
    from matplotlib.backend_bases import FigureCanvasBase

    from contracts.errors import OutputError

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix.lower().lstrip(".") not in formats:
        raise OutputError(f"{option} {str(path)!r}: {path.suffix or 'no suffix'} is not an "
                          f"image format; end it in .png (or .{', .'.join(formats)})")


def _progress_callback(description: str) -> tuple[Any, Callable[[int, int, str], None]]:
    """A rich progress bar and a ``(done, total, what)`` callback that drives it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/"
        "{task.total}"), TextColumn("{task.fields[what]}"), TimeElapsedColumn(),
        console=err_console, transient=False, disable=not err_console.is_terminal,
    )
    task = progress.add_task(description, total=None, what="")

    def update(done: int, total: int, what: str) -> None:
        progress.update(task, completed=done, total=total, what=what)

    return progress, update


def _load_model(spec: str, batch_size: int) -> tuple[Any, Any, Any]:
    from asteroid_fx.model_spec import load_model_spec

    model_spec = load_model_spec(spec)
    model = model_spec.build()
    inputs, _targets = model_spec.example_inputs(batch_size)
    return model_spec, model, inputs


def _leaf(leaf_modules: list[str] | None) -> tuple[str, ...]:
    return tuple(leaf_modules or ())


LeafOpt = Annotated[
    list[str] | None,
    typer.Option("--leaf", help="qualified name or class name of a module to keep as a leaf"),
]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


@app.command()
def trace(
    model: ModelArg,
    leaf: LeafOpt = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", help="samples in the example batch that is traced")] = 2,
) -> None:
    """Show the layer graph: layers, parameters, activation and cut sizes."""
    with _errors():
        from rich.table import Table

        from asteroid_fx.trace import trace as trace_fn

        spec, module, inputs = _load_model(model, batch_size)
        graph = trace_fn(module, inputs, leaf_modules=_leaf(leaf), model_name=spec.name)
        table = Table(title=f"{spec.name}: {len(graph.layers)} layers (hash {graph.model_hash})")
        for col in ("#", "layer", "op", "params", "act/sample", "out/sample", "cut after"):
            table.add_column(col, justify="right" if col not in ("layer", "op") else "left",
                             overflow="fold")
        for layer in graph.layers:
            cut = graph.cut_bytes[layer.index] if layer.index < len(graph.cut_bytes) else None
            table.add_row(str(layer.index), layer.name, layer.op, _fmt_bytes(layer.param_bytes),
                          _fmt_bytes(layer.activation_bytes), _fmt_bytes(layer.output_bytes),
                          "-" if cut is None else _fmt_bytes(cut))
        console.print(table)
        total = sum(layer.param_bytes for layer in graph.layers)
        console.print(f"parameters: {_fmt_bytes(total)}; input: "
                      f"{_fmt_bytes(graph.input_bytes)}/sample")
        if graph.eval_graph is not None:
            console.print(f"layers of the train mode; the eval mode runs other code "
                          f"({graph.eval_graph.num_layers} layers), which stages run in eval "
                          f"mode (docs/train-eval.md)")


@app.command()
def profile(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write costs.json")] = Path(
        "costs.json"),
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="comma-separated")] = "1,2,4,8",
    repeats: Annotated[int, typer.Option("--repeats", help="timed runs per layer and batch "
                                         "size (the median is kept)")] = 5,
    leaf: LeafOpt = None,
    device_type: Annotated[str, typer.Option(
        "--device-type", help="the device type this machine is (e.g. jetson-nano when run "
        "on a Nano); devices of that type then take these times as measured, and `costs "
        "merge` joins tables of several types")] = "local",
    runtime_overhead: Annotated[bool, typer.Option(
        "--runtime-overhead/--no-runtime-overhead",
        help="also record what the training runtime costs on this host per stage call, "
        "round and message (measured once per host in about 20 s, then cached)")] = True,
    device: Annotated[str, typer.Option(
        "--device", help="where the layers run: cpu (one core, the default), cuda, cuda:N, "
        "or auto (CUDA where available)")] = "cpu",
) -> None:
    """Measure forward/backward time per layer on this host at several batch sizes."""
    with _errors():
        from asteroid_fx.costs import profile as profile_fn
        from asteroid_fx.model_spec import load_model_spec
        from contracts.errors import CostModelError

        try:
            sizes = tuple(int(s) for s in batch_sizes.split(",") if s.strip())
        except ValueError:
            raise CostModelError(f"--batch-sizes must be comma-separated integers, got "
                                 f"{batch_sizes!r}") from None
        from cost_models.profile import profiling_device

        _writable(out, "--out", "costs.json")
        where = profiling_device(device)
        spec = load_model_spec(model)
        start = time.perf_counter()
        bar, update = _progress_callback("profiling")
        with bar:
            table = profile_fn(spec.build(), spec.sample_batch, batch_sizes=sizes,
                               leaf_modules=_leaf(leaf), repeats=repeats, progress=update,
                               optimizer=spec.build_optimizer, device_type=device_type,
                               device=where)
        table = _renamed(table, spec.name)
        if runtime_overhead and where.type != "cpu":
            err_console.print("the runtime-overhead probe trains on the CPU: not measured "
                              "for a GPU table (`calibrate` fits it from a run)")
        elif runtime_overhead:
            from asteroid_fx.cost_source import with_host_overhead

            bar, update = _progress_callback("measuring")
            with bar:
                table = with_host_overhead(table, update)
        table.save(out)
        console.print(f"profiled {table.num_layers} layers at batch sizes {list(sizes)} in "
                      f"{time.perf_counter() - start:.1f} s; {table.device_type} {table.host} "
                      f"({table.host_flops / 1e9:.1f} GFLOP/s per core, optimizer state "
                      f"{table.optimizer_state_factor:.2g}x weights) -> {out}")


def _renamed(table: Any, name: str) -> Any:
    from dataclasses import replace

    return table if table.model_name else replace(table, model_name=name)


@app.command()
def costs(
    files: Annotated[list[str], typer.Argument(
        help="costs.json to show, or `merge A.json B.json ...` to join tables of one model "
        "measured on different device types", metavar="COSTS.json | merge FILES...")],
    cluster: Annotated[Path | None, typer.Option(
        "--cluster", "-c", help="show one time column per device type of this cluster "
        "(measured, or scaled by speed)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b",
                                            help="batch size the times are shown at")] = 1,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="with merge: where to write the merged table")] = None,
) -> None:
    """Show a cost table (per-layer time per device type, memory, cuts), or merge tables."""
    with _errors():
        from contracts.errors import CostModelError
        from contracts.table import CostTable

        if files[0] == "merge":
            from cost_models.merge import merge_costs

            if len(files) < 2 or out is None:
                raise CostModelError("usage: asteroid-fx costs merge A.json B.json ... "
                                     "--out costs.json")
            _writable(out, "--out", "costs.json")
            merged = merge_costs([CostTable.load(f) for f in files[1:]], names=files[1:])
            merged.save(out)
            console.print(f"merged {len(files) - 1} tables of {merged.model_name}: "
                          f"{_measured_line(merged)} -> {out}")
            return
        if len(files) != 1:
            raise CostModelError(f"costs shows one table, got {len(files)} files; to join "
                                 f"tables use `asteroid-fx costs merge ... --out FILE`")
        if out is not None:
            raise CostModelError(f"--out {str(out)!r} applies to `costs merge` only (showing a "
                                 f"table writes nothing); drop it")
        if batch_size < 1:
            raise CostModelError(f"--batch-size must be >= 1, got {batch_size}")
        _show_costs(CostTable.load(files[0]), cluster, batch_size)


def _measured_line(table: Any) -> str:
    kinds = ", ".join(f"{t} ({table.timing_source(t)})" for t in table.measured_types)
    return f"base {table.device_type} ({table.source})" + (f"; columns {kinds}" if kinds else "")


def _show_costs(table: Any, cluster: Path | None, batch_size: int) -> None:
    """Print the table with one time column per device type (or per device speed), each
    taken from ``solver.timing`` as the planner takes it."""
    from rich.table import Table

    from contracts.cluster import Cluster, Device
    from solver.timing import Timing

    # column label -> the device whose times it shows
    labels: dict[str, str] = {}
    if cluster is not None:
        clus = Cluster.from_yaml(cluster)
        for device in clus.devices:
            label = device.type if (device.speed is None or table.column(device.type)) \
                else f"{device.name} ({device.type})"
            labels.setdefault(label, device.name)
    else:   # one stand-in device per type the table has times for
        types = list(dict.fromkeys([table.device_type, *table.measured_types]))
        clus = Cluster(devices=tuple(Device(t, t, 1, speed=1.0) for t in types),
                       bandwidth_mbps=1000.0)
        labels = {t: t for t in types}
    # per layer: the layers' own times (the runtime's per-call overhead is shown below)
    timing = Timing.of(table.without_runtime_overhead(), clus)
    sources = {}
    for label, name in labels.items():
        kind = clus.device(name).type
        scaled = "" if table.column(kind) is not None or cluster is None \
            else f", speed {timing.speeds[name]:.3g}"
        sources[label] = table.timing_source(kind) + scaled
    out = Table(title=f"{table.model_name} — fwd+bwd ms at batch {batch_size}")
    out.add_column("#", justify="right", overflow="fold")
    out.add_column("layer", overflow="fold")
    out.add_column("op", overflow="fold")
    for label in labels:
        out.add_column(label, justify="right", overflow="fold")
    out.add_column("params", justify="right", overflow="fold")
    out.add_column("cut after", justify="right", overflow="fold")
    totals = dict.fromkeys(labels, 0.0)
    for i, layer in enumerate(table.layers):
        cells = []
        for label, name in labels.items():
            t = (timing.fwd_time(name, i, i, batch_size)
                 + timing.bwd_time(name, i, i, batch_size))
            totals[label] += t
            cells.append(f"{1e3 * t:.3f}")
        cut = _fmt_bytes(table.cut_bytes[i]) if i < len(table.cut_bytes) else "-"
        out.add_row(str(i), layer.name, layer.op, *cells, _fmt_bytes(layer.param_bytes), cut)
    out.add_row("", "total", "", *(f"{1e3 * v:.3f}" for v in totals.values()),
                _fmt_bytes(table.total_param_bytes), "")
    console.print(out)
    for label, src in sources.items():
        console.print(f"{label}: {src}")
    console.print(f"optimizer state: {table.optimizer_state_factor:.3g}x the weights")
    for kind, over, message in [
            (table.device_type, table.runtime_overhead, table.message_overhead_s),
            *((c.device_type, c.runtime_overhead, c.message_overhead_s) for c in table.columns)]:
        if not over.is_zero:
            console.print(f"runtime overhead ({kind}): {over.describe()} "
                          f"(docs/latency-model.md)")
        if message > 0:
            console.print(f"runtime cost per message ({kind}): {message * 1e3:.3f} ms of one "
                          f"core, over a device's speed; a message pays its slower end's, on "
                          f"top of the link's latency (probed, or fitted by `calibrate`)")


def _costs_for(model: str, batch_size: int, costs: str | None, leaf: tuple[str, ...],
               clus: Any, planner: str = "asteroid") -> tuple[Any, Any, Any, Any, Any]:
    """The model spec, the model, its example inputs, the cost table ``--costs`` asks for
    and the model's trace it was made on or checked against (bad ``--planner`` /
    ``--batch-size`` are refused first: measuring takes a while)."""
    from asteroid_fx.cost_source import resolve_costs
    from contracts.errors import PlanError
    from solver.api import PLANNERS
    from solver.space import check_batch_size

    if planner not in PLANNERS:
        raise PlanError(f"unknown planner {planner!r}; choose one of "
                        f"{', '.join(sorted(PLANNERS))}")
    if batch_size < 1:
        raise PlanError(f"--batch-size must be >= 1, got {batch_size}")
    check_batch_size(batch_size, "--batch-size")

    spec, module, inputs = _load_model(model, 2)
    bar, update = _progress_callback("measuring the model on this host")
    with bar:
        choice = resolve_costs(spec, module, inputs, clus, costs, leaf_modules=leaf,
                               batch_size=batch_size, progress=update)
    console.print(f"costs: {choice.detail}", highlight=False)
    return spec, module, inputs, _renamed(choice.table, spec.name), choice.graph


CostsOpt = Annotated[
    str | None,
    typer.Option("--costs", help="costs.json (from `profile` or `costs merge`), `measure` "
                 "(this host, cached) or `analytic` (FLOP model); default: measure when the "
                 "cluster has a local device, else analytic"),
]


@app.command()
def plan(
    model: ModelArg,
    cluster: ClusterOpt,
    batch_size: BatchOpt,
    planner: PlannerOpt = "asteroid",
    check_ilp: Annotated[bool, typer.Option("--check-ilp", help="cross-check with the ILP")]
    = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write plan.json")] = None,
    costs_file: CostsOpt = None,
    leaf: LeafOpt = None,
    micro_batch: MicroOpt = None,
    time_limit: TimeLimitOpt = None,
    objective: ObjectiveOpt = "model",
) -> None:
    """Plan stages, device groups, shares and micro-batches; print the report."""
    with _errors():
        from contracts.cluster import Cluster
        from solver.alternatives import check_objective
        from solver.anytime import check_time_limit
        from solver.api import check_planner_limit

        check_time_limit(time_limit)
        check_objective(objective, planner)     # before any costs are measured
        check_planner_limit(planner, time_limit)
        _writable(out, "--out", "plan.json")
        clus = Cluster.from_yaml(cluster)
        table = _costs_for(model, batch_size, costs_file, _leaf(leaf), clus, planner)[3]
        result = _plan(table, clus, batch_size, planner, micro_batch, time_limit, check_ilp,
                       objective)
        _print_report(result, table, clus)
        if out is not None:
            result.save(out)
            console.print(f"wrote {out}")


LARGE_FLEET = 12
"""Above this many devices, ``plan``/``partition`` without ``--time-limit`` say that the
search may take minutes and what it proves (docs/planner.md, "Anytime planning")."""


def _plan(table: Any, clus: Any, batch_size: int, planner: str, micro_batch: int | None,
          time_limit: float | None, check_ilp: bool = False, objective: str = "model") -> Any:
    """``solver.api.plan`` with a progress bar, and a hint on large fleets."""
    from solver.api import plan as plan_fn

    if time_limit is None and planner == "asteroid" and len(clus.devices) > LARGE_FLEET:
        err_console.print(f"note: {len(clus.devices)} devices: the search may take minutes, "
                          f"tens of minutes on 64 boards "
                          f"(exact over the capability order; the report gives its proven "
                          f"gap over every order); --time-limit SECONDS returns the best "
                          f"plan found by then, with its proven gap", highlight=False)
    bar, update = _progress_callback("planning")
    with bar:
        return plan_fn(table, clus, batch_size, planner=planner, check_ilp=check_ilp,
                       optimizer_state_factor=table.optimizer_state_factor,
                       micro_batch_size=micro_batch, time_limit=time_limit,
                       objective=objective,
                       progress=lambda done, what: update(round(1000 * done), 1000, what))


def _print_report(plan_obj: Any, table: Any, clus: Any) -> None:
    from asteroid_fx.report import plan_report

    console.print(plan_report(plan_obj, table, clus))


@app.command()
def partition(
    model: ModelArg,
    cluster: ClusterOpt,
    batch_size: BatchOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")] = Path("out"),
    planner: PlannerOpt = "asteroid",
    no_onnx: Annotated[bool, typer.Option("--no-onnx", help="skip per-stage ONNX export")] = False,
    costs_file: CostsOpt = None,
    leaf: LeafOpt = None,
    micro_batch: MicroOpt = None,
    time_limit: TimeLimitOpt = None,
    objective: ObjectiveOpt = "model",
    token: Annotated[str | None, typer.Option(
        "--token", help="the shared secret devices prove to join a run of this package, "
        "written to DIR/token (mode 0600); default: $ASTEROID_TOKEN, else the directory's "
        "existing token, else a fresh random one")] = None,
) -> None:
    """Plan and split the model into runnable stages; write a stage package directory."""
    with _errors():
        from asteroid_fx.package import check_package_dir, save_partition
        from asteroid_fx.partition import partition as partition_fn
        from contracts.cluster import Cluster
        from runtime.trust import check_token
        from solver.alternatives import check_objective
        from solver.anytime import check_time_limit
        from solver.api import check_planner_limit

        check_time_limit(time_limit)
        check_objective(objective, planner)     # before any costs are measured
        check_planner_limit(planner, time_limit)
        _writable(out, "--out", directory=True)
        check_package_dir(out)
        if token is not None:
            check_token(token, "--token")
        start = time.perf_counter()
        clus = Cluster.from_yaml(cluster)
        spec, module, inputs, table, graph = _costs_for(model, batch_size, costs_file,
                                                        _leaf(leaf), clus, planner)
        result = _plan(table, clus, batch_size, planner, micro_batch, time_limit,
                       objective=objective)
        _print_report(result, table, clus)
        stages = partition_fn(module, inputs, result, graph=graph)  # (traced once)
        bar, update = _progress_callback("ONNX export and check")
        if no_onnx:
            bar.disable = True
        with bar:
            written = save_partition(out, result, stages, model_spec=spec, onnx=not no_onnx,
                                     example_inputs=inputs, costs=table, cluster=clus,
                                     progress=update, token=token)
        size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
        console.print(f"wrote {len(written)} files ({_fmt_bytes(size)}) to {out}/ in "
                      f"{time.perf_counter() - start:.1f} s: "
                      + ", ".join(sorted(str(Path(p).name) for p in written.values())))


@app.command()
def calibrate(
    directory: Annotated[Path, typer.Argument(help="the partition directory that ran")],
    metrics: Annotated[Path, typer.Argument(help="metrics.jsonl of `asteroid-fx run DIR "
                                            "--metrics`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the corrected "
                                      "cost table")] = Path("costs.json"),
) -> None:
    """Correct the partition's cost table by what a run of it measured (per device type and
    stage, plus a per-message overhead); plan with it via `--costs`."""
    with _errors():
        from asteroid_fx.calibration import calibrate as calibrate_fn

        _writable(out, "--out", "costs.json")
        table, correction = calibrate_fn(directory, metrics)
        table.save(out)
        for group, stages in sorted(correction.ratios.items()):
            cells = ", ".join(f"stage {s}: F x{f:.2f} B x{b:.2f}"
                              for s, (f, b) in sorted(stages.items()))
            console.print(f"{group}: {cells}")
        console.print(f"per-message overhead {correction.message_overhead_s * 1e3:.3f} ms; "
                      f"round {correction.predicted_round_s * 1e3:.2f} ms predicted, "
                      f"{correction.measured_round_s * 1e3:.2f} ms measured, "
                      f"{correction.calibrated_round_s * 1e3:.2f} ms calibrated -> {out}")


@app.command()
def plot(
    metrics: Annotated[Path, typer.Argument(help="metrics.jsonl of `asteroid-fx run DIR "
                                            "--metrics`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("run.png"),
) -> None:
    """Plot measured against predicted round time per step, recoveries marked."""
    with _errors():
        from asteroid_fx.run_plot import plot_metrics

        _writable(out, "--out", "run.png")
        _image(out, "--out")
        console.print(f"wrote {plot_metrics(metrics, out)}")


@app.command()
def simulate(
    plan_file: Annotated[Path, typer.Argument(
        help="plan.json, or a fine-tuning directory of `finetune --method pac` (or its "
        "pac_plan.json): both phases and the E-epoch total")],
    costs_file: Annotated[Path | None, typer.Option(
        "--costs", help="costs.json (default: costs.json beside plan.json)")] = None,
    cluster: Annotated[Path | None, typer.Option(
        "--cluster", "-c", help="cluster.yaml (default: cluster.yaml beside plan.json)")] = None,
    model: Annotated[str | None, typer.Option("--model", help="MODEL_SPEC for analytic costs")]
    = None,
    rounds: Annotated[int, typer.Option("--rounds", help="training rounds to simulate")] = 1,
    gantt: Annotated[Path | None, typer.Option("--gantt", help="write a Gantt chart PNG")] = None,
    micro_batch: Annotated[int | None, typer.Option(
        "--micro-batch", help="simulate the plan's stages and groups at this micro-batch size "
        "(a divisor of the batch; shares split again by speed and memory)")] = None,
) -> None:
    """Event-simulate rounds of a plan: time, bubbles, memory; optional Gantt PNG."""
    with _errors():
        from contracts.cluster import Cluster
        from contracts.errors import PlanError
        from contracts.plan import Plan
        from solver.simulate import simulate as simulate_fn

        _writable(gantt, "--gantt", "round.png")
        _image(gantt, "--gantt")
        pac_file = _pac_plan_file(plan_file)
        if pac_file is not None:
            given = [flag for flag, value in (("--gantt", gantt), ("--micro-batch", micro_batch),
                                               ("--model", model)) if value is not None]
            if rounds != 1:
                given.append("--rounds")
            if given:
                raise PlanError(f"{', '.join(given)} apply to a plan.json, not to a PAC plan "
                                f"(its two phases are simulated as planned); drop them")
            _simulate_finetune(pac_file, costs_file, cluster)
            return
        plan_obj = Plan.load(plan_file)
        plan_dir = Path(plan_file).parent
        cluster_path = cluster or (plan_dir / "cluster.yaml")
        costs_path = costs_file or (plan_dir / "costs.json")
        if not Path(cluster_path).is_file():
            raise PlanError(f"simulate needs the cluster: pass --cluster cluster.yaml "
                            f"(looked for {cluster_path})")
        clus = Cluster.from_yaml(cluster_path)
        if costs_file is not None and model is not None:
            raise PlanError("--costs and --model both give the cost table; pass one")
        if model is not None:       # (asked for: it beats the costs.json beside the plan)
            table = _costs_for(model, plan_obj.batch_size, None, (), clus)[3]
        elif Path(costs_path).is_file():
            from contracts.table import CostTable

            table = CostTable.load(costs_path)
        else:
            raise PlanError(f"simulate needs the cost table: pass --costs costs.json or "
                            f"--model MODEL_SPEC (looked for {costs_path})")
        _check_plan_costs(plan_obj, table)
        if micro_batch is not None:
            from solver.split import resplit

            plan_obj = resplit(plan_obj, table, clus, micro_batch)
            console.print(f"micro-batch {micro_batch}: shares "
                          + " | ".join("/".join(map(str, st.shares)) for st in plan_obj.stages))
        result = simulate_fn(plan_obj, table, clus, rounds=rounds)
        console.print(f"simulated {rounds} round(s): round time {result.round_time_s:.4f} s, "
                      f"bubble fraction {result.bubble_fraction:.1%}"
                      + ("" if plan_obj.predicted is None else
                         f" (model predicts {plan_obj.predicted.round_time_s:.4f} s)"))
        for device, peak in sorted(result.peak_memory_bytes.items()):
            console.print(f"  {device}: peak memory {_fmt_bytes(peak)}")
        if gantt is not None:
            from asteroid_fx.gantt import gantt_png

            gantt_png(result, gantt)
            console.print(f"wrote {gantt}")


def _check_plan_costs(plan_obj: Any, table: Any) -> None:
    """``PlanError`` where the plan's layers are not the table's (another model,
    ``solver.evaluate.check_covers``: before a re-split, which would fail on them less
    clearly); a warning where only the model hashes differ (a board's table of the same
    layers)."""
    from solver.evaluate import check_covers

    check_covers(plan_obj, table)
    if plan_obj.model_hash and table.model_hash and plan_obj.model_hash != table.model_hash:
        log.warning("the plan's model hash %s differs from the cost table's %s (the layer "
                    "counts agree); check that they are of one model", plan_obj.model_hash,
                    table.model_hash)


def _pac_plan_file(path: Path) -> Path | None:
    """``pac_plan.json`` when ``path`` is it or a fine-tuning directory holding it."""
    from runtime.pac_train import PAC_PLAN_FILE

    if path.is_dir() and (path / PAC_PLAN_FILE).is_file():
        return path / PAC_PLAN_FILE
    if path.name == PAC_PLAN_FILE and path.is_file():
        return path
    return None


def _simulate_finetune(pac_file: Path, costs_file: Path | None, cluster: Path | None) -> None:
    """``simulate`` of a PAC plan: both phases, each epoch and the total (see
    [Note: PAC simulation] in solver.pac_simulate)."""
    from contracts.cluster import Cluster
    from contracts.errors import PlanError
    from contracts.pac_plan import PacPlan
    from contracts.table import CostTable
    from solver.pac import predict_finetune
    from solver.pac_simulate import simulate_finetune

    plan_obj = PacPlan.load(pac_file)
    here = pac_file.parent
    costs_path = costs_file or (here / "costs.json")
    if not Path(costs_path).is_file():
        raise PlanError(f"simulate needs the cost table: pass --costs costs.json (looked for "
                        f"{costs_path})")
    if cluster is not None:
        clus = Cluster.from_yaml(cluster)
    elif (here / "cluster.json").is_file():
        clus = Cluster.from_json((here / "cluster.json").read_text())
    else:
        raise PlanError(f"simulate needs the cluster: pass --cluster cluster.yaml (looked for "
                        f"{here / 'cluster.json'})")
    table = CostTable.load(costs_path)
    result = simulate_finetune(plan_obj, table, clus)
    pred = predict_finetune(plan_obj, table, clus)
    e = plan_obj.epochs
    console.print(
        f"simulated PAC: phase-1 step {result.phase1_step_s * 1e3:.2f} ms (model "
        f"{pred.phase1_step_s * 1e3:.2f} ms, bubbles {result.phase1_bubble_fraction:.0%}), "
        f"phase-2 step {result.phase2_step_s * 1e3:.2f} ms; epoch 1 {result.epoch1_s:.3f} s, "
        f"later epochs {result.epoch_s:.3f} s, {e} epochs {result.total_s:.3f} s (model "
        f"{pred.total_s:.3f} s)", markup=False, highlight=False)
    for device, peak in sorted(result.peak_memory_bytes.items()):
        console.print(f"  {device}: peak memory {_fmt_bytes(peak)}")


@app.command()
def run(
    directory: Annotated[Path, typer.Argument(help="partition directory from `partition`")],
    emulate: Annotated[Path | None, typer.Option("--emulate", help="cluster.yaml to emulate on "
                                                 "this host")] = None,
    steps: Annotated[int, typer.Option("--steps", help="training rounds (mini-batches)")] = 10,
    seed: Annotated[int, typer.Option(
        "--seed", help="seed of the weights, data and dropout (same seed, same losses)")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="learning rate (when the model file "
                                                 "has no build_optimizer)")] = 0.01,
    metrics: Annotated[Path | None, typer.Option("--metrics", help="metrics.jsonl")] = None,
    fail: Annotated[str | None, typer.Option("--fail", help="DEVICE@STEP: SIGKILL a device")]
    = None,
    leave: Annotated[str | None, typer.Option(
        "--leave", help="DEVICE@STEP: SIGTERM a device: it finishes the step, hands its "
        "state over and leaves (graceful, nothing replayed)")] = None,
    recovery: Annotated[str, typer.Option("--recovery", help="replay | restart")] = "replay",
    replicate_every: Annotated[str | None, typer.Option(
        "--replicate-every", help="with --fail: copy each stage's state to its replica "
        "holder every K steps, or 'auto': the smallest K whose traffic fits in half of "
        "the devices' predicted idle time (default 1)")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        "--checkpoint-every", help="with --fail: disk checkpoint every N steps (default: 1 "
        "for restart, 10 for replay)")] = None,
    replan_tolerance: Annotated[float | None, typer.Option(
        "--replan-tolerance", help="with --fail/--leave, replay: keep the layer-wise repair "
        "when its predicted round is at most this fraction slower than a full re-plan "
        "(default 0.1; 0: always the faster plan)")] = None,
    replan_time_limit: Annotated[float | None, typer.Option(
        "--replan-time-limit", help="with --fail/--leave: seconds the full re-plan may search "
        "while the survivors wait (default 10; the best plan found by then, with its proven "
        "gap; small clusters are planned exactly well within it)")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate", help="with --fail/--leave, replay: predict the re-plan "
        "on the cost table as the run measured it (forward/backward per device type and "
        "stage, per-message overhead)")] = True,
    token: Annotated[str | None, typer.Option(
        "--token", help="the job's shared secret (default: $ASTEROID_TOKEN, else DIR/token); "
        "a device process without it is refused")] = None,
) -> None:
    """Train from a partition directory: on an emulated cluster on this host (--emulate), or
    on real devices, one process per device, rank i = device i of plan.json:

    \b
      torchrun --nnodes N --node-rank I --nproc-per-node 1 \\
          --master-addr HOST --master-port 29500 -m asteroid_fx.cli run DIR
    """
    with _errors():
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from asteroid_fx.training import run as run_fn
        from runtime.stage_io import load_plan
        from solver.anytime import check_time_limit
        from solver.replan import REPLAN_TIME_LIMIT_S

        check_time_limit(replan_time_limit, "--replan-time-limit",
                         f"leave it out for the default of {REPLAN_TIME_LIMIT_S:g} s, or give "
                         f"inf for an exact re-plan")
        if recovery != "replay" and fail is None and leave is None:
            from contracts.errors import RuntimeFailure

            raise RuntimeFailure(f"--recovery {recovery} applies to a run with --fail (or "
                                 f"--leave); add one, or drop --recovery")
        _writable(metrics, "--metrics", "metrics.jsonl")
        batch = load_plan(directory).batch_size
        progress = Progress(
            TextColumn("[bold]training"), BarColumn(), TextColumn("step {task.completed}/"
            "{task.total}"), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=err_console, disable=not err_console.is_terminal,
        )
        task = progress.add_task("train", total=steps, info="")

        def on_step(record: Any) -> None:
            if "step" not in record:
                return
            round_time = float(record.get("round_time_s", 0.0))
            rate = batch / round_time if round_time > 0 else 0.0
            progress.update(task, completed=int(record["step"]) + 1,
                            info=f"loss {float(record['loss']):.4f}  round {round_time:.3f} s  "
                                 f"{rate:.1f} samples/s  plan v{record.get('plan_version', 0)}")

        kwargs: dict[str, Any] = {"emulate": emulate, "steps": steps, "seed": seed, "lr": lr,
                                  "metrics": metrics, "progress": on_step, "token": token}
        if fail is not None:
            kwargs["fail"] = fail
        if leave is not None:
            kwargs["leave"] = leave
        if fail is not None or leave is not None:
            kwargs["recovery"] = recovery
        if replicate_every is not None:
            kwargs["replicate_every"] = replicate_every
        if checkpoint_every is not None:
            kwargs["checkpoint_every"] = checkpoint_every
        if replan_tolerance is not None:
            kwargs["replan_tolerance"] = replan_tolerance
        if replan_time_limit is not None:
            from asteroid_fx.replanning import Replanner

            kwargs["replanner"] = Replanner(full_time_limit=replan_time_limit)
        if not calibrate:
            kwargs["calibrate"] = False
        with progress:
            result = run_fn(directory, **kwargs)
        summary = getattr(result, "summary", None)
        if callable(summary) and os.environ.get("RANK", "0") == "0":
            console.print(summary(), markup=False)


@app.command()
def finetune(
    model: ModelArg,
    cluster: ClusterOpt,
    batch_size: BatchOpt,
    method: Annotated[str, typer.Option(
        "--method", help="pac: parallel adapters on the frozen model, backbone forward once "
        "(phase 1, pipelined) then adapters from the activation cache (phase 2, data "
        "parallel); full: today's hybrid-pipeline training of the whole model")] = "pac",
    epochs: Annotated[int, typer.Option("--epochs", help="passes over the samples")] = 3,
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")] = Path("out"),
    emulate: Annotated[Path | None, typer.Option(
        "--emulate", help="cluster.yaml to run on, emulated on this host")] = None,
    metrics: Annotated[Path | None, typer.Option("--metrics", help="metrics.jsonl")] = None,
    samples: Annotated[int | None, typer.Option(
        "--samples", help="samples per epoch (default: len(dataset()) when the model file "
        "defines dataset(), else 8 batches of sample_batch with per-index seeds)")] = None,
    rank: Annotated[int | None, typer.Option(
        "--rank", help="adapter bottleneck width (--method pac; default 8)")] = None,
    tap: Annotated[list[str] | None, typer.Option(
        "--tap", help="layer index, layer name or module to tap (repeatable; default: "
        "every transformer block's output)")] = None,
    train_head: Annotated[bool, typer.Option(
        "--train-head", help="also train a copy of the model's head")] = False,
    seed: Annotated[int, typer.Option("--seed", help="seed of weights, adapters and data")]
    = 0,
    lr: Annotated[float, typer.Option("--lr", help="learning rate (plain SGD unless the "
                                                 "model file has build_optimizer)")] = 0.01,
    costs_file: CostsOpt = None,
    micro_batch: MicroOpt = None,
    phase1_planner: Annotated[str, typer.Option(
        "--phase1-planner", help="planner of the forward-only phase 1 (asteroid: fastest; "
        "pp-equal: one device per stage, spreading the frozen weights)")] = "asteroid",
    phase1_objective: Annotated[str, typer.Option(
        "--phase1-objective", help="memory: the phase-1 plan of lowest peak memory pressure "
        "(peak / device memory) among those at most 1 + --phase1-slack times slower than the "
        "fastest; time: the fastest phase 1")] = "memory",
    phase1_slack: Annotated[float, typer.Option(
        "--phase1-slack", help="with --phase1-objective memory: how much slower than the "
        "fastest phase 1 (a fraction of its step time) a plan may be for less memory")]
    = 2.0,
    cache: Annotated[str, typer.Option(
        "--cache", help="where the activation cache lives: auto (planned by memory and link "
        "bandwidth: rows parked on other devices during phase 1 or streamed to their trainer "
        "every step) or local (every device caches the rows it trains on)")] = "auto",
    cache_slack: Annotated[float, typer.Option(
        "--cache-slack", help="with --cache auto: how much longer the phase-2 step may get "
        "for streaming rows cached on other devices (a fraction of it; 0: only fetches the "
        "step hides)")] = 0.0,
    cache_dtype: Annotated[str | None, typer.Option(
        "--cache-dtype", help="keep the activation cache in this dtype: bfloat16 or float16 "
        "halve the cache, its hand-offs and fetches (entries rounded once; the adapters "
        "still train in the model's dtype); default: as the backbone computes them")] = None,
    cache_store: Annotated[str, typer.Option(
        "--cache-store", help="where each device keeps its cache rows: memory, disk (a file "
        "in $ASTEROID_CACHE_DIR or the temporary directory, read back every phase-2 step: "
        "the cache costs storage reads instead of memory) or auto (with --phase1-objective "
        "memory: the store of lowest peak memory pressure whose predicted total is at most "
        "1 + --store-slack times the fastest's; with time: the fastest)")] = "auto",
    store_slack: Annotated[float, typer.Option(
        "--store-slack", help="with --cache-store auto: how much longer (a fraction of the "
        "predicted total) a cache on disk may make the run for its lower peak memory")]
    = 0.05,
    fail: Annotated[str | None, typer.Option(
        "--fail", help="DEVICE@STEP: with --emulate, kill that device at the start of step "
        "STEP (in epoch 1: during phase-1 mini-batch STEP, and phase 1 is re-planned on the "
        "survivors; later: a phase-2 step); the others take over its samples")] = None,
) -> None:
    """Fine-tune with parallel adapters and an activation cache (PAC), or fully for comparison."""
    with _errors():
        from asteroid_fx.errors import PlanError
        from contracts.cluster import Cluster
        from runtime.train import check_lr

        if method not in ("pac", "full"):
            raise PlanError(f"--method must be pac or full, got {method!r}")
        if method == "full" and (rank is not None or tap or train_head):
            raise PlanError("--rank, --tap and --train-head shape the adapters of --method pac; "
                            "full fine-tuning trains the whole model: drop them")
        if method == "full" and cache_dtype is not None:
            raise PlanError(f"--cache-dtype {cache_dtype} applies to --method pac only (full "
                            f"fine-tuning keeps no activation cache); drop it")
        if method == "full" and (cache_store != "auto" or store_slack != 0.05):
            raise PlanError("--cache-store and --store-slack apply to --method pac only (full "
                            "fine-tuning keeps no activation cache); drop them")
        if epochs < 1:
            raise PlanError(f"--epochs must be >= 1, got {epochs}")
        if emulate is None and (fail is not None or metrics is not None):
            raise PlanError("--fail and --metrics apply to a run: add --emulate CLUSTER, or "
                            "drop them")
        check_lr(lr)        # before anything is written
        _writable(out, "--out", directory=True)
        _writable(metrics, "--metrics", "metrics.jsonl")
        if method == "pac":
            from asteroid_fx.package import check_package_dir
            from runtime.pac_train import PAC_PLAN_FILE

            check_package_dir(out, PAC_PLAN_FILE, "fine-tuning")
        clus = Cluster.from_yaml(cluster)
        if fail is not None:    # (the plan's own devices and steps are checked later)
            from runtime.pac_recovery import fail_specs

            fail_specs(fail, clus.names, "the cluster")
        spec, module, inputs, table, graph = _costs_for(model, batch_size, costs_file, (),
                                                        clus)
        if method == "full":
            _finetune_full(spec, module, inputs, table, graph, clus, batch_size, epochs,
                           samples, out, emulate, metrics, seed, lr, micro_batch)
            return
        from asteroid_fx.finetune import prepare_finetune, run_finetune

        layers = None if not tap else [int(t) if t.isdigit() else t for t in tap]
        plan_obj = prepare_finetune(spec, clus, table, out, batch_size=batch_size,
                                    epochs=epochs, num_samples=samples,
                                    rank=8 if rank is None else rank, seed=seed,
                                    layers=layers, train_head=train_head,
                                    micro_batch_size=micro_batch,
                                    phase1_planner=phase1_planner,
                                    phase1_objective=phase1_objective,
                                    phase1_slack=phase1_slack, cache=cache,
                                    cache_slack=cache_slack, cache_dtype=cache_dtype,
                                    cache_store=cache_store, store_slack=store_slack,
                                    fail=fail)
        console.print(_pac_report(plan_obj), markup=False, highlight=False)
        console.print(f"wrote {out}/")
        if emulate is not None:
            result = run_finetune(out, emulate, seed=seed, lr=lr, metrics=metrics, fail=fail)
            console.print(result.summary(plan_obj.steps_per_epoch), markup=False,
                          highlight=False)


def _pac_report(plan_obj: Any) -> str:
    p1 = plan_obj.phase1
    stages = "; ".join(f"segments {s.first}-{s.last} on {list(s.devices)} shares "
                       f"{list(s.shares)}" for s in p1.stages)
    rounded = plan_obj.model.made_bytes != plan_obj.model.entry_bytes
    lines = [f"PAC: taps at layers {list(plan_obj.model.taps)}, cache entry "
             f"{_fmt_bytes(plan_obj.model.entry_bytes)}/sample"
             + (f" (rounded from {_fmt_bytes(plan_obj.model.made_bytes)})" if rounded else "")
             + ", adapters "
             f"{_fmt_bytes(plan_obj.model.trainable_bytes)}",
             f"phase 1 (epoch 1, forward only): {stages}; micro-batch "
             f"{p1.micro_batch_size} x {p1.num_micro_batches}",
             "phase 2 (data parallel from the cache): " + ", ".join(
                 f"{d} {n}" for d, n in zip(plan_obj.devices, plan_obj.shares, strict=True))
             + f" of {plan_obj.batch_size}; {plan_obj.steps_per_epoch} steps/epoch, "
             f"{plan_obj.epochs} epochs"]
    choice = plan_obj.meta.get("phase1_choice")
    if choice:
        lines.append(f"phase-1 choice ({choice['objective']} objective): {choice['reason']}")
        for i, c in enumerate(choice["candidates"]):
            mark = "*" if i == choice["chosen"] else " "
            peaks = ", ".join(f"{d} {_fmt_bytes(b)}"
                              for d, b in c["peak_memory_bytes"].items())
            lines.append(f"  {mark} {c['phase1']}: phase-1 step "
                         f"{c['phase1_step_s'] * 1e3:.2f} ms, pressure {c['pressure']:.3%}, "
                         f"peaks {peaks}")
    cache_choice = plan_obj.meta.get("cache_choice")
    lines.append(f"cache: {cache_choice['reason'] if cache_choice else plan_obj.cache}")
    if cache_choice and cache_choice.get("store_reason"):
        lines.append(f"cache store: {cache_choice['store_reason']}")
    pred = plan_obj.predicted
    if pred is not None:
        lines.append(f"predicted: phase-1 step {pred.phase1_step_s * 1e3:.2f} ms, phase-2 step "
                     f"{pred.phase2_step_s * 1e3:.2f} ms (all-reduce "
                     f"{pred.allreduce_s * 1e3:.2f} ms); epoch 1 {pred.epoch1_s:.3f} s, later "
                     f"epochs {pred.epoch_s:.3f} s, total {pred.total_s:.3f} s")
        lines += [f"  {d}: peak {_fmt_bytes(pred.peak_memory_bytes[d])}, cache "
                  f"{_fmt_bytes(pred.cache_bytes[d])}"
                  + (" on disk" if plan_obj.on_disk(d) else "") for d in plan_obj.devices]
    return "\n".join(lines)


def _finetune_full(spec: Any, module: Any, inputs: Any, table: Any, graph: Any, clus: Any,
                   batch_size: int, epochs: int, samples: int | None, out: Path,
                   emulate: Path | None,
                   metrics: Path | None, seed: int, lr: float, micro_batch: int | None) -> None:
    """``--method full``: plan, partition and (with --emulate) run the whole model for the
    same number of steps as PAC would take."""
    import json

    from asteroid_fx.finetune import DEFAULT_SAMPLES_BATCHES
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition as partition_fn
    from contracts.files import write_text
    from runtime.launch import run as run_fn
    from runtime.samples import SampleSource
    from solver.api import plan as plan_fn

    count = samples if samples is not None or spec.dataset is not None else \
        DEFAULT_SAMPLES_BATCHES * batch_size
    source = SampleSource(spec, seed, count)
    steps = epochs * source.steps_per_epoch(batch_size)
    result = plan_fn(table, clus, batch_size, optimizer_state_factor=table.optimizer_state_factor,
                     micro_batch_size=micro_batch)
    _print_report(result, table, clus)
    stages = partition_fn(module, inputs, result, graph=graph)
    save_partition(out, result, stages, model_spec=spec, onnx=False, example_inputs=inputs,
                   costs=table, cluster=clus)
    console.print(f"wrote {out}/ ({steps} steps)")
    if emulate is None:
        return
    run = run_fn(out, emulate=emulate, steps=steps, seed=seed, lr=lr, metrics=metrics,
                 num_samples=source.num_samples)
    if metrics is not None:      # every step row carries its phase, as PAC's do
        rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line]
        write_text(metrics, "".join(json.dumps({**r, "phase": "full"} if "step" in r else r)
                                    + "\n" for r in rows), "metrics")
    console.print(run.summary(), markup=False)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (usage errors exit 2)."""
    try:
        app(args=argv)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    return 0


_STOPPED: list[int] = []
"""The signal that stopped this command (``_stop``), if one did."""


def _stop(signum: int, _frame: Any) -> None:
    """SIGTERM / SIGHUP: stop as Ctrl-C does (``KeyboardInterrupt``), so that the running
    command's ``finally`` blocks run: the device processes of a run are ended and its
    metrics moved into place ([Note: orphaned workers] in runtime.worker)."""
    _STOPPED.append(signum)
    raise KeyboardInterrupt


def entry() -> None:
    """The ``asteroid-fx`` console script: :func:`main`'s exit code. A process that torchrun
    started ends without the interpreter's teardown (runtime/launch.py [Note: ending a
    torchrun worker]). Elsewhere SIGTERM and SIGHUP stop a command as Ctrl-C does, with one
    line and the exit code ``128 + signal`` (a launcher killed by them left its device
    processes training and its metrics in a hidden ``.NAME.partial`` file)."""
    torchrun = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
    if not torchrun:
        import signal

        for sig in (getattr(signal, name, None) for name in ("SIGTERM", "SIGHUP")):
            if sig is not None:
                signal.signal(sig, _stop)
    code = main()
    if torchrun:
        from runtime.launch import end_process

        end_process(code)
    if _STOPPED:
        import signal

        name = signal.Signals(_STOPPED[0]).name
        err_console.print(f"stopped by {name}", highlight=False)
        code = 128 + _STOPPED[0]
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
