"""Contrastive Neuron Attribution, the forward passes: last-token MLP activations summed per prompt set.

The prompt sets (positive, negative, neutral) run together in length-sorted, left-padded batches (so every
prompt's last real token sits at position -1). A pre-hook on every layer's `down_proj` adds the last-token input,
one value per neuron, to its set's float64 running sum on the device; nothing per-prompt is kept. The pass stops
inside the last layer that can be selected, before its `down_proj`: later layers (`skip_last_layers`), the final
norm and the lm_head are never computed.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from cna_export.arch import ArchSpec, shape_of
from cna_export.attribution import distributed
from cna_export.attribution.chat_template import user_turn
from cna_export.attribution.experts import capture_units
from cna_export.attribution.hooks import decoder_layers, down_projs, mlp_of, pre_hooks
from cna_export.circuit.recipe import check_prompt_fits
from cna_export.errors import RecipeError
from cna_export.progress import QUIET_SECONDS

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised inside the last needed hook to end the forward pass early."""


@dataclass
class SetStats:
    """Per-neuron sums over one prompt set (and, for neutral sets, top-n membership counts and |act| sums)."""

    sums: torch.Tensor  # [layers, neurons] float64
    count: int
    top_counts: torch.Tensor | None = None  # [layers, neurons] int32
    abs_sums: torch.Tensor | None = None  # [layers, neurons] float64
    routed: torch.Tensor | None = None  # MoE: [layers, experts] int64, prompts whose last token was routed there

    @property
    def mean(self) -> torch.Tensor:
        return self.sums / self.count


# Where a config gives the context a model was trained for (every family of the table has the first).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class Context:
    """The longest prompt a model takes (tokens; None when its config does not say) and its name, for messages."""

    limit: int | None
    model: str


