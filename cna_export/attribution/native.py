"""Contrastive Neuron Attribution inside llama.cpp: the forward passes of `collect_sets`, on a GGUF file as it is.

The model stays quantized and mmapped by llama.cpp. The prompt sets run together, as in the torch route: their
common chat-template prefix is decoded once into KV sequence 0 and shared (a unified cache: no copy), then the
prompts go in length-sorted groups of `batch_size` sequences per decode. A tap on the graph (see
`cna_export.gguf.llamacpp`) reads the input of each layer's `ffn_down` at every sequence's last token and adds it
to its set's float64 sums (`_Sums`, the same accumulator as the torch route, so `SetStats` means the same); the
graph ends after the last layer that can be selected.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cna_export.arch import ArchSpec, ModelShape, arch_for, model_type_for_gguf
from cna_export.attribution.collect import SetStats, _Sums, common_prefix
from cna_export.attribution.select import Attribution, from_stats, prepare
from cna_export.circuit.format import ModelIdentity, prompt_set
from cna_export.circuit.selection import Selection
from cna_export.errors import RecipeError
from cna_export.gguf.check import check_gguf, gguf_shape
from cna_export.gguf.llamacpp import FfnDownTap, LlamaCppModel, Seq
from cna_export.io.hashing import combined_sha256, sha256_files

log = logging.getLogger(__name__)


def _groups(tagged: list[tuple[int, list[int]]], batch_size: int) -> list[list[int]]:
    """Indices of `tagged` in length-sorted groups of at most `batch_size` (the torch route's order)."""
    order = sorted(range(len(tagged)), key=lambda i: (len(tagged[i][1]), i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def collect_sets_gguf(
    model: LlamaCppModel,
    spec: ArchSpec,
    shape: ModelShape,
    sets: Sequence[list[list[int]]],
    batch_size: int,
    top_n: int | None = None,
    last_layer: int | None = None,
    share_prefix: bool = True,
) -> list[SetStats]:
    """Per prompt set, sum the last-token input of every layer's ffn_down (float64), through llama.cpp.

    Args:
        model: the loaded GGUF.
        spec, shape: the architecture row (its `gguf_down` site names the tensors) and the model's shape.
        sets: token ids per prompt, per set.
        batch_size: sequences per decode.
        top_n: also count per-layer top-|act| membership and sum |act| (neutral prompts).
        last_layer: the last layer read (default: the model's last); later layers are not computed.

    Returns:
        One `SetStats` per set, as `collect_sets` returns them.
    """
    last = shape.num_layers - 1 if last_layer is None else last_layer
    sums = _Sums(len(sets), shape.intermediate_size, top_n)
    names = {spec.gguf_down.name(i).encode(): i for i in range(last + 1)}

    # The tap only copies rows out; they are added after each decode. Torch work inside the callback would wake its
    # thread pool while llama.cpp's threads wait for the main thread, and the two pools fight for the cores.
    pending: list[tuple[int, np.ndarray]] = []
    tap = FfnDownTap(names, shape.intermediate_size, last, lambda layer, rows: pending.append((layer, rows)))
    tagged = [(k, ids) for k, prompts in enumerate(sets) for ids in prompts]
    prefix = common_prefix([ids for _, ids in tagged]) if share_prefix else 0
    groups = _groups(tagged, batch_size)
    widest = max(sum(len(tagged[i][1]) - prefix for i in g) for g in groups)
    n_batch = max(widest, prefix, 1)
    n_ctx = prefix + widest + 8
    with model.context(n_ctx, n_batch, min(batch_size, len(tagged)), tap) as ctx:
        if prefix:
            # The prefix's KV cells go to sequence 0; every sequence of a group then shares them.
            tap.recording = False
            ctx.decode([Seq(tagged[0][1][:prefix], 0, output=False)])
            tap.recording = True
        for group in tqdm(groups, desc="llama.cpp forward passes", unit="batch", leave=False):
            sums.labels = torch.tensor([tagged[i][0] for i in group])
            for sid in range(1, len(group)):
                if prefix:
                    ctx.share(0, sid, prefix)
            ctx.decode([Seq(tagged[i][1][prefix:], prefix) for i in group])
            for layer, rows in pending:
                sums.add(layer, torch.from_numpy(rows))
            pending.clear()
            for sid in range(len(group)):
                ctx.forget(sid, prefix)
    return sums.stats([len(prompts) for prompts in sets], shape.num_layers)


def encode_sets(model: LlamaCppModel, sets: Sequence[Sequence[str]], chat_template: str | None) -> list[list[list[int]]]:
    """Token ids per prompt, per set, with the GGUF's own tokenizer and chat template."""
    out = []
    for prompts in sets:
        if not prompts:
            raise RecipeError("A prompt set is empty.", "give at least one prompt on each side.")
        out.append([model.encode(p, chat_template) for p in prompts])
    return out


def gguf_chat_template(path: Path, use: bool) -> str | None:
    """The GGUF's `tokenizer.chat_template` when `use` and the file has one."""
    if not use:
        return None
    from cna_export.gguf.ollama import read_chat_template

    return read_chat_template(path) or None


def describe_gguf(path: Path) -> tuple[ArchSpec, ModelShape, dict]:
    """Architecture row, shape and small metadata of a GGUF file, from its header alone (no transformers: its GGUF
    config reader parses the whole vocabulary, ~30 s for a Qwen file on 2 cores)."""
    layout = check_gguf(path)
    spec = arch_for(model_type_for_gguf(layout.architecture, layout.get("general.name")))
    return spec, gguf_shape(layout, spec, path), layout.metadata


def gguf_identity(source_name: str, path: Path, spec: ArchSpec, shape: ModelShape, metadata: dict) -> ModelIdentity:
    """The circuit's provenance for a GGUF file: the same weights hash as the torch route (sha256 over
    "NAME DIGEST"), a config hash over the file's small metadata values."""
    config = json.dumps(metadata, sort_keys=True, default=str).encode()
    return ModelIdentity(
        source=source_name, model_type=spec.model_type, weights_sha256=combined_sha256(sha256_files([path])),
        config_sha256=hashlib.sha256(config).hexdigest(), num_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size, hidden_size=shape.hidden_size,
    )  # fmt: skip


def attribute_gguf(
    path: Path, spec: ArchSpec, model_id: ModelIdentity, positive: Sequence[str], negative: Sequence[str],
    neutral: Sequence[str], selection: Selection, *, n_threads: int | None = None,
) -> Attribution:  # fmt: skip
    """`attribute` through llama.cpp on a GGUF file: the same prompt sets, sums and selection step.

    Example:
        >>> spec, shape, meta = describe_gguf(p); ident = gguf_identity(str(p), p, spec, shape, meta)
        >>> attribute_gguf(p, spec, ident, harmful, benign, neutral, Selection(top_k=46)).circuit(46)
    """
    shape = ModelShape(model_id.num_layers, model_id.intermediate_size, model_id.hidden_size)
    selection, top_n, last = prepare(shape, selection)
    template = gguf_chat_template(path, selection.chat_template)
    with LlamaCppModel(path, n_threads) as model:
        if model.n_layer != shape.num_layers:
            raise RecipeError(f"llama.cpp reads {model.n_layer} layers in {path}, the header {shape.num_layers}.",
                              "re-convert the model.")  # fmt: skip
        groups = [positive, negative] + ([neutral] if top_n else [])
        sets = encode_sets(model, groups, template)
        stats = collect_sets_gguf(model, spec, shape, sets, selection.batch_size, top_n, last)
    prompts = {name: prompt_set(list(p)) for name, p in zip(("positive", "negative", "neutral"), groups)}
    return from_stats(stats, selection, top_n, prompts, model_id, dtype="float32", chat_template=template is not None)
