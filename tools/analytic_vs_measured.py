"""Compare analytic per-layer FLOPs with measured per-layer forward times of one model.

Profiles a model (default ``examples/mobilenet_v2.py``) at batch sizes 1, 2, 4, 8 on one
host core, timing the whole profile, and prints the Pearson and Spearman correlations
between each layer's analytic forward FLOPs and its measured forward time (the median at
the largest batch size, and the fitted per-sample time), plus the same for the analytic
roofline time, and the profile's wall time.

Usage::

    python tools/analytic_vs_measured.py [--model examples/mobilenet_v2.py]
        [--batch-sizes 1,2,4,8] [--repeats 5] [--warmup 2] [--out costs.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence

import torch

from asteroid_fx.costs import analytic_costs, profile
from asteroid_fx.model_spec import load_model_spec
from asteroid_fx.trace import trace

__all__ = ["pearson", "spearman", "main"]


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation coefficient (nan when a side is constant)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0  # ties share their average rank
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    return pearson(_ranks(xs), _ranks(ys))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples/mobilenet_v2.py")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="", help="also save the measured table here")
    args = parser.parse_args(argv)

    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    spec = load_model_spec(args.model)
    torch.manual_seed(0)
    model = spec.build_model()
    example = spec.example_inputs(max(sizes))[0]
    graph = trace(model, example, model_name=spec.name)

    started = time.perf_counter()
    measured = profile(model, spec.sample_batch, sizes, repeats=args.repeats,
                       warmup=args.warmup, example_inputs=example, graph=graph,
                       model_name=spec.name)
    wall = time.perf_counter() - started
    analytic = analytic_costs(model, example, graph=graph, host_flops=measured.host_flops,
                              model_name=spec.name)
    if args.out:
        measured.save(args.out)

    flops = [layer.flops for layer in analytic.layers]
    largest = [row[-1] for row in measured.meta["fwd_median_s"]]
    fitted = [layer.fwd.per_sample_s for layer in measured.layers]
    roofline = [layer.fwd.at(sizes[-1]) for layer in analytic.layers]
    total_measured = sum(layer.fwd.at(sizes[-1]) for layer in measured.layers)
    results = {
        "model": spec.name,
        "layers": measured.num_layers,
        "batch_sizes": list(sizes),
        "repeats": args.repeats,
        "host_flops": measured.host_flops,
        "profile_wall_s": wall,
        f"pearson_flops_vs_fwd_b{sizes[-1]}": pearson(flops, largest),
        f"spearman_flops_vs_fwd_b{sizes[-1]}": spearman(flops, largest),
        "pearson_flops_vs_fwd_per_sample": pearson(flops, fitted),
        "spearman_flops_vs_fwd_per_sample": spearman(flops, fitted),
        f"pearson_roofline_vs_fwd_b{sizes[-1]}": pearson(roofline, largest),
        f"spearman_roofline_vs_fwd_b{sizes[-1]}": spearman(roofline, largest),
        f"total_fwd_b{sizes[-1]}_measured_s": total_measured,
        f"total_fwd_b{sizes[-1]}_analytic_s": sum(roofline),
    }
    width = max(len(k) for k in results)
    for key, value in results.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
