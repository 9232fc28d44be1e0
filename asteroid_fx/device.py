"""Device-side entry points ``-m asteroid_fx.device run DIR | profile MODEL`` (torch/numpy/pyyaml).

Example (on each of N boards, ``i`` = the board's index in ``plan.json``'s devices)::

    torchrun --nnodes N --nproc-per-node 1 --node-rank i --master-addr HOST \\
        --master-port 29500 -m asteroid_fx.device run out/ --steps 100 --metrics m.jsonl

It does what ``asteroid-fx run DIR`` does under torchrun (rank ``i`` trains device ``i`` of
the plan, seeded weights and batches, ``metrics.jsonl`` written by rank 0), without the
workstation's dependencies (typer, rich, pulp, ONNX, matplotlib), on Python >= 3.8 and
torch >= 2.0. Bad input exits non-zero with one line on stderr (``--debug``: traceback).

``python -m asteroid_fx.device profile model.py --device-type jetson-nano --out nano.json``
measures the model on the board itself (``asteroid-fx costs merge`` then joins the tables of
every type on the workstation).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from contracts.errors import AsteroidError, RuntimeFailure

__all__ = ["main", "run_device", "profile_device"]

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LAUNCH_HINT = ("torchrun --nnodes N --nproc-per-node 1 --node-rank i --master-addr HOST "
                "-m asteroid_fx.device run DIR")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m asteroid_fx.device",
        description="asteroid-fx on a device: train this device's stage of a partition "
                    "directory, one process per device under torchrun.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    run = commands.add_parser(
        "run", help="train the partition in DIR (rank i = device i of DIR/plan.json)",
        description=f"Train the partition in DIR; launch with: {_LAUNCH_HINT}")
    run.add_argument("directory", metavar="DIR", type=Path,
                     help="partition directory written by `asteroid-fx partition`")
    run.add_argument("--steps", type=int, default=10, help="mini-batches to train (10)")
    run.add_argument("--seed", type=int, default=0, help="seed of weights and batches (0)")
    run.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (0.01)")
    run.add_argument("--metrics", type=Path, default=None,
                     help="metrics.jsonl written by rank 0 (one JSON object per step)")
    run.add_argument("--timeout", type=float, default=120.0,
                     help="seconds a collective may wait for a peer (120)")
    run.add_argument("--token", default=None,
                     help="the job's shared secret (default: $ASTEROID_TOKEN, else DIR/token); "
                          "a process without the job's token is refused")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help=argparse.SUPPRESS)   # also accepted after `run`
    prof = commands.add_parser(
        "profile", help="measure the model's layers on this device, labelled with its type",
        description="Measure forward/backward time per layer on this device at several batch "
                    "sizes and write a cost table labelled with --device-type; join the "
                    "tables of all types on the workstation with `asteroid-fx costs merge`.")
    prof.add_argument("model", metavar="MODEL_SPEC",
                      help="path/to/model.py (or path/to/model.py:prefix)")
    prof.add_argument("--device-type", required=True,
                      help="the type of this device as in cluster.yaml, e.g. jetson-nano")
    prof.add_argument("--out", type=Path, required=True, help="where to write the table")
    prof.add_argument("--batch-sizes", default="1,2,4,8",
                      help="comma-separated batch sizes to measure at (1,2,4,8)")
    prof.add_argument("--repeats", type=int, default=5,
                      help="timed runs per layer and batch size; the median is kept (5)")
    prof.add_argument("--leaf", action="append", default=None,
                      help="qualified name or class name of a module to keep whole")
    prof.add_argument("--device", default="auto",
                      help="where to run the layers: auto (CUDA where available, as `run` "
                           "trains there; default), cpu, cuda or cuda:N")
    prof.add_argument("--no-runtime-overhead", dest="runtime_overhead", action="store_false",
                      help="skip measuring the runtime's own cost per stage call, round and "
                           "message on this device (about 20 s; `calibrate` then fits it "
                           "from a run)")
    prof.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS)
    return parser


def profile_device(model: str, device_type: str, out: Path, *, batch_sizes: str = "1,2,4,8",
                   repeats: int = 5, leaf: Sequence[str] = (), runtime_overhead: bool = True,
                   progress: Callable[[int, int, str], None] | None = None,
                   device: str = "auto") -> Any:
    """Profile ``model`` on this device and write a table labelled ``device_type``
    (``asteroid-fx profile --device-type`` without the workstation's dependencies); with
    ``runtime_overhead``, also the runtime's own cost per stage call, round and message on
    this device (``asteroid_fx.runtime_overhead.measure_here``), which the column of this
    type then carries after ``asteroid-fx costs merge``. ``device`` is where the layers run
    (``cost_models.profile.profiling_device``: by default CUDA where available, where
    ``run`` trains); the runtime-overhead probe trains on the CPU, so on CUDA it is left
    out and ``calibrate`` fits that overhead from a run.

    Returns:
        The ``CostTable`` written to ``out``.

    Raises:
        CostModelError: bad batch sizes, device type or output directory.
        ModelSpecError / TraceError: the model cannot be loaded or traced.
    """
    from asteroid_fx.costs import profile
    from asteroid_fx.model_spec import load_model_spec
    from contracts.errors import CostModelError

    try:
        sizes = tuple(int(s) for s in batch_sizes.split(",") if s.strip())
    except ValueError:
        raise CostModelError(f"--batch-sizes must be comma-separated integers, got "
                             f"{batch_sizes!r}") from None
    if not out.parent.is_dir():
        raise CostModelError(f"--out {str(out)!r}: directory {str(out.parent)!r} does not "
                             f"exist")
    from cost_models.profile import profiling_device

    where = profiling_device(device)
    spec = load_model_spec(model)
    table = profile(spec.build(), spec.sample_batch, sizes, leaf_modules=tuple(leaf),
                    repeats=repeats, progress=progress, optimizer=spec.build_optimizer,
                    device_type=device_type, device=where)
    if runtime_overhead and where.type != "cpu":
        log.warning("the runtime-overhead probe trains on the CPU: not measured for %s "
                    "(`calibrate` fits it from a run)", where)
    elif runtime_overhead:
        from dataclasses import replace

        from asteroid_fx.runtime_overhead import measure_here
        from contracts.table import RuntimeOverhead

        what = "the runtime's own overhead on this device"
        if progress is not None:
            progress(0, 1, what)
        found = measure_here()
        if progress is not None:
            progress(1, 1, what)
        table = replace(table,
                        runtime_overhead=RuntimeOverhead.from_dict(found["runtime_overhead"]),
                        message_overhead_s=float(found["message_overhead_s"]),
                        meta={**table.meta, "runtime_overhead_probe": found["probe"]})
    table.save(out)
    return table


def _profile_command(args: argparse.Namespace) -> None:
    """``profile``: progress on a terminal, one line when done."""
    tty = sys.stderr.isatty()

    def progress(done: int, total: int, what: str) -> None:
        if tty:
            print(f"\r\033[Kprofiling {done}/{total} {what}", end="", file=sys.stderr,
                  flush=True)

    table = profile_device(args.model, args.device_type, args.out,
                           batch_sizes=args.batch_sizes, repeats=args.repeats,
                           leaf=args.leaf or (), runtime_overhead=args.runtime_overhead,
                           progress=progress, device=args.device)
    if tty:
        print(file=sys.stderr)
    print(f"profiled {table.num_layers} layers of {table.model_name} at batch sizes "
          f"{list(table.batch_sizes)} on this {args.device_type} ({table.host}, "
          f"{table.meta.get('device', 'cpu')}) -> {args.out}",
          flush=True)


def run_device(directory: Path, *, steps: int = 10, seed: int = 0, lr: float = 0.01,
               metrics: Path | None = None, timeout_s: float = 120.0,
               token: str | None = None) -> Any:
    """Train this process's device of the partition in ``directory`` (under torchrun).

    The package is checked first (plan, stage files and model agree), and the process
    proves the job's token (``token``, else ``$ASTEROID_TOKEN``, else ``DIR/token``) before
    it joins the process group.

    Raises:
        RuntimeFailure: not started by torchrun, bad options, or training failed.
        PartitionError: the directory is missing, incomplete, of another format, or its
            files do not match its plan.
        AuthenticationError: no token, or not the job's (this process, or another one, was
            refused).
    """
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise RuntimeFailure(f"{', '.join(missing)} not set: start one process per device with "
                             f"`{_LAUNCH_HINT}`")
    if steps < 1:
        raise RuntimeFailure(f"--steps must be >= 1, got {steps}")
    if timeout_s <= 0:
        raise RuntimeFailure(f"--timeout must be > 0 seconds, got {timeout_s}")
    if not (directory / "plan.json").is_file():
        raise RuntimeFailure(f"{str(directory)!r} is not a partition directory (no plan.json); "
                             f"copy the directory written by `asteroid-fx partition` to this "
                             f"device")
    if metrics is not None and not metrics.parent.is_dir():
        raise RuntimeFailure(f"--metrics {str(metrics)!r}: directory {str(metrics.parent)!r} "
                             f"does not exist")
    from runtime.launch import run_source
    from runtime.package_check import check_package
    from runtime.train import DirectorySource
    from runtime.trust import resolve_token

    check_package(directory)   # format and files, before any process group is made
    token = resolve_token(token, directory)
    rank = int(os.environ["RANK"])

    def progress(record: Mapping[str, Any]) -> None:
        if rank == 0 and "step" in record:
            print(f"step {record['step']}: loss {float(record['loss']):.6f}, round "
                  f"{float(record['round_time_s']):.3f} s", flush=True)

    return run_source(DirectorySource(str(directory)), steps=steps, seed=seed, lr=lr,
                      metrics=metrics, progress=progress, timeout_s=timeout_s, token=token)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 usage)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "profile":
            _profile_command(args)
            return 0
        result = run_device(args.directory, steps=args.steps, seed=args.seed, lr=args.lr,
                            metrics=args.metrics, timeout_s=args.timeout, token=args.token)
    except AsteroidError as exc:
        if args.debug:
            raise
        print(f"asteroid-fx device: error: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("asteroid-fx device: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line per rank, not a page of C++ frames
        if args.debug:
            raise
        # (a rank whose peer stopped the job, e.g. refused its token, saw only the closed
        # connection: 55 lines of traceback ending in "Failed to recv, got 0 bytes")
        text = " ".join(str(exc).split())[:300]
        print(f"asteroid-fx device: error: {type(exc).__name__}: {text} (if another rank "
              f"stopped the job, its message says why; --debug for the traceback)",
              file=sys.stderr)
        return 1
    summary = getattr(result, "summary", None)
    if callable(summary) and os.environ.get("RANK", "0") == "0":
        print(summary(), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in tests
    from runtime.launch import end_process

    end_process(main())   # [Note: ending a torchrun worker]
