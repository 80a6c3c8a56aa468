"""The model card (README.md) of an exported folder: what was changed, how it measured, and where it came from.

The card is built with huggingface_hub's `ModelCard`/`ModelCardData` (front-matter the Hub understands:
`base_model`, `base_model_relation`, `library_name`, `license`, `tags`), a human section saying what was changed,
the evaluation numbers when there are any, and a machine-readable provenance block (fenced JSON after an HTML
comment marker) with the source, the circuit hash, the recipe, the tool version and the sha256 of every file.
`check_card` tells whether a folder still holds exactly the files its card lists (`cna_export.ship.hub.push` uses it).
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from cna_export.arch import arch_for
from cna_export.circuit.format import Circuit
from cna_export.errors import CheckpointError, CnaExportError
from cna_export.io.output import write_text_atomic
from cna_export.io.source import Source
from cna_export.io.untrusted_json import parse_json
from cna_export.ship.adapter_card import sources_lines
from cna_export.ship.provenance import (
    CARD_NAME,
    HUB_ID,
    MARKER,
    PROVENANCE_FORMAT,
    RECIPE_NAME,
    audit_lines,
    file_hashes,
    provenance,
    provenance_block,
    source_metadata,
)

log = logging.getLogger(__name__)

_BLOCK = re.compile(re.escape(MARKER) + r"\s*```json\n(.*?)\n```", re.S)
# The Hub's model tree knows these relations (hub docs, "Specifying a base model"): adapter, merge, quantized,
# finetune. A folded neuron edit changes full weights of the base model, which is what "finetune" means there.
RELATION = "finetune"




def preload() -> None:
    """Import huggingface_hub's card module on a worker thread (~0.1 s), so that an export, which writes the card
    last, finds it loaded: the import runs while the kernel copies the weights."""
    from importlib import import_module

    threading.Thread(target=import_module, args=("huggingface_hub.repocard",), daemon=True).start()


def build_card(folder: Path, source: Source, circuit: Circuit, *, base_model: str | None = None,
               name: str | None = None, **record: Any):  # fmt: skip
    """Build the model card of an exported folder (a `huggingface_hub.ModelCard`).

    Args:
        folder: the exported folder (weights, config, circuit.json, optional recipe.yaml).
        source: the model the export was made from.
        circuit: the circuit as applied (its multipliers are the ones folded in).
        base_model: the Hub id of the source, when it cannot be inferred (a local copy, a GGUF file).
        name: the folder's final name, for the audit command (`folder` may be its staging sibling).
        record: the provenance options (`cna_export.ship.provenance.provenance`): target, source_weights_sha256,
            metrics (also shown in a table), known_hashes, hash_weights.

    Returns:
        The card; `card.save(folder / "README.md")` writes it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    record = provenance(folder, source, circuit, **record)
    inherited = source_metadata(source)
    base = base_model or inherited.pop("base_model", None)
    inherited.pop("base_model", None)
    if base_model is not None:
        check_repo_id(base_model)
    if base is None:
        log.info("the card has no base_model (the source is not a Hub id); --base-model owner/name sets it")
    record["source"]["base_model"] = base
    has_gguf, library = _library(record["files"])
    tags = ["cna-export", _tag(circuit.behaviour), "neuron-editing"] + (["gguf"] if has_gguf else [])
    if circuit.recipe:
        tags.append(_tag(circuit.recipe))
    data = ModelCardData(
        base_model=base,
        library_name=library,
        pipeline_tag="text-generation",
        tags=tags,
        **inherited,
        **({"base_model_relation": RELATION} if base else {}),
    )
    body = _human_text(record, circuit, base, name or Path(folder).name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_card(folder: Path, source: Source, circuit: Circuit, **kwargs: Any) -> Path:
    """Build the card of `folder` (see `build_card`) and save it as `folder/README.md`."""
    path = Path(folder) / CARD_NAME
    build_card(folder, source, circuit, **kwargs).save(path)
    return path


def update_card(
    folder: Path, *, metrics: dict[str, Any] | None = None, rehash: bool = False, files: dict[str, str] | None = None,
    to: Path | None = None,
) -> Path:  # fmt: skip
    """Rewrite the card of an exported folder: add evaluation numbers, and/or re-hash its files.

    Use `rehash=True` after adding a file to an export (a GGUF conversion, say), so that the card lists it and
    `push` accepts the folder. `files` replaces the file list as it is (hashes checked by the caller). The
    front-matter is kept (a GGUF added gets its tag). The new card replaces the old one atomically, or is written
    to `to` (a staged output that replaces it later, with the other outputs of a command).

    Example:
        >>> update_card(Path("qwen-no-refusal"), metrics=headline_from(Path("eval-report")))
    """
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_NAME
    record = read_provenance(path)
    if metrics is not None:
        record["metrics"] = metrics
    if rehash:
        record["files"] = file_hashes(Path(folder))
    if files is not None:
        record["files"] = files
    card = ModelCard(path.read_text(encoding="utf-8"))
    has_gguf, card.data.library_name = _library(record["files"])
    if has_gguf:
        card.data.tags = [*(card.data.tags or []), *([] if "gguf" in (card.data.tags or []) else ["gguf"])]
    circuit = Circuit.load(Path(folder) / record["circuit"]["file"])
    body = _human_text(record, circuit, card.data.base_model, Path(folder).name)
    text = str(ModelCard(f"---\n{card.data.to_yaml()}\n---\n{body}"))
    if to is not None:
        Path(to).write_text(text, encoding="utf-8")
        return Path(to)
    return write_text_atomic(path, text, overwrite=True)


def add_metrics(folder: Path, metrics: dict[str, Any], to: Path | None = None) -> None:
    """Put evaluation numbers into the card of a folder exported by cna-export (`update_card`); the card shows
    the prompt split and counts they come from. Raises `CheckpointError` if the folder has no such card."""
    update_card(folder, metrics=metrics, to=to)


def copy_recipe(recipe_file: Path, folder: Path) -> None:
    """Keep the recipe an export came from next to its weights (hashed by the card like every file)."""
    shutil.copyfile(recipe_file, Path(folder) / RECIPE_NAME)


def _library(files: dict[str, str]) -> tuple[bool, str]:
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
    ran = [f"answers of up to {checks['answer_tokens']} greedy tokens"
           + (" (refusals also looked for past the opening: delayed refusals)" if checks.get("delayed_refusals")
              else ""),
           f"first-token KL and KL over the original's own first {checks['kl_answer_tokens']} answer tokens"]  # fmt: skip
    skipped = []
    over, long = checks.get("over_refusal", "not run"), checks.get("long_context", "not run")
    (ran if over != "not run" else skipped).append(f"over-refusal set {over}" if over != "not run" else "over-refusal")
    (ran if long != "not run" else skipped).append(f"long-context check ({long})" if long != "not run"
                                                   else "long-context check")  # fmt: skip
    for name, label in (("mmlu", "MMLU"), ("judge", "an LLM judge")):
        (ran if checks.get(name) else skipped).append(label)
    text = "Checks run: " + "; ".join(ran) + "." + (f" Not run: {', '.join(skipped)}." if skipped else "")
    if checks.get("limit"):
        text += f" Only the first {checks['limit']} prompts of each set were used (`--limit`)."
    if checks.get("partial"):
        text += " The evaluation was stopped before it finished: these are partial numbers."
    return ["", text]


def _tag(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "custom"


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
    return ["- MLP widths differ by layer: " + "; ".join(f"{w} neurons in {where[w]}" for w in groups)
            + " (a neuron's index is below its layer's width)"]  # fmt: skip


def _spans(layers: list[int]) -> str:
    """'0-3, 5' for [0, 1, 2, 3, 5]."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _human_text(record: dict[str, Any], circuit: Circuit, base: str | None, name: str) -> str:
    edit, src = record["edit"], record["source"]
    total = circuit.num_neurons
    n = edit["neurons"]
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{src['model']}`"
    patched = _library(record["files"])[1] == "gguf"  # the source GGUF patched in place, not a dense export
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
        unhashed = ["Weight files listed with `null` were not hashed at export (`--file-hashes` does it); "
                    "`cna-export push` records their sha256 before uploading.", ""]  # fmt: skip
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
        return (f"- Patched into: {site.describe()} of the GGUF file (`W_up[j, :] *= m`, the same edit as "
                "`W_down[:, j] *= m` for a gated MLP): in a quantized row only its f16 block scales are multiplied, "
                "the quantized values stay the source's")  # fmt: skip
    where = site.describe() + (" (`W_down[:, j] *= m`)" if target == "down" else
                               " (`W_up[j, :] *= m`, the same edit for a gated MLP)")  # fmt: skip
    return f"- Folded into: {where}; exact, no approximation"


def _identical_line(src: dict[str, Any], patched: bool) -> str:
    if patched:
        return ("- Every other tensor of the GGUF file is byte-identical to the source file's, and so are the "
                "metadata and the vocabulary.")  # fmt: skip
    return "- Every other tensor is byte-identical to the source" + (
        " (as dequantized from its GGUF file)." if src.get("gguf_file") else ".")  # fmt: skip


def read_provenance(card_path: Path) -> dict[str, Any]:
    """The provenance block of a card written by cna-export."""
    try:
        text = Path(card_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(
            f"{card_path} does not exist.", "export with cna-export (it writes the card), or pass --no-verify."
        ) from None
    match = _BLOCK.search(text)
    if match is None:
        raise CheckpointError(
            f"{card_path} has no cna-export provenance block.", "re-export the model, or pass --no-verify."
        )
    record = parse_json(match.group(1), lambda why: CheckpointError(
        f"The provenance block of {card_path} is not valid JSON ({why}).", "re-export."))  # fmt: skip
    if not isinstance(record, dict) or record.get("format") != PROVENANCE_FORMAT or "files" not in record:
        raise CheckpointError(f"The provenance block of {card_path} is not cna-export's.", "re-export.")
    return record


def check_card(folder: Path) -> dict[str, Any]:
    """Check that the files of `folder` are exactly those its card lists, with the same sha256.

    A file the card lists without a hash (weights exported without --file-hashes) gets the hash found now, and the
    card is rewritten with it, so what is uploaded records every file.

    Returns:
        The provenance record. Raises `CheckpointError` naming the first file that is missing, extra or changed.
    """
    folder = Path(folder)
    record = read_provenance(folder / CARD_NAME)
    listed: dict[str, str | None] = record["files"]
    found = file_hashes(folder, desc="checking hashes")
    for name in sorted(set(listed) | set(found)):
        if name not in found:
            problem = f"{folder}/{name} is listed in the model card but missing"
        elif name not in listed:
            problem = f"{folder}/{name} is not listed in the model card"
        elif listed[name] is not None and found[name] != listed[name]:
            problem = f"{folder}/{name} does not match the sha256 in the model card"
        else:
            continue
        raise CheckpointError(f"{problem}.", "re-export the folder (or pass --no-verify to push it as it is).")
    if None in listed.values():
        log.info("recording the sha256 of the weight files in the model card")
        update_card(folder, files=found)
        record["files"] = found
    return record


def check_repo_id(repo_id: str) -> None:
    """Raise `CnaExportError` unless `repo_id` looks like `owner/name`."""
    if not HUB_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise CnaExportError(f"{repo_id!r} is not a Hub repository id.", "use owner/name, e.g. me/qwen-no-refusal.")
