"""What `run` says when it is done: where the neurons are, a quick check of the edit on a few validation prompts,
the files written, the next commands, and a warning with its fix when the edit looks harmful.

The quick check is an evaluation like `eval`'s (`sweep.run_eval`, in the backend the run discovered with),
on the first `QUICK_PROMPTS` prompts of the recipe's validation split with short answers: the behaviour rate and
first-token KL, original against edited, and two answers side by side. It is a glance, not a measurement: report
`cna-export eval` numbers on the test split.

The warning thresholds come from the committed benchmarks (benchmarks/results/*.json, Qwen2.5-Coder-0.5B): every
edit there that left the model's answers intact stayed below first-token KL 0.5 and perplexity ratio 1.25
(largest: KL 0.47, ratio 1.13), and every edit that garbled them was above both (KL 0.85 / x1.77 for a custom
recipe with most neurons in the last layer, issue 24; KL 1.79 / x2.25 for French at m = 4).
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from cna_export.backends.base import Backend
from cna_export.circuit.format import CIRCUIT_FILE, Circuit
from cna_export.errors import CnaExportError
from cna_export.evaluate.chat import Exchange
from cna_export.evaluate.chat import render as render_chat
from cna_export.evaluate.measure import EvalConfig

log = logging.getLogger(__name__)

MAX_LAYER_SHARE = 0.5  # more than this share of the neurons in one layer: warn
KL_FIRST_WARN = 0.5  # first-token KL on the quick check's benign prompts above this: warn
PPL_RATIO_WARN = 1.25  # perplexity of the original's benign answers under the edit, relative, above this: warn
QUICK_PROMPTS = 4  # validation prompts per set in the quick check
QUICK_TOKENS = 16  # greedy tokens per answer in the quick check: a refusal is stated in its first dozen
TOP_LAYERS = 5  # layers listed under "where the neurons are"


@dataclass
class RunSummary:
    """What a `run` produced, for `render`: the circuit, the export, the quick check (None: not run) and how the
    user named things (so the next commands can be pasted as they are)."""

    circuit: Circuit
    out: Path
    model: str
    recipe: str
    adapter: bool = False
    check: dict | None = None  # {"baseline": metrics, "edited": metrics, "exchanges": [...], "detector": bool}
    check_note: str | None = None  # why the quick check did not run
    warnings: list[str] = field(default_factory=list)


# Warnings ----------------------------------------------------------------------------------------------------


def layer_warning(circuit: Circuit) -> str | None:
    """A warning when more than `MAX_LAYER_SHARE` of the neurons sit in one layer, with the fix."""
    counts = circuit.layer_counts()
    if not counts:
        return None
    layer, n = max(counts.items(), key=lambda kv: kv[1])
    total = len(circuit.neurons)
    if n / total <= MAX_LAYER_SHARE:
        return None
    last = circuit.model.num_layers - 1 - layer
    where = "the last layer" if last == 0 else f"layer {layer}" + (f" ({last} from the end)" if last < 4 else "")
    fix = (
        f"leave the last layers out (--skip-last-layers {last + 1}, or skip_last_layers: {last + 1} in the recipe)"
        if last < 4
        else f"leave that layer out (--skip-first-layers {layer + 1} if it is an early one)"
    )
    return (
        f"{n} of {total} neurons ({100 * n / total:.0f}%) are in {where}: an edit concentrated in one layer often "
        f"garbles the output. Fix: {fix}, rank by specificity (--specificity 1), or lower --fraction."
    )


def check_warnings(edited: dict) -> list[str]:
    """Warnings from the quick check's metrics of the edited model (first-token KL, perplexity ratio)."""
    out = []
    fix = (
        "Fix: select fewer neurons (--fraction, --top-k), use a multiplier closer to 1, or let `cna-export "
        "sweep` choose k and m within a KL budget."
    )
    if edited["kl_first"] > KL_FIRST_WARN:
        out.append(
            f"first-token KL {edited['kl_first']:.3f} on benign prompts is above {KL_FIRST_WARN}: the edit "
            f"changes ordinary answers, not only the behaviour. {fix}"
        )
    if edited["ppl_ratio"] > PPL_RATIO_WARN:
        out.append(
            f"the original's benign answers are {edited['ppl_ratio']:.2f}x as perplexing to the edited model "
            f"(above {PPL_RATIO_WARN}x): its text quality dropped. {fix}"
        )
    return out


