"""The llama.cpp backend's attribution: the forward passes of `collect_sets`, inside llama.cpp, on a GGUF as it is.

The model stays quantized and mmapped by llama.cpp. The prompt sets run together, as in the torch route: their
common chat-template prefix is decoded once into KV sequence 0 and shared (a unified cache: no copy), then the
prompts go in length-sorted groups of `batch_size` sequences per decode. A tap on the graph (see
`cna_export.gguf.tap`) reads the input of each layer's `ffn_down` at every sequence's last token and adds it
to its set's float64 sums (`SetSums`, the same accumulator as the torch route, so `SetStats` means the same); the
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

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cna_export.arch import ArchSpec, ModelShape
from cna_export.arch.experts import ExpertShape
from cna_export.attribution.collect import SetStats, SetSums, common_prefix
from cna_export.attribution.experts import router_weights
from cna_export.errors import RecipeError
from cna_export.gguf.llamacpp import LlamaCppModel, Seq
from cna_export.gguf.tap import FfnDownTap, Unit
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


def add_rows(sums: SetSums, moe: ExpertShape | None, parts: dict[tuple[int, str], np.ndarray]) -> None:
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
    sums = SetSums(len(sets), shape.row_width, top_n)  # a layer narrower than the widest fills the first columns

    # The tap only copies rows out; they are added after each decode. Torch work inside the callback would wake its
    # thread pool while llama.cpp's threads wait for the main thread, and the two pools fight for the cores.
    pending: dict[tuple[int, str], np.ndarray] = {}
    tap = FfnDownTap(
        tap_units(spec, shape, last),
        last,
        lambda layer, part, rows: pending.__setitem__((layer, part), rows),
        spec.model_type,
    )
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


def encode_sets(
    model: LlamaCppModel, sets: Sequence[Sequence[str]], chat_template: str | None
) -> list[list[list[int]]]:
    """Token ids per prompt, per set, with the GGUF's own tokenizer and chat template."""
    out = []
    for prompts in sets:
        if not prompts:
            raise RecipeError("A prompt set is empty.", "give at least one prompt on each side.")
        out.append([model.encode(p, chat_template) for p in prompts])
    return out
