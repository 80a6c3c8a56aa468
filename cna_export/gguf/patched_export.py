"""GGUF in, GGUF out: the export of `run`, `apply` and `sweep --export` on a GGUF source. The circuit is patched into
a copy of the quantized file (`patch_gguf`: f16 block scales of the ffn_up rows, every other byte copied), in a
folder with the applied circuit, the recipe, the model card and, on request, an Ollama Modelfile. Nothing is
dequantized; the folder is itself a model source (`resolve` reads it as its .gguf)."""

from __future__ import annotations

import logging
from pathlib import Path

from cna_export.backends.options import ExportOptions
from cna_export.circuit.format import CIRCUIT_FILE, Circuit
from cna_export.io.names import check_name
from cna_export.io.output import OutputPlan
from cna_export.io.source import Source

log = logging.getLogger(__name__)


def export_patched_gguf(source: Source, circuit: Circuit, out: Path, options: ExportOptions | None = None) -> Path:
    """Write `out/` with the source GGUF patched by `circuit` (same file name, same quantization).

    Args:
        source: a GGUF source.
        circuit: the neurons and default multiplier.
        out: the export folder; must not exist unless `options.overwrite` (and then only one written by cna-export).
        options: multiplier, allow_negative, force (as for `patch_gguf`), overwrite; recipe_file (saved as
            `recipe.yaml`), base_model and metrics (for the card), hash_files (record the GGUF's sha256 in the card
            now; by default `push` records it), modelfile (also an Ollama `Modelfile` next to the GGUF).

    Returns:
        The folder.

    Example:
        >>> export_patched_gguf(resolve("smollm2.Q4_1.gguf"), circuit, Path("smol-no-refusal"))
    """
    from cna_export.gguf.patch import patch_gguf_report
    from cna_export.ship.card import copy_recipe, write_card

    o = options or ExportOptions()
    out = Path(out)
    check_name(source.path.name, "Model file name")  # it is the Modelfile's FROM line and is named in the card
    plan = OutputPlan(o.overwrite, protect=[source.path])
    plan.folder(out)
    with plan:
        tmp = plan.temp(out)
        gguf = tmp / source.path.name
        report = patch_gguf_report(
            source.path,
            circuit,
            gguf,
            multiplier=o.multiplier,
            force=o.force,
            allow_negative=o.allow_negative,
            layout=source.layout,
        )
        # The folder's circuit.json is the record of what was applied (patch-gguf's sidecar, renamed).
        applied = Circuit.load(report.sidecar)
        report.sidecar.replace(tmp / CIRCUIT_FILE)
        if o.recipe_file is not None:
            copy_recipe(o.recipe_file, tmp)
        if o.modelfile:
            from gguf import Keys

            from cna_export.gguf.ollama import write_modelfile

            write_modelfile(gguf, source.layout.get(Keys.Tokenizer.CHAT_TEMPLATE))
        write_card(
            tmp,
            source,
            applied,
            hash_weights=o.hash_files,
            target="up",
            base_model=o.base_model,
            source_weights_sha256=circuit.model.weights_sha256,
            metrics=o.metrics,
            name=out.name,
        )
    log.info("wrote %s: %s", out, report.summary())
    return out
