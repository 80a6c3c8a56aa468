"""The model card (README.md) of an exported folder: what was changed, how it measured, and where it came from.

The card is built with huggingface_hub's `ModelCard`/`ModelCardData` (front-matter the Hub understands:
`base_model`, `base_model_relation`, `library_name`, `license`, `tags`), a human section saying what was changed,
the evaluation numbers when there are any, and a machine-readable provenance block (fenced JSON after an HTML
comment marker) with the source, the circuit hash, the recipe, the tool version and the sha256 of every file.
`check_card` tells whether a folder still holds exactly the files its card lists (`cna_export.ship.hub.push` uses it).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cna_export import __version__
from cna_export.arch import arch_for
from cna_export.circuit.format import Circuit
from cna_export.errors import CheckpointError, CnaExportError
from cna_export.io.checkpoint import BackgroundHasher, sha256_file
from cna_export.io.source import Source

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
RECIPE_NAME = "recipe.yaml"
PROVENANCE_FORMAT = "cna-export-provenance"
_MARKER = f"<!-- {PROVENANCE_FORMAT} -->"
_BLOCK = re.compile(re.escape(_MARKER) + r"\s*```json\n(.*?)\n```", re.S)
_HUB_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+?)/?$")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# A folder inside the huggingface_hub cache: .../models--owner--name/snapshots/<commit>
_CACHE_DIR = re.compile(r"^models--([\w.-]+?)--([\w.-]+)$")
# The Hub's model tree knows these relations (hub docs, "Specifying a base model"): adapter, merge, quantized,
# finetune. A folded neuron edit changes full weights of the base model, which is what "finetune" means there.
RELATION = "finetune"


WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def preload() -> None:
    """Import huggingface_hub's card module on a worker thread (~0.1 s), so that an export, which writes the card
    last, finds it loaded: the import runs while the kernel copies the weights."""
    from importlib import import_module

    threading.Thread(target=import_module, args=("huggingface_hub.repocard",), daemon=True).start()


def file_hashes(
    folder: Path, desc: str = "hashing export", known: dict[str, str] | None = None, weights: bool = True
) -> dict[str, str | None]:
    """sha256 of every file in `folder` (relative posix path -> hex) except the card and hidden files.

    `known` digests (hashed while the files were written) are taken as they are; the rest are hashed on two threads.
    With `weights=False` the weight files are listed with no hash (None), as an export does without --file-hashes.
    """
    folder = Path(folder)
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    files = [p for p in files if p.relative_to(folder).as_posix() != CARD_NAME]
    known = known or {}
    unhashed = {p.relative_to(folder).as_posix() for p in files if not weights and p.suffix in WEIGHT_SUFFIXES}
    todo = [p for p in files if p.relative_to(folder).as_posix() not in known.keys() | unhashed]
    with (
        tqdm(total=sum(p.stat().st_size for p in todo), unit="B", unit_scale=True, desc=desc, leave=False) as bar,
        BackgroundHasher(folder) as hasher,
    ):
        for p in todo:
            hasher.submit(p)
        computed = hasher.results()
        bar.update(bar.total)
    merged = {**known, **computed}
    return {name: merged.get(name) for name in sorted(p.relative_to(folder).as_posix() for p in files)}


def source_metadata(source: Source) -> dict[str, Any]:
    """Card fields inherited from the source model: license (and its name/link), language, Hub base model id.

    Read from the source's README front-matter (folders and Hub snapshots) or the `general.*` keys of a GGUF file.
    """
    meta: dict[str, Any] = {}
    if source.is_gguf:
        from gguf import Keys

        from cna_export.gguf.check import check_gguf

        layout = check_gguf(source.path)
        keys = {
            "license": (Keys.General.LICENSE, str),
            "license_name": (Keys.General.LICENSE_NAME, str),
            "license_link": (Keys.General.LICENSE_LINK, str),
            "language": (Keys.General.LANGUAGES, list),
        }
        for name, (key, kind) in keys.items():
            if (value := layout.get(key, kind)) is not None:
                meta[name] = value
        url = layout.get(Keys.General.SOURCE_REPO_URL) or ""
        match = _HUB_URL.match(url)
        if match:
            meta["base_model"] = match.group(1)
    else:
        readme = source.folder / CARD_NAME
        if readme.is_file():
            from huggingface_hub import ModelCard

            try:
                data = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True).data.to_dict()
            except (ValueError, UnicodeDecodeError) as exc:  # a broken source card must not stop an export
                log.warning("ignoring the front-matter of %s (%s)", readme, exc)
                data = {}
            meta.update({k: data[k] for k in ("license", "license_name", "license_link", "language") if data.get(k)})
        hub = hub_origin(source)
        if hub is not None:
            meta["base_model"] = hub[0]
    return meta


def hub_origin(source: Source) -> tuple[str, str] | None:
    """(Hub id, commit) of a source that came from the Hub: resolved from an id, or a folder of the HF cache."""
    if source.is_gguf:
        return None
    if source.revision is not None and _HUB_ID.match(source.name):
        return source.name, source.revision
    folder = Path(source.folder)
    match = _CACHE_DIR.match(folder.parent.parent.name) if folder.parent.name == "snapshots" else None
    return (f"{match.group(1)}/{match.group(2)}", folder.name) if match else None


def _public_name(source: Source) -> str:
    """The source as the card names it: a Hub id as is, a local path by its last component only (a card is
    published; the layout of the author's disk is not its business)."""
    hub = hub_origin(source)
    return hub[0] if hub else Path(source.name).name


def provenance(
    folder: Path,
    source: Source,
    circuit: Circuit,
    *,
    target: str = "down",
    source_weights_sha256: str | None = None,
    metrics: dict[str, Any] | None = None,
    known_hashes: dict[str, str] | None = None,
    hash_weights: bool = True,
) -> dict[str, Any]:
    """The machine-readable record of an export; `files` covers every file of `folder` but the card."""
    recipe_path = Path(folder) / RECIPE_NAME
    hub = hub_origin(source)
    return {
        "format": PROVENANCE_FORMAT,
        "format_version": 1,
        "tool": "cna-export",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "model": _public_name(source),
            "revision": hub[1] if hub else source.revision,
            "gguf_file": source.gguf_file,
            "weights_sha256": source_weights_sha256,
        },
        "circuit": {"file": "circuit.json", "sha256": circuit.sha256()},
        "recipe": {
            "name": circuit.recipe,
            "file": RECIPE_NAME if recipe_path.is_file() else None,
            "sha256": sha256_file(recipe_path) if recipe_path.is_file() else None,
        },
        "edit": {
            "behaviour": circuit.behaviour,
            "target": target,
            "multiplier": circuit.multiplier,
            "neurons": len(circuit.neurons),
            "neurons_per_layer": {str(k): v for k, v in circuit.layer_counts().items()},
        },
        "metrics": metrics,
        "files": file_hashes(folder, known=known_hashes, weights=hash_weights),
    }


