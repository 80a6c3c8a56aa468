"""`cna-export tune`: attribute once, search on the validation split, choose, evaluate the test split once.

What it writes into OUT (atomically: all or nothing):

- `front.json`: every trial (its knobs, k, objectives, validation metrics), the Pareto front, the rule and the
  chosen trial, the original's validation metrics, the budget, the seed, the time taken;
- `front.png`: behaviour change against KL, the front and the chosen point;
- `recipe.yaml`: the recipe with the chosen k, m, layer window, specificity, protect weight and sign filter
  (`settings_chosen_on: validation`), with the prompt files it names copied beside it;
- `circuit.json`: the chosen circuit at its multiplier;
- `validation/prompts.jsonl`: per-prompt records of every measured trial;
- `test/`: the one evaluation of the chosen point on the test split (results.json, prompts.jsonl, report.md);
- `summary.md`: the same in words, with 95% intervals.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from cna_export import __version__
from cna_export.attribution.discover import DiscoveryPlan, plan_discovery
from cna_export.attribution.select import Attribution, attribute_on
from cna_export.backends.base import Backend, open_model
from cna_export.backends.options import LoadOptions
from cna_export.circuit.format import CIRCUIT_FILE
from cna_export.circuit.recipe import Recipe, find_recipe, load_prompts, load_recipe
from cna_export.errors import RecipeError
from cna_export.evaluate.declared import behaviour_of, detector_description
from cna_export.evaluate.detectors import detector_for
from cna_export.evaluate.measure import EvalConfig
from cna_export.evaluate.protect import protect_prompts
from cna_export.evaluate.sweep import goal_of, heldout_sets, results_document
from cna_export.io.output import check_output_path, staged_output
from cna_export.tune import front as F
from cna_export.tune.search import Aim, Budget, SearchResult, search
from cna_export.tune.space import Point, SearchSpace, recipe_params
from cna_export.tune.trials import Evaluator, PromptSets
from cna_export.tune.tuned_recipe import write_recipe

log = logging.getLogger(__name__)
MARKER = "front.json"


@dataclass
class TuneResult:
    """What a tune wrote and chose."""

    out: Path
    trials: int
    chosen: dict | None
    test: dict | None
    seconds: float


def tune_job(
    recipe: str,
    model: str,
    out: Path,
    cfg: EvalConfig,
    budget: Budget,
    space: SearchSpace | None = None,
    *,
    load: LoadOptions | None = None,
    overwrite: bool = False,
) -> TuneResult:
    """Tune a recipe's knobs on `model` (module docstring) in its backend (`load.backend`: a GGUF file in llama.cpp,
    each trial a patched temporary copy; anything else in torch, each trial runtime hooks); `budget.limit` keeps the first
    N prompts of each validation and test set (a quick look on a CPU).

    Example:
        >>> tune_job("refusal-strengthen", "qwen.gguf", Path("tuned"), EvalConfig(), Budget(trials=30, seed=0))
    """
    space = space or SearchSpace()
    recipe_file = find_recipe(recipe)
    rec, base = load_recipe(recipe_file)
    if rec.validation_positive is None:
        raise RecipeError(
            f"Recipe {rec.name} has no validation split, and the tuner never chooses on the test split.",
            "add validation_positive and validation_negative to the recipe.",
        )
    local = Path(model).expanduser()
    check_output_path(out, local if local.exists() else None, overwrite, folder=True)
    # Everything that can be wrong with the recipe fails here, before the model loads.
    plan = plan_discovery(rec, base)
    m_range = space.multipliers(rec.multiplier, rec.allow_negative)
    splits = _split(rec, base, "validation", budget.limit), _split(rec, base, "test", budget.limit)
    job = TuneInputs(
        rec,
        recipe_file,
        base,
        plan,
        behaviour_of(rec, base),
        m_range,
        *splits,
        replace(cfg, system_prompt=plan.selection.system_prompt),
    )
    backend = open_model(model, load)
    try:
        return _tune(backend, job, budget, space, (Path(out), overwrite))
    finally:
        backend.close()


@dataclass(frozen=True)
class TuneInputs:
    """A tune's recipe resolved: its file and folder, discovery plan, behaviour (with its detector), the m range,
    the validation and test prompt sets, and the evaluation settings (with the recipe's system prompt)."""

    recipe: Recipe
    recipe_file: Path
    base: Path | None
    plan: DiscoveryPlan
    behaviour: str
    m_range: tuple[float, float]
    validation: PromptSets
    test: PromptSets
    cfg: EvalConfig


def _tune(backend: Backend, job: TuneInputs, budget: Budget, space: SearchSpace, out: tuple[Path, bool]) -> TuneResult:
    """Attribute once, search, choose, evaluate the test split once, write (see `tune_job`)."""
    rec, base, plan, behaviour, m_range, cfg = job.recipe, job.base, job.plan, job.behaviour, job.m_range, job.cfg
    validation, test = job.validation, job.test
    detector, goal = detector_for(behaviour), goal_of(rec.multiplier)
    discovery_protect = plan.protect or (load_prompts(rec.protect, base) if rec.protect is not None else [])
    attribution = _attribute(backend, plan, discovery_protect)
    allow_negative = rec.allow_negative or m_range[0] < 0
    # Trials read first-token KL from their generation: no teacher-forced pass (the objectives use no other KL).
    val = Evaluator(backend, validation, detector, replace(cfg, score_answers=False), allow_negative)
    collateral = budget.collateral_budget
    collateral = F.auto_collateral_budget(val.metrics) if collateral is None else collateral
    budget = replace(budget, collateral_budget=collateral)
    labels = {"behaviour": str(behaviour), "recipe": rec.name}
    has_protect = bool(discovery_protect and validation.protect)
    start = recipe_params(space, backend.shape, m_range, plan.selection, rec.multiplier, has_protect)
    aim = Aim(goal, m_range, labels, has_protect, start)
    found = search(attribution, val, plan.selection, space, budget, aim)
    measured = [t for t in found.trials if "objectives" in t]
    points = [t["objectives"] for t in measured]
    front = [measured[i]["number"] for i in F.pareto_front(points)]
    pick = F.choose(points, [t["k"] for t in measured], budget.kl_budget, budget.collateral_budget)
    chosen = measured[pick] if pick is not None else None
    document = {
        "kind": "tune",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": _public_name(backend),
        "backend": backend.runtime,
        "recipe": rec.name,
        "behaviour": str(behaviour),
        "detector": detector_description(behaviour),
        "goal": goal,
        "split": "validation",
        "seed": budget.seed,
        "trials_requested": budget.trials,
        "timeout_s": budget.timeout,
        "trials_run": len(found.trials),
        "stopped_by": found.stopped_by,
        "seconds": round(found.seconds, 1),
        "config": asdict(val.cfg),  # the validation trials' (the test split is scored in full)
        "space": space.model_dump(),
        "m_range": list(m_range),
        "objectives": dict(zip(F.OBJECTIVES, F.DIRECTIONS)),
        "kl_budget": budget.kl_budget,
        "collateral_budget": budget.collateral_budget,
        "rule": F.rule_text(budget.kl_budget, budget.collateral_budget),
        "prompts": {"validation": _counts(validation), "test": _counts(test)},
        "baseline": val.metrics,
        "trials": found.trials,
        "pareto": front,
        "chosen": chosen["number"] if chosen else None,
    }
    test_results = test_records = None
    if chosen is not None:
        circuit = found.circuits[chosen["same_as"] if chosen["same_as"] is not None else chosen["number"]]
        test_results, test_records = _evaluate_test(
            Evaluator(backend, test, detector, cfg, allow_negative), circuit, document
        )
        document["test"] = _test_summary(test_results)
    _write(out[0], out[1], document, found, (rec, job.recipe_file, base), test_results, test_records)
    return TuneResult(out[0], len(found.trials), chosen, document.get("test"), found.seconds)


def _split(rec: Recipe, base: Path | None, split: str, limit: int | None = None) -> PromptSets:
    """A split's prompts, none of them a discovery prompt (nor, for the test split, a validation prompt)."""
    pos, neg = heldout_sets(rec, base, split=split, limit=limit)
    return PromptSets(pos, neg, protect_prompts(rec, base, split, limit))


def _attribute(backend: Backend, plan, protect: list[str]) -> Attribution:
    """The attribution sums over every layer (the window is searched), with the neutral and protect sets."""
    neutral = plan.neutral or load_prompts("builtin:neutral_diverse")
    # Every layer is reached and the neutral prompts run (a nonzero specificity asks for them), whatever the
    # recipe says: each trial then reselects from these sums.
    full = plan.selection.model_copy(
        update={"skip_first_layers": 0, "skip_last_layers": 0, "specificity": 1.0, "protect_weight": 0.0}
    )
    return attribute_on(backend, plan.positive, plan.negative, neutral, full, protect=protect)


def _evaluate_test(ev: Evaluator, circuit, document: dict) -> tuple[dict, list[dict]]:
    """The test split, measured once: the original (`ev`'s baseline) and the chosen edit."""
    metrics, records = ev.measure(circuit, circuit.multiplier, "chosen")
    results = results_document(
        "eval",
        document["model"],
        document["behaviour"],
        ev.cfg,
        ev.base,
        goal=document["goal"],
        split="test",
        backend=document["backend"],
        recipe=document["recipe"],
    )
    results["detector"] = document["detector"]
    results["baseline"], results["points"] = ev.metrics, [metrics]
    results["settings_chosen_on"] = "validation"
    return results, list(ev.records) + records


def _test_summary(results: dict) -> dict:
    """Rates before -> after with 95% Wilson intervals, KL, on the test split."""
    base, point = results["baseline"], results["points"][0]
    out = {}
    for name, hits, n in (
        ("positive", "positive_hits", "n_positive"),
        ("negative", "benign_hits", "n_negative"),
        ("protect", "protect_hits", "n_protect"),
    ):
        if n in base:
            out[name] = {
                "n": base[n],
                "original": base[hits] / base[n],
                "original_ci": F.wilson(base[hits], base[n]),
                "edited": point[hits] / point[n],
                "edited_ci": F.wilson(point[hits], point[n]),
            }
    return {**out, "kl_first": point["kl_first"], "kl_mean": point["kl_mean"], "ppl_ratio": point["ppl_ratio"]}


def _write(
    out: Path,
    overwrite: bool,
    document: dict,
    found: SearchResult,
    recipe: tuple,
    test_results: dict | None,
    test_records: list[dict] | None,
) -> None:
    """Everything into a temporary sibling of `out`, renamed into place at the end."""
    from cna_export.evaluate.report import write_report
    from cna_export.evaluate.sweep import save_results

    rec, recipe_file, base = recipe
    chosen = next((t for t in document["trials"] if t["number"] == document["chosen"] and "objectives" in t), None)

    with staged_output(Path(out), overwrite=overwrite) as tmp:
        (tmp / "validation").mkdir()
        (tmp / "validation" / "prompts.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in found.records), encoding="utf-8"
        )
        measured = [t for t in document["trials"] if "objectives" in t]
        index = {t["number"]: i for i, t in enumerate(measured)}
        title = f"{rec.name} on {document['model']} (validation)"
        F.plot_front(
            measured,
            [index[n] for n in document["pareto"]],
            index.get(document["chosen"]),
            document["kl_budget"],
            tmp / "front.png",
            title,
        )
        if chosen is not None:
            circuit = found.circuits[chosen["same_as"] if chosen["same_as"] is not None else chosen["number"]]
            circuit.save(tmp / CIRCUIT_FILE)
            point = Point(**{k: chosen[k] for k in Point.__dataclass_fields__})
            write_recipe(recipe_file, base, point, tmp, document)
            save_results(tmp / "test", test_results, test_records)
            write_report(tmp / "test", test_results, circuit)
        (tmp / "summary.md").write_text(summary(document), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(document, indent=1), encoding="utf-8")


def _public_name(backend: Backend) -> str:
    """The model as outputs name it: a Hub id, or the file or folder name of a local model (never its path)."""
    local = Path(backend.model_name).expanduser()
    return local.name if local.exists() else backend.model_name


def _counts(sets: PromptSets) -> dict:
    return {"positive": len(sets.positive), "negative": len(sets.negative), "protect": len(sets.protect)}


def summary(document: dict) -> str:
    """summary.md: the chosen point and the test split's numbers with their intervals."""
    lines = [
        f"# tune: {document['recipe']} on {document['model']}",
        "",
        f"{document['trials_run']} of {document['trials_requested']} trials ({document['stopped_by']}), "
        f"{document['seconds'] / 60:.1f} min, {document['backend']}, seed {document['seed']}. Detector: "
        f"{document['detector']}. Chosen on the validation split by: {document['rule']}.",
        "",
    ]
    chosen = next((t for t in document["trials"] if t["number"] == document["chosen"]), None)
    if chosen is None:
        return "\n".join(
            lines
            + [
                "No trial met the rule: nothing was chosen and the test split was not evaluated. "
                "See front.json and front.png for the best points found.",
                "",
            ]
        )
    o = chosen["objectives"]
    lines += [
        f"Chosen: trial {chosen['number']}, k = {chosen['k']}, m = {chosen['multiplier']:.3g}, skip "
        f"{chosen['skip_first_layers']} + {chosen['skip_last_layers']} layers, specificity "
        f"{chosen['specificity']:.2f}, protect weight {chosen['protect_weight']:.2f}, sign filter "
        f"{'on' if chosen['sign_filter'] else 'off'}. Validation: behaviour change "
        f"{100 * o['behaviour_change']:+.1f} points, collateral {100 * o['collateral']:.1f} points, KL "
        f"{o['kl']:.4f}.",
        "",
        "Test split (evaluated once, for the chosen point):",
        "",
        "| set | n | original [95% CI] | edited [95% CI] |",
        "|---|---|---|---|",
    ]
    test = document["test"]
    for name in ("positive", "negative", "protect"):
        if name in test:
            t = test[name]
            lines.append(
                f"| {name} | {t['n']} | {_pct(t['original'], t['original_ci'])} | {_pct(t['edited'], t['edited_ci'])} |"
            )
    lines += [
        "",
        f"KL first token {test['kl_first']:.4f}, mean {test['kl_mean']:.4f}; perplexity ratio {test['ppl_ratio']:.3f}.",
        "",
    ]
    return "\n".join(lines)


def _pct(rate: float, ci) -> str:
    return f"{100 * rate:.0f}% [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