def context_of(model: nn.Module) -> Context:
    """The context of a loaded transformers model, from its (text) config."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = Path(str(getattr(config, "name_or_path", "") or "the model")).name or "the model"
    for key in CONTEXT_KEYS:
        value = getattr(text, key, None)
        if type(value) is int and value > 0:
            return Context(value, name)
    return Context(None, name)


def encode_prompts(
    tokenizer,
    prompts: Sequence[str],
    chat_template: bool = True,
    context: Context | None = None,
    system: str | None = None,
) -> list[list[int]]:
    """Token ids per prompt; chat-templated (with the generation prompt) when the tokenizer has a template. A
    `system` message goes first in the template, or, without one, before the prompt as plain text.

    With `context`, a prompt longer than the model's context is refused here, before the first forward pass
    (`recipe.check_prompt_fits`, the check the llama.cpp route makes too), naming its file and line."""
    if not prompts:
        raise RecipeError("A prompt set is empty.", "give at least one prompt on each side.")
    use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    encoded = []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecipeError(f"Prompt {prompt!r} is empty.", "remove empty prompts from the set.")
        if use_template:
            text = user_turn(
                tokenizer, prompt, f"The {context.model}" if context else "The model's", system
            )  # sandboxed
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(f"{system}\n\n{prompt}" if system else prompt)["input_ids"]
        if not ids:
            raise RecipeError(f"Prompt {prompt!r} tokenizes to nothing.", "remove it or fix the tokenizer.")
        if context is not None:
            check_prompt_fits(prompt, len(ids), context.limit, context.model)
        encoded.append(list(ids))
    return encoded


def batches(
    encoded: list[list[int]], batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Left-padded (input_ids, attention_mask, original indices) batches of length-sorted prompts."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        group = [encoded[i] for i in rows]
        width = max(len(ids) for ids in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        out.append((ids, mask, rows))
    return out


def collect(model: nn.Module, spec: ArchSpec, encoded: list[list[int]], *args, **kwargs) -> SetStats:
    """`collect_sets` for one prompt set."""
    return collect_sets(model, spec, [encoded], *args, **kwargs)[0]


class SetSums:
    """Running per-set sums of one pass over the prompt sets, kept per layer on the device each layer runs on
    (layers may be spread over several GPUs, the CPU or disk offload), so nothing is copied to the host until the
    end. The capture hook adds each batch's last-token activations to the rows of its sets (`labels`)."""

    def __init__(self, n_sets: int, width: int, top_n: int | None) -> None:
        self.n_sets, self.width, self.top_n = n_sets, width, top_n
        self.sums: dict[int, torch.Tensor] = {}
        self.tops: dict[int, torch.Tensor] = {}
        self.abs_sums: dict[int, torch.Tensor] = {}
        self.routed: dict[int, torch.Tensor] = {}  # MoE: per layer [sets, experts] routing counts
        self.labels = torch.zeros(0, dtype=torch.long)  # set of each row of the batch in flight

    def _zeros(self, store: dict[int, torch.Tensor], layer: int, dtype: torch.dtype, device) -> torch.Tensor:
        if layer not in store:
            store[layer] = torch.zeros(self.n_sets, self.width, dtype=dtype, device=device)
        return store[layer]

    def add(
        self, layer: int, act: torch.Tensor, offset: int = 0, groups: int = 1, routed: torch.Tensor | None = None
    ) -> None:
        """Add `act` ([batch, w], the last token of each row) to columns offset..offset+w of the rows' sets.

        MoE: `act` holds `groups` experts of w / groups neurons each; top-n membership is counted per expert,
        and only where the token was routed to it (`routed` [batch, groups] bool; an unrouted expert's zeros are
        no one's top-n). The routing counts of the layer are kept for the coverage report."""
        acc = torch.float32 if act.device.type == "mps" else torch.float64
        rows = self.labels.to(act.device)
        cols = slice(offset, offset + act.shape[1])
        self._zeros(self.sums, layer, acc, act.device)[:, cols].index_add_(0, rows, act.to(acc))
        if routed is not None:
            counts = self.routed.setdefault(
                layer, torch.zeros(self.n_sets, groups, dtype=torch.int64, device=act.device)
            )
            counts.index_add_(0, rows, routed.to(torch.int64))
        if self.top_n:
            magnitude = act.abs()
            per = magnitude.reshape(act.shape[0], groups, -1)
            idx = per.topk(min(self.top_n, per.shape[-1]), dim=-1).indices  # [batch, groups, n]
            idx = idx + offset + per.shape[-1] * torch.arange(groups, device=act.device)[:, None]
            hit = torch.ones_like(idx, dtype=torch.int32)
            if routed is not None:
                hit = hit * routed[..., None].to(torch.int32)
            flat = (rows[:, None, None] * self.width + idx).reshape(-1)  # (set, neuron) as one index
            tops = self._zeros(self.tops, layer, torch.int32, act.device)
            tops.view(-1).index_add_(0, flat, hit.reshape(-1))
            self._zeros(self.abs_sums, layer, acc, act.device)[:, cols].index_add_(0, rows, magnitude.to(acc))

    def gather(self, parts: dict[int, torch.Tensor], n_layers: int, dtype: torch.dtype) -> torch.Tensor:
        """[sets, layers, width] on the host, summed over ranks (layers that never ran stay zero)."""
        out = torch.zeros((self.n_sets, n_layers, self.width), dtype=dtype)
        for layer, part in parts.items():
            out[:, layer] = part.to("cpu", dtype)
        return distributed.all_reduce_sum(out)

    def stats(self, counts: Sequence[int], n_layers: int) -> list[SetStats]:
        total = self.gather(self.sums, n_layers, torch.float64)
        routed = self._routed(n_layers)
        if not self.top_n:
            return [
                SetStats(total[k], n, routed=routed[k] if routed is not None else None) for k, n in enumerate(counts)
            ]
        tops, mags = self.gather(self.tops, n_layers, torch.int32), self.gather(self.abs_sums, n_layers, torch.float64)
        return [
            SetStats(total[k], n, tops[k], mags[k], routed[k] if routed is not None else None)
            for k, n in enumerate(counts)
        ]

    def _routed(self, n_layers: int) -> torch.Tensor | None:
        """[sets, layers, experts] routing counts summed over ranks (None for a dense model)."""
        if not self.routed:
            return None
        experts = max(part.shape[1] for part in self.routed.values())
        out = torch.zeros((self.n_sets, n_layers, experts), dtype=torch.int64)
        for layer, part in self.routed.items():
            out[:, layer, : part.shape[1]] = part.cpu()
        return distributed.all_reduce_sum(out)


