"""Fold neuron multipliers into weights: pure tensor math, no I/O.

Scaling neuron j of a gated MLP by m multiplies its activation h_j = act(gate_j x) * (up_j x) by m. Because
`down_proj(h) = W_down h` has no bias, `W_down (m * h) = (W_down diag(m)) h`: the edit is exactly
`W_down[:, j] *= m`. Equivalently h_j is linear in `up_j`, so `W_up[j, :] *= m` gives the same function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from cna_export.arch.sites import Site
from cna_export.errors import CircuitError
from cna_export.fold.mxfp4 import fold_mxfp4_neurons_
from cna_export.fold.storage import stored

# layer -> (neuron indices, multipliers), the form every consumer of a dense circuit uses.
LayerEdits = dict[int, tuple[torch.Tensor, torch.Tensor]]
# (layer, expert) -> (neuron indices, multipliers): expert None (dense MLP), an int (routed) or "shared".
UnitEdits = dict[tuple[int, int | str | None], tuple[torch.Tensor, torch.Tensor]]


def check_multiplier(m: float, allow_negative: bool = False) -> float:
    """Validate one multiplier: finite as the float32 every fold computes in (1e39 is a finite Python float, but
    inf there: refused before any long work), and non-negative unless explicitly allowed."""
    if not isinstance(m, (int, float)) or isinstance(m, bool) or not math.isfinite(m):
        raise CircuitError(f"Multiplier {m!r} is not a finite number.", "use 0 to ablate, 1 to keep, >1 to amplify.")
    exact = torch.tensor([float(m)], dtype=torch.float64)
    stored(exact, torch.float32, torch.ones(1, dtype=torch.bool), exact, "the multiplier")
    if m < 0 and not allow_negative:
        raise CircuitError(
            f"Multiplier {m} is negative, which flips neurons rather than scaling them.",
            "pass --allow-negative if that is intended.",
        )
    return float(m)


def group_by_layer(neurons: Iterable[tuple[int, int, float]]) -> LayerEdits:
    """Turn (layer, index, multiplier) triples into per-layer index/multiplier tensors (sorted by index)."""
    by_layer: dict[int, dict[int, float]] = {}
    for layer, index, m in neurons:
        by_layer.setdefault(layer, {})[index] = m
    edits: LayerEdits = {}
    for layer in sorted(by_layer):
        items = sorted(by_layer[layer].items())
        index = torch.tensor([i for i, _ in items], dtype=torch.long)
        exact = torch.tensor([m for _, m in items], dtype=torch.float64)
        # The multipliers are float32 from here on: 1e39 would be inf, and 0 x inf a NaN weight.
        edits[layer] = (
            index,
            stored(exact, torch.float32, torch.isfinite(exact), exact, f"the multipliers of layer {layer}", index),
        )
    return edits


def group_by_unit(neurons: Iterable[tuple[int, int | str | None, int, float]]) -> UnitEdits:
    """Turn (layer, expert, index, multiplier) into per-(layer, expert) index/multiplier tensors; dense units
    (expert None) sort first in each layer, then routed experts, then the shared one."""
    by_unit: dict[tuple[int, int | str | None], list[tuple[int, int, float]]] = {}
    for layer, expert, index, m in neurons:
        by_unit.setdefault((layer, expert), []).append((layer, index, m))
    order = sorted(by_unit, key=lambda k: (k[0], -1 if k[1] is None else (k[1] if isinstance(k[1], int) else 2**40)))
    return {unit: group_by_layer(by_unit[unit])[unit[0]] for unit in order}


def scaled_rows(
    rows: torch.Tensor, index: torch.Tensor, multiplier: torch.Tensor, what: str = "the weights"
) -> torch.Tensor:
    """Rows `index` of `rows` (one row per neuron, any view) times their multipliers, in the rows' dtype.

    The product is taken in float32 and rounded once to the weight's dtype; a product that is not finite there
    is refused (`fold.storage.stored`), so nothing is written.
    """
    old = rows[index]
    scaled = old.to(torch.float32) * multiplier.to(torch.float32).reshape(-1, *[1] * (rows.dim() - 1))
    return stored(scaled, rows.dtype, torch.isfinite(old), multiplier, what, index)


def scale_rows_(rows: torch.Tensor, index: torch.Tensor, multiplier: torch.Tensor, what: str = "the weights") -> None:
    """Scale rows `index` of `rows` (one row per neuron, any view) in place (see `scaled_rows`)."""
    rows[index] = scaled_rows(rows, index, multiplier, what)


def scale_columns_(weight: torch.Tensor, index: torch.Tensor, multiplier: torch.Tensor) -> None:
    """Scale columns `index` of `down_proj.weight` ([hidden, intermediate]) in place."""
    scale_rows_(weight.T, index, multiplier)


def fold_site_(tensor: torch.Tensor, site: Site, width: int, index: torch.Tensor, multiplier: torch.Tensor,
        expert: int | None = None, *, what: str | None = None, dry_run: bool = False) -> None:  # fmt: skip
    """Scale neurons `index` of an MLP of `width` neurons in `tensor`, stored as `site` says, in place (an MXFP4
    site: in its 4-bit codes, exactly or refused, fold/mxfp4.py).

    `what` names the tensor in messages; `dry_run` makes every check (a product that its dtype cannot hold, an
    MXFP4 code without an exact scaled code) without writing, which an export runs before its first byte."""
    what = what or site.template
    if site.codec == "mxfp4":
        fold_mxfp4_neurons_(tensor, expert, index, multiplier, what.rpartition(".")[2], dry_run=dry_run)
        return
    rows = site.rows(tensor, width, expert)
    new = scaled_rows(rows, index, multiplier, what)
    if not dry_run:
        rows[index] = new


def fold_site(tensor: torch.Tensor, site: Site, width: int, index: torch.Tensor, multiplier: torch.Tensor,
        expert: int | None = None) -> torch.Tensor:  # fmt: skip
    """A copy of `tensor` with neurons `index` scaled (see `fold_site_`)."""
    out = tensor.clone()
    fold_site_(out, site, width, index, multiplier, expert)
    return out
