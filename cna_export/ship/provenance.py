"""Provenance of an export: where the source came from (Hub id and revision, license, base model) and the
machine-readable record the card carries (source, circuit hash, recipe, tool version, the sha256 of every file).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cna_export import __version__
from cna_export.circuit.format import CIRCUIT_FILE, Circuit
from cna_export.io.hashing import BackgroundHasher, sha256_file
from cna_export.io.source import Source
from cna_export.progress import bar as progress_bar

log = logging.getLogger(__name__)

PROVENANCE_FORMAT = "cna-export-provenance"
MARKER = f"<!-- {PROVENANCE_FORMAT} -->"  # what read_provenance looks for in a card
CARD_NAME = "README.md"
RECIPE_NAME = "recipe.yaml"
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
_HUB_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+?)/?$")
# A folder inside the huggingface_hub cache: .../models--owner--name/snapshots/<commit>
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_CACHE_DIR = re.compile(r"^models--([\w.-]+?)--([\w.-]+)$")


def source_metadata(source: Source) -> dict[str, Any]:
    """Card fields inherited from the source model: license (and its name/link), language, Hub base model id.

    Read from the source's README front-matter (folders and Hub snapshots) or the `general.*` keys of a GGUF file.
    """
    meta: dict[str, Any] = {}
    if source.is_gguf:
        from gguf import Keys

        layout = source.layout  # checked once, when the source was resolved
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
    if source.revision is not None and HUB_ID.match(source.name):
        return source.name, source.revision
    folder = Path(source.folder)
    match = _CACHE_DIR.match(folder.parent.parent.name) if folder.parent.name == "snapshots" else None
    return (f"{match.group(1)}/{match.group(2)}", folder.name) if match else None


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
            "model": source.public_name,
            "revision": hub[1] if hub else source.revision,
            "gguf_file": source.gguf_file,
            "weights_sha256": source_weights_sha256,
        },
        "circuit": {
            "file": CIRCUIT_FILE,
            "sha256": circuit.sha256(),
            # A stack names each circuit it was made of (cna_export.circuit.stack).
            **({"sources": [s.model_dump() for s in circuit.sources]} if circuit.sources else {}),
        },
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
        progress_bar(
            total=sum(p.stat().st_size for p in todo), unit="B", unit_scale=True, desc=desc, leave=False
        ) as bar,
        BackgroundHasher(folder) as hasher,
    ):
        for p in todo:
            hasher.submit(p)
        computed = hasher.results()
        bar.update(bar.total)
    merged = {**known, **computed}
    return {name: merged.get(name) for name in sorted(p.relative_to(folder).as_posix() for p in files)}


def provenance_block(record: dict[str, Any]) -> list[str]:
    """The card lines that carry the record: the marker, then the record as fenced JSON."""
    return [MARKER, "```json", json.dumps(record, indent=1), "```", ""]


def audit_lines(source: str, name: str, files: dict[str, Any], patched: bool) -> list[str]:
    """The card's Audit section: the one command that checks this folder against its source (exit 0 when it is
    exactly the source with circuit.json applied), run where both lie; a GGUF converted into a dense export gets
    the two commands that check it. `source` is the source as the card names it (a Hub id, or the name of a
    local folder or file), `name` this folder's name."""
    what = (
        "this GGUF file is exactly the source file with that circuit patched in"
        if patched
        else "these weights are exactly the source with that circuit folded in"
    )
    lines = [
        "## Audit",
        "",
        f"`circuit.json` lists every neuron and multiplier. To check that {what}, and nothing else changed (run it "
        "where the source and this folder both are; a local source is named by its folder or file name):",
        "",
        "```bash",
        f"cna-export diff {source} {name} --verify {name}/circuit.json",
        "```",
        "",
    ]
    converted = [] if patched else [f for f in files if f.endswith(".gguf")]
    for gguf in converted:
        outtype = gguf.removesuffix(".gguf").rsplit("-", 1)[-1]
        if outtype not in ("f32", "f16", "bf16"):
            lines += [
                f"`{gguf}` is these weights converted for llama.cpp and quantized, which rounds every block "
                "of the scaled tensors anew: it is checked through the weights above.",
                "",
            ]
            continue
        # `gguf` converts a local folder: a Hub source is converted from its downloaded snapshot.
        folder = "SOURCE_FOLDER" if "/" in source else source
        original = f"{source.replace('/', '-')}-{outtype}.gguf"
        lines += [
            f"`{gguf}` is these weights converted for llama.cpp. Converted the same way, the source checks it:",
            "",
            "```bash",
            f"cna-export gguf {folder} -o {original} --outtype {outtype}",
            f"cna-export diff {original} {name}/{gguf} --verify {name}/circuit.json",
            "```",
            "",
        ]
    return lines