@torch.inference_mode()
def collect_sets(
    model: nn.Module,
    spec: ArchSpec,
    sets: Sequence[list[list[int]]],
    batch_size: int,
    pad_id: int,
    top_n: int | None = None,
    share_prefix: bool = True,
    last_layer: int | None = None,
) -> list[SetStats]:
    """Per prompt set, sum last-token inputs of the neurons' module (`spec.hook`); with `top_n`, also count
    per-layer top-|act| membership and sum |act|.

    The sets run together: one shared prefix, one length-sorted batch order over all their prompts (less
    padding), each row's activations added to its own set's sums. The forward pass ends at `last_layer`
    (default: the model's last); later layers' sums stay zero. Under torch.distributed each rank runs a strided
    slice of the prompts and the partial sums are all-reduced.
    """
    layers = decoder_layers(model, spec)
    n_layers = len(layers)
    shape = shape_of(model.config.get_text_config())
    sums = SetSums(len(sets), shape.row_width, top_n)  # a layer narrower than the widest fills the first columns
    last = n_layers - 1 if last_layer is None else last_layer
    recording = [False]  # the shared prefix runs first and is not recorded

    def capture(layer: int, x: torch.Tensor) -> None:
        if recording[0]:
            sums.add(layer, x[:, -1, :])
        if layer == last:
            raise _StopForward

    tagged = distributed.shard([(k, ids) for k, prompts in enumerate(sets) for ids in prompts])
    mine = [ids for _, ids in tagged]
    # Chat templates give every prompt the same opening (often a default system prompt): run it once and
    # reuse its key/value cache, so each batch computes only the tokens that differ.
    prefix = common_prefix(mine) if share_prefix else 0
    if prefix and not _prefix_allowed(model, mine, prefix):
        prefix = 0
    device = input_device(model)
    # The pass ends at the last layer's down_proj, where only the final token is read: its MLP runs on that one.
    with (
        _capture(model, spec, shape, last, sums, recording, capture),
        pre_hooks({last: mlp_of(model, spec, last)}, lambda _, x: x[:, -1:]),
    ):
        cache = _prefix_cache(model, mine[0][:prefix], device) if prefix else None
        recording[0] = True
        todo = batches([ids[prefix:] for ids in mine], batch_size, pad_id)
        for ids, mask, rows in tqdm(
            todo,
            desc="forward passes",
            unit="batch",
            leave=False,
            delay=QUIET_SECONDS,
            disable=not distributed.is_main(),
        ):
            sums.labels = torch.tensor([tagged[i][0] for i in rows])
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(ids.shape[0])
            _forward(model, ids, mask, prefix, past, device)
    return sums.stats([len(prompts) for prompts in sets], n_layers)


def _capture(model: nn.Module, spec: ArchSpec, shape, last: int, sums: SetSums, recording: list, capture):
    """The capture hooks: `down_proj` pre-hooks of a dense model; for an MoE model, every unit of every layer
    (attribution/experts.py) and a forward hook that ends the pass after the last layer's MLP block."""
    if shape.moe is None:
        return pre_hooks(dict(enumerate(down_projs(model, spec)[: last + 1])), capture)

    def add(layer: int, act: torch.Tensor, **kwargs) -> None:
        if recording[0]:
            sums.add(layer, act, **kwargs)

    def stop(_module: nn.Module, _args: tuple, _out: torch.Tensor) -> None:
        raise _StopForward

    stack = contextlib.ExitStack()
    stack.enter_context(
        capture_units(
            decoder_layers(model, spec), spec, shape, last, add, lambda: len(sums.labels) if recording[0] else 0
        )
    )
    stack.callback(mlp_of(model, spec, last).register_forward_hook(stop).remove)
    return stack


def _prefix_cache(model: nn.Module, prefix: list[int], device: torch.device) -> DynamicCache:
    """The key/value cache of the shared prefix (one pass, not recorded)."""
    cache = DynamicCache(config=model.config)
    _forward(model, torch.tensor([prefix]), torch.ones(1, len(prefix), dtype=torch.long), 0, cache, device)
    return cache


def common_prefix(encoded: list[list[int]], minimum: int = 4) -> int:
    """Length of the token prefix all prompts share, leaving each at least one token of its own (0 if short)."""
    if len(encoded) < 2:
        return 0
    first, n = encoded[0], min(map(len, encoded)) - 1
    for seq in encoded[1:]:
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return n if n >= minimum else 0


def _forward(model, ids, mask, offset, past, device) -> None:
    """One forward pass that ends inside the last layer. `offset` tokens are already in the cache `past`."""
    # Positions count real tokens only, so a left-padded prompt sees the same positions as alone.
    position_ids = offset + (mask.cumsum(-1) - 1).clamp(min=0)
    if offset:
        mask = torch.cat([torch.ones(mask.shape[0], offset, dtype=mask.dtype), mask], dim=1)
    try:
        model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=past is not None,
            **{_cache_kwarg(model): past},
        )
    except _StopForward:
        return
    raise AssertionError("the last layer's down_proj never ran")


def _cache_kwarg(model: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.x); use whichever this model's forward takes."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _prefix_allowed(model: nn.Module, encoded: list[list[int]], prefix: int) -> bool:
    """Sliding-window layers count padding inside the window, so share a prefix only if all fits in it; never with
    linear-attention layers (Qwen3.5), whose recurrent state the cache cannot repeat for each row of a batch."""
    config = model.config.get_text_config()
    if "linear_attention" in (getattr(config, "layer_types", None) or []):
        return False
    window = getattr(config, "sliding_window", None)
    uses_window = window and any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ["sliding"]))
    return not uses_window or max(map(len, encoded)) < window


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (the CPU when it is offloaded to meta/disk)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device
