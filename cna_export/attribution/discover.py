"""Discovery: resolve a recipe (or the user's prompt files) with command-line overrides into a plan, run
attribution on an opened model (a backend: torch or llama.cpp), return the circuit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cna_export.attribution.select import attribute_on
from cna_export.circuit.companions import load_system_prompt
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import Recipe, Universal, load_prompts
from cna_export.circuit.selection import DEFAULT_FRACTION, Selection
from cna_export.errors import RecipeError

if TYPE_CHECKING:
    from cna_export.backends.base import Backend


def discover_on(backend: Backend, positive: Sequence[str], negative: Sequence[str], neutral: Sequence[str],
        selection: Selection, *, protect: Sequence[str] = (), **labels: Any) -> Circuit:  # fmt: skip
    """Run CNA on a backend and return the circuit (not yet saved); `labels` (behaviour, recipe, multiplier) are
    recorded in it. `protect`: prompts whose behaviour must not change (ranked against with
    `selection.protect_weight`).

    Example:
        >>> circuit = discover_on(open_model("./qwen"), harmful, benign, neutral, Selection(top_k=100))
    """
    k = selection.resolve_k(backend.shape)  # before the forward passes, so a bad k fails fast
    result = attribute_on(backend, positive, negative, neutral, selection, protect=protect)
    fraction = None if selection.top_k is not None else selection.fraction or DEFAULT_FRACTION
    return result.circuit(k, fraction=fraction, **labels)


NEUTRAL_DEFAULT: str = Universal.model_fields["prompts"].default  # the recipes' default, defined there


@dataclass(frozen=True)
class DiscoveryPlan:
    """Everything discovery needs besides the model: the selection and the prompt sets, resolved."""

    selection: Selection
    positive: list[str]
    negative: list[str]
    neutral: list[str]
    behaviour: str = "custom"
    multiplier: float = 0.0
    recipe: str | None = None
    protect: list[str] = field(default_factory=list)  # run only when the protect weight needs them


def plan_discovery(
    recipe: Recipe | None = None,
    base: Path | None = None,
    *,
    overrides: dict | None = None,
    positive: str | None = None,
    negative: str | None = None,
    neutral: str | None = None,
    behaviour: str | None = None,
    multiplier: float | None = None,
) -> DiscoveryPlan:
    """A recipe's discovery settings and prompts (or the given prompt files) with `overrides` applied.

    Args:
        recipe, base: the recipe and its folder (relative prompt paths); None uses the prompt files.
        overrides: selection fields to change (CLI flags; None values are ignored).
        positive, negative, neutral: prompt references used when there is no recipe.
        behaviour, multiplier: override the recipe's.
    """
    if recipe is None and (positive is None or negative is None):
        raise RecipeError("discover needs prompt sets.", "pass --recipe, or both --positive and --negative.")
    selection = (recipe.selection() if recipe else Selection()).override(**(overrides or {}))
    # A --system-prompt flag (text, builtin:NAME or a file) wins over the recipe's; either is stored as its text.
    if selection.system_prompt is not None:
        selection = selection.model_copy(update={"system_prompt": load_system_prompt(selection.system_prompt, None)})
    elif recipe is not None and recipe.system_prompt is not None:
        selection = selection.model_copy(update={"system_prompt": load_system_prompt(recipe.system_prompt, base)})
    protect: list[str] = []
    if selection.protect_weight:
        if recipe is None or recipe.protect is None:
            raise RecipeError("--protect-weight needs protect prompts.", "use a recipe with a `protect:` set.")
        protect = load_prompts(recipe.protect, base)
    if recipe is not None:
        pos, neg = load_prompts(recipe.positive, base), load_prompts(recipe.negative, base)
        neutral_ref = recipe.universal.prompts
    else:
        pos, neg, neutral_ref, base = load_prompts(positive), load_prompts(negative), neutral or NEUTRAL_DEFAULT, None
    needs_neutral = selection.universal or selection.specificity
    return DiscoveryPlan(
        selection,
        pos,
        neg,
        load_prompts(neutral_ref, base) if needs_neutral else [],
        behaviour or (recipe.behaviour if recipe else "custom"),
        multiplier if multiplier is not None else (recipe.multiplier if recipe else 0.0),
        recipe.name if recipe else None,
        protect,
    )


def discover_source(backend: Backend, plan: DiscoveryPlan) -> Circuit:
    """Run a discovery plan on an opened model (`cna_export.backends.open_backend`)."""
    return discover_on(backend, plan.positive, plan.negative, plan.neutral, plan.selection, behaviour=plan.behaviour,
                       recipe=plan.recipe, multiplier=plan.multiplier, protect=plan.protect)  # fmt: skip