def nothing_to_change(check: dict, multiplier: float) -> list[str]:
    """A warning when the original already sits where the edit pushes (a recipe that lowers a behaviour the model
    never shows on the quick check's prompts, or raises one it always shows): the edit then has little to do."""
    base = check["baseline"]
    if not check["detector"] or not base.get("n_positive"):
        return []
    hits, n = base["positive_hits"], base["n_positive"]
    if (multiplier < 1 and hits == 0) or (multiplier > 1 and hits == n):
        rate = "none" if hits == 0 else "all"
        return [
            f"the original shows {check['behaviour']} on {rate} of the {n} validation prompts checked: this model may "
            "not need this edit, and its effect cannot be seen here. Fix: measure it on the test split with "
            "`cna-export eval`, or use a recipe whose prompts this model answers the way you want to change."
        ]
    return []


# Quick check -------------------------------------------------------------------------------------------------


def quick_check(backend: Backend, circuit: Circuit, out: Path, recipe_ref: str, *, adapter: bool = False,
        prompts: int = QUICK_PROMPTS) -> dict:  # fmt: skip
    """Evaluate the export (or, for an adapter or an export this backend cannot run, the circuit applied at
    runtime) against the original on the first `prompts` prompts of the recipe's validation split, in the backend
    `run` discovered with; returns the two variants' metrics and two exchanges.

    Raises:
        CnaExportError: when the recipe has no held-out prompts (the caller reports it and goes on).
    """
    from cna_export import progress
    from cna_export.circuit.recipe import load_recipe
    from cna_export.evaluate.detectors import DETECTORS
    from cna_export.evaluate.options import HeldOut, Variants
    from cna_export.evaluate.sweep import heldout_sets, run_eval

    rec, base = load_recipe(recipe_ref)
    pos, neg = heldout_sets(rec, base, split="validation", limit=prompts)
    # A behaviour without a detector still gets KL and perplexity (the harm the check is for): the refusal detector
    # stands in, and its rate is not shown.
    known = rec.behaviour in DETECTORS
    behaviour = rec.behaviour if known else "refusal"
    cfg = EvalConfig(
        max_new_tokens=QUICK_TOKENS, batch_size=max(1, prompts), kl_tokens=8, chat_template=rec.chat_template
    )
    units = 2 * ((len(pos) + len(neg)) * cfg.max_new_tokens + len(neg) * 4)
    # The export itself when the backend runs it (llama.cpp runs the patched GGUF, not a dequantized folder).
    export = not adapter and backend.can_run(Path(out))
    variants = Variants(edited=Path(out)) if export else Variants(circuit=circuit)
    with progress.overall(units, "quick check"):
        results, records, _ = run_eval(
            backend, HeldOut(positive=pos, negative=neg, split="validation"), behaviour, cfg, variants
        )
    point = results["points"][0]
    answers: dict[str, dict[str, str]] = {}
    for r in records:
        if r["set"] == "positive":
            answers.setdefault(r["prompt"], {})[r["label"]] = r["answer"]
    exchanges = [Exchange(p, a.get("original", ""), a.get(point["label"], "")) for p, a in list(answers.items())[:2]]
    return {
        "baseline": results["baseline"],
        "edited": point,
        "exchanges": exchanges,
        "detector": known,
        "behaviour": rec.behaviour,
    }


def summarize_run(backend: Backend, circuit: Circuit, out: Path, *, model: str, recipe: str, adapter: bool = False,
        prompts: int = QUICK_PROMPTS) -> RunSummary:  # fmt: skip
    """The summary of one `run`: the layer warning always, the quick check on `prompts` validation prompts per set
    (0: skipped) in the backend the run used; a failing quick check is reported in the summary, never fails the run
    (the export is done)."""
    summary = RunSummary(circuit, Path(out), model, recipe, adapter)
    warning = layer_warning(circuit)
    summary.warnings += [warning] if warning else []
    if prompts < 1:
        summary.check_note = "skipped (--no-check)"
        return summary
    try:
        summary.check = quick_check(backend, circuit, out, recipe, adapter=adapter, prompts=prompts)
    except CnaExportError as exc:
        summary.check_note = f"not run: {exc}"
        return summary
    except KeyboardInterrupt:  # the export is complete: stopping the glance at it must not look like a failure
        summary.check_note = "stopped (Ctrl-C); the export is complete"
        return summary
    except Exception as exc:  # noqa: BLE001  (a glance that fails must not fail a finished export)
        log.debug("quick check failed", exc_info=True)
        summary.check_note = (
            f"failed ({exc.__class__.__name__}: {exc}); the export is complete, measure it with `cna-export eval`"
        )
        return summary
    summary.warnings += check_warnings(summary.check["edited"])
    summary.warnings += nothing_to_change(summary.check, circuit.multiplier)
    return summary


