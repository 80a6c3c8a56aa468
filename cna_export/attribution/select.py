"""Contrastive Neuron Attribution, the selection: per-neuron deltas, exclusions (skipped layers, universal
neurons, the sign filter), the ranking score, and the circuit of the top k.

The ranking score of neuron j, with its penalties (each off at 0):

    score_j = max(0, |delta_j| - S * mean|a_j(neutral)| - W * |delta_protect_j|)
    delta_j = mean a_j(positive) - mean a_j(negative)
    delta_protect_j = mean a_j(protect) - mean a_j(negative)

S (`specificity`) prefers neurons that are quiet on ordinary text. W (`protect_weight`) is the protect set's
penalty: a neuron that separates the protect prompts from the negative ones as strongly as it separates the
positive ones reads a protect prompt the way it reads a positive one, so scaling it moves the protect prompts'
behaviour too. Measured against the negative set, delta_protect is in the same units as delta (W = 1 zeroes a neuron
that moves protect prompts as far as positive ones), and it is zero for a neuron that treats protect prompts like
the negative ones, the prompts an edit is already meant to leave alone; measured against the positive set it would
instead penalize the very neurons that tell the two apart. The absolute value counts a move either way: the
protect set's behaviour must not change, up or down.

The sign filter (`sign_filter`) keeps a neuron only when its mean activation on the positive prompts has the sign of
delta_j. Scaling neuron j by m adds (m - 1) * a_j * w_j to the output (w_j its down-projection column); on a
positive prompt that moves along the contrast direction delta_j * w_j exactly when a_j(positive) * delta_j > 0,
towards the behaviour for m > 1 and away from it for m < 1. A neuron with a large |delta| whose positive-set
activation has the other sign (say -0.2 on positive prompts, -1.5 on negative ones) would move those prompts the
wrong way when amplified, while pushing the negative prompts (larger |a|) further still.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from cna_export.arch import ModelShape
from cna_export.arch.experts import SHARED, ExpertShape
from cna_export.attribution.collect import SetStats
from cna_export.circuit.format import (
    Circuit,
    ExpertRouting,
    ModelIdentity,
    Neuron,
    PromptSet,
    RecordedSelection,
    Routing,
    prompt_set,
)
from cna_export.circuit.selection import Selection
from cna_export.errors import RecipeError

if TYPE_CHECKING:
    from cna_export.backends.base import Backend

log = logging.getLogger(__name__)


def universal_mask(stats: SetStats, threshold: float) -> torch.Tensor:
    """Neurons in the per-layer top-n for at least `threshold` of the neutral prompts."""
    assert stats.top_counts is not None
    return stats.top_counts >= math.ceil(threshold * stats.count - 1e-9)


def select(delta: torch.Tensor, k: int, excluded: torch.Tensor, per_layer: int | None = None) -> list[tuple[int, int]]:
    """Top-k (layer, index) by |delta|, skipping `excluded`, at most `per_layer` in any one layer (taking neurons in
    rank order and passing over those of a full layer is the same as the top k among each layer's top
    `per_layer`). Ties break by (layer, index): deterministic."""
    score = delta.abs().to(torch.float64).numpy().copy()
    score[excluded.numpy()] = -np.inf
    if per_layer is not None:
        for row in score:
            row[np.argsort(-row, kind="stable")[per_layer:]] = -np.inf
    available = int(np.isfinite(score).sum())
    if k > available:
        cap = f" with at most {per_layer} per layer" if per_layer is not None else ""
        raise RecipeError(
            f"k={k} but only {available} neurons remain after exclusions{cap}.",
            "lower k, exclude fewer layers or raise max_layer_share.",
        )
    flat = np.argsort(-score.reshape(-1), kind="stable")[:k]
    width = delta.shape[1]
    return [(int(i // width), int(i % width)) for i in flat]


@dataclass
class Attribution:
    """One attribution run: per-neuron deltas and exclusions. `circuit(k)` cuts the ranking at any k, so a
    sweep over k needs the forward passes only once."""

    delta: torch.Tensor  # [layers, neurons] float64, mean(positive) - mean(negative)
    score: torch.Tensor  # [layers, neurons] float64 >= 0, what the top-k is taken of (|delta| unless specificity)
    excluded: torch.Tensor  # [layers, neurons] bool: skipped layers and universal neurons
    universal: list[tuple[int, int]]
    top_n: int | None
    prompts: dict[str, PromptSet]
    selection: Selection
    model_id: ModelIdentity
    dtype: str
    chat_template: bool
    moe: ExpertShape | None = None  # MoE: columns are (expert, index) as `ExpertShape.neuron` maps them
    routed: dict[str, torch.Tensor] | None = None  # MoE: set -> [layers, experts] prompts routed there
    stats: list[SetStats] | None = None  # the per-set sums it was made from, in the order of `prompts`
    collected_top_n: int | None = None  # the top-n the neutral sums were collected with

    def reselect(self, selection: Selection) -> Attribution:
        """The same sums under other selection knobs (skipped layers within those the passes reached, universal
        threshold, specificity, protect weight, sign filter): no forward pass. The tuner's trials use this."""
        if self.stats is None:
            raise ValueError("this attribution kept no sums to reselect from")
        selection.layer_window(self.model_id.shape())  # a window that leaves no layer is refused, as in `prepare`
        needs_top_n = selection.universal or selection.specificity
        if needs_top_n and self.collected_top_n is None:
            raise ValueError("the neutral sums were not collected: universal exclusion and specificity need them")
        return from_stats(
            self.stats,
            selection,
            self.collected_top_n if needs_top_n else None,
            self.prompts,
            self.model_id,
            dtype=self.dtype,
            chat_template=self.chat_template,
            moe=self.moe,
        )

    def neuron(self, layer: int, column: int, delta: float) -> Neuron:
        """The circuit neuron of attribution column `column` of `layer`."""
        if self.moe is None:
            return Neuron(layer=layer, index=column, delta=delta)
        expert, index = self.moe.neuron(layer, column)
        return Neuron(layer=layer, expert=expert, index=index, delta=delta)

    def routing(self, neurons: list[Neuron]) -> Routing | None:
        """The routing coverage of the experts the circuit selected (None for a dense model)."""
        if self.moe is None or self.routed is None:
            return None
        units = sorted({(n.layer, n.expert) for n in neurons if n.expert is not None}, key=str)
        coverage = [
            ExpertRouting(
                layer=l,
                expert=e,
                routed={k: int(v[l, e]) if e != SHARED else self.prompts[k].count for k, v in self.routed.items()},
            )
            for l, e in units
        ]
        return Routing(coverage=coverage)

    def _ranking(self, k: int) -> torch.Tensor:
        """What the top-k is taken of: the score; with specificity or a protect weight, the neurons the penalties
        left at zero come after all positive ones, by |delta| less the protect penalty."""
        if not (self.selection.specificity or self.selection.protect_weight):
            return self.score
        left = int(((self.score > 0) & ~self.excluded).sum())
        if k > left:
            log.warning(
                "only %d neurons keep contrast after the specificity and protect penalties; the other %d of k=%d are "
                "the next by |delta| (less the protect penalty)",
                left,
                k - left,
                k,
            )
        # Past the positive scores: by |delta| less the protect penalty (made >= 0, as `select` ranks magnitudes),
        # so among them a neuron that moves the protect set still comes last.
        magnitude = self.delta.abs() - self.selection.protect_weight * self._protect_delta().abs()
        magnitude = magnitude - magnitude.min()
        return torch.where(self.score > 0, self.score + magnitude.max(), magnitude)

    def _protect_delta(self) -> torch.Tensor:
        if self.stats is None or "protect" not in self.prompts:
            return torch.zeros_like(self.delta)
        named = dict(zip(self.prompts, self.stats))
        return named["protect"].mean - named["negative"].mean

    def circuit(
        self,
        k: int,
        *,
        fraction: float | None = None,
        behaviour: str = "custom",
        recipe: str | None = None,
        multiplier: float = 0.0,
    ) -> Circuit:
        """The circuit of the top-k neurons by score (`fraction` is only recorded, as requested)."""
        share = self.selection.max_layer_share
        chosen = select(self._ranking(k), k, self.excluded, None if share is None else max(1, math.ceil(share * k)))
        log.info("selected %d neurons; %d universal excluded", len(chosen), len(self.universal))
        recorded = self.selection.model_dump() | {
            "top_k": k,
            "fraction": fraction,
            "universal_top_n": self.top_n,
            "universal_excluded": self.universal,
            "dtype": self.dtype,
            "chat_template": self.chat_template,
        }
        neurons = [self.neuron(l, i, float(self.delta[l, i])) for l, i in chosen]
        return Circuit(
            behaviour=str(behaviour),  # a declared behaviour carries its detector; the circuit keeps the name
            recipe=recipe,
            multiplier=multiplier,
            model=self.model_id,
            prompts=self.prompts,
            selection=RecordedSelection.model_validate(recorded),
            neurons=neurons,
            routing=self.routing(neurons),
        )


