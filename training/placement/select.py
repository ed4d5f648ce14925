"""Budgeted selection of points: cluster coverage, greedy by gain/cost, then 2-opt moves (step 5)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

MAX_MOVES = 10_000
"""Most improving 2-opt moves applied (each strictly raises the gain, so the loop ends anyway)."""


@dataclass(frozen=True)
class Selection:
    """Chosen items of a budgeted selection."""

    chosen: tuple[int, ...]
    """Indices of the chosen items, ascending."""
    cost: int
    """Total cost of the chosen items."""
    gain: float
    """Total gain of the chosen items."""


def _check(gains: Sequence[float], costs: Sequence[int], clusters: Sequence[int], budget: int) -> None:
    if not len(gains) == len(costs) == len(clusters):
        raise ValueError(f"gains, costs and clusters differ in length: {len(gains)}, {len(costs)}, {len(clusters)}")
    if any(not math.isfinite(g) for g in gains):
        raise ValueError("every gain must be finite")
    if any(isinstance(c, bool) or int(c) != c or c < 1 for c in costs):
        raise ValueError("every cost must be an integer >= 1")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")


def _make(chosen: set[int], gains: Sequence[float], costs: Sequence[int]) -> Selection:
    order = tuple(sorted(chosen))
    return Selection(order, sum(int(costs[i]) for i in order), float(sum(gains[i] for i in order)))


def greedy_select(gains: Sequence[float], costs: Sequence[int], clusters: Sequence[int], budget: int) -> Selection:
    """Cover clusters first, then add items by gain/cost while they fit.

    Coverage: clusters in order of their best gain/cost ratio; each gets its best-ratio item with gain > 0
    that still fits (a cluster none of whose items fits, or whose gains are all 0, stays uncovered). Then
    every item with gain > 0 in order of gain/cost (ties by index) is added when it fits.
    """
    _check(gains, costs, clusters, budget)
    ratio = [g / c for g, c in zip(gains, costs)]
    by_ratio = sorted(range(len(gains)), key=lambda i: (-ratio[i], i))
    chosen: set[int] = set()
    spent = 0
    covered: set[int] = set()
    for i in by_ratio:
        if gains[i] > 0 and clusters[i] not in covered and spent + costs[i] <= budget:
            chosen.add(i)
            covered.add(clusters[i])
            spent += costs[i]
    for i in by_ratio:
        if i not in chosen and gains[i] > 0 and spent + costs[i] <= budget:
            chosen.add(i)
            spent += costs[i]
    return _make(chosen, gains, costs)


def _best_move(chosen: list[int], gains: torch.Tensor, costs: torch.Tensor, clusters: torch.Tensor, slack: int):
    """(delta, removed or None, added indices) of the best add / swap-1-for-1 / swap-1-for-2 move."""
    n = gains.shape[0]
    free = torch.ones(n, dtype=torch.bool)  # [n]
    free[chosen] = False
    idx = free.nonzero().squeeze(1)  # [u]
    g, c, cl = gains[idx], costs[idx], clusters[idx]  # [u]
    pair_ok = torch.ones(len(idx), len(idx), dtype=torch.bool).triu(1)  # [u, u], i < j
    pair_g, pair_c = g[:, None] + g[None, :], c[:, None] + c[None, :]  # [u, u]
    best = (0.0, None, ())
    counts = torch.bincount(clusters[chosen], minlength=int(clusters.max()) + 1) if chosen else None
    if len(idx):
        fits = c <= slack
        if fits.any():
            j = int(torch.where(fits, g, -torch.inf).argmax())
            best = max(best, (float(g[j]), None, (int(idx[j]),)), key=lambda m: m[0])
    for o in chosen:
        room, need = slack + int(costs[o]), int(clusters[o]) if counts[clusters[o]] == 1 else None
        single, pair = c <= room, pair_ok & (pair_c <= room)
        if need is not None:
            single = single & (cl == need)
            pair = pair & ((cl[:, None] == need) | (cl[None, :] == need))
        if single.any():
            j = int(torch.where(single, g, -torch.inf).argmax())
            best = max(best, (float(g[j] - gains[o]), o, (int(idx[j]),)), key=lambda m: m[0])
        if pair.any():
            flat = int(torch.where(pair, pair_g, -torch.inf).flatten().argmax())
            i, j = divmod(flat, len(idx))
            best = max(best, (float(pair_g[i, j] - gains[o]), o, (int(idx[i]), int(idx[j]))), key=lambda m: m[0])
    return best


def two_opt(
    selection: Selection, gains: Sequence[float], costs: Sequence[int], clusters: Sequence[int], budget: int
) -> Selection:
    """Apply the best improving move (add one, swap one chosen for one or two unchosen) until none improves.

    Moves stay within the budget and never uncover a cluster; each raises the gain strictly, so the result
    never has less gain than `selection`. Ties go to the lowest indices, so the result is deterministic.
    """
    _check(gains, costs, clusters, budget)
    if selection.cost > budget:
        raise ValueError(f"the starting selection costs {selection.cost}, over the budget {budget}")
    gain_t = torch.tensor(gains, dtype=torch.float64)  # [n]
    cost_t = torch.tensor([int(c) for c in costs], dtype=torch.long)  # [n]
    cluster_t = torch.tensor(clusters, dtype=torch.long)  # [n]
    chosen, spent = set(selection.chosen), selection.cost
    for _ in range(MAX_MOVES):
        tolerance = 1e-12 * max(1.0, abs(sum(gains[i] for i in chosen)))
        delta, removed, added = _best_move(sorted(chosen), gain_t, cost_t, cluster_t, budget - spent)
        if delta <= tolerance:
            break
        if removed is not None:
            chosen.discard(removed)
            spent -= int(costs[removed])
        chosen.update(added)
        spent += sum(int(costs[a]) for a in added)
        logger.debug("2-opt: removed %s, added %s, gain +%.6g", removed, added, delta)
    return _make(chosen, gains, costs)


def select_points(gains: Sequence[float], costs: Sequence[int], clusters: Sequence[int], budget: int) -> Selection:
    """Greedy with cluster coverage, then 2-opt: the selection `search_placement` uses."""
    greedy = greedy_select(gains, costs, clusters, budget)
    improved = two_opt(greedy, gains, costs, clusters, budget)
    logger.info("selection: greedy gain %.6g -> 2-opt gain %.6g (cost %d of %d)",
                greedy.gain, improved.gain, improved.cost, budget)
    return improved


def random_select(costs: Sequence[int], budget: int, seed: int) -> Selection:
    """The control the search is measured against: items in a seeded random order, each taken while it fits
    the budget (no gains; Selection.gain is 0)."""
    _check([0.0] * len(costs), costs, [0] * len(costs), budget)
    order = torch.randperm(len(costs), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, spent = set(), 0
    for index in order:
        if spent + costs[index] <= budget:
            chosen.add(index)
            spent += costs[index]
    return _make(chosen, [0.0] * len(costs), costs)
