"""The eval and sweep jobs, from what the user names (a model, a recipe, a circuit or an exported folder) to a
report folder: results.json, prompts.jsonl, report.md and plots, staged and committed whole (a partial report
when stopped), with one progress bar across every phase."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from cna_export import progress
from cna_export.attribution.discover import use_llama_cpp
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import find_recipe, load_recipe
from cna_export.errors import CnaExportError
from cna_export.evaluate.depth import DepthChecks, DepthOptions, add_delayed_refusals
from cna_export.evaluate.judge import JUDGE_MIN_TOKENS
from cna_export.evaluate.measure import EvalConfig
from cna_export.evaluate.report import headline, selection_scores, write_report
from cna_export.evaluate.stream import (
    REPORT_MARKER,
    ReportStream,
    check_report_folder,
    mark_partial,
    staged_report,
    write_results,
)
from cna_export.evaluate.sweep import goal_of, heldout_sets, parse_k, results_document, run_eval, split_of, sweep_source
from cna_export.io.output import check_output_path
from cna_export.io.source import resolve
from cna_export.io.untrusted_json import read_json
from cna_export.progress import SCORE_UNITS

log = logging.getLogger(__name__)


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
    dtype: str = "auto", device: str = "auto", split: str = "test", mmlu_per_topic: int | None = None,
    mmlu_file: Path | None = None, judge: str | None = None, judge_model: str | None = None,
    lm_eval_include: Path | None = None, backend: str = "auto", limit: int | None = None,
    depth: DepthOptions = DepthOptions(),
) -> JobResult:  # fmt: skip
    """Evaluate a circuit (hooks, at each multiplier) or an exported folder against the original on held-out
    prompts; write the report into `out`, and the headline numbers into the export's card when it has one.

    The report folder is staged and committed whole (`cna_export.evaluate.stream`): records are appended as each
    variant finishes, and Ctrl-C / SIGTERM after the original was measured commits a partial report.

    Args:
        split: the recipe's "test" split (reported numbers) or "validation" split (for choosing settings).
        mmlu_per_topic: also score MMLU offline on this many questions per topic (`cna_export.evaluate.mmlu`).
        lm_eval_include: a folder of local lm-eval task files (offline tasks, e.g. `mmlu.lm_eval_local_task`).
        judge, judge_model: also grade every answer with an LLM judge (`cna_export.evaluate.judge`); answers are
            then at least `JUDGE_MIN_TOKENS` long and verdicts are cached in `out/judge_cache.jsonl`.
        backend: a GGUF model runs in llama.cpp (`cna_export.evaluate.native`: the circuit is patched into
            temporary copies of the file, `edited` is a patched GGUF) unless this is "torch".
        limit: the first N prompts of each set only (a quick evaluation on a CPU).
        depth: the optional checks (over-refusal set, long context; `cna_export.evaluate.depth`).
    """
    check_report_folder(out)
    loaded = Circuit.load(circuit) if circuit else None
    if multipliers and loaded is None:
        raise CnaExportError("--multiplier needs --circuit.", "pass --circuit, or evaluate an --edited folder.")
    recorded = loaded.recipe if loaded is not None and not positive and not recipe else None
    # A recipe named by the circuit file (untrusted) must be a shipped one; a typed --recipe may be any path.
    rec, base = load_recipe(recipe or recorded, shipped_only=not recipe) if recipe or recorded else (None, None)
    pos, neg = heldout_sets(rec, base, positive, negative, split=split, limit=limit)
    questions = None
    if mmlu_per_topic:
        from cna_export.evaluate import mmlu

        questions = mmlu.stratified(mmlu.load_questions(mmlu_file), mmlu_per_topic)
    if judge and cfg.max_new_tokens < JUDGE_MIN_TOKENS:
        log.warning("judged answers need %d tokens: generating %d instead of %d", JUDGE_MIN_TOKENS,
                    JUDGE_MIN_TOKENS, cfg.max_new_tokens)  # fmt: skip
        cfg = replace(cfg, max_new_tokens=JUDGE_MIN_TOKENS)
    behaviour = behaviour or (rec.behaviour if rec else None) or (loaded.behaviour if loaded else None)
    if behaviour is None:
        raise CnaExportError("Unknown behaviour to detect.", "pass --behaviour refusal (or a --recipe).")
    checks = depth.build(cfg, behaviour, limit)
    source, used_split = resolve(model, revision), split_of(rec, split, positive)
    native = use_llama_cpp(source, backend)
    if native and lm_eval_tasks:
        raise CnaExportError("--lm-eval runs lm-evaluation-harness in torch.", "add --backend torch.")
    variants = 1 + (1 if edited is not None else len(multipliers or [0]) if loaded is not None else 0)
    units = (len(pos) + len(neg)) * cfg.max_new_tokens + len(neg) * SCORE_UNITS + checks.units()
    units += len(questions or []) * SCORE_UNITS if native else 0
    held: dict = {}  # the stream, once the staged folder exists (what a partial report is made from)

    def finish_partial(folder: Path, stopped_by: str) -> bool:
        stream = held.get("stream")
        if stream is None or not stream.metrics:
            return False  # not even the original finished: nothing to report
        done = SimpleNamespace(positive=pos, negative=neg, metrics=stream.metrics[0])
        moved = [p["multiplier"] for p in stream.metrics[1:] if p["multiplier"] not in (None, 1)]
        partial = results_document("eval", source.name, behaviour, cfg, done, goal=goal_of(moved[0]) if moved else None,
                            split=used_split, **({"backend": "llama.cpp"} if native else {}))  # fmt: skip
        partial["points"], partial["edited"] = stream.metrics[1:], str(edited) if edited is not None else None
        mark_partial(partial, stopped_by, len(stream.metrics), variants)
        _finish(folder, partial, stream, checks, rec, limit, questions, behaviour)
        write_report(folder, partial, loaded)
        return True

    with staged_report(out, finish_partial) as folder:
        stream = held["stream"] = ReportStream(folder)

        def on_variant(metrics: dict, records: list[dict]) -> None:
            stream.add(metrics, [*records, *checks.take(metrics)])

        with progress.overall(variants * units, "eval"):
            if native:
                from cna_export.evaluate.depth import runner_extra
                from cna_export.evaluate.native import run_eval_gguf

                results, _, used = run_eval_gguf(
                    source.path, pos, neg, behaviour, cfg, model_name=source.name, split=used_split, circuit=loaded,
                    multipliers=multipliers, edited=edited, allow_negative=allow_negative, questions=questions,
                    extra=runner_extra(checks) if checks.active else None, on_variant=on_variant,
                )  # fmt: skip
            else:
                results, _, used = run_eval(
                    source, pos, neg, behaviour, cfg, circuit=loaded, multipliers=multipliers, edited=edited,
                    allow_negative=allow_negative, lm_eval_tasks=lm_eval_tasks, lm_eval_limit=lm_eval_limit,
                    dtype=dtype, device=device, split=used_split, lm_eval_include=lm_eval_include,
                    extra=_torch_extras(questions, cfg, checks), on_variant=on_variant,
                )  # fmt: skip
        _finish(folder, results, stream, checks, rec, limit, questions, behaviour)
        if judge:
            graded = [r for r in stream.records if r["set"] in ("positive", "negative")]
            results["judge"] = judge_results(judge, judge_model, graded, folder / "judge_cache.jsonl")
            stream.rewrite()
            write_results(folder, results)
        write_report(folder, results, used)
    job = JobResult(headline(results), Path(out) / "report.md")
    if edited is not None and (Path(edited) / "circuit.json").is_file():
        from cna_export.ship.card import add_metrics

        job.card_updated = add_metrics(Path(edited), job.headline)  # the card's file hashes stay valid
    return job


def _torch_extras(questions: Sequence | None, cfg: EvalConfig, checks: DepthChecks):
    """The torch route's `extra(model, tokenizer)`: MMLU and the optional checks, on every variant."""
    from cna_export.evaluate.depth import torch_extra
    from cna_export.evaluate.mmlu import capability_check

    parts = ([capability_check(questions, cfg.batch_size)] if questions else []) + (
        [torch_extra(checks, cfg)] if checks.active else [])  # fmt: skip
    if not parts:
        return None
    return lambda model, tokenizer: {k: v for part in parts for k, v in part(model, tokenizer).items()}