def build_card(
    folder: Path,
    source: Source,
    circuit: Circuit,
    *,
    target: str = "down",
    source_weights_sha256: str | None = None,
    metrics: dict[str, Any] | None = None,
    base_model: str | None = None,
    known_hashes: dict[str, str] | None = None,
    hash_weights: bool = True,
):
    """Build the model card of an exported folder (a `huggingface_hub.ModelCard`).

    Args:
        folder: the exported folder (weights, config, circuit.json, optional recipe.yaml).
        source: the model the export was made from.
        circuit: the circuit as applied (its multipliers are the ones folded in).
        target: `down` (down_proj columns) or `up` (up_proj rows).
        source_weights_sha256: combined sha256 of the source weights, when known.
        metrics: evaluation numbers (name -> number, or a nested dict), shown in a table and in the provenance.
        base_model: the Hub id of the source, when it cannot be inferred (a local copy, a GGUF file).
        known_hashes: sha256 of files already hashed while they were written (relative path -> hex).
        hash_weights: False lists the weight files without their sha256 (`push` adds them before uploading).

    Returns:
        The card; `card.save(folder / "README.md")` writes it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    record = provenance(folder, source, circuit, target=target, source_weights_sha256=source_weights_sha256,
                        metrics=metrics, known_hashes=known_hashes, hash_weights=hash_weights)  # fmt: skip
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
    body = _human_text(record, circuit, base)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_card(folder: Path, source: Source, circuit: Circuit, **kwargs: Any) -> Path:
    """Build the card of `folder` (see `build_card`) and save it as `folder/README.md`."""
    path = Path(folder) / CARD_NAME
    build_card(folder, source, circuit, **kwargs).save(path)
    return path


def update_card(
    folder: Path, *, metrics: dict[str, Any] | None = None, rehash: bool = False, files: dict[str, str] | None = None
) -> Path:
    """Rewrite the card of an exported folder: add evaluation numbers, and/or re-hash its files.

    Use `rehash=True` after adding a file to an export (a GGUF conversion, say), so that the card lists it and
    `push` accepts the folder. `files` replaces the file list as it is (hashes checked by the caller). The
    front-matter is kept (a GGUF added gets its tag).

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
    body = _human_text(record, circuit, card.data.base_model)
    ModelCard(f"---\n{card.data.to_yaml()}\n---\n{body}").save(path)
    return path


