"""The eval and sweep jobs, from what the user names (a model, a recipe, a circuit or an exported folder) to a
report folder: results.json, prompts.jsonl, report.md and plots, staged and committed whole (a partial report
when stopped), with one progress bar across every phase. The model is opened once, in its backend
(`cna_export.backends`): a GGUF in llama.cpp unless torch is asked for."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from cna_export import progress
from cna_export.backends.base import open_model
from cna_export.backends.options import ExportOptions, LoadOptions
from cna_export.circuit.companions import load_system_prompt
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import find_recipe, load_recipe
from cna_export.errors import CnaExportError
from cna_export.evaluate.declared import behaviour_of
from cna_export.evaluate.depth import DepthChecks, add_delayed_refusals, runner_extra
from cna_export.evaluate.judge import JUDGE_MIN_TOKENS
from cna_export.evaluate.measure import EvalConfig, lm_eval_check
from cna_export.evaluate.options import EvalRequest, HeldOut, SweepOptions, SweepRequest, Variants
from cna_export.evaluate.protect import note_protect, protect_prompts, split_protect
from cna_export.evaluate.report import headline, selection_scores, write_report
from cna_export.evaluate.stream import (
    RESULTS,
    ReportStream,
    mark_partial,
    report_outputs,
    staged_report,
    write_results,
)
from cna_export.evaluate.sweep import (
    eval_document,
    heldout_sets,
    parse_k,
    run_eval,
    split_of,
    sweep_source,
)
from cna_export.io.output import check_output_path
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
    model: str, out: Path, cfg: EvalConfig, request: EvalRequest, load: LoadOptions | None = None
) -> JobResult:
    """Evaluate a circuit (applied at runtime, at each multiplier) or an exported model against the original on
    held-out prompts, and write the report folder `out`.

    `out` must not exist unless `request.overwrite` (and then only as a folder cna-export wrote), nor overlap the
    model or the edited model. The card of `edited` is left alone unless `request.update_card`: the headline
    numbers are then added to it, labelled with their split and prompt counts, together with the report (both or
    neither; a partial report leaves the card as it was).

    The model runs in its backend (`load.backend`): a GGUF file in llama.cpp (a circuit is patched into temporary
    copies of the file; `edited` is a patched GGUF or the folder `run` wrote), anything else in torch. The report
    folder is staged and committed whole (`cna_export.evaluate.stream`): records are appended as each variant
    finishes, and Ctrl-C / SIGTERM after the original was measured commits a partial report.

    Args:
        request: the edit and the prompts (`EvalRequest`): split is the recipe's "test" split (reported numbers) or
            "validation" split (for choosing settings); limit keeps the first N prompts of each set (a quick
            evaluation on a CPU); mmlu_per_topic also scores MMLU offline (`cna_export.evaluate.mmlu`);
            lm_eval_include is a folder of local lm-eval task files; judge and judge_model also grade every answer
            with an LLM judge (`cna_export.evaluate.judge`): answers are then at least `JUDGE_MIN_TOKENS` long and
            verdicts are cached in `out/judge_cache.jsonl`; depth holds the optional checks (over-refusal set,
            long context; `cna_export.evaluate.depth`).
        load: how the model is loaded (`LoadOptions`).
    """
    r = request
    loaded = Circuit.load(r.circuit) if r.circuit else None
    if r.multipliers and loaded is None:
        raise CnaExportError("--multiplier needs --circuit.", "pass --circuit, or evaluate an --edited folder.")
    outputs = report_outputs(out, r.overwrite, [model, r.edited])
    card = _card_to_update(r.edited) if r.update_card else None
    if card is not None:
        outputs.file(card, overwrite=True, protect=())
    recorded = loaded.recipe if loaded is not None and not r.positive and not r.recipe else None
    # A recipe named by the circuit file (untrusted) must be a shipped one; a typed --recipe may be any path.
    rec, base = load_recipe(r.recipe or recorded, shipped_only=not r.recipe) if r.recipe or recorded else (None, None)
    pos, neg = heldout_sets(rec, base, r.positive, r.negative, split=r.split, limit=r.limit)
    # The recipe's protect set rides with the positive prompts and is split off after measuring (evaluate/protect.py).
    protect = protect_prompts(rec, base, r.split, r.limit) if rec is not None and r.positive is None else []
    questions = None
    if r.mmlu_per_topic:
        from cna_export.evaluate import mmlu

        questions = mmlu.stratified(mmlu.load_questions(r.mmlu_file), r.mmlu_per_topic)
    if r.judge and cfg.max_new_tokens < JUDGE_MIN_TOKENS:
        log.warning(
            "judged answers need %d tokens: generating %d instead of %d",
            JUDGE_MIN_TOKENS,
            JUDGE_MIN_TOKENS,
            cfg.max_new_tokens,
        )
        cfg = replace(cfg, max_new_tokens=JUDGE_MIN_TOKENS)
    behaviour = r.behaviour or (behaviour_of(rec, base) if rec else None) or (loaded.behaviour if loaded else None)
    cfg = with_system_prompt(cfg, rec, base, loaded)
    if behaviour is None:
        raise CnaExportError("Unknown behaviour to detect.", "pass --behaviour refusal (or a --recipe).")
    checks = r.depth.build(cfg, behaviour, r.limit)
    backend = open_model(model, load)
    if r.lm_eval_tasks and not backend.supports_lm_eval:
        raise CnaExportError("--lm-eval runs lm-evaluation-harness in torch.", "add --backend torch.")
    held = HeldOut(positive=pos + protect, negative=neg, split=split_of(rec, r.split, r.positive))
    variants = Variants(circuit=loaded, multipliers=r.multipliers, edited=r.edited, allow_negative=r.allow_negative)
    extras = _extras(r, questions, cfg, checks)
    count = 1 + (1 if r.edited is not None else len(r.multipliers or [0]) if loaded is not None else 0)
    units = (len(pos) + len(protect) + len(neg)) * cfg.max_new_tokens + len(neg) * SCORE_UNITS + checks.units()
    units += len(questions or []) * SCORE_UNITS
    stash: dict = {}  # the stream, once the staged folder exists (what a partial report is made from)

    def finish_partial(folder: Path, stopped_by: str) -> bool:
        stream = stash.get("stream")
        if stream is None or not stream.metrics:
            return False  # not even the original finished: nothing to report
        done = SimpleNamespace(positive=pos, negative=neg, metrics=stream.metrics[0])
        partial = eval_document(backend, behaviour, cfg, done, held.split, stream.metrics[1:])
        partial["points"], partial["edited"] = stream.metrics[1:], str(r.edited) if r.edited is not None else None
        note_protect(partial, pos, protect)
        mark_partial(partial, stopped_by, len(stream.metrics), count)
        _finish(folder, partial, stream, checks, rec, r.limit, questions, behaviour)
        write_report(folder, partial, loaded)
        return True

    try:
        with staged_report(outputs, out, finish_partial) as folder:
            stream = stash["stream"] = ReportStream(folder)

            def on_variant(metrics: dict, records: list[dict]) -> None:
                split_protect(metrics, records, len(pos), len(protect))  # in place: results see it too
                stream.add(metrics, [*records, *checks.take(metrics)])

            with progress.overall(count * units, "eval"):
                results, _, used = run_eval(
                    backend, held, behaviour, cfg, variants, extras=extras, on_variant=on_variant
                )
            note_protect(results, pos, protect)
            _finish(folder, results, stream, checks, rec, r.limit, questions, behaviour)
            if r.judge:
                graded = [x for x in stream.records if x["set"] in ("positive", "negative")]
                results["judge"] = judge_results(r.judge, r.judge_model, graded, folder / "judge_cache.jsonl")
                stream.rewrite()
                write_results(folder, results)
            write_report(folder, results, used)
            job = JobResult(headline(results), Path(out) / "report.md", card_updated=card is not None)
            if card is not None:
                from cna_export.ship.card import add_metrics

                add_metrics(Path(r.edited), job.headline, to=outputs.temp(card))  # the file hashes stay valid
    finally:
        backend.close()
    return job


def _card_to_update(edited: Path | None) -> Path:
    """The card of the exported folder `edited`, checked to be one cna-export wrote (`--update-card`)."""
    from cna_export.ship.card import CARD_NAME, read_provenance

    if edited is None:
        raise CnaExportError("--update-card needs --edited.", "pass the exported folder with --edited.")
    card = Path(edited) / CARD_NAME
    read_provenance(card)
    return card


def _extras(request: EvalRequest, questions: Sequence | None, cfg: EvalConfig, checks: DepthChecks) -> list:
    """The metrics every variant gets besides the behaviour's, in order: lm-eval (torch), MMLU, the depth checks."""
    extras = []
    if request.lm_eval_tasks:
        extras.append(lm_eval_check(request.lm_eval_tasks, request.lm_eval_limit, request.lm_eval_include))
    if questions:
        from cna_export.evaluate.mmlu import capability_check

        extras.append(capability_check(questions, cfg.batch_size))
    if checks.active:
        extras.append(runner_extra(checks, cfg))
    return extras