# Rendering ---------------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _rate(metrics: dict, hits: str, n: str) -> str:
    return f"{metrics[hits]}/{metrics[n]}"


def render(summary: RunSummary, width: int = 100) -> str:
    """The summary as text, for the terminal."""
    c, out = summary.circuit, summary.out
    counts = sorted(c.layer_counts().items(), key=lambda kv: (-kv[1], kv[0]))
    total = len(c.neurons)
    lines = [
        f"where: {total} neurons in {len(counts)} of {c.model.num_layers} layers; most in "
        + ", ".join(f"layer {layer} ({n}, {100 * n / total:.0f}%)" for layer, n in counts[:TOP_LAYERS])
    ]
    lines += ["", *_check_lines(summary, width)]
    files = sorted(p for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else [out]
    lines += ["", f"files in {out}:"]
    lines += [f"  {p.name}  {_size(p.stat().st_size)}" for p in files if p.is_file()]
    lines += ["", "next:", *(f"  {cmd}" for cmd in next_commands(summary))]
    lines += [""] + [f"warning: {w}" for w in summary.warnings] if summary.warnings else []
    return "\n".join(lines)


def _check_lines(summary: RunSummary, width: int) -> list[str]:
    check = summary.check
    if check is None:
        return [f"quick check: {summary.check_note}"]
    base, edited = check["baseline"], check["edited"]
    lines = [
        f"quick check on {base['n_positive']} + {base['n_negative']} validation prompts ({QUICK_TOKENS} tokens; "
        "`cna-export eval` measures the test split):"
    ]
    if check["detector"]:
        lines.append(
            f"  {check['behaviour']}: original {_rate(base, 'positive_hits', 'n_positive')}, edited "
            f"{_rate(edited, 'positive_hits', 'n_positive')}; on benign prompts "
            f"{_rate(base, 'benign_hits', 'n_negative')} -> {_rate(edited, 'benign_hits', 'n_negative')}"
        )
    else:
        lines.append(f"  {check['behaviour']}: no detector for this behaviour, so no rate (answers below)")
    lines.append(
        f"  first-token KL {edited['kl_first']:.3f} (warn above {KL_FIRST_WARN}), perplexity ratio "
        f"{edited['ppl_ratio']:.3f} (warn above {PPL_RATIO_WARN})"
    )
    shown = [replace(e, original=_clip(e.original), edited=_clip(e.edited)) for e in check["exchanges"]]
    return lines + ["", render_exchanges(shown, width)] if shown else lines


def _clip(text: str, chars: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 3] + "..."


def render_exchanges(exchanges: list[Exchange], width: int) -> str:
    return render_chat(exchanges, width).rstrip()


def next_commands(summary: RunSummary) -> list[str]:
    """The commands a user runs next, with the names they used."""
    q = shlex.quote
    model, out, recipe = q(summary.model), q(str(summary.out)), q(summary.recipe)
    name = summary.out.name or "edited"
    if summary.adapter:
        circuit = q(str(summary.out / CIRCUIT_FILE))
        return [
            f"cna-export eval --model {model} --circuit {circuit} --recipe {recipe} --out {q(name + '-eval')}",
            f"cna-export chat --model {model} --circuit {circuit} --prompt {q(_sample(summary))}",
            f"cna-export push {out} YOU/{name}",
        ]
    cmds = [
        f"cna-export eval --model {model} --edited {out} --recipe {recipe} --out {q(name + '-eval')}",
        f"cna-export chat --model {model} --edited {out} --prompt {q(_sample(summary))}",
        f"cna-export push {out} YOU/{name}",
    ]
    ggufs = sorted(summary.out.glob("*.gguf")) if summary.out.is_dir() else []
    if (summary.out / "Modelfile").is_file():
        cmds.append(f"ollama create {name} -f {q(str(summary.out / 'Modelfile'))}")
    elif ggufs:
        cmds.append(
            f"# Ollama: re-run with --modelfile for {q(str(summary.out / 'Modelfile'))}, then: "
            f"ollama create {name} -f {q(str(summary.out / 'Modelfile'))}"
        )
    else:
        cmds.append(
            f"cna-export gguf {out} -o {q(name + '-q8_0.gguf')} --outtype q8_0 --modelfile --ollama-create {name}"
        )
    return cmds


def _sample(summary: RunSummary) -> str:
    """A prompt to try in chat: the quick check's first positive prompt, else a generic one."""
    if summary.check and summary.check["exchanges"]:
        return summary.check["exchanges"][0].prompt
    return "How do I pick a lock?" if summary.circuit.behaviour == "refusal" else "Hello! What can you do?"
