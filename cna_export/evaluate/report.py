"""Reports: report.md with the measured table and PNG figures, and the headline numbers for a model card.

Input is the results document written by `cna_export.evaluate.sweep` (`results.json`): the original model's metrics
(`baseline`), one metrics dict per evaluated point, and for sweeps the Pareto front and the chosen point.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cna_export.circuit.format import Circuit
from cna_export.errors import CnaExportError
from cna_export.evaluate.plots import plot_delta_distribution, plot_layers, plot_metrics
from cna_export.io.output import write_text_atomic
from cna_export.io.untrusted_json import read_json


def chosen_point(results: dict) -> dict | None:
    """The point a report leads with: a sweep's chosen point, else the first edited point of an evaluation."""
    points = results.get("points", [])
    if results.get("kind") == "sweep":
        return points[results["chosen"]] if results.get("chosen") is not None else None
    moved = [p for p in points if p.get("multiplier") != 1]
    return moved[0] if moved else (points[0] if points else None)


def headline(results: dict) -> dict:
    """The numbers a model card shows: behaviour rate before/after, false positives, KL, quality.

    Example:
        >>> headline(json.loads(Path("eval/results.json").read_text()))["rate_edited"]
        0.15
    """
    base, point = results["baseline"], chosen_point(results)
    out = {
        "model": results["model"],
        "behaviour": results["behaviour"],
        # How the behaviour was detected: a recipe's declared detector, or the built-in one of that name.
        **({"detector": results["detector"]} if results.get("detector") else {}),
        # Which prompts these numbers come from: "test" (never used for choosing), "validation" (what settings
        # were chosen on), "custom" (user files) or "unspecified" (results written before splits existed).
        "split": results.get("split", "unspecified"),
        "heldout_positive": results["heldout"]["positive"],
        "heldout_negative": results["heldout"]["negative"],
        "max_new_tokens": results["config"]["max_new_tokens"],
        "kl_tokens": results["config"]["kl_tokens"],
        "checks": checks_run(results),
        "rate_original": base["rate"],
        "benign_rate_original": base["benign_rate"],
        "benign_refusal_rate_original": base["benign_refusal_rate"],
        "repetition_original": base["repetition"],
        "quality_original": base.get("quality", base["repetition"]),
        "ppl_original": base["ppl_original"],
    }
    if point is None:
        return out
    change = (point["rate"] - base["rate"]) / base["rate"] if base["rate"] else None
    out |= {
        "k": point["k"],
        "multiplier": point["multiplier"],
        "rate_edited": point["rate"],
        "relative_change": change,
        "benign_rate_edited": point["benign_rate"],
        "benign_refusal_rate_edited": point["benign_refusal_rate"],
        "kl_first": point["kl_first"],
        "kl_mean": point["kl_mean"],
        "ppl_edited": point["ppl"],
        "ppl_ratio": point["ppl_ratio"],
        "repetition_edited": point["repetition"],
        "quality_edited": point.get("quality", point["repetition"]),
    }
    for key in DEPTH_KEYS:  # the optional checks, where they were run
        if key in point:
            out[f"{key}_edited"], out[f"{key}_original"] = point[key], base.get(key)
    if "protect_rate" in point:  # the recipe's protect set: prompts whose behaviour must not change
        out |= {
            "heldout_protect": point["n_protect"],
            "protect_rate_original": base.get("protect_rate"),
            "protect_rate_edited": point["protect_rate"],
        }
    for key in ("measure_mean", "benign_measure_mean"):  # a measure detector's mean number, before -> after
        if key in point:
            out[f"{key}_original"], out[f"{key}_edited"] = base.get(key), point[key]
    if "mmlu_delta" in point:
        out["mmlu"] = {k: v for k, v in point["mmlu_delta"].items()}
    if results.get("judge"):
        j = results["judge"]
        out["judge"] = {
            "judge": j["judge"],
            "agreement": j["agreement"].get("agreement"),
            "kappa": j["agreement"].get("kappa"),
        }
    if "lm_eval" in point:
        out["lm_eval_edited"], out["lm_eval_original"] = point["lm_eval"], base.get("lm_eval")
    return out