def _finish(folder: Path, results: dict, stream: ReportStream, checks: DepthChecks, rec, limit: int | None,
            questions: Sequence | None, behaviour: str) -> None:  # fmt: skip
    """What every results document of `eval` gets after the variants ran (or were stopped): the optional checks'
    description, delayed refusals, MMLU deltas, the recipe's split note; written with the records."""
    results["depth"], results["limit"] = checks.describe(), limit
    if behaviour == "refusal":
        add_delayed_refusals(results, stream.records)
    if questions:
        from cna_export.evaluate.mmlu import add_deltas

        add_deltas(results)
    if rec is not None:  # a report on the test split means little if the recipe was tuned on that split
        results["settings_chosen_on"] = rec.settings_chosen_on
    stream.rewrite()
    write_results(folder, results)


def judge_results(spec: str, model: str | None, records: list[dict], cache: Path) -> dict:
    """Grade `records` (in place) with the judge; the judge's verdict shares and its agreement with the regex."""
    from cna_export.evaluate import judge as J

    jd = J.make_judge(spec, model)
    J.judge_records(jd, records, J.VerdictCache(cache))
    labels = list(dict.fromkeys(r["label"] for r in records))
    return {
        "judge": jd.name, "rubric_version": J.RUBRIC_VERSION,
        "agreement": J.agreement(records),
        "per_label": {label: {"verdicts": J.judge_rates(records, label),
                              "agreement": J.agreement([r for r in records if r["label"] == label])}
                      for label in labels},
    }  # fmt: skip


