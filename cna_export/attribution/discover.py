"""Discovery: resolve a recipe (or the user's prompt files) with command-line overrides into a plan, load the
model, run attribution, return the circuit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cna_export.arch import ArchSpec
from cna_export.attribution.select import attribute
from cna_export.circuit.format import Circuit, ModelIdentity
from cna_export.circuit.recipe import Recipe, Universal, load_prompts
from cna_export.circuit.selection import DEFAULT_FRACTION, Selection
from cna_export.errors import RecipeError
from cna_export.io.source import Source, describe, identity, load_model


def discover(
    model: nn.Module, tokenizer, spec: ArchSpec, model_id: ModelIdentity, positive: Sequence[str],
    negative: Sequence[str], neutral: Sequence[str], selection: Selection, **labels: Any,
) -> Circuit:  # fmt: skip
    """Run CNA and return the circuit (not yet saved); `labels` (behaviour, recipe, multiplier) are recorded in it.

    Example:
        >>> circuit = discover(model, tok, arch_for("llama"), ident, harmful, benign, neutral, Selection(top_k=100))
    """
    k = selection.resolve_k(model_id.shape())  # before the forward passes, so a bad k fails fast
    result = attribute(model, tokenizer, spec, model_id, positive, negative, neutral, selection)
    fraction = None if selection.top_k is not None else selection.fraction or DEFAULT_FRACTION
    return result.circuit(k, fraction=fraction, **labels)


def discover_circuit(
    source: Source,
    positive: Sequence[str],
    negative: Sequence[str],
    neutral: Sequence[str],
    selection: Selection,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    offload_folder: Path | None = None,
    trust_remote_code: bool = False,
    behaviour: str = "custom",
    recipe: str | None = None,
    multiplier: float = 0.0,
    backend: str = "auto",
) -> Circuit:
    """Load `source`, fingerprint it, and run `discover` on it (a GGUF file through llama.cpp unless `backend` is
    "torch", which dequantizes it in transformers)."""
    if use_llama_cpp(source, backend):
        return _discover_gguf(source, positive, negative, neutral, selection, behaviour=behaviour, recipe=recipe,
                              multiplier=multiplier)
    spec, shape, config = describe(source)
    model_id = identity(source, config, shape)
    selection.resolve_k(model_id.shape())  # a k or a layer window the model cannot honour: before it loads
    model, tokenizer = load_model(
        source, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
        device_map=device_map, offload_folder=offload_folder,
    )  # fmt: skip
    return discover(
        model, tokenizer, spec, model_id, positive, negative, neutral, selection,
        behaviour=behaviour, recipe=recipe, multiplier=multiplier,
    )  # fmt: skip


BACKENDS = ("auto", "llama.cpp", "torch")


def use_llama_cpp(source: Source, backend: str) -> bool:
    """Whether `source` runs through llama.cpp: a GGUF file, unless the torch route is asked for."""
    if backend not in BACKENDS:
        raise RecipeError(f"Unknown backend {backend!r}.", f"use one of {', '.join(BACKENDS)}.")
    if backend == "llama.cpp" and not source.is_gguf:
        raise RecipeError(f"--backend llama.cpp needs a .gguf model; {source.name} is not one.",
                          "pass a GGUF file, or --backend torch.")  # fmt: skip
    return source.is_gguf and backend != "torch"


def _discover_gguf(
    source: Source, positive: Sequence[str], negative: Sequence[str], neutral: Sequence[str], selection: Selection,
    **labels: Any,
) -> Circuit:  # fmt: skip
    """`discover` inside llama.cpp: the quantized file as it is, mmapped, never dequantized in Python."""
    from cna_export.attribution.native import attribute_gguf, describe_gguf, gguf_identity

    spec, shape, metadata = describe_gguf(source.path)
    k = selection.resolve_k(shape)  # before the forward passes, so a bad k fails fast
    model_id = gguf_identity(source.name, source.path, spec, shape, metadata)
    result = attribute_gguf(source.path, spec, model_id, positive, negative, neutral, selection)
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


def plan_discovery(
    recipe: Recipe | None = None, base: Path | None = None, *, overrides: dict | None = None,
    positive: str | None = None, negative: str | None = None, neutral: str | None = None,
    behaviour: str | None = None, multiplier: float | None = None,
) -> DiscoveryPlan:  # fmt: skip
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
    if recipe is not None:
        pos, neg = load_prompts(recipe.positive, base), load_prompts(recipe.negative, base)
        neutral_ref = recipe.universal.prompts
    else:
        pos, neg, neutral_ref, base = load_prompts(positive), load_prompts(negative), neutral or NEUTRAL_DEFAULT, None
    needs_neutral = selection.universal or selection.specificity
    return DiscoveryPlan(
        selection, pos, neg, load_prompts(neutral_ref, base) if needs_neutral else [],
        behaviour or (recipe.behaviour if recipe else "custom"),
        multiplier if multiplier is not None else (recipe.multiplier if recipe else 0.0),
        recipe.name if recipe else None,
    )


def discover_source(source: Source, plan: DiscoveryPlan, **load: object) -> Circuit:
    """Run a discovery plan on a model source (`load`: dtype, device, device_map, offload_folder,
    trust_remote_code, backend)."""
    return discover_circuit(
        source, plan.positive, plan.negative, plan.neutral, plan.selection, behaviour=plan.behaviour,
        recipe=plan.recipe, multiplier=plan.multiplier, **load,
    )  # fmt: skip