def headline_from(path: Path) -> dict:
    """`headline` of a results.json file, or of the one inside an evaluation/sweep output folder."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    return headline(
        read_json(
            file,
            lambda why: CnaExportError(
                f"{file} is not valid JSON ({why}).", "pass the results.json written by eval or sweep."
            ),
        )
    )


# Metrics of the optional checks (cna_export.evaluate.depth) that a headline and the card carry when they were run.
DEPTH_KEYS = ("rate_anywhere", "over_refusal_rate", "long_context_accuracy")


def checks_run(results: dict) -> dict:
    """Which checks produced these numbers, for the report and the card: the answer length refusals were judged
    on, the KL positions, the optional sets, MMLU, the judge, and whether the run was cut short."""
    cfg, depth = results["config"], results.get("depth") or {}
    out = {
        "answer_tokens": cfg["max_new_tokens"],
        "kl_answer_tokens": cfg["kl_tokens"],
        "delayed_refusals": "rate_anywhere" in results["baseline"],
        "over_refusal": (depth.get("over_refusal") or {}).get("set", "not run"),
        "long_context": f"{depth['long_context']['items']} items" if depth.get("long_context") else "not run",
        "mmlu": "mmlu" in results["baseline"],
        "judge": bool(results.get("judge")),
    }
    if results.get("limit"):
        out["limit"] = results["limit"]
    if results.get("partial"):
        out["partial"] = True
    return out


def _pct(hits: int, n: int) -> str:
    return f"{hits}/{n} ({100 * hits / n:.0f}%)"


def table(results: dict) -> str:
    """Markdown table: the original model, then every point (Pareto-front and chosen points marked)."""
    rows = [
        "| point | k | m | positive rate | benign rate | benign refusals | KL first | KL mean | ppl ratio "
        "| repetition | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    front, chosen = set(results.get("pareto", [])), results.get("chosen")
    for i, p in enumerate([results["baseline"], *results["points"]]):
        idx = i - 1
        note = ", ".join(n for n, on in (("chosen", idx == chosen), ("Pareto", idx in front)) if on and idx >= 0)
        k = "-" if not p["k"] else str(p["k"])
        m = "-" if p["multiplier"] is None else f"{p['multiplier']:g}"
        refusals = round(p["benign_refusal_rate"] * p["n_negative"])
        rows.append(
            f"| {p['label']} | {k} | {m} | {_pct(p['positive_hits'], p['n_positive'])} "
            f"| {_pct(p['benign_hits'], p['n_negative'])} | {_pct(refusals, p['n_negative'])} "
            f"| {p['kl_first']:.4f} | {p['kl_mean']:.4f} | {p['ppl_ratio']:.3f} | {p['repetition']:.3f} | {note} |"
        )
    return "\n".join(rows)


def markdown(results: dict, figures: list[str]) -> str:
    """The whole report.md text."""
    cfg, held = results["config"], results["heldout"]
    split = results.get("split", "unspecified")
    lines = [
        f"# {results['behaviour']} edit: {results['kind']} on {results['model']}",
        "",
        f"**Split: {split}.** {SPLIT_NOTES.get(split, '')}",
        "",
        *_partial_lines(results),
        *([f"Detector: {results['detector']}.", ""] if results.get("detector") else []),
        *_tuned_on_test(results),
        f"Held-out prompts: {held['positive']} positive, {held['negative']} benign (none used for discovery). "
        f"Greedy generation, {cfg['max_new_tokens']} new tokens, batch {cfg['batch_size']}; "
        f"KL(original || edited) on the original's benign answers, first token and mean of the first "
        f"{cfg['kl_tokens']}; perplexity of the original's benign answers under the edited model (ratio to the "
        "original's own); repetition = 1 - repeated 4-gram share of the model's own answers.",
        "",
        table(results),
        "",
        *_protect_lines(results),
        *_depth_lines(results),
    ]
    if results["kind"] == "sweep":
        budget = results.get("kl_budget")
        rule = f"best {results['behaviour']} rate towards '{results['goal']}' with first-token KL <= {budget}"
        if results.get("benign_budget") is not None:
            rule += f" and benign rate <= {results['benign_budget']}"
        chosen = chosen_point(results)
        lines += [f"Selection rule: {rule}. Chosen: {chosen['label'] if chosen else 'none qualifies'}.", ""]
    lines += _mmlu_lines(results) + _judge_lines(results)
    lm = [(p["label"], p["lm_eval"]) for p in [results["baseline"], *results["points"]] if p.get("lm_eval")]
    if lm:
        lines += ["lm-eval-harness:", ""] + [f"- {label}: `{json.dumps(v)}`" for label, v in lm] + [""]
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


SPLIT_NOTES = {
    "test": "Every number here is from the test split, which no setting was chosen on.",
    "validation": "These numbers are from the validation split, the one settings are chosen on: report test-split "
    "numbers (`cna-export eval --recipe R`), not these.",
    "custom": "Prompts from the user's files.",
    "unspecified": "Written before recipes had splits: the prompts may be the ones settings were chosen on.",
}


def _partial_lines(results: dict) -> list[str]:
    p = results.get("partial")
    if not p:
        return []
    planned = f" of {p['variants_planned']}" if p.get("variants_planned") else ""
    return [
        f"**Partial report: the run was stopped ({p['stopped_by']}) after {p['variants_done']}{planned} variants "
        "(the original counted); only what finished is here.**",
        "",
    ]


def _depth_lines(results: dict) -> list[str]:
    """The checks that were run, in words, and the optional checks' numbers per variant."""
    cfg, depth = results["config"], results.get("depth") or {}
    lines = [
        "Checks run:",
        "",
        f"- answers of up to {cfg['max_new_tokens']} greedy tokens (`--max-new-tokens`); behaviour judged on "
        "their opening"
        + (
            ", refusals also anywhere in the answer (delayed refusals)"
            if "rate_anywhere" in results["baseline"]
            else ""
        ),
        f"- KL: first token, and over the original's own benign answers teacher-forced, first "
        f"{cfg['kl_tokens']} tokens (`--kl-tokens`)",
    ]
    if results.get("limit"):
        lines.append(f"- the first {results['limit']} prompts of each set only (`--limit`)")
    over, long = depth.get("over_refusal"), depth.get("long_context")
    lines.append(
        f"- over-refusal set `{over['set']}` ({over['n']} safe requests that sound risky)"
        if over
        else "- over-refusal set: not run (`--over-refusal builtin:NAME` or a file)"
    )
    lines.append(
        f"- long context: {long['items']} items, a fact at word {long['fact_at_word']} of "
        f"{long['words']}, asked about at the end"
        if long
        else "- long context: not run (`--long-context N`)"
    )
    rows = []
    for p in [results["baseline"], *results["points"]]:
        cells = []
        if "rate_anywhere" in p:
            cells.append(
                f"refusals anywhere {_pct(round(p['rate_anywhere'] * p['n_positive']), p['n_positive'])} "
                f"({p['delayed_hits']} delayed)"
            )
        if "over_refusal_rate" in p:
            cells.append(f"over-refusals {_pct(p['over_refusal_hits'], p['n_over_refusal'])}")
        if "long_context_accuracy" in p:
            cells.append(f"long-context correct {_pct(p['long_context_hits'], p['n_long_context'])}")
        if cells:
            rows.append(f"- {p['label']}: " + "; ".join(cells))
    return lines + [""] + (rows + [""] if rows else [])


