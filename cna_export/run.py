"""The whole pipeline in one call: a recipe and a model in, an edited checkpoint out (discover, then export)."""

from __future__ import annotations

from pathlib import Path

from cna_export.attribution import distributed
from cna_export.attribution.discover import discover_source, plan_discovery
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import find_recipe, load_recipe
from cna_export.circuit.stack import load_stack, stack
from cna_export.errors import CnaExportError
from cna_export.fold.export import EXPORT_MARKER, apply_circuit
from cna_export.fold.scale import check_multiplier
from cna_export.io.output import check_output_path
from cna_export.io.source import resolve


def run_recipe(
    recipe_ref: str, model: str, out: Path, *, revision: str | None = None, overrides: dict | None = None,
    local_model: Path | None = None, load: dict | None = None, stack_with: list[Path] | None = None,
    adapter: bool = False, **export: object,
) -> tuple[Path | None, Circuit]:  # fmt: skip
    """Discover a recipe's circuit on `model` and export the edited checkpoint to `out`.

    Args:
        recipe_ref: recipe name (built-in) or YAML path.
        model: folder, Hub id or .gguf file.
        out: the export folder.
        overrides: selection fields to change (CLI flags).
        local_model: the model's local path, so an output that overlaps it is refused before discovery.
        load: model-loading options (dtype, device, device_map, offload_folder, trust_remote_code).
        stack_with: circuit files to stack on the discovered circuit (a neuron in several gets the product).
        adapter: write a LoRA adapter folder (`cna_export.ship.adapter.write_adapter`) instead of the edited model;
            `gguf` must then be None or "f32" (the GGUF LoRA is float32).
        export: `apply_circuit` options (multiplier, allow_negative, overwrite, target, gguf, ...). A GGUF source
            gives a folder with the patched GGUF of the same quantization (`modelfile`: and an Ollama Modelfile),
            unless `safetensors` (or `gguf`, a conversion of the dequantized export) is set.

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
    if adapter and export.get("gguf") not in (None, "f32"):
        raise CnaExportError(f"A GGUF LoRA adapter is written in f32, not {export['gguf']}.", "pass --gguf f32.")
    # The circuits to stack are read before the (long) discovery, so a bad file fails at once.
    extra = [] if not stack_with else [load_stack([p], export.get("multiplier"), allow_negative) for p in stack_with]
    if extra and export.get("multiplier") is not None:
        load_stack([Path("discovered"), *stack_with], export["multiplier"])  # raises: one override, several circuits
    plan = plan_discovery(recipe, base, overrides=overrides)
    source = resolve(model, revision)
    circuit = discover_source(source, plan, **(load or {}))
    safetensors, modelfile = bool(export.pop("safetensors", False)), bool(export.pop("modelfile", False))
    if not distributed.is_main():
        return None, circuit
    if extra:
        names = [f"{recipe_ref} (discovered)", *(Path(p).name for p in stack_with)]
        circuit = stack([circuit, *extra], names, allow_negative)
    if adapter:
        from cna_export.ship.adapter import write_adapter

        gguf, _ = export.pop("gguf", None), export.pop("hash_files", None)
        path = write_adapter(source, circuit, out, recipe_file=find_recipe(recipe_ref), allow_negative=allow_negative,
                             gguf=gguf is not None, **export)  # fmt: skip
        return path, circuit
    if source.is_gguf and not safetensors and export.get("gguf") is None:
        # GGUF in, GGUF out: the same quantized file with the circuit patched in (nothing dequantized).
        from cna_export.gguf.native_export import export_patched_gguf

        for unused in ("target", "gguf"):
            export.pop(unused, None)
        path = export_patched_gguf(source, circuit, out, recipe_file=find_recipe(recipe_ref),
                                   allow_negative=allow_negative, modelfile=modelfile, **export)  # fmt: skip
        return path, circuit
    path = apply_circuit(source, circuit, out, recipe_file=find_recipe(recipe_ref), allow_negative=allow_negative,
                         **export)  # fmt: skip
    return path, circuit
