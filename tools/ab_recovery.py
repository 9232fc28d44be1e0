"""Recovery time of two source trees, alternating: chaos trials run by each tree's own
tools/chaos.py (optionally beside a one-core CPU hog), in ABBA order, with the ratio."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# [Note: A/B recovery runs]
# The host is noisy (other jobs, a load of 5-15 on 2 cores), so two trees are compared in
# the same run, trial by trial: round r runs every chosen chaos trial with tree A then B
# (odd rounds: B then A), each trial a fresh ``tools/chaos.py --only I`` of that tree (its
# own hog with ``--hog``). Per trial and tree the recovery event gives recover_s
# (detection -> first round of the new generation, as chaos.py reports it) and where it
# went (stop_s, search_s, partition_s, load_s, start_parts_s). The summary: medians per
# tree, the median of the per-pair ratios B/A, and the parts' medians.

PARTS = ("stop_s", "search_s", "partition_s", "load_s")
START_PARTS = ("hooks", "load_stage", "apply_state", "first_barrier")


def run_one(tree: Path, index: int, seed: int, hog: bool, work: Path) -> list[dict[str, Any]]:
    """Chaos trial ``index`` by ``tree``: one dict per recovery event (recover_s, parts)."""
    out = work / "rows.json"
    cmd = [sys.executable, str(tree / "tools" / "chaos.py"), "--only", str(index),
           "--seed", str(seed), "--work", str(work), "--json", str(out)]
    if hog:
        cmd.append("--hog")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = json.loads(out.read_text())["rows"]
    events = []
    metrics = work / f"trial-{index:03d}" / "metrics.jsonl"
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") != "recovery":
            continue
        item: dict[str, Any] = {"outcome": rows[0]["outcome"]}
        if "resumed_at" in record and "detected_at" in record:
            item["recover_s"] = float(record["resumed_at"]) - float(record["detected_at"])
        for part in PARTS:
            item[part] = record.get(part)
        for part in START_PARTS:
            item[part] = (record.get("start_parts_s") or {}).get(part)
        events.append(item)
    return events


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="tree A (e.g. main)")
    parser.add_argument("--after", type=Path, required=True, help="tree B (the change)")
    parser.add_argument("--trials", default="0,3,9", help="chaos trial indices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hog", action="store_true", help="a one-core busy loop per trial")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    trees = {"A": args.before.resolve(), "B": args.after.resolve()}
    indices = [int(i) for i in args.trials.split(",")]
    results: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    pairs: list[float] = []
    for r in range(args.rounds):
        for index in indices:
            got: dict[str, list[dict[str, Any]]] = {}
            for side in ("AB" if r % 2 == 0 else "BA"):
                with tempfile.TemporaryDirectory(prefix=f"afx-ab-{side}-") as tmp:
                    got[side] = run_one(trees[side], index, args.seed, args.hog, Path(tmp))
                results[side] += [dict(e, trial=index, round=r) for e in got[side]]
                times = [e.get("recover_s") for e in got[side]]
                print(f"round {r} trial {index} {side}: recover_s "
                      f"{[round(t, 3) for t in times if t is not None]} "
                      f"{[e['outcome'] for e in got[side]][:1]}", flush=True)
            a, b = (_median([e.get("recover_s") for e in got[s]]) for s in "AB")
            if a and b:
                pairs.append(b / a)
    summary: dict[str, Any] = {"pairs_b_over_a": pairs,
                               "ratio_median": _median(pairs)}
    for side in "AB":
        summary[side] = {"tree": str(trees[side]),
                         "recover_s_median": _median([e.get("recover_s")
                                                      for e in results[side]]),
                         "events": len(results[side])}
        for part in PARTS + START_PARTS:
            summary[side][part] = _median([e.get(part) for e in results[side]])
    print(json.dumps(summary, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps({"summary": summary, "events": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
