"""The whole pipeline in one call: a recipe and a model in, an edited checkpoint out (discover, then export)."""

from __future__ import annotations

from pathlib import Path

from cna_export.attribution import distributed
from cna_export.attribution.discover import discover_source, plan_discovery
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import find_recipe, load_recipe
from cna_export.fold.export import EXPORT_MARKER, apply_circuit
from cna_export.fold.scale import check_multiplier
from cna_export.io.output import check_output_path
from cna_export.io.source import resolve


def run_recipe(
    recipe_ref: str, model: str, out: Path, *, revision: str | None = None, overrides: dict | None = None,
    local_model: Path | None = None, load: dict | None = None, **export: object,
) -> tuple[Path | None, Circuit]:  # fmt: skip
    """Discover a recipe's circuit on `model` and export the edited checkpoint to `out`.

    Args:
        recipe_ref: recipe name (built-in) or YAML path.
        model: folder, Hub id or .gguf file.
        out: the export folder.
        overrides: selection fields to change (CLI flags).
        local_model: the model's local path, so an output that overlaps it is refused before discovery.
        load: model-loading options (dtype, device, device_map, offload_folder, trust_remote_code).
        export: `apply_circuit` options (multiplier, allow_negative, overwrite, target, gguf, ...).

    Returns:
        (the export folder, or None on a non-main rank under torch.distributed; the circuit).

    Example:
        >>> run_recipe("refusal-ablate", "Qwen/Qwen2.5-0.5B-Instruct", Path("qwen-no-refusal"))
    """
    recipe, base = load_recipe(recipe_ref)
    allow_negative = bool(export.pop("allow_negative", False)) or recipe.allow_negative
    if export.get("multiplier") is not None:
        check_multiplier(export["multiplier"], allow_negative)
    check_output_path(Path(out), local_model, bool(export.get("overwrite")), marker=EXPORT_MARKER)
    plan = plan_discovery(recipe, base, overrides=overrides)
    source = resolve(model, revision)
    circuit = discover_source(source, plan, **(load or {}))
    if not distributed.is_main():
        return None, circuit
    path = apply_circuit(source, circuit, out, recipe_file=find_recipe(recipe_ref), allow_negative=allow_negative,
                         **export)  # fmt: skip
    return path, circuit
