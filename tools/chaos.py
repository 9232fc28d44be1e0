"""Chaos trials: seeded random faults at named moments on emulated 3-5 device clusters."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.faults import ENV, FAULTS, LOG_ENV, MOMENTS, Fault  # noqa: E402

# [Note: chaos trials]
# Trial i of ``--seed S`` draws (from random.Random(f"{S}/{i}")) a layout of examples/mlp.py
# (3-5 emulated devices at half a core each, 2-3 stages, at least one data-parallel group),
# a device, a step, a moment (runtime.faults.MOMENTS) and a fault (runtime.faults.FAULTS).
# The moment constrains the device: ``allreduce`` a member of a multi-device stage,
# ``replica-push`` the first device of a stage (the one that sends its replicas),
# ``recovery`` any device but a second one that ``--fail`` kills at the same step (so a
# recovery is under way when the fault fires: a double failure). Each trial runs in a child
# process (``runtime.recovery.run_with_recovery``, replay mode, replicas every step,
# checkpoints every CHECKPOINT_EVERY steps) in a session of its own, bounded by
# ``--deadline``; the fault reaches the workers through ASTEROID_FX_FAULT (see
# [Note: fault injection]). Checked per trial:
# * outcome: finished, or stopped with a one-line reason (an AsteroidError), else crashed
#   (any other exception) or hang (the deadline passed: the session is killed);
# * losses: every step line of metrics.jsonl (replayed ones too) equals single-process
#   training (runtime.reference, rel 1e-5);
# * devices: every recovery event names a non-empty set of devices, no device twice; all of
#   them were faulted, and every fired kill/stop/leave (and the --fail victim) is named
#   (a stop-cont device may be named or not: SIGCONT may come before the verdict);
# * leftovers: processes carrying the trial's marker variable alive after the child ended
#   (and a grace for the SIGCONT helper); they are killed and counted;
# * detect_s: the event's detection (launcher clock) minus the fault log's time of the
#   signal; recover_s: detection -> first round of the new generation; total_s: both.

MODEL = ROOT / "examples" / "mlp.py"
MARKER = "ASTEROID_FX_CHAOS_TRIAL"
BATCH = 12
MICRO = 6
LR = 0.05
CHECKPOINT_EVERY = 2
SPEED = 0.5
#: layouts: devices per stage, and the layer ranges of examples/mlp.py (7 layers)
LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]] = {
    "1|2": ((1, 2), ((0, 3), (4, 6))),
    "2|1": ((2, 1), ((0, 3), (4, 6))),
    "1|2|1": ((1, 2, 1), ((0, 1), (2, 3), (4, 6))),
    "2|2": ((2, 2), ((0, 3), (4, 6))),
    "1|3": ((1, 3), ((0, 3), (4, 6))),
    "1|2|2": ((1, 2, 2), ((0, 1), (2, 3), (4, 6))),
    "2|1|2": ((2, 1, 2), ((0, 1), (2, 3), (4, 6))),
    "2|3": ((2, 3), ((0, 3), (4, 6))),
}


@dataclass(frozen=True)
class Trial:
    """One drawn trial."""

    index: int
    layout: str
    fault: Fault
    primary: str | None = None       # --fail victim at the same step (moment "recovery")

    @property
    def label(self) -> str:
        extra = f" +{self.primary}@{self.fault.step}:kill" if self.primary else ""
        return f"{self.fault.spec()}{extra}"


@dataclass
class Row:
    """What one trial measured (a row of the JSON and of the table)."""

    trial: int
    layout: str
    fault: str
    moment: str
    kind: str
    outcome: str = ""                 # finished | stopped | crashed | hang
    reason: str = ""
    fired: list[str] = field(default_factory=list)       # devices whose fault fired
    failed: list[list[str]] = field(default_factory=list)  # per recovery event
    sources: list[str] = field(default_factory=list)
    devices_ok: bool = True
    devices_note: str = ""
    losses_ok: bool = True
    losses_note: str = ""
    lost_steps: int = 0
    detect_s: float | None = None
    recover_s: list[float] = field(default_factory=list)
    total_s: float | None = None
    leftover: int = 0
    plans: list[list[str]] = field(default_factory=list)   # devices of generation 1, 2, ...
    double: bool = False
    double_ok: bool | None = None
    wall_s: float = 0.0
    hog: bool = False


def layout_devices(layout: str) -> list[list[str]]:
    """Device names per stage of ``layout`` (d0, d1, ...)."""
    groups, _ = LAYOUTS[layout]
    out: list[list[str]] = []
    n = 0
    for size in groups:
        out.append([f"d{n + i}" for i in range(size)])
        n += size
    return out


def draw(index: int, seed: int, steps: int) -> Trial:
    """Trial ``index`` of ``seed`` (see [Note: chaos trials])."""
    rng = random.Random(f"{seed}/{index}")
    layout = rng.choice(sorted(LAYOUTS))
    stages = layout_devices(layout)
    everyone = [d for s in stages for d in s]
    moment = rng.choice(MOMENTS)
    kind = rng.choice(sorted(FAULTS))
    step = rng.randint(1, steps - 2)
    primary = None
    if moment == "allreduce":
        device = rng.choice([d for s in stages if len(s) > 1 for d in s])
    elif moment == "replica-push":
        device = rng.choice([s[0] for s in stages])
    elif moment == "recovery":
        primary = rng.choice(everyone)
        device = rng.choice([d for d in everyone if d != primary])
    else:
        device = rng.choice(everyone)
    return Trial(index, layout, Fault(device, step, moment, kind), primary)


def cluster_yaml(layout: str) -> str:
    names = [d for s in layout_devices(layout) for d in s]
    return "devices:\n" + "".join(
        f"  - {{name: {d}, type: local, speed: {SPEED}, memory_gb: 1}}\n" for d in names) + \
        "network:\n  bandwidth_mbps: 1000\n"


def make_partition(work: Path, layout: str) -> tuple[Path, Path]:
    """examples/mlp.py split as ``layout`` (batch 12, two micro-batches of 6): (partition
    directory, cluster file), made once per work directory."""
    import torch

    from asteroid_fx.costs import analytic_costs
    from asteroid_fx.model_spec import import_model_file
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition
    from contracts.cluster import Cluster
    from contracts.plan import Plan, Stage
    from solver.evaluate import evaluate

    name = layout.replace("|", "-")
    directory, cluster_file = work / f"part-{name}", work / f"cluster-{name}.yaml"
    if (directory / "plan.json").is_file():
        return directory, cluster_file
    cluster_file.write_text(cluster_yaml(layout))
    module = import_model_file(MODEL)
    torch.manual_seed(0)
    inputs, _ = module.sample_batch(2)
    costs = analytic_costs(module.build_model(), inputs)
    cluster = Cluster.from_yaml(cluster_file)
    _, ranges = LAYOUTS[layout]
    stages = tuple(Stage(r, tuple(devs), tuple([MICRO // len(devs)] * len(devs)))
                   for r, devs in zip(ranges, layout_devices(layout), strict=True))
    plan = Plan(costs.model_hash, cluster.cluster_hash, BATCH, MICRO, BATCH // MICRO, stages,
                num_layers=7, model_name="MLP")
    plan = replace(plan, predicted=evaluate(plan, costs, cluster))
    save_partition(directory, plan, partition(module.build_model(), inputs, plan),
                   model_spec=str(MODEL), onnx=False)
    return directory, cluster_file


# -- the child: one trial --------------------------------------------------------------------
def child(spec_file: Path) -> int:
    """Run one trial's training (``--child``) and write its outcome as JSON."""
    from asteroid_fx.errors import AsteroidError
    from asteroid_fx.replanning import Replanner
    from runtime.recovery import run_with_recovery
    from runtime.train import TrainConfig

    spec = json.loads(spec_file.read_text())
    config = TrainConfig(steps=spec["steps"], seed=spec["seed"], lr=LR,
                         timeout_s=spec["op_timeout_s"], metrics=spec["metrics"])
    result: dict[str, Any]
    try:
        run_with_recovery(spec["directory"], spec["cluster"], config, fail=spec["fail"],
                          recovery="replay", checkpoint_every=CHECKPOINT_EVERY,
                          replicate_every=1, timeout_s=spec["run_timeout_s"],
                          replanner=Replanner())
        result = {"status": "finished"}
    except AsteroidError as exc:
        result = {"status": "stopped", "reason": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001 - any other exception is a bug: reported
        result = {"status": "crashed", "reason": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# -- the parent ------------------------------------------------------------------------------
def marked_pids(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment has ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_trial(trial: Trial, work: Path, *, steps: int, seed: int, deadline_s: float,
              reference: Sequence[float], hog: bool) -> Row:
    """Run ``trial`` in a child process and check it (see [Note: chaos trials])."""
    directory, cluster_file = make_partition(work, trial.layout)
    tdir = work / f"trial-{trial.index:03d}"
    tdir.mkdir(parents=True, exist_ok=True)
    for old in tdir.iterdir():
        old.unlink()
    metrics, result_file, fault_log = tdir / "metrics.jsonl", tdir / "result.json", \
        tdir / "faults.jsonl"
    spec = {"directory": str(directory), "cluster": str(cluster_file), "steps": steps,
            "seed": seed, "metrics": str(metrics), "result": str(result_file),
            "fail": f"{trial.primary}@{trial.fault.step}" if trial.primary else None,
            "op_timeout_s": 30.0, "run_timeout_s": deadline_s}
    (tdir / "spec.json").write_text(json.dumps(spec))
    marker = f"{os.getpid()}-{trial.index}-{time.time_ns()}"
    env = {**os.environ, ENV: trial.fault.spec(), LOG_ENV: str(fault_log), MARKER: marker,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    row = Row(trial=trial.index, layout=trial.layout, fault=trial.label,
              moment=trial.fault.moment, kind=trial.fault.fault, hog=hog)
    began = time.monotonic()
    with (tdir / "log.txt").open("wb") as log_fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child",
                                 str(tdir / "spec.json")], env=env, stdout=log_fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            row.outcome, row.reason = "hang", f"no end within the {deadline_s:.0f} s deadline"
            _kill_session(proc)
    row.wall_s = time.monotonic() - began
    # leftovers: give the SIGCONT helper (and exiting workers) a moment, then count and kill
    grace = time.monotonic() + trial.fault.cont_after_s + 2.0
    left = marked_pids(marker)
    while left and time.monotonic() < grace:
        time.sleep(0.1)
        left = marked_pids(marker)
    row.leftover = len(left)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not row.outcome:
        if result_file.is_file():
            result = json.loads(result_file.read_text())
            row.outcome, row.reason = result["status"], result.get("reason", "")
        else:
            row.outcome = "crashed"
            row.reason = f"the trial process ended with code {proc.returncode} and no result"
    row.plans = generation_devices(directory)
    check(row, trial, metrics, fault_log, reference, steps)
    return row


def generation_devices(directory: Path) -> list[list[str]]:
    """Devices of the plan of every generation after the first (DIR/recovery/gen<k>)."""
    out = []
    k = 1
    while (directory / "recovery" / f"gen{k}" / "plan.json").is_file():
        plan = json.loads((directory / "recovery" / f"gen{k}" / "plan.json").read_text())
        out.append([d for stage in plan["stages"] for d in stage["devices"]])
        k += 1
    return out


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for text in path.read_text().splitlines():
        text = text.strip()
        if text:
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError:    # a line cut by a kill
                continue
    return out


def check(row: Row, trial: Trial, metrics: Path, fault_log: Path,
          reference: Sequence[float], steps: int) -> None:
    """Fill ``row``'s checks from the trial's metrics and fault log."""
    fired = _lines(fault_log)
    row.fired = sorted({f["device"] for f in fired})
    lines = _lines(metrics)
    events = [line for line in lines if line.get("event") == "recovery"]
    row.failed = [list(e.get("failed", [])) for e in events]
    row.sources = [str(e.get("source")) for e in events]
    row.lost_steps = sum(int(e.get("lost_steps", 0)) for e in events)
    # devices
    must = {trial.primary} if trial.primary else set()
    may = set(must)
    for f in fired:
        may.add(f["device"])
        # a leave asked during a recovery takes effect after the next committed round: when
        # the re-plan already dropped the device it just exits (nothing to name)
        dropped = (f["fault"] == "leave" and f["moment"] == "recovery"
                   and bool(row.plans) and f["device"] not in row.plans[0])
        if f["fault"] != "stop-cont" and not dropped:
            must.add(f["device"])
    named = [d for e in row.failed for d in e]
    problems = []
    if any(not e for e in row.failed):
        problems.append("an event names no device")
    if len(named) != len(set(named)):
        problems.append(f"a device named twice: {row.failed}")
    if set(named) - may:
        problems.append(f"blamed {sorted(set(named) - may)}, not faulted")
    if row.outcome == "finished" and must - set(named):
        problems.append(f"{sorted(must - set(named))} failed but no event names it")
    row.devices_ok, row.devices_note = not problems, "; ".join(problems)
    # losses
    steps_seen = [line for line in lines if "step" in line and "loss" in line]
    bad = [line["step"] for line in steps_seen
           if not 0 <= line["step"] < len(reference)
           or abs(line["loss"] - reference[line["step"]]) > 1e-5 * max(1.0,
                                                                       abs(reference[line["step"]]))]
    last = {line["step"] for line in steps_seen}
    problems = []
    if bad:
        problems.append(f"steps {sorted(set(bad))} differ from the reference")
    if row.outcome == "finished" and last != set(range(steps)):
        problems.append(f"steps {sorted(set(range(steps)) - last)} missing")
    row.losses_ok, row.losses_note = not problems, "; ".join(problems)
    # times: the event that names the faulted device (the first one for --fail's victim)
    # (not for a fault during a recovery: the event's detection is the --fail victim's)
    at = {f["device"]: float(f["at"]) for f in fired if f["moment"] != "recovery"}
    for e in events:
        if "detected_at" in e and "resumed_at" in e:
            row.recover_s.append(float(e["resumed_at"]) - float(e["detected_at"]))
        hit = [d for d in e.get("failed", []) if d in at]
        if hit and row.detect_s is None and "detected_at" in e:
            row.detect_s = float(e["detected_at"]) - at[hit[0]]
            if "resumed_at" in e:
                row.total_s = float(e["resumed_at"]) - at[hit[0]]
    # a double failure: the fault fired during the recovery from --fail's victim
    row.double = bool(trial.primary) and trial.fault.fault in ("kill", "stop") and bool(fired)
    if row.double:
        row.double_ok = ((row.outcome == "finished" and row.losses_ok)
                         or (row.outcome == "stopped" and bool(row.reason)))


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """The targets' counts and the medians over ``rows``."""
    hung = [r.detect_s for r in rows if r.kind in ("stop", "stop-cont") and r.detect_s is not None
            and r.moment != "recovery"]
    recover = [t for r in rows for t in r.recover_s]
    totals = [r.total_s for r in rows if r.total_s is not None]
    doubles = [r for r in rows if r.double]
    return {
        "trials": len(rows),
        "finished": sum(r.outcome == "finished" for r in rows),
        "stopped_with_reason": sum(r.outcome == "stopped" and bool(r.reason) for r in rows),
        "crashed": sum(r.outcome == "crashed" for r in rows),
        "hangs": sum(r.outcome == "hang" for r in rows),
        "wrong_device_events": sum(not r.devices_ok for r in rows),
        "loss_mismatches": sum(not r.losses_ok for r in rows),
        "leftover_processes": sum(r.leftover for r in rows),
        "faults_fired": sum(bool(r.fired) for r in rows),
        "recoveries": len(recover),
        "double_failures": len(doubles),
        "double_failures_ok": sum(bool(r.double_ok) for r in doubles),
        "double_failure_sources": sorted({s for r in doubles for s in r.sources}),
        "lost_steps": sum(r.lost_steps for r in rows),
        "hung_detect_s_median": statistics.median(hung) if hung else None,
        "hung_detect_s_max": max(hung) if hung else None,
        "recover_s_median": statistics.median(recover) if recover else None,
        "recover_s_max": max(recover) if recover else None,
        "total_s_median": statistics.median(totals) if totals else None,
        "hog": any(r.hog for r in rows),
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def tables(rows: Sequence[Row], summary: Mapping[str, Any]) -> tuple[Any, Any]:
    """rich tables: one row per trial, and the summary."""
    from rich.table import Table

    trials = Table(title="chaos trials")
    for name in ("#", "layout", "fault", "outcome", "failed (per event)", "source", "losses",
                 "devices", "lost", "detect s", "recover s", "left", "wall s"):
        trials.add_column(name)
    for r in rows:
        trials.add_row(str(r.trial), r.layout, r.fault, r.outcome,
                       " ".join(",".join(f) for f in r.failed) or "-",
                       ",".join(r.sources) or "-", "ok" if r.losses_ok else "MISMATCH",
                       "ok" if r.devices_ok else "WRONG", str(r.lost_steps),
                       _fmt(r.detect_s), _fmt(max(r.recover_s) if r.recover_s else None),
                       str(r.leftover), f"{r.wall_s:.1f}")
    table = Table(title="chaos summary")
    table.add_column("measure")
    table.add_column("value")
    for key, value in summary.items():
        table.add_row(key, _fmt(value) if isinstance(value, float) else str(value))
    return trials, table


def markdown(rows: Sequence[Row], summary: Mapping[str, Any]) -> str:
    """The summary and the trials as markdown tables (for docs/benchmarks.md)."""
    out = ["| measure | value |", "|---|---|"]
    for key, value in summary.items():
        out.append(f"| {key} | {_fmt(value) if isinstance(value, float) else value} |")
    out += ["", "| # | layout | fault | outcome | failed (per event) | source | losses | "
            "devices | lost | detect s | recover s | left |", "|" + "---|" * 12]
    for r in rows:
        out.append(f"| {r.trial} | {r.layout.replace('|', ' / ')} | `{r.fault}` | "
                   f"{r.outcome} | "
                   f"{' '.join(','.join(f) for f in r.failed) or '-'} | "
                   f"{','.join(r.sources) or '-'} | {'ok' if r.losses_ok else 'MISMATCH'} | "
                   f"{'ok' if r.devices_ok else 'WRONG'} | {r.lost_steps} | "
                   f"{_fmt(r.detect_s)} | "
                   f"{_fmt(max(r.recover_s) if r.recover_s else None)} | {r.leftover} |")
    return "\n".join(out) + "\n"


def reference_losses(steps: int, seed: int) -> list[float]:
    from asteroid_fx.model_spec import import_model_file
    from runtime.reference import reference_training

    return reference_training(import_model_file(MODEL), BATCH, steps=steps, seed=seed,
                              lr=LR).losses


def start_hog() -> subprocess.Popen[bytes]:
    """A one-core busy loop (``--hog``)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            stdin=subprocess.DEVNULL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="index of the first trial")
    parser.add_argument("--only", type=str, default=None,
                        help="comma-separated trial indices to run (e.g. to rerun one)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="seconds per trial before it counts as a hang")
    parser.add_argument("--hog", action="store_true",
                        help="run a one-core busy loop during the trials")
    parser.add_argument("--work", type=Path, default=None, help="work directory")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="write the tables as markdown here")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child)
    if args.steps < 3:
        parser.error("--steps must be >= 3")
    from rich.console import Console

    console = Console(width=200)
    work = args.work or Path(tempfile.mkdtemp(prefix="afx-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    indices = ([int(i) for i in args.only.split(",")] if args.only
               else list(range(args.first, args.first + args.trials)))
    reference = reference_losses(args.steps, args.seed)
    hog = start_hog() if args.hog else None
    rows: list[Row] = []
    began = time.monotonic()
    try:
        for n, index in enumerate(indices):
            trial = draw(index, args.seed, args.steps)
            row = run_trial(trial, work, steps=args.steps, seed=args.seed,
                            deadline_s=args.deadline, reference=reference, hog=hog is not None)
            rows.append(row)
            flags = [] if row.losses_ok else ["LOSS MISMATCH"]
            flags += [] if row.devices_ok else [f"WRONG DEVICES ({row.devices_note})"]
            flags += [f"{row.leftover} LEFTOVER"] if row.leftover else []
            console.print(f"[{n + 1}/{len(indices)}] trial {index} {trial.layout} "
                          f"{trial.label}: {row.outcome} {row.failed} {row.sources} "
                          f"{row.wall_s:.1f}s {' '.join(flags)}"
                          + (f" ({row.reason})" if row.reason else ""), highlight=False)
            if args.json is not None:   # after every trial: an interrupted run keeps its rows
                args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows],
                                                 "summary": summarize(rows)}, indent=1))
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    summary = summarize(rows)
    summary["wall_s"] = time.monotonic() - began
    trials_table, summary_table = tables(rows, summary)
    console.print(trials_table)
    console.print(summary_table)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows],
                                         "summary": summary}, indent=1))
    if args.markdown is not None:
        args.markdown.write_text(markdown(rows, summary))
    console.print(f"work directory: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