def _finish(
    folder: Path,
    results: dict,
    stream: ReportStream,
    checks: DepthChecks,
    rec,
    limit: int | None,
    questions: Sequence | None,
    behaviour: str,
) -> None:
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


def with_system_prompt(cfg: EvalConfig, rec, base: Path | None, circuit: Circuit | None) -> EvalConfig:
    """`cfg` with the system message the edit was made under: the recipe's, else the one the circuit recorded."""
    if cfg.system_prompt is not None:
        return cfg
    if rec is not None and rec.system_prompt is not None:
        return replace(cfg, system_prompt=load_system_prompt(rec.system_prompt, base))
    if circuit is not None and circuit.selection.system_prompt is not None:
        return replace(cfg, system_prompt=circuit.selection.system_prompt)
    return cfg


def judge_results(spec: str, model: str | None, records: list[dict], cache: Path) -> dict:
    """Grade `records` (in place) with the judge; the judge's verdict shares and its agreement with the regex."""
    from cna_export.evaluate import judge as J

    jd = J.make_judge(spec, model)
    J.judge_records(jd, records, J.VerdictCache(cache))
    labels = list(dict.fromkeys(r["label"] for r in records))
    return {
        "judge": jd.name,
        "rubric_version": J.RUBRIC_VERSION,
        "agreement": J.agreement(records),
        "per_label": {
            label: {
                "verdicts": J.judge_rates(records, label),
                "agreement": J.agreement([r for r in records if r["label"] == label]),
            }
            for label in labels
        },
    }


