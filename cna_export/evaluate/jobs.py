"""The eval and sweep jobs, from what the user names (a model, a recipe, a circuit or an exported folder) to a
report folder: results.json, prompts.jsonl, report.md and plots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import find_recipe, load_recipe
from cna_export.errors import CnaExportError
from cna_export.evaluate.measure import EvalConfig
from cna_export.evaluate.report import headline, selection_scores, write_report
from cna_export.evaluate.sweep import heldout_sets, parse_k, run_eval, save_results, sweep_source
from cna_export.io.output import check_output_path
from cna_export.io.source import resolve


@dataclass
class JobResult:
    """What a job wrote: the headline numbers, the report, and (eval of an export / sweep --export) the export."""

    headline: dict
    report: Path
    export: Path | None = None
    card_updated: bool = False
    chosen: dict | None = None


def eval_job(
    model: str, out: Path, cfg: EvalConfig, *, revision: str | None = None, circuit: Path | None = None,
    edited: Path | None = None, multipliers: Sequence[float] | None = None, allow_negative: bool = False,
    recipe: str | None = None, positive: str | None = None, negative: str | None = None,
    behaviour: str | None = None, lm_eval_tasks: Sequence[str] = (), lm_eval_limit: int | None = None,
    dtype: str = "auto", device: str = "auto",
) -> JobResult:  # fmt: skip
    """Evaluate a circuit (hooks, at each multiplier) or an exported folder against the original on held-out
    prompts; write the report into `out`, and the headline numbers into the export's card when it has one."""
    loaded = Circuit.load(circuit) if circuit else None
    if multipliers and loaded is None:
        raise CnaExportError("--multiplier needs --circuit.", "pass --circuit, or evaluate an --edited folder.")
    recipe_name = recipe or (loaded.recipe if loaded is not None and not positive else None)
    rec, base = load_recipe(recipe_name) if recipe_name else (None, None)
    pos, neg = heldout_sets(rec, base, positive, negative)
    behaviour = behaviour or (rec.behaviour if rec else None) or (loaded.behaviour if loaded else None)
    if behaviour is None:
        raise CnaExportError("Unknown behaviour to detect.", "pass --behaviour refusal (or a --recipe).")
    results, records, used = run_eval(
        resolve(model, revision), pos, neg, behaviour, cfg, circuit=loaded, multipliers=multipliers, edited=edited,
        allow_negative=allow_negative, lm_eval_tasks=lm_eval_tasks, lm_eval_limit=lm_eval_limit, dtype=dtype,
        device=device,
    )  # fmt: skip
    save_results(out, results, records)
    job = JobResult(headline(results), write_report(out, results, used))
    if edited is not None and (Path(edited) / "circuit.json").is_file():
        from cna_export.ship.card import add_metrics

        job.card_updated = add_metrics(Path(edited), job.headline)  # the card's file hashes stay valid
    return job


def sweep_job(
    model: str, recipe: str, ks: Sequence[str], multipliers: Sequence[float], cfg: EvalConfig, out: Path, *,
    revision: str | None = None, positive: str | None = None, negative: str | None = None,
    kl_budget: float | None = 0.1, benign_budget: float | None = None, allow_negative: bool = False,
    export: Path | None = None, overwrite: bool = False, local_model: Path | None = None, dtype: str = "auto",
    device: str = "auto",
) -> JobResult:  # fmt: skip
    """Attribute once with the recipe, sweep k x m on held-out prompts, write the report, and with `export`
    export the point the selection rule chose (a one-line error, after the report, when none qualifies)."""
    if export is not None:
        check_output_path(export, local_model, overwrite, marker="circuit.json")
    rec, base = load_recipe(recipe)
    source = resolve(model, revision)
    results, records, circuits, att = sweep_source(
        source, rec, base, [parse_k(k) for k in ks], multipliers, cfg, positive=positive, negative=negative,
        kl_budget=kl_budget, benign_budget=benign_budget, allow_negative=allow_negative, dtype=dtype, device=device,
        out=out,
    )  # fmt: skip
    chosen = results["points"][results["chosen"]] if results["chosen"] is not None else None
    shown = circuits[chosen["k"]] if chosen else circuits[max(circuits)]
    candidates, cuts = selection_scores(att, circuits)
    report = write_report(out, results, shown, candidates, cuts, specificity=att.selection.specificity)
    job = JobResult(headline(results), report, chosen=chosen)
    if export is None:
        return job
    if chosen is None:
        raise CnaExportError("No sweep point meets the selection rule, so nothing was exported.",
                             "raise --kl-budget or try other --k/--multipliers; see the report.")  # fmt: skip
    from cna_export.fold.export import apply_circuit

    circuit = circuits[chosen["k"]].model_copy(update={"multiplier": chosen["multiplier"]})
    job.export = apply_circuit(source, circuit, export, allow_negative=allow_negative or rec.allow_negative,
                               overwrite=overwrite, recipe_file=find_recipe(recipe), metrics=job.headline)  # fmt: skip
    return job