def add_metrics(folder: Path, metrics: dict[str, Any]) -> bool:
    """Put evaluation numbers into the card of a folder exported by cna-export; False if it has no such card."""
    try:
        read_provenance(Path(folder) / CARD_NAME)
    except CheckpointError:
        log.warning("%s has no cna-export model card; the evaluation numbers were not added to it", folder)
        return False
    update_card(folder, metrics=metrics)
    return True


def copy_recipe(recipe_file: Path, folder: Path) -> None:
    """Keep the recipe an export came from next to its weights (hashed by the card like every file)."""
    shutil.copyfile(recipe_file, Path(folder) / RECIPE_NAME)


def _library(files: dict[str, str]) -> tuple[bool, str]:
    """(holds a GGUF, the card's library_name): transformers while there are safetensors, else gguf."""
    has_gguf = any(name.endswith(".gguf") for name in files)
    dense = any(name.endswith(".safetensors") for name in files)
    return has_gguf, "gguf" if has_gguf and not dense else "transformers"


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


def _human_text(record: dict[str, Any], circuit: Circuit, base: str | None) -> str:
    edit, src = record["edit"], record["source"]
    total = circuit.model.num_layers * circuit.model.intermediate_size
    n = edit["neurons"]
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{src['model']}`"
    site = arch_for(circuit.model.model_type).site(edit["target"])
    where = site.describe() + (" (`W_down[:, j] *= m`)" if edit["target"] == "down" else
                               " (`W_up[j, :] *= m`, the same edit for a gated MLP)")  # fmt: skip
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
        f"- Folded into: {where}; exact, no approximation",
        "- Every other tensor is byte-identical to the source"
        + (" (as dequantized from its GGUF file)." if src.get("gguf_file") else "."),
        "",
        "| layer | neurons |",
        "|---:|---:|",
    ]
    lines += [f"| {layer} | {count} |" for layer, count in edit["neurons_per_layer"].items()]
    lines += ["", "## Evaluation", ""]
    metrics = record.get("metrics")
    if metrics:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in _flatten(metrics)]
    else:
        lines.append("Not evaluated yet (`cna-export eval --model SOURCE --edited THIS_FOLDER ...` measures it).")
    unhashed = []
    if None in record["files"].values():
        unhashed = ["Weight files listed with `null` were not hashed at export (`--file-hashes` does it); "
                    "`cna-export push` records their sha256 before uploading.", ""]  # fmt: skip
    lines += [
        "",
        "## Audit",
        "",
        "`circuit.json` lists every neuron and multiplier. To check that these weights are exactly the source with "
        "that circuit folded in, and nothing else changed:",
        "",
        "```bash",
        "cna-export diff SOURCE_MODEL THIS_FOLDER --verify circuit.json",
        "```",
        "",
        "## Provenance",
        "",
        "Source, circuit and recipe hashes, tool version and the sha256 of every file in this repository "
        "(except this card):",
        "",
        *unhashed,
        _MARKER,
        "```json",
        json.dumps(record, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


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
    try:
        record = json.loads(match.group(1))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"The provenance block of {card_path} is not valid JSON ({exc}).", "re-export.") from None
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
    if not _HUB_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise CnaExportError(f"{repo_id!r} is not a Hub repository id.", "use owner/name, e.g. me/qwen-no-refusal.")