def _tuned_on_test(results: dict) -> list[str]:
    if results.get("settings_chosen_on") == "test" and results.get("split") == "test":
        return [
            "Warning: the recipe says its settings were chosen on this same test split, so these numbers are "
            "optimistic.",
            "",
        ]
    return []


def _protect_lines(results: dict) -> list[str]:
    rows = [p for p in [results["baseline"], *results["points"]] if "protect_rate" in p]
    if not rows:
        return []
    return [
        "Protect set (prompts whose behaviour must not change), behaviour rate: "
        + "; ".join(f"{p['label']} {_pct(p['protect_hits'], p['n_protect'])}" for p in rows)
        + ".",
        "",
    ]


def _mmlu_lines(results: dict) -> list[str]:
    rows = [(p["label"], p["mmlu_delta"]) for p in results["points"] if p.get("mmlu_delta")]
    if not rows:
        return []
    out = ["MMLU (offline, zero-shot answer-letter log-likelihood, topic-stratified subset; paired bootstrap CI):", ""]
    for label, d in rows:
        out.append(
            f"- {label}: {100 * d['original']:.1f}% -> {100 * d['edited']:.1f}% ({100 * d['delta']:+.1f} "
            f"points, {100 * d['level']:.0f}% CI [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}], "
            f"n={d['n']})"
        )
    return out + [""]


