"""GGUF in, GGUF out: the export of `run` on a GGUF source. The circuit is patched into a copy of the quantized
file (`patch_gguf`: f16 block scales of the ffn_up rows, every other byte copied), in a folder with the applied
circuit, the recipe, the model card and, on request, an Ollama Modelfile. Nothing is dequantized."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cna_export.circuit.format import Circuit
from cna_export.io.output import check_output_path, staged_output
from cna_export.io.source import Source

log = logging.getLogger(__name__)

EXPORT_MARKER = "circuit.json"  # as in every export folder (cna_export.fold.export.EXPORT_MARKER)


def export_patched_gguf(
    source: Source, circuit: Circuit, out: Path, *, overwrite: bool = False, recipe_file: Path | None = None,
    base_model: str | None = None, hash_files: bool = False, modelfile: bool = False, **patch: Any,
) -> Path:  # fmt: skip
    """Write `out/` with the source GGUF patched by `circuit` (same file name, same quantization).

    Args:
        source: a GGUF source (`source.is_gguf`).
        circuit: the neurons and default multiplier.
        out: the export folder; must not exist unless `overwrite` (and then only one written by cna-export).
        patch: `patch_gguf_report`'s options (multiplier, allow_negative, force).
        recipe_file: saved as `recipe.yaml` beside the GGUF.
        base_model: the Hub id of the source for the model card.
        hash_files: record the GGUF's sha256 in the card now (by default `push` records it).
        modelfile: also write an Ollama `Modelfile` next to the GGUF.

    Returns:
        The folder.

    Example:
        >>> export_patched_gguf(resolve("smollm2.Q4_1.gguf"), circuit, Path("smol-no-refusal"))
    """
    from cna_export.gguf.patch import patch_gguf_report
    from cna_export.ship.card import copy_recipe, write_card

    out = Path(out)
    check_output_path(out, source.path, overwrite, marker=EXPORT_MARKER)
    with staged_output(out, overwrite, marker=EXPORT_MARKER) as tmp:
        gguf = tmp / source.path.name
        report = patch_gguf_report(source.path, circuit, gguf, **patch)
        # The folder's circuit.json is the record of what was applied (patch-gguf's sidecar, renamed).
        applied = Circuit.load(report.sidecar)
        report.sidecar.replace(tmp / EXPORT_MARKER)
        if recipe_file is not None:
            copy_recipe(recipe_file, tmp)
        if modelfile:
            from cna_export.gguf.ollama import write_modelfile

            write_modelfile(gguf)
        write_card(tmp, source, applied, hash_weights=hash_files, target="up", base_model=base_model,
                   source_weights_sha256=circuit.model.weights_sha256)  # fmt: skip
    log.info("wrote %s: %s", out, report.summary())
    return out
