"""Experiments: evaluate one edit (`run_eval`) or a grid of k and m from one attribution (`run_sweep`).

Both produce the same results document (a dict saved as `results.json`, one metrics dict per evaluated point
plus the original model's) and per-prompt records (`prompts.jsonl`); `cna_export.evaluate.report` turns them into
report.md and PNGs. A sweep runs the attribution forward passes once and cuts the ranking at every k, and
generates and scores the original model's answers once; every (k, m) point then runs as the backend's variant
(torch: runtime hooks; llama.cpp: a patched temporary file). Both backends share this module.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from cna_export import __version__
from cna_export.arch.spec import ModelShape
from cna_export.attribution.discover import plan_discovery
from cna_export.attribution.select import Attribution, attribute_on
from cna_export.backends.base import Backend, applied_circuit
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import Recipe, load_prompts
from cna_export.circuit.selection import Selection
from cna_export.errors import CnaExportError, RecipeError
from cna_export.evaluate.choose import pareto, pick
from cna_export.evaluate.declared import behaviour_of, detector_description
from cna_export.evaluate.detectors import detector_for
from cna_export.evaluate.measure import (
    Baseline,
    EvalConfig,
    Extra,
    build_baseline,
    disjoint,
    measure,
    prompts_sha256,
)
from cna_export.evaluate.options import HeldOut, SweepOptions, Variants
from cna_export.evaluate.protect import note_protect, protect_prompts, split_protect
from cna_export.fold.scale import check_multiplier
from cna_export.io.output import write_text_atomic
from cna_export.progress import track

log = logging.getLogger(__name__)

DEFAULT_BENIGN = "builtin:refusal_benign_heldout"  # everyday requests, used when a recipe has no benign held-out set


# Prompt sets and grid ----------------------------------------------------------------------------------------


def heldout_sets(
    recipe: Recipe | None = None,
    base: Path | None = None,
    positive: str | None = None,
    negative: str | None = None,
    split: str = "test",
    limit: int | None = None,
) -> tuple[list[str], list[str]]:
    """Held-out positive and benign prompts of one split: explicit files first, then the recipe's sets.

    `split="validation"` reads `validation_positive/negative` (what sweeps choose settings on), `"test"` reads
    `heldout_positive/negative` (reported numbers only). Prompts that also appear among the recipe's discovery
    prompts are dropped, so an evaluation never scores the prompts the circuit was found with, and test prompts
    that are also validation prompts are dropped too. `limit`: keep the first N of each set (a quick evaluation
    on a CPU). Use `split_of` to learn which split a call really used.
    """
    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', not {split!r}")
    pos_ref, neg_ref = _split_refs(recipe, split)
    pos_ref, neg_ref = positive or pos_ref, negative or neg_ref
    if pos_ref is None:
        raise RecipeError(
            f"No held-out ({split}) prompts to evaluate on.",
            "pass --recipe with heldout_positive (test) or validation_positive, or --positive FILE.",
        )
    pos = load_prompts(pos_ref, base if positive is None else None)
    neg = load_prompts(neg_ref or DEFAULT_BENIGN, base if negative is None else None)
    if recipe is not None:
        discovery = load_prompts(recipe.positive, base) + load_prompts(recipe.negative, base)
        if split == "test" and recipe.validation_positive is not None:
            discovery += load_prompts(recipe.validation_positive, base)
            if recipe.validation_negative is not None:
                discovery += load_prompts(recipe.validation_negative, base)
        pos, neg = disjoint(pos, discovery), disjoint(neg, discovery)
    return (pos[:limit], neg[:limit]) if limit else (pos, neg)


def _split_refs(recipe: Recipe | None, split: str) -> tuple:
    """The recipe's prompt references of a split. A recipe without a validation split falls back to its test
    sets (with a warning): `split_of` then says "test", and reports flag the choice as made on the test split."""
    if recipe is None:
        return None, None
    if split == "validation" and recipe.validation_positive is not None:
        return recipe.validation_positive, recipe.validation_negative
    if split == "validation":
        log.warning("recipe %s has no validation split: choosing on its test split", recipe.name)
    return recipe.heldout_positive, recipe.heldout_negative


def split_of(recipe: Recipe | None, split: str, positive: str | None = None) -> str:
    """What a `heldout_sets(recipe, split=...)` call really evaluates on: "validation", "test", or "custom" for
    prompt files given by the user."""
    if positive is not None:
        return "custom"
    if split == "validation" and (recipe is None or recipe.validation_positive is None):
        return "test"
    return split


def parse_k(text: str) -> int | float:
    """'1600' -> 1600 neurons, '0.014' or '1.4%' -> a fraction of all MLP neurons."""
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise CnaExportError(f"k {text!r} is not a number.", "pass counts (1600) or fractions (0.014).") from None


def resolve_ks(ks: Sequence[int | float], shape: ModelShape, selection: Selection | None = None) -> list[int]:
    """Neuron counts for the given counts or fractions, sorted and without duplicates; with `selection`, each
    must fit its layer window (`Selection.resolve_k`)."""
    out = set()
    for k in ks:
        n = round(k * shape.num_neurons) if isinstance(k, float) else k
        if isinstance(k, float) and not 0 < k <= 1:
            raise CnaExportError(f"k fraction {k} is outside (0, 1].", "e.g. 0.01 for 1% of the MLP neurons.")
        if not 1 <= n <= shape.num_neurons:
            raise CnaExportError(f"k={n} is outside 1..{shape.num_neurons}.", "pass smaller counts or fractions.")
        if selection is not None:
            selection.model_copy(update={"top_k": int(n), "fraction": None}).resolve_k(shape)
        out.add(int(n))
    return sorted(out)


def goal_of(multiplier: float) -> str:
    """Ablating (m < 1) is meant to lower the behaviour rate, amplifying to raise it."""
    return "decrease" if multiplier < 1 else "increase"


# Results files -----------------------------------------------------------------------------------------------


def eval_document(backend: Backend, behaviour: str, cfg: EvalConfig, baseline, split: str, points: list[dict]) -> dict:
    """An eval's results document (`results_document`), its goal read from the first point that moves a neuron."""
    moved = [p["multiplier"] for p in points if p["multiplier"] not in (None, 1)]
    goal = goal_of(moved[0]) if moved else None
    return results_document("eval", backend.model_name, behaviour, cfg, baseline, goal=goal, split=split,
                            backend=backend.runtime)  # fmt: skip


