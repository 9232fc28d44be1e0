"""A run's metrics.jsonl as a plot: measured against predicted round time per step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asteroid_fx.figures import save_figure
from contracts.arguments import is_number
from contracts.errors import RuntimeFailure, absent

__all__ = ["RunMetrics", "read_metrics", "plot_metrics"]


@dataclass(frozen=True)
class RunMetrics:
    """The step rows and events of one ``metrics.jsonl``."""

    steps: list[dict[str, Any]]
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse ``path`` (written by ``asteroid-fx run --metrics``); ``RuntimeFailure`` naming
    the file and the line when it is not one."""
    source = Path(path)
    if not source.is_file():
        raise RuntimeFailure(f"metrics file {source} {absent(source)}; write one with "
                             f"`asteroid-fx run DIR --metrics {source}`")
    steps: list[dict[str, Any]] = []
    recoveries: list[dict[str, Any]] = []
    summary = None
    for number, line in enumerate(source.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not ("step" in row or "event" in row):
            raise RuntimeFailure(f"{source} line {number} is not a metrics record (expected "
                                 f"the JSON lines of `asteroid-fx run --metrics`)")
        if row.get("event") == "recovery":
            recoveries.append(row)
        elif row.get("event") == "summary":
            summary = row
        elif "step" in row and "round_time_s" in row:
            if not (_number(row["step"], int) and _number(row["round_time_s"], float)
                    and _number(row.get("predicted_round_time_s"), float, none=True)):
                raise RuntimeFailure(f"{source} line {number}: step {row['step']!r} and its "
                                     f"times must be numbers (the JSON lines of `asteroid-fx "
                                     f"run --metrics`)")
            steps.append(row)
    if not steps:
        raise RuntimeFailure(f"{source} has no step rows; is it the metrics.jsonl of "
                             f"`asteroid-fx run DIR --metrics`?")
    return RunMetrics(steps=steps, recoveries=recoveries, summary=summary)


def _number(value: Any, kind: type, none: bool = False) -> bool:
    """Whether ``value`` reads as a number of ``kind`` (an int for steps; None where allowed)."""
    if value is None:
        return none
    if not is_number(value):
        return False
    return kind is float or float(value).is_integer()


def plot_metrics(path: str | Path, out: str | Path, *, title: str = "") -> Path:
    """Draw measured round time per step against the prediction each step should be compared
    with (``predicted_round_time_s``, labelled by its ``prediction`` kind), with recoveries
    marked; returns the PNG written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(path)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = [int(r["step"]) for r in metrics.steps]
    ax.plot(x, [float(r["round_time_s"]) * 1e3 for r in metrics.steps], "o-", ms=3,
            label="measured")
    kinds = sorted({str(r.get("prediction", "plan")) for r in metrics.steps
                    if r.get("predicted_round_time_s") is not None})
    for kind in kinds:
        rows = [r for r in metrics.steps if r.get("predicted_round_time_s") is not None
                and str(r.get("prediction", "plan")) == kind]
        ax.plot([int(r["step"]) for r in rows],
                [float(r["predicted_round_time_s"]) * 1e3 for r in rows], "s--", ms=3,
                label=f"predicted ({kind})")
    for i, ev in enumerate(metrics.recoveries):
        resumed = ev.get("resume_step")
        if resumed is None:
            continue
        ax.axvline(float(resumed) - 0.5, color="crimson", ls=":",
                   label="recovery" if i == 0 else None)
        ax.annotate(f"{ev.get('mode', '')} {ev.get('failed', '')}", (float(resumed) - 0.5, 0),
                    xycoords=("data", "axes fraction"), rotation=90, va="bottom",
                    ha="right", fontsize=7, color="crimson")
    ax.set_xlabel("step")
    ax.set_ylabel("round time (ms)")
    ax.set_title(title or f"{Path(path).name}: measured vs predicted round time")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, target)
    plt.close(fig)
    return target
