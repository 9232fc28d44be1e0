"""Gantt chart of a simulated round: one row per device, F/B/transfer/all-reduce bars."""

from __future__ import annotations

from pathlib import Path

from asteroid_fx.figures import save_figure
from solver.simulate import SimResult

__all__ = ["gantt_png", "COLOURS"]

COLOURS: dict[str, str] = {
    "F": "#4C72B0",
    "B": "#DD8452",
    "SEND": "#8C8C8C",
    "ALLREDUCE": "#55A868",
    "UPDATE": "#8172B3",
}
_LABELS = {"F": "forward", "B": "backward", "SEND": "transfer", "ALLREDUCE": "all-reduce",
           "UPDATE": "optimizer step"}


def gantt_png(result: SimResult, path: str | Path, *, title: str = "",
              annotate: bool = True) -> Path:
    """Draw ``result`` as a Gantt chart PNG at ``path`` (matplotlib, Agg backend).

    Rows are devices in stage order; bars are coloured by kind (``COLOURS``); forward and
    backward bars are labelled with their micro-batch when ``annotate`` and there is room.
    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out = Path(path)
    devices = sorted({e.device for e in result.events} | set(result.stage_of),
                     key=lambda d: (result.stage_of.get(d, 0), d))
    rows = {d: i for i, d in enumerate(devices)}
    height = max(2.0, 0.5 * len(devices) + 1.2)
    fig, ax = plt.subplots(figsize=(11, height))
    total = result.total_time_s or 1.0
    for ev in result.events:
        y = rows[ev.device]
        width = ev.end - ev.start
        if width <= 0:
            continue
        thin = ev.kind == "SEND" and result.comm == "overlap"
        bar_h, offset = (0.25, 0.35) if thin else (0.8, 0.0)
        ax.broken_barh([(ev.start, width)], (y - 0.4 + offset, bar_h),
                       facecolors=COLOURS.get(ev.kind, "#000000"), edgecolor="white",
                       linewidth=0.4)
        if annotate and ev.kind in ("F", "B") and width > total / 60:
            ax.text(ev.start + width / 2, y, f"{ev.kind}{ev.micro_batch}", ha="center",
                    va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(devices)))
    ax.set_yticklabels([f"{d} (s{result.stage_of.get(d, 0)})" for d in devices])
    ax.invert_yaxis()
    ax.set_xlim(0, total)
    ax.set_xlabel("time (s)")
    kinds = [k for k in COLOURS if any(e.kind == k for e in result.events)]
    ax.legend(handles=[Patch(color=COLOURS[k], label=_LABELS[k]) for k in kinds],
              loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(devices) < 4 else -0.12),
              ncol=len(kinds) or 1, frameon=False)
    heading = title or "Simulated round"
    ax.set_title(f"{heading}: round time {result.round_time_s:.3f} s, "
                 f"bubbles {100 * result.bubble_fraction:.0f}% ({result.schedule}, "
                 f"{result.rounds} round{'s' if result.rounds != 1 else ''})")
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out
