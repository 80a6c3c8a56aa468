"""The search: a seeded multi-objective Optuna study over the tuner's space, each trial a selection cut from one
attribution (no forward pass) and measured on the validation split.

The first trial is the recipe's own point (its k, m and selection knobs, clipped into the space), so the choice
is never behind the recipe as shipped when that point is admissible. Then Optuna's TPE sampler in its
multi-objective form (seeded; its first trials are random, then it models the good and the bad trials) proposes
points; the KL and collateral budgets go in as constraints, so the sampler learns
where the admissible region lies. Two trials that land on the same edit (same k, m, window, knobs) are measured
once. A trial whose selection is impossible (more neurons than the exclusions leave) is recorded as skipped.
The budget is a number of trials and, optionally, a time: no trial starts after the time is up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from cna_export.attribution.select import Attribution
from cna_export.circuit.format import Circuit
from cna_export.circuit.selection import Selection
from cna_export.errors import RecipeError
from cna_export.tune.front import DIRECTIONS, OBJECTIVES, objectives
from cna_export.tune.space import Point, SearchSpace, suggest
from cna_export.tune.trials import Evaluator

log = logging.getLogger(__name__)


@dataclass
class Budget:
    """How long to search, what is admissible, and the seed."""

    trials: int
    timeout: float | None = None  # seconds; no trial starts after it
    seed: int = 0
    kl_budget: float = 0.1
    collateral_budget: float | None = None  # None: the original's 95% interval (front.auto_collateral_budget)
    limit: int | None = None  # the first N prompts of each validation and test set only (a quick look on a CPU)


@dataclass(frozen=True)
class Aim:
    """What a study aims at besides its space and budget: the goal (lower or raise the behaviour, `front.objectives`),
    the multiplier range, the labels every trial's circuit records, and whether the protect weight is searched."""

    goal: str
    m_range: tuple[float, float]
    labels: dict
    has_protect: bool
    start: dict | None = None  # a trial's parameters measured first (`space.recipe_params`: the recipe's own point)


@dataclass
class SearchResult:
    """Every trial (params, k, objectives, metrics), the per-prompt records of the measured ones, the circuits."""

    trials: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    circuits: dict[int, Circuit] = field(default_factory=dict)  # trial number -> circuit (at its multiplier)
    stopped_by: str = "trials"
    seconds: float = 0.0


def cut(attribution: Attribution, point: Point, base: Selection, **labels) -> Circuit:
    """The circuit of a point: the attribution's sums reselected with the point's knobs, cut at its k."""
    return attribution.reselect(point.selection(base)).circuit(
        point.k, fraction=point.fraction, multiplier=point.multiplier, **labels
    )


def search(
    attribution: Attribution, evaluator: Evaluator, base: Selection, space: SearchSpace, budget: Budget, aim: Aim
) -> SearchResult:
    """Run the study; returns every trial in order (see the module docstring)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shape = attribution.model_id.shape()
    result, measured = SearchResult(), {}
    sampler = optuna.samplers.TPESampler(
        seed=budget.seed, multivariate=True, n_startup_trials=min(10, max(2, budget.trials // 3))
    )
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=sampler)
    if aim.start is not None:
        study.enqueue_trial(aim.start)
    start = time.monotonic()

    def objective(trial) -> tuple[float, ...]:
        point = suggest(trial, space, shape, aim.m_range, base, aim.has_protect)
        row = {"number": trial.number, "params": dict(trial.params), **_point_fields(point)}
        if point.key() not in measured:
            try:
                circuit = cut(attribution, point, base, **aim.labels)
            except RecipeError as exc:  # e.g. the sign filter and the window leave fewer than k neurons
                result.trials.append({**row, "skipped": str(exc)})
                trial.set_constraint("kl", 1.0)  # a skipped trial counts as inadmissible
                trial.set_constraint("collateral", 1.0)
                raise optuna.TrialPruned(str(exc)) from None
            metrics, records = evaluator.measure(circuit, point.multiplier, f"trial {trial.number}")
            measured[point.key()] = (trial.number, metrics)
            result.records += records
            result.circuits[trial.number] = circuit
        first, metrics = measured[point.key()]
        obj = objectives(metrics, evaluator.metrics, aim.goal)
        # The budgets as constraints (feasible at <= 0): the sampler learns where admissible points lie.
        trial.set_constraint("kl", obj["kl"] - budget.kl_budget)
        trial.set_constraint("collateral", obj["collateral"] - budget.collateral_budget)
        result.trials.append(
            {**row, "same_as": first if first != trial.number else None, "objectives": obj, "metrics": _brief(metrics)}
        )
        return tuple(obj[name] for name in OBJECTIVES)

    # Each trial would repeat select's "only n neurons keep contrast" warning; the trials record their knobs.
    quiet = logging.getLogger("cna_export.attribution.select")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tqdm(total=budget.trials, desc="tune", unit="trial") as bar:
            study.optimize(
                objective,
                n_trials=budget.trials,
                timeout=budget.timeout,
                callbacks=[_progress(bar, start, budget.timeout)],
            )
    finally:
        quiet.setLevel(level)
    result.seconds = time.monotonic() - start
    if len(study.trials) < budget.trials:
        result.stopped_by = "timeout"
    return result


def _progress(bar, start: float, timeout: float | None) -> Callable:
    def update(study, trial) -> None:
        bar.update(1)
        done = len(study.trials)
        per = (time.monotonic() - start) / max(1, done)
        left = per * (bar.total - done)
        if timeout is not None:
            left = min(left, max(0.0, timeout - (time.monotonic() - start)))
        bar.set_postfix_str(f"{per:.0f} s/trial, about {left / 60:.1f} min left")

    return update


def _point_fields(point: Point) -> dict:
    return asdict(point)


_KEPT = (
    "rate",
    "positive_hits",
    "n_positive",
    "benign_rate",
    "benign_hits",
    "n_negative",
    "benign_refusal_rate",
    "protect_rate",
    "protect_hits",
    "n_protect",
    "kl_first",
    "kl_mean",
    "ppl_ratio",
    "repetition",
    "measure_mean",
    "benign_measure_mean",
    "protect_measure_mean",
)


def _brief(metrics: dict) -> dict:
    return {k: metrics[k] for k in _KEPT if k in metrics}
