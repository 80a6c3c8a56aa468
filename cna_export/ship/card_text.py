"""The human part of a model card: what was changed, where the multipliers went, and how the edit measured.

`card.build_card` and `card.update_card` put this text under the card's front-matter; the provenance block and
the audit commands come from `cna_export.ship.provenance`.
"""

from __future__ import annotations

from typing import Any

from cna_export.arch import arch_for
from cna_export.circuit.format import Circuit
from cna_export.ship.adapter_card import sources_lines
from cna_export.ship.provenance import audit_lines, provenance_block


def library_of(files: dict[str, str]) -> tuple[bool, str]:
    """(holds a GGUF, the card's library_name): transformers while there are safetensors, else gguf."""
    has_gguf = any(name.endswith(".gguf") for name in files)
    dense = any(name.endswith(".safetensors") for name in files)
    return has_gguf, "gguf" if has_gguf and not dense else "transformers"


def _split_sentence(split: str | None, positive: Any = None, negative: Any = None) -> str:
    """Which prompts the evaluation numbers come from (the headline's `split`, and its prompt counts), in words."""
    counts = ""
    if isinstance(positive, int) and isinstance(negative, int):
        counts = f" ({positive} prompts with the behaviour, {negative} benign)"
    return {
        "test": f"These numbers come from the recipe's test split{counts}: prompts no setting was chosen on.",
        "validation": f"These numbers come from the validation split{counts}, the prompts the settings were chosen "
        "on; they overstate what to expect on new prompts.",
        "custom": f"These numbers come from prompt files given to `cna-export eval`{counts}.",
    }.get(split or "", f"Which prompt split these numbers{counts} come from was not recorded.")


def _checks_lines(checks: dict[str, Any] | None) -> list[str]:
    """Which checks the evaluation numbers come from (`cna_export.evaluate.report.checks_run`), in words."""
    if not checks:
        return []
    ran = [
        f"answers of up to {checks['answer_tokens']} greedy tokens"
        + (" (refusals also looked for past the opening: delayed refusals)" if checks.get("delayed_refusals") else ""),
        f"first-token KL and KL over the original's own first {checks['kl_answer_tokens']} answer tokens",
    ]
    skipped = []
    over, long = checks.get("over_refusal", "not run"), checks.get("long_context", "not run")
    (ran if over != "not run" else skipped).append(f"over-refusal set {over}" if over != "not run" else "over-refusal")
    (ran if long != "not run" else skipped).append(
        f"long-context check ({long})" if long != "not run" else "long-context check"
    )
    for name, label in (("mmlu", "MMLU"), ("judge", "an LLM judge")):
        (ran if checks.get(name) else skipped).append(label)
    text = "Checks run: " + "; ".join(ran) + "." + (f" Not run: {', '.join(skipped)}." if skipped else "")
    if checks.get("limit"):
        text += f" Only the first {checks['limit']} prompts of each set were used (`--limit`)."
    if checks.get("partial"):
        text += " The evaluation was stopped before it finished: these are partial numbers."
    return ["", text]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


# A multimodal wrapper's export: what the card adds to "What was changed".
WRAPPER_NOTE = (
    "- Only MLP neurons of the language model changed: the vision tower, the projector and the processor files "
    "are the source's, byte for byte."
)


def _expert_lines(circuit: Circuit) -> list[str]:
    """A mixture of experts: where the neurons sit among the experts, and how often each was routed to."""
    if not circuit.is_moe:
        return []
    spec = arch_for(circuit.model.model_type)
    routed = {(r.layer, r.expert): r.routed for r in (circuit.routing.coverage if circuit.routing else [])}
    lines = [
        "",
        f"Neurons inside experts are (layer, expert, index): {spec.experts.down.describe()} for a routed expert"
        + (", the shared expert's own down projection for `shared`" if spec.experts.shared_down else "")
        + "; a dense layer's are its MLP's. Their activation is the router weight times the input of the expert's "
        "down projection at the last token (0 when the token is not routed there).",
        "",
        "| layer | expert | neurons | prompts routed there (positive / negative) |",
        "|---:|---:|---:|---:|",
    ]
    for (layer, expert), count in circuit.expert_counts().items():
        cover = routed.get((layer, expert))
        where = "dense" if expert is None else expert
        share = f"{cover.get('positive', '-')} / {cover.get('negative', '-')}" if cover else "-"
        lines.append(f"| {layer} | {where} | {count} | {share} |")
    return lines