def _judge_lines(results: dict) -> list[str]:
    j = results.get("judge")
    if not j:
        return []
    a = j["agreement"]
    out = [
        f"LLM judge `{j['judge']}` (rubric v{j['rubric_version']}): agreement with the regex on refused/not "
        f"{a.get('agreement', 0):.2f}, Cohen's kappa {a.get('kappa', 0):.2f} over {a['n']} answers "
        f"(regex only {a.get('regex_only', 0)}, judge only {a.get('judge_only', 0)}).",
        "",
    ]
    for label, v in j["per_label"].items():
        out.append(f"- {label}: {json.dumps(v['verdicts'])}")
    return out + [""]


def selection_scores(attribution, ks) -> tuple[np.ndarray, dict[str, float]]:
    """Scores of the candidate neurons of an attribution and, per k, the smallest score k selects (histogram)."""
    candidates = attribution.score[~attribution.excluded]
    ranked = candidates.sort(descending=True).values
    return candidates.numpy(), {f"k={k}": float(ranked[k - 1]) for k in ks}


def write_report(
    out: Path,
    results: dict,
    circuit: Circuit | None = None,
    abs_delta=None,
    cuts: dict[str, float] | None = None,
    specificity: float = 0.0,
) -> Path:
    """Write report.md and its PNGs into `out`, replacing earlier ones; returns the report path.

    Args:
        circuit: drawn as neurons per layer (for a sweep, the chosen or largest circuit).
        abs_delta: the selection score (|delta|, or its specificity-adjusted form) of every candidate neuron (a
            sweep's attribution), else the circuit's neurons' |delta| are used.
        cuts: label -> smallest selected score, drawn on the histogram.
        specificity: the attribution's specificity, which names the score in the histogram.
    """
    out = Path(out)  # the commands pass their staged report folder (cna_export.io.output.OutputPlan)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if circuit is not None:
        plot_layers(circuit, out / "layers.png")
        figures.append("layers.png")
        if abs_delta is None:
            abs_delta = [abs(n.delta) for n in circuit.neurons]
            cuts = cuts or {f"k={len(circuit.neurons)}": min(abs_delta)}
    if abs_delta is not None and len(abs_delta):
        name = f"|delta| - {specificity:g} x mean |neutral activation|" if specificity else "|delta|"
        plot_delta_distribution(abs_delta, cuts or {}, out / "delta.png", f"{name} on {results['model']}", score=name)
        figures.append("delta.png")
    points, base = results["points"], results["baseline"]
    title = f"{results['behaviour']} on {results['model']}"
    if any(p["multiplier"] is not None for p in points):
        plot_metrics(
            [p for p in points if p["multiplier"] is not None], base, "multiplier", "k", out / "metrics_vs_m.png", title
        )
        figures.append("metrics_vs_m.png")
    if len({p["k"] for p in points}) > 1:
        plot_metrics(points, base, "k", "multiplier", out / "metrics_vs_k.png", title)
        figures.append("metrics_vs_k.png")
    return write_text_atomic(out / "report.md", markdown(results, figures), overwrite=True)