def sweep_job(
    model: str, cfg: EvalConfig, out: Path, request: SweepRequest, load: LoadOptions | None = None
) -> JobResult:
    """Attribute once with the recipe, sweep k x m on held-out prompts, write the report, and with
    `request.export` export the point the selection rule chose (a one-line error, after the report, when none
    qualifies). The model runs in its backend (a GGUF in llama.cpp unless `load.backend` is "torch"); the export
    is written in the source's format (a GGUF source: the patched GGUF). The report folder is staged as
    `eval_job`'s is: each point's records appended as it finishes, a partial report when stopped; `request.limit`:
    the first N prompts of each held-out set only."""
    r = request
    outputs = report_outputs(out, r.overwrite, [model])
    if r.export is not None:  # written after the sweep, by the backend's export (same rules)
        if Path(r.export).absolute() == Path(out).absolute():
            raise CnaExportError(f"--export {r.export} is also the --out report folder.", "choose another folder.")
        check_output_path(r.export, local_path(model), r.overwrite, folder=True)
    rec, base = load_recipe(r.recipe)
    backend = open_model(model, load)
    held_pos, held_neg = heldout_sets(rec, base, r.positive, r.negative, split="validation", limit=r.limit)
    points = len(r.ks) * len([m for m in r.multipliers if m != 1])
    units = (len(held_pos) + len(held_neg)) * cfg.max_new_tokens + len(held_neg) * SCORE_UNITS

    def finish_partial(folder: Path, stopped_by: str) -> bool:
        saved = folder / RESULTS
        if not saved.is_file():
            return False  # stopped before the original was measured
        partial = read_json(saved, lambda why: CnaExportError(f"{saved} is damaged ({why}).", "run the sweep again."))
        partial["limit"] = r.limit
        mark_partial(partial, stopped_by, 1 + len(partial["points"]), 1 + points)
        write_results(folder, partial)
        write_report(folder, partial)
        return True

    try:
        with staged_report(outputs, out, finish_partial) as folder:
            options = SweepOptions(
                ks=[parse_k(k) for k in r.ks],
                multipliers=r.multipliers,
                kl_budget=r.kl_budget,
                benign_budget=r.benign_budget,
                allow_negative=r.allow_negative,
                out=folder,
                limit=r.limit,
            )
            with progress.overall((1 + points) * units, "sweep"):
                results, _, circuits, att = sweep_source(backend, rec, base, cfg, options, r.positive, r.negative)
            results["limit"] = r.limit
            write_results(folder, results)
            chosen = results["points"][results["chosen"]] if results["chosen"] is not None else None
            shown = circuits[chosen["k"]] if chosen else circuits[max(circuits)]
            candidates, cuts = selection_scores(att, circuits)
            write_report(folder, results, shown, candidates, cuts, specificity=att.selection.specificity)
    finally:
        backend.close()
    job = JobResult(headline(results), Path(out) / "report.md", chosen=chosen)
    if r.export is None:
        return job
    if chosen is None:
        raise CnaExportError(
            "No sweep point meets the selection rule, so nothing was exported.",
            "raise --kl-budget or try other --k/--multipliers; see the report.",
        )
    circuit = circuits[chosen["k"]].model_copy(update={"multiplier": chosen["multiplier"]})
    export = ExportOptions(
        allow_negative=r.allow_negative or rec.allow_negative,
        overwrite=r.overwrite,
        recipe_file=find_recipe(r.recipe),
        metrics=job.headline,
    )
    job.export = backend.write(circuit, r.export, export)
    return job


def local_path(model: str) -> Path | None:
    """`model` when it is a local file or folder, so an output overlapping it is refused before the (long) work."""
    path = Path(model).expanduser()
    return path if path.exists() else None
