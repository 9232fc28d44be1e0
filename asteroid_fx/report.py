"""Readable plan reports: stages, devices, shares, times, memory and where each device type's
times come from (rich for terminals, markdown).

Example::

    from rich.console import Console
    Console().print(plan_report(plan, costs, cluster))
    Path("report.md").write_text(plan_report_markdown(plan, costs, cluster))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from contracts.cluster import Cluster
from contracts.plan import Plan, Prediction, SearchBound
from contracts.table import CostTable
from solver.evaluate import evaluate
from solver.tied_plan import TIED_STOP

__all__ = ["plan_report", "plan_report_markdown", "format_bytes", "format_seconds"]

_STAGE_HEADERS = ("stage", "layers", "devices", "shares", "E_f", "E_b", "T_w", "T_e", "T_a",
                  "T_w+T_e+T_a")
_MEMORY_HEADERS = ("device", "type", "stage", "share", "peak memory", "capacity", "use")
_SOURCE_HEADERS = ("device type", "devices", "layer times from")


def format_bytes(value: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units)."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024.0 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024.0
    return f"{size:.1f} GiB"  # pragma: no cover - loop always returns


def format_seconds(value: float) -> str:
    """Seconds as ``"12.3 ms"`` or ``"1.23 s"``."""
    if abs(value) < 1.0:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


@dataclass(frozen=True)
class _Content:
    title: str
    summary: tuple[tuple[str, str], ...]
    stages: tuple[tuple[str, ...], ...]
    memory: tuple[tuple[str, ...], ...]
    sources: tuple[tuple[str, ...], ...]
    dominant: int
    oom: tuple[str, ...]


def _layer_label(costs: CostTable, first: int, last: int) -> str:
    names = costs.layers
    if first == last:
        return f"{first} ({names[first].name})"
    return f"{first}..{last} ({names[first].name} .. {names[last].name})"


def _source_phrase(costs: CostTable, device_type: str) -> str:
    """Where a type's layer times come from, and the runtime overhead it pays."""
    parts = [costs.timing_source(device_type)]
    over = costs.runtime_overhead_of(device_type)
    if not over.is_zero:
        parts.append(f"runtime overhead {over.describe()}")
    col = costs.column(device_type)
    if col is not None and col.message_overhead_s > 0:
        parts.append(f"{col.message_overhead_s * 1e3:.3f} ms per message")
    elif costs.message_overhead_s > 0:
        parts.append(f"{costs.message_overhead_s * 1e3:.3f} ms per message of one core, "
                     f"over each device's speed")
    workspace = costs.workspace_of(device_type)
    if workspace is not None:
        parts.append(f"fixed workspace {workspace / 2**20:.1f} MiB (measured)")
    return "; ".join(parts)


def _content(plan: Plan, costs: CostTable, cluster: Cluster) -> _Content:
    pred: Prediction = plan.predicted or evaluate(plan, costs, cluster)
    stage_rows = []
    for s, (stage, sp) in enumerate(zip(plan.stages, pred.stages, strict=True)):
        mark = " *" if s == pred.dominant_stage else ""
        stage_rows.append((
            f"{s}{mark}", _layer_label(costs, stage.first, stage.last),
            ", ".join(stage.devices), ", ".join(str(x) for x in stage.shares),
            format_seconds(sp.e_f), format_seconds(sp.e_b), format_seconds(sp.t_w),
            format_seconds(sp.t_e), format_seconds(sp.t_a), format_seconds(sp.total)))
    memory_rows = []
    oom = []
    for stage_index, stage in enumerate(plan.stages):
        for device, share in zip(stage.devices, stage.shares, strict=True):
            peak = pred.peak_memory_bytes.get(device, 0)
            cap = pred.memory_capacity_bytes.get(device, cluster.device(device).memory_bytes)
            use = f"{100.0 * peak / cap:.0f}%" if cap else "n/a"
            if peak > cap:
                use += " OOM"
                oom.append(device)
            memory_rows.append((device, cluster.device(device).type, str(stage_index),
                                str(share), format_bytes(peak), format_bytes(cap), use))
    by_type: dict[str, list[str]] = {}
    for member in cluster.devices:
        by_type.setdefault(member.type, []).append(member.name)
    source_rows = tuple((type_name, ", ".join(names), _source_phrase(costs, type_name))
                        for type_name, names in by_type.items())
    info = plan.planner
    summary = (
        ("model", f"{plan.model_name or costs.model_name} ({costs.num_layers} layers, "
                  f"{costs.source} costs)"),
        ("planner", f"{info.name} v{info.version}, search {format_seconds(info.search_time_s)}"
         + (f"; {check_words(info.check)}" if info.check else "")),
        *((("optimality", _bound_text(info.bound)),) if info.bound is not None else ()),
        ("batch", f"{plan.batch_size} = {plan.num_micro_batches} micro-batches x "
                  f"{plan.micro_batch_size}, schedule {plan.schedule}"),
        ("round time", format_seconds(pred.round_time_s)),
        *((("simulated", f"{format_seconds(pred.simulated_round_time_s)} (event simulation of "
                         f"the schedule: what a run should measure)"),)
          if pred.simulated_round_time_s is not None else ()),
        ("throughput", f"{pred.throughput_samples_s:.2f} samples/s"),
        ("dominant stage", f"{pred.dominant_stage} (largest E_f + E_b, marked *)"),
        ("fits in memory", "yes" if pred.fits else f"NO: {', '.join(oom)}"),
    )
    title = f"Plan for {plan.model_name or costs.model_name}: {plan.num_stages} stage(s) on " \
            f"{len(plan.devices)} of {len(cluster.devices)} device(s)"
    return _Content(title, summary, tuple(stage_rows), tuple(memory_rows), source_rows,
                    pred.dominant_stage, tuple(oom))


