"""The tuner's objectives, Pareto front and choice, as pure functions of measured metrics; and the front's figure.

Three objectives, all on the validation split:

- behaviour change: how far the behaviour rate on the positive prompts moved towards the goal (rate points;
  maximized): original - edited when the recipe lowers the behaviour (m < 1), edited - original when it raises it;
- collateral: the larger of the protect set's absolute rate change (its behaviour must not change either way) and
  the rise of the behaviour on the negative prompts (benign refusals up, say) (minimized);
- KL: mean first-token KL(original || edited) on the negative prompts (minimized).

The chosen point: the largest behaviour change among the trials whose KL is at most the KL budget and whose
collateral is at most the collateral budget; ties go to the smaller collateral, then the smaller KL, then the
smaller k, then the earlier trial. By default the collateral budget is the half-width of the 95% Wilson interval
of the original's rate on each guarded set (the negative set, and the protect set when there is one), the smaller
of the two: a chosen edit moves those rates by no more than the sampling noise of the original's own rate on that
many prompts. A behaviour change of zero or less never qualifies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

OBJECTIVES = ("behaviour_change", "collateral", "kl")
DIRECTIONS = ("maximize", "minimize", "minimize")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate of `hits` in `n`.

    Example:
        >>> [round(x, 3) for x in wilson(5, 40)]
        [0.055, 0.261]
    """
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def objectives(metrics: dict, baseline: dict, goal: str) -> dict[str, float]:
    """The three objectives of one trial's validation metrics against the original's."""
    change = baseline["rate"] - metrics["rate"] if goal == "decrease" else metrics["rate"] - baseline["rate"]
    collateral = max(0.0, metrics["benign_rate"] - baseline["benign_rate"])
    if "protect_rate" in metrics:
        collateral = max(collateral, abs(metrics["protect_rate"] - baseline["protect_rate"]))
    return {"behaviour_change": change, "collateral": collateral, "kl": metrics["kl_first"]}


def auto_collateral_budget(baseline: dict) -> float:
    """How far a guarded set's rate may move: the smaller half-width of the original's 95% Wilson intervals on
    the negative set and the protect set."""
    sets = [(baseline["benign_hits"], baseline["n_negative"])]
    if "protect_rate" in baseline:
        sets.append((baseline["protect_hits"], baseline["n_protect"]))
    return min((high - low) / 2 for low, high in (wilson(h, n) for h, n in sets))


def dominates(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether `a` is at least as good as `b` on every objective and better on one."""
    ge = (a["behaviour_change"] >= b["behaviour_change"], a["collateral"] <= b["collateral"], a["kl"] <= b["kl"])
    gt = (a["behaviour_change"] > b["behaviour_change"], a["collateral"] < b["collateral"], a["kl"] < b["kl"])
    return all(ge) and any(gt)


def pareto_front(points: Sequence[dict[str, float]]) -> list[int]:
    """Indices of the points no other point dominates (a repeated point keeps its first copy only)."""
    front = []
    for i, p in enumerate(points):
        if any(dominates(q, p) for j, q in enumerate(points) if j != i):
            continue
        if any(points[j] == p for j in front):
            continue
        front.append(i)
    return front


def choose(
    points: Sequence[dict[str, float]], ks: Sequence[int], kl_budget: float, collateral_budget: float
) -> int | None:
    """Index of the chosen point by the rule of the module docstring, or None when none qualifies."""
    ok = [
        i
        for i, p in enumerate(points)
        if p["behaviour_change"] > 0 and p["kl"] <= kl_budget and p["collateral"] <= collateral_budget
    ]
    if not ok:
        return None
    return min(ok, key=lambda i: (-points[i]["behaviour_change"], points[i]["collateral"], points[i]["kl"], ks[i], i))


def rule_text(kl_budget: float, collateral_budget: float) -> str:
    return (
        f"largest behaviour change with first-token KL <= {kl_budget:g} and collateral <= "
        f"{collateral_budget:.3f}; ties: smaller collateral, smaller KL, smaller k"
    )


def plot_front(
    trials: Sequence[dict], front: Sequence[int], chosen: int | None, kl_budget: float, path: Path, title: str
) -> None:
    """Behaviour change against KL for every trial (colour: collateral), the Pareto front's trials ringed (the
    front is over three objectives, so it need not be monotone in this plane), the KL budget dashed, the chosen point
    starred."""
    from cna_export.evaluate.plots import _figure, save_png

    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kl = [t["objectives"]["kl"] for t in trials]
    change = [100 * t["objectives"]["behaviour_change"] for t in trials]
    colour = [100 * t["objectives"]["collateral"] for t in trials]
    dots = ax.scatter(
        kl,
        change,
        c=colour,
        cmap="viridis",
        vmin=0,
        vmax=max(1.0, max(colour, default=0)),
        s=28,
        alpha=0.85,
        label="trials",
    )
    fig.colorbar(dots, ax=ax, label="collateral (rate points)")
    if front:
        ax.scatter(
            [kl[i] for i in front],
            [change[i] for i in front],
            s=90,
            facecolors="none",
            edgecolors="black",
            label="Pareto front",
        )
    if chosen is not None:
        ax.scatter(
            [kl[chosen]],
            [change[chosen]],
            marker="*",
            s=260,
            color="red",
            edgecolor="black",
            zorder=5,
            label=f"chosen (trial {trials[chosen]['number']})",
        )
    ax.axvline(kl_budget, color="grey", ls="--", lw=1, label=f"KL budget {kl_budget:g}")
    ax.set_xlabel("first-token KL on benign prompts (validation)")
    ax.set_ylabel("behaviour change towards the goal (rate points)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    save_png(fig, path)