def sweep_job(
    model: str, recipe: str, ks: Sequence[str], multipliers: Sequence[float], cfg: EvalConfig, out: Path, *,
    revision: str | None = None, positive: str | None = None, negative: str | None = None,
    kl_budget: float | None = 0.1, benign_budget: float | None = None, allow_negative: bool = False,
    export: Path | None = None, overwrite: bool = False, local_model: Path | None = None, dtype: str = "auto",
    device: str = "auto", backend: str = "auto", limit: int | None = None,
) -> JobResult:  # fmt: skip
    """Attribute once with the recipe, sweep k x m on held-out prompts, write the report, and with `export`
    export the point the selection rule chose (a one-line error, after the report, when none qualifies).
    A GGUF model runs in llama.cpp unless `backend` is "torch"; its export is then the patched GGUF.
    The report folder is staged as `eval_job`'s is: each point's records appended as it finishes, a partial
    report when stopped; `limit`: the first N prompts of each held-out set only."""
    check_report_folder(out)
    if export is not None:
        check_output_path(export, local_model, overwrite, marker="circuit.json")
    rec, base = load_recipe(recipe)
    source = resolve(model, revision)
    native = use_llama_cpp(source, backend)
    held_pos, held_neg = heldout_sets(rec, base, positive, negative, split="validation", limit=limit)
    points = len(ks) * len([m for m in multipliers if m != 1])
    units = (len(held_pos) + len(held_neg)) * cfg.max_new_tokens + len(held_neg) * SCORE_UNITS

    def finish_partial(folder: Path, stopped_by: str) -> bool:
        if not (folder / REPORT_MARKER).is_file():
            return False  # stopped before the original was measured
        marker = folder / REPORT_MARKER
        partial = read_json(marker, lambda why: CnaExportError(f"{marker} is damaged ({why}).", "run the sweep again."))
        partial["limit"] = limit
        mark_partial(partial, stopped_by, 1 + len(partial["points"]), 1 + points)
        write_results(folder, partial)
        write_report(folder, partial)
        return True

    with staged_report(out, finish_partial) as folder:
        options = dict(positive=positive, negative=negative, kl_budget=kl_budget, benign_budget=benign_budget,
                       allow_negative=allow_negative, out=folder, limit=limit)  # fmt: skip
        with progress.overall((1 + points) * units, "sweep"):
            if native:
                from cna_export.evaluate.native import sweep_source_gguf

                results, _, circuits, att = sweep_source_gguf(
                    source.path, source.name, rec, base, [parse_k(k) for k in ks], multipliers, cfg, **options
                )
            else:
                results, _, circuits, att = sweep_source(
                    source, rec, base, [parse_k(k) for k in ks], multipliers, cfg, dtype=dtype, device=device,
                    **options,
                )  # fmt: skip
        results["limit"] = limit
        write_results(folder, results)
        chosen = results["points"][results["chosen"]] if results["chosen"] is not None else None
        shown = circuits[chosen["k"]] if chosen else circuits[max(circuits)]
        candidates, cuts = selection_scores(att, circuits)
        write_report(folder, results, shown, candidates, cuts, specificity=att.selection.specificity)
    job = JobResult(headline(results), Path(out) / "report.md", chosen=chosen)
    if export is None:
        return job
    if chosen is None:
        raise CnaExportError("No sweep point meets the selection rule, so nothing was exported.",
                             "raise --kl-budget or try other --k/--multipliers; see the report.")  # fmt: skip
    circuit = circuits[chosen["k"]].model_copy(update={"multiplier": chosen["multiplier"]})
    negative_ok = allow_negative or rec.allow_negative
    if native:
        from cna_export.gguf.native_export import export_patched_gguf

        job.export = export_patched_gguf(source, circuit, export, overwrite=overwrite, recipe_file=find_recipe(recipe),
                                         allow_negative=negative_ok)  # fmt: skip
        return job
    from cna_export.fold.export import apply_circuit

    job.export = apply_circuit(source, circuit, export, allow_negative=negative_ok, overwrite=overwrite,
                               recipe_file=find_recipe(recipe), metrics=job.headline)  # fmt: skip
    return job
