"""The selection knobs of attribution, defined once: recipes set them, CLI flags override them (the flags are made
from these fields), attribution reads them, and the circuit records them.

Circuit, recipe and config files are untrusted input, so every model here is strict: no bool where a number is
expected, no string where a number is expected, no unknown keys.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cna_export.arch import ModelShape
from cna_export.errors import RecipeError

DEFAULT_FRACTION = 0.001  # the paper's 0.1% of all MLP neurons, when neither top_k nor fraction is given


class Strict(BaseModel):
    """Base of every file schema: unknown keys and type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Knobs(Strict):
    """The knobs a recipe sets directly (the universal-neuron ones sit in the recipe's `universal` block)."""

    top_k: int | None = Field(default=None, ge=1, description="Neurons to select (count).")
    fraction: float | None = Field(default=None, gt=0, le=1, description="Neurons to select (share of all).")
    skip_first_layers: int = Field(default=0, ge=0, description="Never select neurons in layers 0..n-1.")
    skip_last_layers: int = Field(
        default=0, ge=0, description="Never select neurons in the last n layers (not in the paper; see the recipes)."
    )
    specificity: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Rank by max(0, |delta| - S x mean |activation| on neutral prompts): prefers neurons quiet on "
        "ordinary text (not in the paper; 0 ranks by |delta|).",
    )
    protect_weight: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Rank by |delta| - W x |delta on the protect set| (protect mean - negative mean): neurons that "
        "also separate the protect prompts from the negative ones rank lower (0 ignores the protect set).",
    )
    sign_filter: bool = Field(
        default=False,
        description="Keep only neurons whose mean activation on the positive prompts has the sign of their delta, "
        "so scaling them moves those prompts along the contrast (for amplification, m > 1).",
    )
    max_layer_share: float | None = Field(
        default=None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Per-layer budget: no layer gets more than this share of the k neurons (rounded up); the next "
        "ranked neurons of other layers fill the rest (none: no budget).",
    )
    batch_size: int = Field(default=16, ge=1, description="Prompts per forward pass.")
    chat_template: bool = Field(default=True, description="Apply the tokenizer's chat template if it has one.")

    @model_validator(mode="after")
    def _one_size(self) -> Knobs:
        if self.top_k is not None and self.fraction is not None:
            raise ValueError("give top_k or fraction, not both")
        return self


class Selection(Knobs):
    """Everything that decides which neurons are selected."""

    universal: bool = Field(default=True, description="Exclude neurons that fire strongly on almost any prompt.")
    universal_top_n: int | None = Field(
        default=None, ge=1, description="Per-layer top-|activation| size on neutral prompts (default 1% of width)."
    )
    universal_threshold: float = Field(
        default=0.8, gt=0, le=1, description="Share of neutral prompts that makes a neuron universal."
    )
    system_prompt: str | None = Field(
        default=None, min_length=1, description="System message put before every prompt in the chat template."
    )

    def layer_window(self, shape: ModelShape) -> range:
        """The layers neurons may be selected in: all but the first `skip_first_layers` and the last
        `skip_last_layers`. A window that leaves no layer is one line (never quietly narrowed: a recipe made for a
        deep model says so on a shallow one rather than selecting where it was told not to)."""
        first, last = self.skip_first_layers, shape.num_layers - self.skip_last_layers
        if first >= last:
            raise RecipeError(
                f"Skipping the first {first} and the last {self.skip_last_layers} layers leaves none of this model's "
                f"{shape.num_layers} to select neurons in.",
                f"skip at most {shape.num_layers - 1} layers in all (--skip-first-layers, --skip-last-layers, or the "
                "recipe's skip_first_layers, skip_last_layers).",
            )
        return range(first, last)

    def resolve_k(self, shape: ModelShape) -> int:
        """The number of neurons to select in a model of `shape` (a fraction is of all its MLP neurons); the
        layer window must hold that many."""
        k = (
            self.top_k
            if self.top_k is not None
            else max(1, round((self.fraction or DEFAULT_FRACTION) * shape.num_neurons))
        )
        if k > shape.num_neurons:
            raise RecipeError(
                f"k={k} neurons is outside 1..{shape.num_neurons} (all MLP neurons of this model).",
                "lower --top-k or --fraction.",
            )
        window = self.layer_window(shape)
        room = shape.neurons_in(window)
        if k > room:
            raise RecipeError(
                f"k={k} neurons do not fit layers {window.start}..{window.stop - 1}, which hold {room} (the others "
                "are skipped).",
                "lower --top-k or --fraction, or skip fewer layers.",
            )
        return k

    def override(self, **values: Any) -> Selection:
        """A copy with the given (non-None) values, as CLI flags set them: a count clears a fraction and vice versa.
        A value outside its field's range is a one-line error naming the flag."""
        given = {k: v for k, v in values.items() if v is not None}
        data = self.model_dump()
        if "top_k" in given:
            data["fraction"] = None
        if "fraction" in given:
            data["top_k"] = None
        for key, value in given.items():
            try:
                type(self).model_validate({**data, key: value})
            except ValidationError:
                raise RecipeError(f"{flag(key)} {value} {_rule(key)}.", _HINTS.get(key, "see --help.")) from None
            data[key] = value
        return type(self).model_validate(data)


def flag(field: str) -> str:
    """The CLI flag of a selection field (`skip_first_layers` -> `--skip-first-layers`)."""
    return "--" + field.replace("_", "-")


def _rule(field: str) -> str:
    """What a field's constraints require, in words (from its pydantic metadata)."""
    low = high = None
    low_open = finite = False
    for item in Selection.model_fields[field].metadata:
        if getattr(item, "ge", None) is not None:
            low = item.ge
        if getattr(item, "gt", None) is not None:
            low, low_open = item.gt, True
        if getattr(item, "le", None) is not None:
            high = item.le
        if getattr(item, "allow_inf_nan", None) is False:
            finite = True
    if high is not None:
        return f"must be in {'(' if low_open else '['}{low:g}, {high:g}]"
    if finite:
        return f"must be a finite number >= {low:g}"
    return f"must be at least {low:g}" if low is not None else "is not valid"


_HINTS = {
    "top_k": "pass a positive count.",
    "fraction": "e.g. 0.001 for 0.1%.",
    "batch_size": "pass a positive size.",
    "skip_first_layers": "pass 0 or more.",
    "skip_last_layers": "pass 0 or more.",
    "universal_top_n": "pass a positive count.",
    "universal_threshold": "e.g. 0.8.",
    "specificity": "e.g. 1, or 0 for off.",
    "protect_weight": "e.g. 1, or 0 for off.",
    "max_layer_share": "e.g. 0.25 for at most a quarter of the neurons in one layer.",
}
