"""The suffix-pipeline summary of the Asteroid DP: five numbers, the prepend rule and dominance.

[Note: why a Pareto front]
The round latency is not a max of per-stage terms (the dominant stage's ``M X``, the
warm-up/cool-down sums and the drain term couple all stages), so a plain min-max DP is
not exact. The DP runs from the last stage to the first and describes a suffix pipeline
``P`` (stages ``k..S-1``, costed as a pipeline of its own) by five numbers:

* ``R``    its own round latency,
* ``Xm``   the largest ``X_s = E_f^s + E_b^s`` (the dominant stage ``d``, last argmax),
* ``Pre``  ``sum_{i=k}^{d-1} X_i + D(P)``, where ``D(P)`` is the drain term of
  ``solver.evaluate`` ([Note: the drain correction]); it depends only on ``d`` and the
  stages after it, so it stays fixed while ``d`` stays dominant,
* ``G``    ``max_{s in P} (T_a^s - sum_{i=k}^{s-1} E_b^i)``,
* ``SumX`` ``sum_{s in P} X_s``,

and by its stage count ``N`` (known from the DP cell, see [Note: DP cells] in ``solver.dp``).

Prepending a stage ``n`` (``F = E_f^n``, ``B = E_b^n``, ``X = F + B``, ``A = T_a^n``):

* ``Xm >= X`` (the dominant stays in ``P``; ties go to the later stage):
  ``R' = max(F + R, M Xm + X + Pre + A)``, ``Xm' = Xm``, ``Pre' = X + Pre``;
* ``Xm < X`` (``n`` becomes dominant, its tail is all of ``P``):
  ``D' = max(0, SumX - (min(M, N + 1) - 1) min(F, B))``,
  ``R' = M X + max(A + D', G - B)``, ``Xm' = X``, ``Pre' = D'``;
* in both cases ``G' = max(A, G - B)`` and ``SumX' = X + SumX``.

(Derivation: with ``d`` dominant, ``round = W_d + M X_d + max(D + max_{s<=d}(sum_{i=s}^{d-1}
B_i + A_s), max_{s>d}(A_s - sum_{i=d}^{s-1} B_i))`` where ``W_d = sum_{i<d} F_i``;
prepending adds ``F`` to every warm-up and one more ``s < d`` term.) ``R'`` is
non-decreasing in ``R, Xm, Pre, G, SumX`` except where ``Xm`` crosses ``X``: a summary
``lo`` with ``Xm_lo < X <= Xm_hi`` makes ``n`` dominant and pays ``D' <= SumX_lo``, while
``hi`` keeps its own dominant and pays ``X + Pre_hi``. Every pipeline satisfies ``R >= M
Xm + G``, so the ``G`` part of the jump is harmless. For ``D'``: every stage of the cost
table has ``min(E_f, E_b) >= rho X`` (``hiding_ratio``: the fitted forward/backward time
ratios of the layers bound it; re-sharding time adds equally to both), so with
``h = 1 + (min(M, N + 1) - 1) rho``, ``D' <= SumX_lo - (h - 1) X``, which is at most
``X + Pre_hi`` when ``SumX_lo - Pre_hi <= h Xm_lo``; more stages only hide more. So
``lo`` *dominates* ``hi`` when it is ``<=`` in all five numbers, has at least as many
stages (within a DP cell ``min(M, N + 1)`` is the same for all), and either ``Xm_lo ==
Xm_hi`` or ``SumX_lo - Pre_hi <= h Xm_lo``. Prepending the same stage preserves this
relation (case by case: both keep their dominant and ``SumX_lo - Pre_hi`` is unchanged;
only ``lo``'s changes, to a larger ``Xm``; both change, to equal ``Xm``), so keeping the
non-dominated summaries per DP cell is exact.
"""

from __future__ import annotations

import math
from typing import Any

from contracts.cluster import Cluster
from contracts.table import CostTable, TimeFit
from solver.evaluate import drain_term

__all__ = ["PipelineSummary", "Summary", "prepend", "dominates", "hiding_ratio"]

# A summary as the DP stores it: (R, Xm, Pre, G, SumX, stage, tail); stage = (first, last,
# group, shares) and tail the summary of the stages after it (None for the last stage).
Summary = tuple[float, float, float, float, float, tuple[int, int, int, tuple[int, ...]], Any]