def _bound_text(bound: SearchBound) -> str:
    """``optimal over ...`` or ``within 3.1% of the optimum ... (time limit)``."""
    over = "every device order" if bound.space == "classes" else "the capability order"
    cuts = (f"{bound.cuts} candidate cuts of {bound.layers - 1}"
            if bound.cuts < bound.layers - 1 else "every cut")
    if bound.optimal:
        return f"optimal over {over}, {cuts}"
    order = "optimal over the capability order; " if bound.order_optimal else ""
    why = ("the bound leaves out the tied weights' all-reduce and copies"
           if bound.stopped == TIED_STOP else f"search stopped: {bound.stopped or 'early'}")
    return (f"{order}within {100 * bound.gap:.3g}% of the optimum over {over}, {cuts} "
            f"(proven bound {format_seconds(bound.bound_s)}; {why})")


def _rich_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]],
                numeric_from: int) -> Table:
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i >= numeric_from else "left",
                         overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def plan_report(plan: Plan, costs: CostTable, cluster: Cluster) -> RenderableType:
    """A rich renderable (summary, stage table, memory table, time sources) for
    ``Console().print``.

    Uses ``plan.predicted`` when present, otherwise evaluates the plan.
    """
    content = _content(plan, costs, cluster)
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    for key, value in content.summary:
        style = "bold red" if key == "fits in memory" and content.oom else ""
        summary.add_row(key, Text(value, style=style))
    return Group(
        Text(content.title, style="bold"),
        summary,
        _rich_table("Stages (times per micro-batch; T_* per round)", _STAGE_HEADERS,
                    content.stages, 4),
        _rich_table("Memory per device", _MEMORY_HEADERS, content.memory, 3),
        _rich_table("Layer times per device type", _SOURCE_HEADERS, content.sources, 3),
    )


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def plan_report_markdown(plan: Plan, costs: CostTable, cluster: Cluster) -> str:
    """The same report as markdown (for ``report.md``)."""
    content = _content(plan, costs, cluster)
    lines = [f"# {content.title}", ""]
    lines += [f"- **{key}**: {value}" for key, value in content.summary]
    lines += ["", "## Stages", "",
              "E_f / E_b: one micro-batch through the stage (slowest device of the group, "
              "plus the input cut's transfer); T_w / T_e / T_a: warm-up, execution and "
              "all-reduce time of the stage in one round.", ""]
    lines += _md_table(_STAGE_HEADERS, content.stages)
    lines += ["", "## Memory per device", ""]
    lines += _md_table(_MEMORY_HEADERS, content.memory)
    lines += ["", "## Layer times per device type", "",
              "A type with a column in the cost table takes its measured times as they are; "
              "every other type scales the base times by its speed.", ""]
    lines += _md_table(_SOURCE_HEADERS, content.sources)
    return "\n".join(lines) + "\n"


_CHECK_PHRASES = {
    "device_order_from": "best device order from the {} baseline",
    "seeded_from": "seeded from the {} baseline",
    "ilp_status": "ILP {}",
    "ilp_solver": "solver {}",
    "gap": "DP-ILP gap {}",
}


def _tied_words(tied: Mapping[str, Any]) -> str:
    """``check["tied"]`` (solver.tied_plan) as words."""
    split = format_seconds(float(tied["split_round_s"])) + ("" if tied.get("split_fits", True)
                                                            else ", does not fit")
    alone = tied.get("one_stage_round_s")
    other = "no plan of one stage fits" if alone is None else \
        f"one stage {format_seconds(float(alone))}"
    weights = ", ".join(str(w) for w in tied.get("weights", ()))
    return f"tied {weights}: kept {tied['kept']} (split {split}; {other})"


def _plan_words(plan: Mapping[str, Any]) -> str:
    """A plan summary of ``solver.alternatives.describe`` as words."""
    stages = plan.get("stages", ())
    return (f"{format_seconds(float(plan['round_s']))}, simulated "
            f"{format_seconds(float(plan['simulated_s']))} ({len(stages)} stage(s), "
            f"micro-batch {plan['micro_batch']})")


def check_words(check: Mapping[str, object]) -> str:
    """``PlannerInfo.check`` as words for the report (``gap 0.12 %``, ``ILP optimal``...)."""
    parts = []
    for key, value in check.items():
        if key == "tied" and isinstance(value, Mapping):
            parts.append(_tied_words(value))
            continue
        if key == "simulated_alternative" and isinstance(value, Mapping):
            parts.append(f"a plan the search passed simulates faster: {_plan_words(value)}; "
                         f"--objective simulated takes it")
            continue
        if key == "model_optimum" and isinstance(value, Mapping):
            parts.append(f"the model's optimum found: {_plan_words(value)}")
            continue
        if isinstance(value, float):
            text = (f"{value:.2%}" if key == "gap" else format_seconds(value)
                    if key.endswith(("_round", "_time_s", "_s")) else f"{value:.4g}")
        elif isinstance(value, (list, tuple)):
            text = ", ".join(str(v) for v in value)
        else:
            text = str(value)
        phrase = _CHECK_PHRASES.get(key)
        parts.append(phrase.format(text) if phrase else
                     f"{key.removesuffix('_s').replace('_', ' ')} {text}")
    return "; ".join(parts)