def prepare(shape: ModelShape, selection: Selection) -> tuple[Selection, int | None, int]:
    """Check the layer window (`Selection.layer_window`: one that leaves no layer is refused); returns
    (selection, top_n for the neutral set or None when it is not needed, the last layer the forward passes must
    reach)."""
    window = selection.layer_window(shape)
    top_n = None
    if selection.universal or selection.specificity:
        # The top-n of an MoE layer is taken per expert, among the prompts routed to it (collect.py).
        unit = shape.moe.width if shape.moe is not None else shape.intermediate_size
        top_n = selection.universal_top_n or max(1, math.ceil(0.01 * unit))
    # Layers skipped at the end are never selected: the forward passes stop before them.
    return selection, top_n, window.stop - 1


def attribute_on(backend: Backend, positive: Sequence[str], negative: Sequence[str], neutral: Sequence[str],
        selection: Selection, *, protect: Sequence[str] = ()) -> Attribution:  # fmt: skip
    """Run the forward passes of CNA on a backend (torch or llama.cpp, `cna_export.backends`): the per-set sums
    of the positive, negative, (for universal neurons or specificity) neutral and (when given) `protect` prompts in
    one set of passes, then deltas, skipped layers and universal neurons (no k yet).

    Example:
        >>> att = attribute_on(open_model("smollm2.Q4_1.gguf"), harmful, benign, neutral, Selection(top_k=46))
        >>> att.circuit(46)
    """
    shape = backend.shape  # with the experts of an MoE model
    selection, top_n, last = prepare(shape, selection)
    groups = named_sets(list(positive), list(negative), list(neutral) if top_n else None, list(protect) or None)
    stats = backend.attribute(list(groups.values()), selection, top_n, last)
    prompts = {name: prompt_set(list(p)) for name, p in groups.items()}
    chat = selection.chat_template and backend.load().has_chat_template
    return from_stats(
        stats, selection, top_n, prompts, backend.identity(), dtype=backend.dtype, chat_template=chat, moe=shape.moe
    )