def _width_lines(circuit: Circuit) -> list[str]:
    """A model whose layers differ in MLP width (Gemma 4's double-wide layers): each width and its layers."""
    widths = circuit.model.layer_widths
    if widths is None:
        return []
    groups = {w: [i for i, x in enumerate(widths) if x == w] for w in sorted(set(widths))}
    where = {w: ("layer " if len(ls) == 1 else "layers ") + _spans(ls) for w, ls in groups.items()}
    return [
        "- MLP widths differ by layer: "
        + "; ".join(f"{w} neurons in {where[w]}" for w in groups)
        + " (a neuron's index is below its layer's width)"
    ]


def _spans(layers: list[int]) -> str:
    """'0-3, 5' for [0, 1, 2, 3, 5]."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def human_text(record: dict[str, Any], circuit: Circuit, base: str | None, name: str) -> str:
    edit, src = record["edit"], record["source"]
    total = circuit.num_neurons
    n = edit["neurons"]
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{src['model']}`"
    patched = library_of(record["files"])[1] == "gguf"  # the source GGUF patched in place, not a dense export
    site = arch_for(circuit.model.model_type).site(edit["target"], "gguf" if patched else "safetensors")
    overrides = sorted({nn.multiplier for nn in circuit.neurons if nn.multiplier is not None})
    lines = [
        "",
        f"# {base or src['model']}: {circuit.behaviour} edited with cna-export",
        "",
        f"This model is {origin} with one behaviour changed and nothing else: the MLP neurons that carry "
        f"**{circuit.behaviour}** (found by contrastive neuron attribution) are scaled, and the scale is folded "
        "into the weights. It loads and runs like the original; no hooks, adapters or custom code.",
        "",
        "## What was changed",
        "",
        f"- Behaviour: **{circuit.behaviour}**" + (f" (recipe `{circuit.recipe}`)" if circuit.recipe else ""),
        f"- Neurons: {n} of {total} MLP neurons ({100 * n / total:.3f}%) in {len(edit['neurons_per_layer'])} layers",
        f"- Multiplier: m = {edit['multiplier']:g} (0 removes a neuron, 1 keeps it, >1 amplifies it)"
        + (f"; per-neuron overrides: {', '.join(f'{m:g}' for m in overrides)}" if overrides else ""),
        _where_line(site, edit["target"], patched),
        *sources_lines(circuit),
        _identical_line(src, patched),
        *([WRAPPER_NOTE] if arch_for(circuit.model.model_type).text_config else []),
        *_width_lines(circuit),
        "",
        "| layer | neurons |",
        "|---:|---:|",
    ]
    lines += [f"| {layer} | {count} |" for layer, count in edit["neurons_per_layer"].items()]
    lines += _expert_lines(circuit)
    lines += ["", "## Evaluation", ""]
    metrics = record.get("metrics")
    if metrics:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in _flatten(metrics) if not name.startswith("checks.")]
        split = _split_sentence(metrics.get("split"), metrics.get("heldout_positive"), metrics.get("heldout_negative"))
        lines += ["", split, *_checks_lines(metrics.get("checks"))]
    else:
        lines.append(f"Not evaluated yet (`cna-export eval --model {src['model']} --edited {name} ...` measures it).")
    unhashed = []
    if None in record["files"].values():
        unhashed = [
            "Weight files listed with `null` were not hashed at export (`--file-hashes` does it); "
            "`cna-export push` records their sha256 before uploading.",
            "",
        ]
    lines += [
        "",
        *audit_lines(src["model"], name, record["files"], patched),
        "## Provenance",
        "",
        "Source, circuit and recipe hashes, tool version and the sha256 of every file in this repository "
        "(except this card):",
        "",
        *unhashed,
        *provenance_block(record),
    ]
    return "\n".join(lines)


def _where_line(site: Any, target: str, patched: bool) -> str:
    """Where the multipliers went: the checkpoint tensor of a dense export, the GGUF tensor of a patched file."""
    if patched:
        return (
            f"- Patched into: {site.describe()} of the GGUF file (`W_up[j, :] *= m`, the same edit as "
            "`W_down[:, j] *= m` for a gated MLP): in a quantized row only its f16 block scales are multiplied, "
            "the quantized values stay the source's"
        )
    where = site.describe() + (
        " (`W_down[:, j] *= m`)" if target == "down" else " (`W_up[j, :] *= m`, the same edit for a gated MLP)"
    )
    return f"- Folded into: {where}; exact, no approximation"


def _identical_line(src: dict[str, Any], patched: bool) -> str:
    if patched:
        return (
            "- Every other tensor of the GGUF file is byte-identical to the source file's, and so are the "
            "metadata and the vocabulary."
        )
    return "- Every other tensor is byte-identical to the source" + (
        " (as dequantized from its GGUF file)." if src.get("gguf_file") else "."
    )
