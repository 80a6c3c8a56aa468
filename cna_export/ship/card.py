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
from importlib import import_module
from pathlib import Path
from typing import Any

from cna_export.circuit.format import Circuit
from cna_export.errors import CheckpointError, CnaExportError
from cna_export.io.output import write_text_atomic
from cna_export.io.source import Source
from cna_export.io.untrusted_json import parse_json
from cna_export.ship.card_text import human_text, library_of
from cna_export.ship.provenance import (
    CARD_NAME,
    HUB_ID,
    MARKER,
    PROVENANCE_FORMAT,
    RECIPE_NAME,
    file_hashes,
    provenance,
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
    has_gguf, library = library_of(record["files"])
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
    body = human_text(record, circuit, base, name or Path(folder).name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_card(folder: Path, source: Source, circuit: Circuit, **kwargs: Any) -> Path:
    """Build the card of `folder` (see `build_card`) and save it as `folder/README.md`."""
    path = Path(folder) / CARD_NAME
    build_card(folder, source, circuit, **kwargs).save(path)
    return path


def update_card(
    folder: Path,
    *,
    metrics: dict[str, Any] | None = None,
    rehash: bool = False,
    files: dict[str, str] | None = None,
    to: Path | None = None,
) -> Path:
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
    has_gguf, card.data.library_name = library_of(record["files"])
    if has_gguf:
        card.data.tags = [*(card.data.tags or []), *([] if "gguf" in (card.data.tags or []) else ["gguf"])]
    circuit = Circuit.load(Path(folder) / record["circuit"]["file"])
    body = human_text(record, circuit, card.data.base_model, Path(folder).name)
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


def _tag(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "custom"


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
    record = parse_json(
        match.group(1),
        lambda why: CheckpointError(f"The provenance block of {card_path} is not valid JSON ({why}).", "re-export."),
    )
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