class PipelineSummary(tuple[float, float, float, float]):
    """``(R, Xm, Pre, G)`` of a suffix pipeline (see [Note: why a Pareto front]), with
    ``sum_x`` (``SumX``) and ``stages`` (``N``) as attributes, so that code written for
    the four numbers keeps working."""

    sum_x: float
    stages: int

    def __new__(cls, r: float, xm: float, pre: float, g: float, sum_x: float,
                stages: int) -> PipelineSummary:
        self = super().__new__(cls, (r, xm, pre, g))
        self.sum_x = sum_x
        self.stages = stages
        return self

    def __repr__(self) -> str:
        return (f"PipelineSummary({tuple(self)!r}, sum_x={self.sum_x!r}, "
                f"stages={self.stages!r})")



def prepend(m: int, f: float, b: float, a: float,
            tail: tuple[float, float, float, float] | None) -> PipelineSummary:
    """The summary of a pipeline after prepending a stage with ``E_f = f``, ``E_b = b``,
    ``T_a = a`` to ``tail`` (None: the stage alone); see [Note: why a Pareto front].

    ``tail`` must be a ``PipelineSummary`` returned by ``prepend`` (typed as the four
    numbers so that callers can keep their own summary aliases).
    """
    x = f + b
    if tail is None:
        return PipelineSummary(m * x + a, x, 0.0, a, x, 1)
    if not isinstance(tail, PipelineSummary):
        raise TypeError(f"prepend needs the PipelineSummary of the tail (from prepend), got "
                        f"the plain tuple {tail!r}, which lacks SumX and the stage count")
    r_t, xm_t, pre_t, g_t = tail
    g = max(a, g_t - b)
    sum_x = x + tail.sum_x
    if xm_t >= x:
        return PipelineSummary(max(f + r_t, m * xm_t + x + pre_t + a), xm_t, x + pre_t, g,
                               sum_x, tail.stages + 1)
    drain = drain_term(f, b, tail.sum_x, tail.stages, m)
    return PipelineSummary(m * x + max(a + drain, g_t - b), x, drain, g, sum_x,
                           tail.stages + 1)


def dominates(lo: PipelineSummary, hi: PipelineSummary, m: int, rho: float = 0.0) -> bool:
    """True when ``lo`` is never worse than ``hi`` after prepending any stages whose
    ``min(E_f, E_b) >= rho (E_f + E_b)``, with ``m`` micro-batches (the Pareto rule)."""
    h = 1.0 + (min(m, lo.stages + 1) - 1) * rho
    return (lo[0] <= hi[0] and lo[1] <= hi[1] and lo[2] <= hi[2] and lo[3] <= hi[3]
            and lo.sum_x <= hi.sum_x and lo.stages >= hi.stages
            and (lo[1] == hi[1] or lo.sum_x - hi[2] <= h * lo[1]))


def hiding_ratio(costs: CostTable, cluster: Cluster | None = None) -> float:
    """A ``rho`` with ``min(E_f, E_b) >= rho (E_f + E_b)`` for every stage of any plan.

    Each device's forward / backward time ratio lies between the smallest and the
    largest ratio of the layers' fitted intercepts and slopes (a ratio of sums lies
    between the ratios of the terms), and so does ``compute_f / compute_b`` (the device
    with the largest backward has a forward of at least the smallest ratio times it);
    re-sharding time adds the same to both, which moves the share of the smaller one
    towards 1/2. With ``cluster``, the layers of every time source its devices use
    count (the base times and the columns of their types, [Note: cost columns]).
    """
    fits: list[tuple[TimeFit, TimeFit]] = []
    if cluster is None:
        fits = [(lc.fwd, lc.bwd) for lc in costs.layers]
    else:
        base_used = False
        seen: set[str] = set()
        for device in cluster.devices:
            col = costs.column(device.type)
            if col is None:
                base_used = True
            elif device.type not in seen:
                seen.add(device.type)
                fits.extend(zip(col.fwd, col.bwd, strict=True))
        if base_used:
            fits = [(lc.fwd, lc.bwd) for lc in costs.layers] + fits
    low, high = math.inf, 0.0
    for fwd, bwd in fits:
        for f, b in ((fwd.intercept_s, bwd.intercept_s),
                     (fwd.per_sample_s, bwd.per_sample_s)):
            if f == 0.0 and b == 0.0:
                continue
            ratio = f / b if b > 0.0 else math.inf
            low, high = min(low, ratio), max(high, ratio)
    if low == math.inf:  # no time anywhere
        return 0.0
    from_low = low / (1.0 + low)
    from_high = 0.0 if high == math.inf else 1.0 / (1.0 + high)
    # a hair below the bound: the DP's float sums may round the other way
    return max(0.0, min(from_low, from_high, 0.5) * (1.0 - 1e-9))
