"""Choosing a sweep's point: the Pareto front over the behaviour rate and first-token KL, and the rule that picks
one point within the KL (and benign-rate) budget. Pure: dicts of metrics in, indices out."""

from __future__ import annotations

from collections.abc import Sequence


def _badness(point: dict, goal: str) -> float:
    return point["rate"] if goal == "decrease" else -point["rate"]


def pareto(points: Sequence[dict], goal: str) -> list[int]:
    """Indices of points no other point beats on both the behaviour rate (towards `goal`) and first-token KL."""
    front = []
    for i, p in enumerate(points):
        a = (_badness(p, goal), p["kl_first"])
        dominated = any(
            (b := (_badness(q, goal), q["kl_first"]))[0] <= a[0] and b[1] <= a[1] and b != a
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def pick(
    points: Sequence[dict], baseline: dict, goal: str, kl_budget: float | None, benign_budget: float | None = None
) -> int | None:
    """The point with the best behaviour rate whose first-token KL (and benign rate) are within budget.

    Only points that move the rate in the goal's direction count; ties go to the lower KL, then the smaller k.
    Returns None when no point qualifies.
    """
    ok = [
        i
        for i, p in enumerate(points)
        if _badness(p, goal) < _badness(baseline, goal)
        and (kl_budget is None or p["kl_first"] <= kl_budget)
        and (benign_budget is None or p["benign_rate"] <= benign_budget)
    ]
    if not ok:
        return None
    return min(ok, key=lambda i: (_badness(points[i], goal), points[i]["kl_first"], points[i]["k"] or 0))
