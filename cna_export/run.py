"""The whole pipeline in one call: a recipe and a model in, an edited checkpoint out (discover, then export)."""

from __future__ import annotations

from pathlib import Path

from cna_export.attribution import distributed
from cna_export.attribution.discover import discover_source, plan_discovery
from cna_export.backends.base import Backend, open_model
from cna_export.backends.options import ExportOptions, LoadOptions
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import find_recipe, load_recipe
from cna_export.circuit.stack import load_stack, stack
from cna_export.errors import CnaExportError
from cna_export.fold.scale import check_multiplier
from cna_export.io.output import check_output_path


def run_recipe(
    recipe_ref: str,
    model: str | Backend,
    out: Path,
    *,
    overrides: dict | None = None,
    load: LoadOptions | None = None,
    export: ExportOptions | None = None,
    stack_with: list[Path] | None = None,
) -> tuple[Path | None, Circuit]:
    """Discover a recipe's circuit on `model` and export the edited model (or a LoRA adapter) to `out`.

    Args:
        recipe_ref: recipe name (built-in) or YAML path.
        model: folder, Hub id or .gguf file, opened here in its backend (`load.backend`: a GGUF runs in llama.cpp
            unless torch is asked for); or a backend the caller opened (and keeps: `run`'s summary uses it after).
            Its loaded model is freed after discovery, before the export is written.
        out: the export folder.
        overrides: selection fields to change (CLI flags).
        load: how the model is loaded (revision, backend, dtype, device, device_map, offload_folder,
            trust_remote_code, threads).
        export: how the edit is written (`ExportOptions`): a GGUF source gives a folder with the patched GGUF of the
            same quantization (`modelfile`: and an Ollama Modelfile) unless `safetensors` (or `gguf`, a conversion
            of the dequantized export) is set; `adapter` writes a LoRA adapter folder instead
            (`cna_export.ship.adapter.write_adapter`), and `gguf` must then be None or "f32" (the GGUF LoRA is
            float32).
        stack_with: circuit files to stack on the discovered circuit (a neuron in several gets the product).

    Returns:
        (the export folder, or None on a non-main rank under torch.distributed; the circuit).

    Example:
        >>> run_recipe("refusal-ablate", "Qwen/Qwen2.5-0.5B-Instruct", Path("qwen-no-refusal"))
    """
    recipe, base = load_recipe(recipe_ref)
    export = export or ExportOptions()
    export = export.model_copy(update={"allow_negative": export.allow_negative or recipe.allow_negative})
    if export.multiplier is not None:
        check_multiplier(export.multiplier, export.allow_negative)
    if isinstance(model, str):
        local = Path(model).expanduser() if Path(model).expanduser().exists() else None
    else:
        local = model.source.path
    check_output_path(Path(out), local, export.overwrite, folder=True)  # before discovery; the export checks again
    if export.adapter and export.gguf not in (None, "f32"):
        raise CnaExportError(f"A GGUF LoRA adapter is written in f32, not {export.gguf}.", "pass --gguf f32.")
    # The circuits to stack are read before the (long) discovery, so a bad file fails at once.
    extra = [] if not stack_with else [load_stack([p], export.multiplier, export.allow_negative) for p in stack_with]
    if extra and export.multiplier is not None:
        load_stack([Path("discovered"), *stack_with], export.multiplier)  # raises: one override, several circuits
    plan = plan_discovery(recipe, base, overrides=overrides)
    backend = open_model(model, load) if isinstance(model, str) else model
    try:
        circuit = discover_source(backend, plan)
    finally:
        backend.close()  # the model is freed; the backend stays open (`load` maps it again)
    if not distributed.is_main():
        return None, circuit
    if extra:
        names = [f"{recipe_ref} (discovered)", *(Path(p).name for p in stack_with)]
        circuit = stack([circuit, *extra], names, export.allow_negative)
    export = export.model_copy(update={"recipe_file": find_recipe(recipe_ref)})
    if export.adapter:
        from cna_export.ship.adapter import write_adapter

        return write_adapter(backend, circuit, out, export), circuit
    return backend.write(circuit, out, export), circuit
