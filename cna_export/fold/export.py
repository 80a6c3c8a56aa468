"""Export: fold a circuit into a checkpoint and write it as safetensors in the Hugging Face layout.

Each source shard becomes one output shard with the same name, tensor order and dtypes. Untouched tensors are
copied byte for byte without being decoded; only the MLP projections a circuit touches are read, scaled and
written. Everything goes into a temporary folder that is renamed into place at the very end.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from cna_export import __version__
from cna_export.arch.experts import SHARED, ExpertKey
from cna_export.arch.sites import Site
from cna_export.arch.spec import ArchSpec, ModelShape
from cna_export.backends.options import ExportOptions
from cna_export.circuit.format import CIRCUIT_FILE, Circuit
from cna_export.errors import ArchitectureError
from cna_export.fold.scale import LayerEdits, UnitEdits, fold_site_
from cna_export.io.checkpoint import INDEX_NAME, CheckpointReader, side_files
from cna_export.io.hashing import BackgroundHasher, StreamHash
from cna_export.io.output import OutputPlan, check_free_space
from cna_export.io.source import Source, describe, identity, load_model
from cna_export.io.temps import scratch_folder
from cna_export.io.writer import OutTensor, write_safetensors
from cna_export.ship.card import check_repo_id, copy_recipe, preload, write_card

log = logging.getLogger(__name__)

Target = Literal["down", "up"]


def unit_site(spec: ArchSpec, shape: ModelShape, layer: int, expert: ExpertKey, target: Target) -> tuple[Site, int]:
    """(checkpoint site, width) of one unit: a dense MLP (expert None), a routed expert, or the shared expert."""
    spec.check_target(target)  # gpt-oss's experts have no up site
    if expert is None:
        return spec.site(target), shape.width(layer)
    if spec.experts is None or shape.moe is None or layer in shape.moe.dense_layers:
        raise ArchitectureError(
            f"Layer {layer} of this {spec.model_type} model has no experts, but the circuit names expert {expert}.",
            "use a circuit discovered on this model.",
        )
    moe = shape.moe
    if expert != SHARED and not 0 <= expert < moe.num_experts or expert == SHARED and not moe.shared:
        raise ArchitectureError(
            f"This model has no expert {expert!r} in layer {layer}.", "use a circuit of this model."
        )
    return spec.experts.site(target, expert), moe.shared if expert == SHARED else moe.width


def _compose(edits: list[Callable]) -> Callable:
    """One in-place edit that applies several (the experts of one layer stacked in one 3-D tensor)."""

    def edit(tensor, **options):
        for fn in edits:
            fn(tensor, **options)

    return edit


def planned_edits(
    spec: ArchSpec, shape: ModelShape, edits: LayerEdits | UnitEdits, target: Target = "down"
) -> dict[str, Callable]:
    """Tensor name -> in-place edit for every tensor a circuit changes (the target's site in the checkpoint).

    `edits` is keyed by layer (dense) or by (layer, expert); each unit's neurons are folded where its site says
    (a per-expert 2-D tensor, a slice of a 3-D tensor that stacks experts, or the dense MLP)."""
    by_name: dict[str, list[Callable]] = {}
    for key, (index, mult) in edits.items():
        layer, expert = key if isinstance(key, tuple) else (key, None)
        site, width = unit_site(spec, shape, layer, expert, target)
        name = site.name(layer, expert)
        fn = partial(fold_site_, site=site, width=width, index=index, multiplier=mult, what=name)
        if site.expert_axis is not None:
            fn = partial(fn, expert=expert)
        by_name.setdefault(name, []).append(fn)
    return {name: fns[0] if len(fns) == 1 else _compose(fns) for name, fns in by_name.items()}


def _expected_shapes(spec: ArchSpec, shape: ModelShape, edits: LayerEdits | UnitEdits, target: Target) -> dict:
    """Tensor name -> the shape config.json implies for it."""
    out = {}
    for key in edits:
        layer, expert = key if isinstance(key, tuple) else (key, None)
        site, width = unit_site(spec, shape, layer, expert, target)
        experts = shape.moe.num_experts if shape.moe else None
        out[site.name(layer, expert)] = site.expected_shape(replace(shape, intermediate_size=width), experts)
    return out


def check_targets(
    reader: CheckpointReader,
    spec: ArchSpec,
    shape: ModelShape,
    edits: LayerEdits | UnitEdits,
    target: Target = "down",
) -> dict[str, Callable]:
    """The planned edits, after checking that every tensor they touch exists with the shape config.json implies."""
    changes = planned_edits(spec, shape, edits, target)
    shapes = _expected_shapes(spec, shape, edits, target)
    for name in changes:
        entry, expected = reader.entry(name), shapes[name]
        if entry.shape != expected:
            raise ArchitectureError(
                f"{name} has shape {list(entry.shape)} but config.json implies {list(expected)}.",
                "use the config.json that belongs to these weights.",
            )
    return changes


def preflight(
    source: Source, out: Path, spec: ArchSpec, shape: ModelShape, edits: LayerEdits | UnitEdits, target: Target
) -> None:
    """Check everything that can be checked before writing: weight headers, target shapes, every scaled value
    in its dtype (a dry run of the fold: a multiplier that makes a float16 weight inf), side files, space.

    A bad input then fails before any byte is written, and a disk that is too small fails before a multi-GB
    write rather than at its end. (GGUF sources are checked when they are dequantized.)
    """
    if source.is_gguf:
        return
    reader = CheckpointReader(source.folder)
    for name, edit in check_targets(reader, spec, shape, edits, target).items():
        edit(reader.tensor(name), dry_run=True)  # one tensor in memory at a time
    extra = [source.folder / INDEX_NAME] if (source.folder / INDEX_NAME).is_file() else []
    needed = sum((source.folder / f).stat().st_size for f in reader.files)
    needed += sum(p.stat().st_size for p in [*side_files(source.folder), *extra])
    check_free_space(Path(out).absolute().parent, needed)


def write_folded(
    src: Path,
    dst: Path,
    spec: ArchSpec,
    shape: ModelShape,
    edits: LayerEdits | UnitEdits,
    metadata: dict[str, str],
    target: Target = "down",
    hash_stream: Callable[[Path], StreamHash] | None = None,
) -> None:
    """Write the folded weights of folder `src` into the existing folder `dst`, plus the side files.

    `hash_stream(path)`, if given, returns the hash that follows each shard's writer (the model card's sha256s)."""
    reader = CheckpointReader(src)
    changes = check_targets(reader, spec, shape, edits, target)
    total = sum(e.nbytes for e in reader.entries.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="export") as bar:
        for file in reader.files:
            out = []
            for entry in reader.entries_in(file):
                edit = changes.get(entry.name)
                copy_from = (src / entry.file, entry.start)
                out.append(OutTensor(entry.name, entry.dtype, entry.shape, entry.nbytes, copy_from, edit=edit))
            meta = {**reader.file_metadata[file], "format": "pt", **metadata}
            write_safetensors(dst / file, out, meta, bar, hash_stream(dst / file) if hash_stream else None)
    if (src / INDEX_NAME).is_file():
        shutil.copyfile(src / INDEX_NAME, dst / INDEX_NAME)
    for path in side_files(src):
        shutil.copyfile(path, dst / path.name)


def materialize_gguf(source: Source, folder: Path, dtype: str = "float32") -> None:
    """Dequantize a GGUF model into a Hugging Face folder (weights, config, tokenizer, generation config)."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(source, dtype=dtype, device="cpu")
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers refuses to save a model still marked as GGUF-quantized
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    clean.load_state_dict(model.state_dict(), assign=True)
    clean.tie_weights()
    del model
    clean.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def apply_circuit(source: Source, circuit: Circuit, out: Path, options: ExportOptions | None = None, *,
        multiplier: float | None = None, target: Target | None = None) -> Path:  # fmt: skip
    """Fold `circuit` into `source` and export it to the folder `out`. The source is never modified.

    Args:
        source: resolved model (folder, Hub snapshot or GGUF file; a GGUF is dequantized to float32 first).
        circuit: neurons and default multiplier.
        out: output folder; must not exist unless `options.overwrite`.
        options: how the edit is written (`ExportOptions`; this function reads multiplier, allow_negative,
            overwrite, force, target, base_model, gguf, hash_files, recipe_file and metrics):
            multiplier overrides every neuron's multiplier; allow_negative accepts negative multipliers; force
            applies even if the circuit was discovered on different weights (same shape); target folds into
            `down` columns (default) or the equivalent `up` rows; recipe_file is saved as `recipe.yaml` in the
            folder; metrics are the evaluation numbers for the model card (README.md, written into every export);
            base_model is the Hub id of the source for the card, when it cannot be inferred (local copy, GGUF
            file); gguf also converts the export to `OUT/OUT-<gguf>.gguf` (outtype f32, f16, bf16 or q8_0),
            inside the staged folder, so the GGUF is listed in the card and a failure leaves no export behind;
            hash_files records the sha256 of every weight file in the card now (computed while writing). By
            default the card lists them without one and `push` records it before uploading: on a checkpoint in
            the page cache, sha256 (~2 GB/s a core) takes several times longer than the copy.
        multiplier, target: the same fields of `options`, for a call that varies only one of them.

    Returns:
        The output folder.

    Example:
        >>> apply_circuit(resolve("Qwen/Qwen2.5-0.5B-Instruct"), Circuit.load("c.json"), Path("out"))
    """
    opts = options or ExportOptions()
    if multiplier is not None or target is not None:
        given = {"multiplier": multiplier, "target": target}
        opts = opts.model_copy(update={k: v for k, v in given.items() if v is not None})
    multiplier, target = opts.multiplier, opts.target
    allow_negative, overwrite, force, base_model = opts.allow_negative, opts.overwrite, opts.force, opts.base_model
    out = Path(out)
    spec, shape, config = describe(source)
    edits = circuit.unit_edits(multiplier, allow_negative)
    plan = OutputPlan(overwrite, protect=[source.path])
    plan.folder(out)
    if base_model is not None:
        check_repo_id(base_model)  # before the export, not after it
    # Hash the weights only when there is something to compare with (cached after discover).
    weights = identity(source, config, shape).weights_sha256 if circuit.model.weights_sha256 and not force else None
    circuit.check_fits(config["model_type"], shape, weights, force)
    metadata = {
        "cna_export.version": __version__,
        "cna_export.io.source": source.public_name,
        "cna_export.circuit_sha256": circuit.sha256(),
        "cna_export.behaviour": circuit.behaviour,
    }
    applied = circuit.applied(multiplier)  # the record the export publishes (its names checked here, before writing)
    preflight(source, out, spec, shape, edits, target)
    preload()
    with plan, BackgroundHasher(plan.temp(out)) as hasher:
        tmp = plan.temp(out)
        stream = hasher.stream if opts.hash_files else None
        if source.is_gguf:
            with scratch_folder(out, "gguf") as dense:
                materialize_gguf(source, dense)
                write_folded(dense, tmp, spec, shape, edits, metadata, target, stream)
        else:
            write_folded(source.folder, tmp, spec, shape, edits, metadata, target, stream)
        applied.save(tmp / CIRCUIT_FILE)
        if opts.recipe_file is not None:
            copy_recipe(opts.recipe_file, tmp)
        if opts.gguf is not None:
            from cna_export.gguf.convert import export_gguf

            export_gguf(tmp, tmp / f"{out.name}-{opts.gguf}.gguf", outtype=opts.gguf)
        write_card(
            tmp,
            source,
            applied,
            known_hashes=hasher.results(),
            hash_weights=opts.hash_files,
            target=target,
            source_weights_sha256=weights,
            metrics=opts.metrics,
            base_model=base_model,
            name=out.name,
        )
    log.info("wrote %s", out)
    return out
