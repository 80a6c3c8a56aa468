"""What the tuner searches: k (as a fraction of all MLP neurons), the multiplier m, the layer window (layers skipped
at the start and at the end), a per-layer budget, specificity, the protect weight and the sign filter; and how one
point of that space
becomes a selection on top of the recipe's own knobs. Pure: no model, no Optuna objects beyond `suggest`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import Field, model_validator

from cna_export.arch import ModelShape
from cna_export.circuit.selection import DEFAULT_FRACTION, Selection, Strict
from cna_export.errors import RecipeError


class SearchSpace(Strict):
    """The ranges a tune searches (the CLI's --k-range and --m-range set the first two)."""

    fraction: tuple[float, float] = Field(
        default=(0.0002, 0.01), description="k as a share of all MLP neurons, searched on a log scale."
    )
    multiplier: tuple[float, float] | None = Field(
        default=None,
        description="m; default (0, 0.9) when the recipe lowers the behaviour (m < 1), (1.25, 4) when "
        "it raises it (m > 1).",
    )
    max_skip_first: int | None = Field(default=None, ge=0, description="Default: a third of the layers.")
    max_skip_last: int | None = Field(default=None, ge=0, description="Default: a quarter of the layers.")
    max_specificity: float = Field(default=2.0, ge=0, allow_inf_nan=False, description="0 turns the knob off.")
    max_protect_weight: float = Field(
        default=2.0, ge=0, allow_inf_nan=False, description="0, or a recipe without a protect set, turns it off."
    )
    sign_filter: bool = Field(default=True, description="Search the sign filter on and off (else the recipe's).")
    min_layer_share: float = Field(
        default=0.1,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="The per-layer budget is searched from this share of k to 1 (no budget); 1 turns it off.",
    )

    @model_validator(mode="after")
    def _ranges(self) -> SearchSpace:
        low, high = self.fraction
        if not 0 < low <= high <= 1:
            raise ValueError("the k range must be fractions with 0 < low <= high <= 1")
        if self.multiplier is not None and not (
            math.isfinite(self.multiplier[0])
            and math.isfinite(self.multiplier[1])
            and self.multiplier[0] <= self.multiplier[1]
        ):
            raise ValueError("the m range must be finite with low <= high")
        return self

    def multipliers(self, recipe_multiplier: float, allow_negative: bool) -> tuple[float, float]:
        """The m range for a recipe: its direction (lower or raise the behaviour) decides the default."""
        if recipe_multiplier == 1:
            raise RecipeError(
                "The recipe's multiplier is 1, which keeps the model as it is: nothing to tune.",
                "set multiplier below 1 (weaken the behaviour) or above 1 (strengthen it).",
            )
        low, high = self.multiplier or ((0.0, 0.9) if recipe_multiplier < 1 else (1.25, 4.0))
        if (low < 1) != (recipe_multiplier < 1) or (high < 1) != (recipe_multiplier < 1) or low == 1 or high == 1:
            raise RecipeError(
                f"The m range {low:g}..{high:g} crosses 1, but the recipe's multiplier "
                f"{recipe_multiplier:g} {'lowers' if recipe_multiplier < 1 else 'raises'} the behaviour.",
                "give an m range on the recipe's side of 1.",
            )
        if low < 0 and not allow_negative:
            raise RecipeError(
                f"The m range starts at {low:g}, a negative multiplier.",
                "set allow_negative: true in the recipe, or start the range at 0.",
            )
        return low, high


@dataclass(frozen=True)
class Point:
    """One setting the tuner tries."""

    fraction: float
    k: int
    multiplier: float
    skip_first_layers: int
    skip_last_layers: int
    specificity: float
    protect_weight: float
    sign_filter: bool
    max_layer_share: float | None = None

    def selection(self, base: Selection) -> Selection:
        """The recipe's selection with this point's knobs (k as a count; the fraction is recorded beside it)."""
        knobs = {k: v for k, v in asdict(self).items() if k not in ("fraction", "k", "multiplier")}
        return base.model_copy(update={**knobs, "top_k": self.k, "fraction": None})

    def key(self) -> tuple:
        """What decides the edit: two points with the same key give the same circuit and the same measurements."""
        share = None if self.max_layer_share is None else max(1, math.ceil(self.max_layer_share * self.k))
        return (
            self.k,
            round(self.multiplier, 6),
            self.skip_first_layers,
            self.skip_last_layers,
            round(self.specificity, 6),
            round(self.protect_weight, 6),
            self.sign_filter,
            share,
        )


def suggest(
    trial: Any, space: SearchSpace, shape: ModelShape, m_range: tuple[float, float], base: Selection, has_protect: bool
) -> Point:
    """One point from an Optuna trial (`trial.suggest_*`): the names are stable, so a seeded study is reproducible.

    Knobs whose range is empty keep the recipe's value: specificity at max 0, the protect weight without a protect
    set, the sign filter when `space.sign_filter` is off."""
    n = shape.num_layers
    first_max, last_max = _skip_max(space, n)
    fraction = trial.suggest_float("fraction", *space.fraction, log=True)
    multiplier = trial.suggest_float("multiplier", *m_range)
    skip_first = trial.suggest_int("skip_first_layers", 0, first_max)
    # A fixed range (a sampler models fixed ranges best), capped so that at least one layer stays selectable.
    skip_last = min(trial.suggest_int("skip_last_layers", 0, last_max), n - 1 - skip_first)
    specificity = trial.suggest_float("specificity", 0.0, space.max_specificity) if space.max_specificity else 0.0
    protect = (
        trial.suggest_float("protect_weight", 0.0, space.max_protect_weight)
        if has_protect and space.max_protect_weight
        else 0.0
    )
    sign = trial.suggest_categorical("sign_filter", [False, True]) if space.sign_filter else base.sign_filter
    share = (
        trial.suggest_float("max_layer_share", space.min_layer_share, 1.0)
        if space.min_layer_share < 1
        else base.max_layer_share
    )
    k = min(shape.num_neurons, max(1, round(fraction * shape.num_neurons)))
    return Point(fraction, k, multiplier, skip_first, skip_last, specificity, protect, bool(sign), share)


def _skip_max(space: SearchSpace, num_layers: int) -> tuple[int, int]:
    """The most layers that may be skipped at the start and at the end (defaults: a third, a quarter)."""
    first = space.max_skip_first if space.max_skip_first is not None else num_layers // 3
    last = space.max_skip_last if space.max_skip_last is not None else num_layers // 4
    return min(first, num_layers - 1), min(last, num_layers - 1)


def recipe_params(
    space: SearchSpace, shape: ModelShape, m_range: tuple[float, float], base: Selection, multiplier: float,
    has_protect: bool,
) -> dict[str, Any]:  # fmt: skip
    """The recipe's own settings as the parameters of a trial (`suggest`'s names), each clipped into the space. The
    tuner measures them first, so its choice on validation is never behind the recipe as shipped when that point
    is admissible.

    Example:
        >>> recipe_params(SearchSpace(), shape, (0.0, 0.9), Selection(fraction=0.002, skip_first_layers=2), 0.0, False)
        {'fraction': 0.002, 'multiplier': 0.0, 'skip_first_layers': 2, ...}
    """

    def clip(x: float, low: float, high: float) -> float:
        return min(max(x, low), high)

    first_max, last_max = _skip_max(space, shape.num_layers)
    share = base.top_k / shape.num_neurons if base.top_k is not None else base.fraction or DEFAULT_FRACTION
    params: dict[str, Any] = {
        "fraction": clip(share, *space.fraction),
        "multiplier": clip(multiplier, *m_range),
        "skip_first_layers": min(base.skip_first_layers, first_max),
        "skip_last_layers": min(base.skip_last_layers, last_max),
    }
    if space.max_specificity:
        params["specificity"] = min(base.specificity, space.max_specificity)
    if has_protect and space.max_protect_weight:
        params["protect_weight"] = min(base.protect_weight, space.max_protect_weight)
    if space.sign_filter:
        params["sign_filter"] = base.sign_filter
    if space.min_layer_share < 1:
        params["max_layer_share"] = clip(base.max_layer_share or 1.0, space.min_layer_share, 1.0)
    return params