def named_sets(
    positive: Sequence[str], negative: Sequence[str], neutral: Sequence[str] | None, protect: Sequence[str] | None
) -> dict[str, Sequence[str]]:
    """The prompt sets of one attribution pass by name, in the order their sums come back (None: not run)."""
    groups: dict[str, Sequence[str]] = {"positive": positive, "negative": negative}
    if neutral is not None:
        groups["neutral"] = neutral
    if protect is not None:
        groups["protect"] = protect
    return groups


def from_stats(
    stats: Sequence[SetStats],
    selection: Selection,
    top_n: int | None,
    prompts: dict[str, PromptSet],
    model_id: ModelIdentity,
    *,
    dtype: str,
    chat_template: bool,
    moe: ExpertShape | None = None,
) -> Attribution:
    """The selection step of CNA on precomputed sums (`SetStats` in the order of `prompts`: positive, negative,
    then neutral and protect when present), whichever backend ran the forward passes: deltas, skipped layers,
    universal neurons, the sign filter, the ranking score (see the module docstring)."""
    num_layers, collected = model_id.num_layers, top_n
    named = dict(zip(prompts, stats))
    delta = named["positive"].mean - named["negative"].mean
    excluded = torch.zeros_like(delta, dtype=torch.bool)
    # The padding columns of layers narrower than the attribution row (an MoE model's dense layers, the narrow
    # layers of a model whose MLP widths differ) are never selected.
    for layer in range(num_layers):
        if moe is not None:
            excluded[layer] = torch.tensor(
                [not moe.valid(layer, c, model_id.width(layer)) for c in range(delta.shape[1])]
            )
        else:
            excluded[layer, model_id.width(layer) :] = True
    excluded[: selection.skip_first_layers] = True
    if selection.skip_last_layers:
        excluded[num_layers - selection.skip_last_layers :] = True
    universal_list: list[tuple[int, int]] = []
    score = delta.abs()
    if selection.sign_filter:  # scaling must move the positive prompts along the contrast (module docstring)
        excluded |= named["positive"].mean * delta <= 0
    if top_n:
        neutral_stats = named["neutral"]
        if selection.universal:
            universal = universal_mask(neutral_stats, selection.universal_threshold)
            universal_list = [(int(a), int(b)) for a, b in universal.nonzero().tolist()]
            excluded |= universal
        else:
            top_n = None
        if selection.specificity:
            score = (score - selection.specificity * neutral_stats.abs_sums / neutral_stats.count).clamp(min=0)
    if selection.protect_weight:
        if "protect" not in named:
            raise RecipeError("protect_weight is set but no protect prompts ran.", "add a protect set to the recipe.")
        score = (score - selection.protect_weight * (named["protect"].mean - named["negative"].mean).abs()).clamp(min=0)
    routed = None
    if moe is not None and all(s.routed is not None for s in stats):
        routed = {name: s.routed for name, s in zip(prompts, stats)}
    return Attribution(delta=delta, score=score, excluded=excluded, universal=universal_list, top_n=top_n,
                       prompts=prompts, selection=selection, model_id=model_id, dtype=dtype, chat_template=chat_template,
                       moe=moe, routed=routed, stats=list(stats), collected_top_n=collected or None)  # fmt: skip