def results_document(kind: str, model: str, behaviour: str, cfg: EvalConfig, baseline: Baseline, **extra) -> dict:
    """The results document of an eval or sweep (`results.json`), whichever backend measured it: what was run,
    on which held-out prompts, the original's metrics, and `extra` fields; the points are appended as measured."""
    return {
        "kind": kind,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "behaviour": str(behaviour),
        "detector": detector_description(behaviour),
        "config": asdict(cfg),
        "heldout": {
            "positive": len(baseline.positive),
            "negative": len(baseline.negative),
            "positive_sha256": prompts_sha256(baseline.positive),
            "negative_sha256": prompts_sha256(baseline.negative),
        },
        "baseline": baseline.metrics,
        "points": [],
        **extra,
    }


def save_results(out: Path, results: dict, records: Sequence[dict]) -> None:
    """Write results.json and prompts.jsonl into the report folder `out` (each atomically), replacing the ones
    written before: the commands pass their own staged folder (`cna_export.io.output.OutputPlan`)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("results.json", json.dumps(results, indent=1)),
        ("prompts.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)),
    ):
        write_text_atomic(Path(out) / name, text, overwrite=True)


# Sweep -------------------------------------------------------------------------------------------------------


def run_sweep(
    backend: Backend,
    attribution: Attribution,
    positive: Sequence[str],
    negative: Sequence[str],
    behaviour: str,
    cfg: EvalConfig,
    options: SweepOptions,
    protect: Sequence[str] = (),
) -> tuple[dict, list[dict], dict[int, Circuit]]:
    """Evaluate every (k, m) of the grid, each point the backend's variant (torch: hooks on the loaded model;
    llama.cpp: the file patched at that point); return results, per-prompt records and circuits. The `protect`
    prompts (a recipe's protect set) ride with the positive ones and every point reports their rate as well
    (`evaluate.protect`).

    m = 1 is the original model at every k and is not re-run. With `options.out`, results are saved after every
    point, so a long sweep that stops early keeps what it measured.

    Example:
        >>> att = attribute_on(backend, harmful, benign, neutral, recipe.selection())
        >>> results, records, circuits = run_sweep(backend, att, held_pos, held_neg, "refusal", EvalConfig(),
        ...                                        SweepOptions(ks=[467, 1600], multipliers=[0, 2]))
    """
    o = options
    for m in o.multipliers:
        check_multiplier(m, o.allow_negative)
    detector = detector_for(behaviour)
    goal = o.goal or goal_of(min(o.multipliers))
    circuits = {k: attribution.circuit(k, behaviour=behaviour, recipe=o.recipe) for k in o.ks}
    baseline = build_baseline(backend.load(), [*positive, *protect], negative, detector, cfg)
    split_protect(baseline.metrics, baseline.records, len(positive), len(protect))
    results = results_document(
        "sweep",
        backend.model_name,
        behaviour,
        cfg,
        baseline,
        goal=goal,
        kl_budget=o.kl_budget,
        benign_budget=o.benign_budget,
        ks=list(o.ks),
        multipliers=list(o.multipliers),
        num_neurons=circuits[o.ks[0]].num_neurons,
        recipe=o.recipe,
        split=o.split,
        backend=backend.runtime,
    )
    note_protect(results, positive, protect)
    records = list(baseline.records)

    def point(k: int, m: float) -> tuple[dict, list[dict]]:
        with backend.variant(circuits[k], m, o.allow_negative) as runner:
            metrics, recs = measure(runner, baseline, detector, cfg, label=f"k={k} m={m:g}", k=k, multiplier=m)
        return split_protect(metrics, recs, len(positive), len(protect))

    sweep_grid(
        results, records, o.ks, o.multipliers, point, kl_budget=o.kl_budget, benign_budget=o.benign_budget, out=o.out
    )
    return results, records, circuits


def sweep_grid(
    results: dict,
    records: list[dict],
    ks: Sequence[int],
    multipliers: Sequence[float],
    point: Callable[[int, float], tuple[dict, list[dict]]],
    *,
    kl_budget: float | None,
    benign_budget: float | None,
    out: Path | None,
) -> None:
    """The point loop of a sweep, whichever backend measures: `point(k, m)` for every (k, m) of the grid but m = 1
    (the original), its metrics and records appended, the Pareto front and the choice kept current, and with
    `out` the results saved and the point's records appended to prompts.jsonl after every point."""
    from cna_export.evaluate.stream import ReportStream, write_results

    stream = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        stream = ReportStream(out)  # records appended as each point finishes
        stream.add(results["baseline"], records)
        write_results(out, results)
    for k, m in track([(k, m) for k in ks for m in multipliers if m != 1], "sweep", lambda _: 0):
        metrics, recs = point(k, m)
        log.info(
            "k=%d m=%g: rate %.3f, benign %.3f, KL %.4f",
            k,
            m,
            metrics["rate"],
            metrics["benign_rate"],
            metrics["kl_first"],
        )
        results["points"].append(metrics)
        records += recs
        _choose(results, kl_budget, benign_budget)
        if stream is not None:
            stream.add(metrics, recs)
            write_results(out, results)
    _choose(results, kl_budget, benign_budget)


def _choose(results: dict, kl_budget: float | None, benign_budget: float | None) -> None:
    points, goal = results["points"], results["goal"]
    results["pareto"] = pareto(points, goal)
    results["chosen"] = pick(points, results["baseline"], goal, kl_budget, benign_budget)


def sweep_source(
    backend: Backend,
    recipe: Recipe,
    base: Path | None,
    cfg: EvalConfig,
    options: SweepOptions,
    positive: str | None = None,
    negative: str | None = None,
) -> tuple[dict, list[dict], dict[int, Circuit], Attribution]:
    """Attribute with the recipe's discovery prompts once, and sweep k x m on the recipe's validation split (its
    test split stays unseen; a recipe without one falls back, flagged in the results). `options.ks` may hold
    fractions of all neurons (0.014); `positive` / `negative` override the held-out prompt files."""
    plan = plan_discovery(recipe, base)
    counts = resolve_ks(options.ks, backend.shape, plan.selection)
    held_pos, held_neg = heldout_sets(recipe, base, positive, negative, split="validation", limit=options.limit)
    protect = protect_prompts(recipe, base, "validation", options.limit) if positive is None else []
    att = attribute_on(backend, plan.positive, plan.negative, plan.neutral, plan.selection, protect=plan.protect)
    cfg = replace(cfg, system_prompt=plan.selection.system_prompt)
    options = options.model_copy(
        update={
            "ks": counts,
            "recipe": recipe.name,
            "goal": goal_of(recipe.multiplier),
            "allow_negative": options.allow_negative or recipe.allow_negative,
            "split": split_of(recipe, "validation", positive),
        }
    )
    behaviour = behaviour_of(recipe, base)
    results, records, circuits = run_sweep(backend, att, held_pos, held_neg, behaviour, cfg, options, protect)
    return results, records, circuits, att


# Evaluate one edit -------------------------------------------------------------------------------------------


def run_eval(
    backend: Backend,
    held: HeldOut,
    behaviour: str,
    cfg: EvalConfig,
    variants: Variants,
    *,
    extras: Sequence[Extra] = (),
    on_variant: Callable[[dict, list[dict]], None] | None = None,
) -> tuple[dict, list[dict], Circuit | None]:
    """Evaluate the original model and either a circuit at each multiplier or an exported model, in the
    backend's runtime, on the held-out prompts of one split. `extras` (lm-eval, MMLU, the depth checks) run on the
    original and on every variant; `on_variant(metrics, records)` hears of each variant as it finishes, the
    original first (the report stream).

    Both ways give the same numbers for the same edit (tested): applying a circuit at runtime scales the same
    neurons that export folds into the weights. Returns the results document, per-prompt records and the circuit
    used, if any (an exported model's own circuit.json or sidecar).

    Example:
        >>> results, records, used = run_eval(open_model("./qwen"), HeldOut(positive=harmful, negative=benign),
        ...                                   "refusal", EvalConfig(), Variants(circuit=Circuit.load("c.json")))
    """
    done = on_variant or (lambda metrics, records: None)
    circuit, edited = variants.circuit, variants.edited
    if edited is not None and circuit is not None:
        raise CnaExportError("Pass either an edited model or a circuit, not both.", "drop --circuit or --edited.")
    detector = detector_for(behaviour)
    baseline = build_baseline(backend.load(), held.positive, held.negative, detector, cfg, extras)
    done(baseline.metrics, baseline.records)
    points, records = [], list(baseline.records)
    if edited is not None:
        circuit = applied_circuit(edited)
        m = circuit.multiplier if circuit is not None else None
        k = len(circuit.neurons) if circuit is not None else None
        with backend.edited(edited) as runner:
            metrics, recs = measure(runner, baseline, detector, cfg, label="exported", k=k, multiplier=m, extras=extras)
        done(metrics, recs)
        points.append(metrics)
        records += recs
    elif circuit is not None:
        for m in variants.multipliers or [circuit.multiplier]:
            with backend.variant(circuit, m, variants.allow_negative) as runner:
                metrics, recs = measure(
                    runner,
                    baseline,
                    detector,
                    cfg,
                    label=f"m={m:g}",
                    k=len(circuit.neurons),
                    multiplier=m,
                    extras=extras,
                )
            done(metrics, recs)
            points.append(metrics)
            records += recs
    results = eval_document(backend, behaviour, cfg, baseline, held.split, points)
    results["points"] = points
    results["edited"] = str(edited) if edited is not None else None
    return results, records, circuit
