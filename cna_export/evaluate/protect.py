"""The protect set in an evaluation: its prompts are measured beside the positive ones (appended to the positive
list, so every backend and every variant handles them as it handles the positive prompts) and split off afterwards:
records labelled `set: protect`, metrics with `protect_rate`, `protect_hits`, `n_protect`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def split_protect(metrics: dict, records: list[dict], n_positive: int, n_protect: int) -> tuple[dict, list[dict]]:
    """Metrics and records of a measurement whose positive list was positive + protect, with the protect prompts
    separated (in place, so every holder of the metrics sees it): `rate` over the positive prompts only,
    `protect_rate` over the protect ones."""
    if not n_protect:
        return metrics, records
    seen = 0
    for r in records:
        if r["set"] == "positive":
            if seen >= n_positive:
                r["set"] = "protect"
            seen += 1
    pos = [r for r in records if r["set"] == "positive"]
    prot = [r for r in records if r["set"] == "protect"]
    out = metrics
    hits, protect_hits = sum(r["behaviour"] for r in pos), sum(r["behaviour"] for r in prot)
    out.update(
        rate=hits / len(pos),
        positive_hits=hits,
        n_positive=len(pos),
        protect_rate=protect_hits / len(prot),
        protect_hits=protect_hits,
        n_protect=len(prot),
    )
    if "measure_mean" in metrics:
        out["measure_mean"] = sum(r["measure"] for r in pos) / len(pos)
        out["protect_measure_mean"] = sum(r["measure"] for r in prot) / len(prot)
    return out, records


def protect_prompts(recipe, base: Path | None, split: str, limit: int | None = None) -> list[str]:
    """The recipe's protect prompts of a split ("validation" or "test"), none of them a discovery protect prompt
    (nor, on the test split, a validation one), the first `limit` of them when given; [] when the recipe has no
    protect set for it."""
    from cna_export.circuit.recipe import load_prompts
    from cna_export.evaluate.measure import disjoint

    ref = recipe.validation_protect if split == "validation" else recipe.heldout_protect
    if ref is None:
        return []
    seen = [] if recipe.protect is None else load_prompts(recipe.protect, base)
    if split == "test" and recipe.validation_protect is not None:
        seen += load_prompts(recipe.validation_protect, base)
    prompts = load_prompts(ref, base)
    prompts = disjoint(prompts, seen) if seen else prompts
    return prompts[:limit] if limit else prompts


def note_protect(results: dict, positive: Sequence[str], protect: Sequence[str]) -> None:
    """The held-out counts and hashes of a results document whose positive list carried the protect set."""
    from cna_export.evaluate.measure import prompts_sha256

    if protect:
        held = results["heldout"]
        held.update(
            positive=len(positive),
            protect=len(protect),
            positive_sha256=prompts_sha256(positive),
            protect_sha256=prompts_sha256(protect),
        )
