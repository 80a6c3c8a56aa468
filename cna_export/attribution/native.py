"""Contrastive Neuron Attribution inside llama.cpp: the forward passes of `collect_sets`, on a GGUF file as it is.

The model stays quantized and mmapped by llama.cpp. The prompt sets run together, as in the torch route: their
common chat-template prefix is decoded once into KV sequence 0 and shared (a unified cache: no copy), then the
prompts go in length-sorted groups of `batch_size` sequences per decode. A tap on the graph (see
`cna_export.gguf.tap`) reads the input of each layer's `ffn_down` at every sequence's last token and adds it
to its set's float64 sums (`_Sums`, the same accumulator as the torch route, so `SetStats` means the same); the
graph ends after the last layer that can be selected.

A mixture of experts is read where llama.cpp computes it (`build_moe_ffn`): the stacked experts' `ffn_down_exps`
is a MUL_MAT_ID whose input holds each token's `n_expert_used` selected experts ([n_ff, slots, tokens]) and whose
third source is their ids; its output is then multiplied by the router weights as the family computes them
(softmax, top-k, normalized or scaled), so the tap reads that multiplication's other factor. The activation is the
torch route's (attribution/experts.py): router weight x down input, placed at columns `e * width + j`, zero for an
expert a token is not routed to; the shared expert's `ffn_down_shexp` input is multiplied by its gate where the
family gates it (Qwen2-MoE's sigmoid, the second factor of the multiplication of its output), and a dense layer's
`ffn_down` is read as in a dense model.
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

from cna_export.arch import ArchSpec, ModelShape, arch_for
from cna_export.arch.experts import ExpertShape
from cna_export.attribution.collect import SetStats, _Sums, common_prefix
from cna_export.attribution.experts import router_weights
from cna_export.attribution.select import Attribution, from_stats, prepare
from cna_export.circuit.format import ModelIdentity, prompt_set, shape_fields
from cna_export.circuit.selection import Selection
from cna_export.errors import RecipeError
from cna_export.gguf.check import check_gguf, gguf_model_type, gguf_shape
from cna_export.gguf.llamacpp import LlamaCppModel, Seq
from cna_export.gguf.tap import FfnDownTap, Unit
from cna_export.io.hashing import combined_sha256, sha256_files
from cna_export.progress import QUIET_SECONDS

log = logging.getLogger(__name__)


def length_groups(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of `seqs` in length-sorted groups of at most `batch_size` (the torch route's batch order)."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def tap_units(spec: ArchSpec, shape: ModelShape, last: int) -> dict[bytes, Unit]:
    """The down projections of layers 0..last that the tap reads, named by the architecture row's GGUF sites: a
    dense layer's `ffn_down`; in an MoE layer the stacked routed experts (weighted by their router weights) and the
    shared expert (weighted by its gate where the family has one, `ExpertSpec.shared_gate`)."""
    moe, ex, units = shape.moe, spec.experts, {}
    for i in range(last + 1):
        if moe is None or ex is None or i in moe.dense_layers:
            units[spec.gguf_down.name(i).encode()] = Unit(i, "dense", shape.width(i))
            continue
        units[ex.gguf_down.name(i).encode()] = Unit(i, "routed", moe.width, weighted=True)
        if moe.shared:
            units[ex.gguf_shared_down.name(i).encode()] = Unit(i, "shared", moe.shared, ex.shared_gate is not None)
    return units


def add_rows(sums: _Sums, moe: ExpertShape | None, parts: dict[tuple[int, str], np.ndarray]) -> None:
    """Add one decode's tapped rows (`parts[layer, part]`, see `FfnDownTap`) to the sums as the torch route adds
    its captures: a dense layer's input; the routed experts as [rows, E * width] (router weight x input at the
    selected experts' columns, zero elsewhere; top-n per expert among the routed rows); the shared expert's input
    times its gate (1 when ungated) at column `E * width`."""
    for (layer, part), rows in parts.items():
        x = torch.from_numpy(rows)
        if part == "dense":
            sums.add(layer, x)
        elif part == "routed":
            assert moe is not None
            ids = torch.from_numpy(parts[layer, "routed_ids"]).long()  # [rows, slots]
            weight = router_weights(ids, torch.from_numpy(parts[layer, "routed_weight"])[..., 0], moe.num_experts)
            h = torch.zeros(x.shape[0], moe.num_experts, moe.width, dtype=x.dtype)
            h.scatter_(1, ids[..., None].expand_as(x), x)
            sums.add(layer, (h * weight[..., None]).reshape(x.shape[0], -1), groups=moe.num_experts, routed=weight > 0)
        elif part == "shared":
            assert moe is not None
            gate = parts.get((layer, "shared_weight"))
            sums.add(layer, x if gate is None else x * torch.from_numpy(gate), offset=moe.num_experts * moe.width)


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
    """Per prompt set, sum the last-token input of every layer's ffn_down (float64), through llama.cpp; for a
    mixture of experts, every unit's activation as the torch route defines it (router weight x down input).

    Args:
        model: the loaded GGUF.
        spec, shape: the architecture row (its GGUF sites name the tensors) and the model's shape (with its
            experts: `shape.moe`).
        sets: token ids per prompt, per set.
        batch_size: sequences per decode.
        top_n: also count per-layer top-|act| membership and sum |act| (neutral prompts).
        last_layer: the last layer read (default: the model's last); later layers are not computed.

    Returns:
        One `SetStats` per set, as `collect_sets` returns them (MoE: with the routing counts).
    """
    last = shape.num_layers - 1 if last_layer is None else last_layer
    sums = _Sums(len(sets), shape.row_width, top_n)  # a layer narrower than the widest fills the first columns

    # The tap only copies rows out; they are added after each decode. Torch work inside the callback would wake its
    # thread pool while llama.cpp's threads wait for the main thread, and the two pools fight for the cores.
    pending: dict[tuple[int, str], np.ndarray] = {}
    tap = FfnDownTap(tap_units(spec, shape, last), last, lambda layer, part, rows: pending.__setitem__((layer, part), rows),
                     spec.model_type)  # fmt: skip
    tagged = [(k, ids) for k, prompts in enumerate(sets) for ids in prompts]
    prefix = common_prefix([ids for _, ids in tagged]) if share_prefix else 0
    groups = length_groups([ids for _, ids in tagged], batch_size)
    widest = max(sum(len(tagged[i][1]) - prefix for i in g) for g in groups)
    n_batch = max(widest, prefix, 1)
    n_ctx = prefix + widest + 8
    with model.context(n_ctx, n_batch, min(batch_size, len(tagged)), tap) as ctx:
        if prefix:
            # The prefix's KV cells go to sequence 0; every sequence of a group then shares them.
            tap.recording = False
            ctx.decode([Seq(tagged[0][1][:prefix], 0, output=False)])
            tap.recording = True
        for group in tqdm(groups, desc="llama.cpp forward passes", unit="batch", leave=False, delay=QUIET_SECONDS):
            sums.labels = torch.tensor([tagged[i][0] for i in group])
            for sid in range(1, len(group)):
                if prefix:
                    ctx.share(0, sid, prefix)
            ctx.decode([Seq(tagged[i][1][prefix:], prefix) for i in group])
            add_rows(sums, shape.moe, pending)
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
    spec = arch_for(gguf_model_type(layout))
    return spec, gguf_shape(layout, spec, path), layout.metadata


def gguf_identity(source_name: str, path: Path, spec: ArchSpec, shape: ModelShape, metadata: dict) -> ModelIdentity:
    """The circuit's provenance for a GGUF file: the same weights hash as the torch route (sha256 over
    "NAME DIGEST"), a config hash over the file's small metadata values."""
    config = json.dumps(metadata, sort_keys=True, default=str).encode()
    return ModelIdentity(
        source=source_name, model_type=spec.model_type, weights_sha256=combined_sha256(sha256_files([path])),
        config_sha256=hashlib.sha256(config).hexdigest(), num_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size, hidden_size=shape.hidden_size, **shape_fields(shape),
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
    shape = model_id.shape()  # an MoE GGUF: its experts as `gguf_identity` recorded them
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
    return from_stats(stats, selection, top_n, prompts, model_id, dtype="float32", chat_template=template is not None,
                      moe=shape.moe)  # fmt: skip
