"""Pareto fronts of pipeline summaries: a plain scan and its numpy twin (the same result).

A summary ``k`` dominates ``s`` (``solver.summary.dominates``, in DP form) when it is
``<=`` in ``Xm``, ``Pre``, ``G`` and ``SumX`` and either has the same ``Xm`` or ``SumX_k -
Pre_s <= h Xm_k``; summaries come sorted by ``(R, Xm, Pre, G, SumX)``, so a summary can
only be dominated by an earlier one. Both kernels keep the first ``cap`` survivors.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import numpy as np

from solver.summary import Summary

__all__ = ["pareto", "pareto_np", "scan", "SUMMARY_KEY"]

SUMMARY_KEY = itemgetter(0, 1, 2, 3, 4)

_BLOCK = 64
"""Rows per block of ``pareto_np``."""


def _dominated(k_xm: Any, k_pre: Any, k_g: Any, k_sx: Any, xm: Any, pre: Any, g: Any,
               sx: Any, h: float) -> Any:
    """Entry ``[p, q]``: does row ``p`` of the first four arrays dominate row ``q`` of the
    last four (the rule of ``pareto``, ``R`` order assumed)?"""
    return ((k_xm[:, None] <= xm[None, :]) & (k_pre[:, None] <= pre[None, :])
            & (k_g[:, None] <= g[None, :]) & (k_sx[:, None] <= sx[None, :])
            & ((k_xm[:, None] == xm[None, :])
               | (k_sx[:, None] - pre[None, :] <= h * k_xm[:, None])))


def pareto_np(table: Any, cap: int | None, h: float) -> list[int]:
    """``pareto`` on rows ``(R, Xm, Pre, G, SumX)`` already in sorted order: the indices
    of the rows kept.

    The dominance relation of ``pareto`` is transitive (for a fixed ``h``), so a row is
    dominated by an earlier kept row exactly when it is dominated by any earlier row.
    Blocks of the rows still undecided are taken in order: each row of a block is
    checked against the earlier rows of the block, and the rows of the block that
    survive are kept and drop every later row they dominate at once (most rows of a
    cell are dominated by its first few summaries, so later blocks are short or none)."""
    xm_a, pre_a, g_a, sx_a = table[:, 1], table[:, 2], table[:, 3], table[:, 4]
    rest = np.arange(len(table))
    kept: list[int] = []
    while len(rest):
        blk, rest = rest[:_BLOCK], rest[_BLOCK:]
        xm, pre, g, sx = xm_a[blk], pre_a[blk], g_a[blk], sx_a[blk]
        new = np.flatnonzero(
            ~np.triu(_dominated(xm, pre, g, sx, xm, pre, g, sx, h), 1).any(axis=0))
        if not len(new):
            continue
        kept.extend(blk[new].tolist())
        if cap is not None and len(kept) >= cap:
            return kept[:cap]
        if len(rest):
            # a later row that any earlier row dominates, a kept one does: drop it now
            hit = _dominated(xm[new], pre[new], g[new], sx[new], xm_a[rest], pre_a[rest],
                             g_a[rest], sx_a[rest], h).any(axis=0)
            rest = rest[~hit]
    return kept


def pareto(items: list[Summary], cap: int | None, h: float,
            ghosts: list[Summary] | None = None) -> list[Summary]:
    """The summaries no other one dominates (``h``: see [Note: why a Pareto front]), in
    sorted order, at most ``cap`` of them.

    ``ghosts`` (``R = inf``, optional) sort after all of ``items`` (finite ``R``); they
    are only sorted and scanned when ``items`` leave room under the cap."""
    items.sort(key=SUMMARY_KEY)
    kept = scan(items, [], cap, h)
    if ghosts and (cap is None or len(kept) < cap):
        ghosts.sort(key=SUMMARY_KEY)
        kept = scan(ghosts, kept, cap, h)
    return kept


def scan(items: list[Summary], kept: list[Summary], cap: int | None,
         h: float) -> list[Summary]:
    """``pareto``'s scan of sorted ``items`` after the summaries ``kept`` so far."""
    if cap is not None and len(kept) >= cap:
        return kept
    for s in items:
        xm, pre, g, sx = s[1], s[2], s[3], s[4]
        dominated = False
        for k in kept:  # a plain loop: this scan is the DP's hot spot
            kx = k[1]
            if (kx <= xm and k[2] <= pre and k[3] <= g and k[4] <= sx
                    and (kx == xm or k[4] - pre <= h * kx)):
                dominated = True
                break
        if dominated:
            continue
        kept.append(s)
        if cap is not None and len(kept) >= cap:
            break
    return kept

