"""Contrastive Neuron Attribution: forward passes only, last-token MLP activations, mean differences.

The prompt sets (positive, negative, neutral) run together in length-sorted, left-padded batches (so every
prompt's last real token sits at position -1). A pre-hook on every layer's `down_proj` adds the last-token input,
one value per neuron, to its set's float64 running sum on the device; nothing per-prompt is kept. The pass stops
inside the last layer that can be selected, before its `down_proj`: later layers (`skip_last_layers`), the final
norm and the lm_head are never computed.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from cna_export import distributed
from cna_export.arch import ArchSpec, ModelShape
from cna_export.circuit import Circuit, ModelIdentity, Neuron, PromptSet, Selection, prompt_set
from cna_export.errors import RecipeError
from cna_export.hooks import down_projs, pre_hooks
from cna_export.source import Source, describe, identity, load_model

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised inside the last needed hook to end the forward pass early."""


@dataclass(frozen=True)
class Settings:
    """Attribution parameters (the recipe's selection block, resolved)."""

    top_k: int | None = None
    fraction: float | None = 0.001
    skip_first_layers: int = 0
    # Not in the paper (default 0 keeps its selection). On small models the top-|delta| neurons pile into the
    # last layers, which write almost straight into the logits: ablating them shifts the first answer token on
    # benign prompts (high first-token KL) more than it removes the behaviour. See benchmarks/refusal_qwen.py.
    skip_last_layers: int = 0
    universal: bool = True
    universal_top_n: int | None = None  # per layer; default 1% of the MLP width
    universal_threshold: float = 0.8
    # Not in the paper (default 0 = rank by |delta|). Zero-ablating neuron j removes its activation from every
    # input, so a neuron that is active on ordinary text shifts every answer. The score
    # max(0, |delta| - specificity * mean |activation| on the neutral prompts) prefers neurons that are quiet
    # on ordinary text: on Qwen2.5-Coder-0.5B it cut refusals by more at a fraction of the first-token KL on
    # benign prompts (benchmarks/results/refusal_qwen_specificity.md).
    specificity: float = 0.0
    batch_size: int = 16
    chat_template: bool = True


@dataclass
class SetStats:
    """Per-neuron sums over one prompt set (and, for neutral sets, top-n membership counts and |act| sums)."""

    sums: torch.Tensor  # [layers, neurons] float64
    count: int
    top_counts: torch.Tensor | None = None  # [layers, neurons] int32
    abs_sums: torch.Tensor | None = None  # [layers, neurons] float64

    @property
    def mean(self) -> torch.Tensor:
        return self.sums / self.count


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool = True) -> list[list[int]]:
    """Token ids per prompt; chat-templated (with the generation prompt) when the tokenizer has a template."""
    if not prompts:
        raise RecipeError("A prompt set is empty.", "give at least one prompt on each side.")
    use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    encoded = []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecipeError(f"Prompt {prompt!r} is empty.", "remove empty prompts from the set.")
        if use_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise RecipeError(f"Prompt {prompt!r} tokenizes to nothing.", "remove it or fix the tokenizer.")
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


@torch.inference_mode()
def collect_sets(
    model: nn.Module,
    spec: ArchSpec,
    sets: Sequence[list[list[int]]],
    batch_size: int,
    pad_id: int,
    top_n: int | None = None,
    desc: str = "forward",
    share_prefix: bool = True,
    last_layer: int | None = None,
) -> list[SetStats]:
    """Per prompt set, sum last-token `down_proj` inputs; with `top_n`, also count per-layer top-|act| membership
    and sum |act|.

    The sets run together: one shared prefix, one length-sorted batch order over all their prompts (less
    padding), each row's activations added to its own set's sums. The forward pass ends at `last_layer`
    (default: the model's last); later layers' sums stay zero.

    Each layer's running sums live on the device that layer runs on (layers may be spread over several GPUs,
    the CPU or disk offload), so nothing is copied to the host until the end. Under torch.distributed each
    rank runs a strided slice of the prompts and the partial sums are all-reduced.
    """
    projs = down_projs(model, spec)
    n_layers, width, n_sets = len(projs), projs[0].in_features, len(sets)
    sums: dict[int, torch.Tensor] = {}
    tops: dict[int, torch.Tensor] = {}
    abs_sums: dict[int, torch.Tensor] = {}
    last = n_layers - 1 if last_layer is None else last_layer

    recording = [True]
    labels: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)]  # set of each row of the batch in flight

    def capture(layer: int, x: torch.Tensor) -> None:
        if not recording[0]:
            if layer == last:
                raise _StopForward
            return
        act = x[:, -1, :]
        acc = torch.float32 if act.device.type == "mps" else torch.float64
        rows = labels[0].to(act.device)
        if layer not in sums:
            sums[layer] = torch.zeros(n_sets, width, dtype=acc, device=act.device)
        sums[layer].index_add_(0, rows, act.to(acc))
        if top_n:
            if layer not in tops:
                tops[layer] = torch.zeros(n_sets, width, dtype=torch.int32, device=act.device)
                abs_sums[layer] = torch.zeros(n_sets, width, dtype=acc, device=act.device)
            magnitude = act.abs()
            idx = magnitude.topk(top_n, dim=-1).indices
            flat = (rows[:, None] * width + idx).reshape(-1)  # (set, neuron) as one index into the flat counts
            tops[layer].view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
            abs_sums[layer].index_add_(0, rows, magnitude.to(acc))
        if layer == last:
            raise _StopForward

    device = input_device(model)
    tagged = distributed.shard([(k, ids) for k, prompts in enumerate(sets) for ids in prompts])
    mine = [ids for _, ids in tagged]
    # Chat templates give every prompt the same opening (often a default system prompt): run it once and
    # reuse its key/value cache, so each batch computes only the tokens that differ.
    prefix = common_prefix(mine) if share_prefix else 0
    if prefix and not _prefix_allowed(model, mine, prefix):
        prefix = 0
    cache = None
    recording[0] = False
    # The pass ends at the last layer's down_proj, where only the final token is read: its MLP runs on that one.
    mlp = model.get_submodule(spec.layers_module)[last].get_submodule(spec.down_proj_module.rpartition(".")[0])
    with pre_hooks(dict(enumerate(projs[: last + 1])), capture), pre_hooks({last: mlp}, lambda _, x: x[:, -1:]):
        if prefix:
            cache = DynamicCache(config=model.config)
            _forward(model, torch.tensor([mine[0][:prefix]]), torch.ones(1, prefix, dtype=torch.long), 0, cache, device)
        recording[0] = True
        todo = batches([ids[prefix:] for ids in mine], batch_size, pad_id)
        for ids, mask, rows in tqdm(todo, desc=desc, unit="batch", leave=False, disable=not distributed.is_main()):
            labels[0] = torch.tensor([tagged[i][0] for i in rows])
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(ids.shape[0])
            _forward(model, ids, mask, prefix, past, device)

    def gather(parts: dict[int, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros((n_sets, n_layers, width), dtype=dtype)
        for layer, part in parts.items():
            out[:, layer] = part.to("cpu", dtype)
        return distributed.all_reduce_sum(out)

    total = gather(sums, torch.float64)
    if not top_n:
        return [SetStats(total[k], len(prompts)) for k, prompts in enumerate(sets)]
    counts, magnitudes = gather(tops, torch.int32), gather(abs_sums, torch.float64)
    return [SetStats(total[k], len(p), counts[k], magnitudes[k]) for k, p in enumerate(sets)]


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
    """Sliding-window layers count padding inside the window, so share a prefix only if all fits in it."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    uses_window = window and any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ["sliding"]))
    return not uses_window or max(map(len, encoded)) < window


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (the CPU when it is offloaded to meta/disk)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def universal_mask(stats: SetStats, threshold: float) -> torch.Tensor:
    """Neurons in the per-layer top-n for at least `threshold` of the neutral prompts."""
    assert stats.top_counts is not None
    return stats.top_counts >= math.ceil(threshold * stats.count - 1e-9)


def resolve_k(settings: Settings, shape: ModelShape) -> int:
    if settings.top_k is not None:
        k = settings.top_k
    else:
        k = max(1, round((settings.fraction or 0.001) * shape.num_neurons))
    if k < 1 or k > shape.num_neurons:
        raise RecipeError(
            f"k={k} neurons is outside 1..{shape.num_neurons} (all MLP neurons of this model).",
            "lower --top-k or --fraction.",
        )
    return k


def select(delta: torch.Tensor, k: int, excluded: torch.Tensor) -> list[tuple[int, int]]:
    """Top-k (layer, index) by |delta|, skipping `excluded`. Ties break by (layer, index): deterministic."""
    score = delta.abs().to(torch.float64).numpy().copy()
    score[excluded.numpy()] = -np.inf
    available = int(np.isfinite(score).sum())
    if k > available:
        raise RecipeError(
            f"k={k} but only {available} neurons remain after exclusions.", "lower k or exclude fewer layers."
        )
    flat = np.argsort(-score.reshape(-1), kind="stable")[:k]
    width = delta.shape[1]
    return [(int(i // width), int(i % width)) for i in flat]


@dataclass
class Attribution:
    """One attribution run: per-neuron deltas and exclusions. `circuit(k)` cuts the ranking at any k, so a
    sweep over k needs the forward passes only once."""

    delta: torch.Tensor  # [layers, neurons] float64, mean(positive) - mean(negative)
    score: torch.Tensor  # [layers, neurons] float64 >= 0, what the top-k is taken of (|delta| unless specificity)
    excluded: torch.Tensor  # [layers, neurons] bool: skipped layers and universal neurons
    universal: list[tuple[int, int]]
    top_n: int | None
    prompts: dict[str, PromptSet]
    settings: Settings
    model_id: ModelIdentity
    dtype: str
    chat_template: bool

    def _ranking(self, k: int) -> torch.Tensor:
        """What the top-k is taken of: the score; with specificity, the neurons the penalty left at zero come
        after all positive ones, by |delta|."""
        if not self.settings.specificity:
            return self.score
        left = int(((self.score > 0) & ~self.excluded).sum())
        if k > left:
            log.warning(
                "only %d neurons keep contrast after the specificity penalty; the other %d of k=%d are the next "
                "by |delta| (lower the specificity to rank more of them by it)", left, k - left, k,
            )  # fmt: skip
        magnitude = self.delta.abs()
        return torch.where(self.score > 0, self.score + magnitude.max(), magnitude)

    def circuit(
        self, k: int, *, fraction: float | None = None, behaviour: str = "custom", recipe: str | None = None,
        multiplier: float = 0.0,
    ) -> Circuit:  # fmt: skip
        """The circuit of the top-k neurons by score (`fraction` is only recorded, as requested)."""
        chosen = select(self._ranking(k), k, self.excluded)
        log.info("selected %d neurons; %d universal excluded", len(chosen), len(self.universal))
        s = self.settings
        return Circuit(
            behaviour=behaviour,
            recipe=recipe,
            multiplier=multiplier,
            model=self.model_id,
            prompts=self.prompts,
            selection=Selection(
                top_k=k,
                fraction=fraction,
                skip_first_layers=s.skip_first_layers,
                skip_last_layers=s.skip_last_layers,
                universal_top_n=self.top_n,
                universal_threshold=s.universal_threshold if s.universal else None,
                universal_excluded=self.universal,
                specificity=s.specificity,
                batch_size=s.batch_size,
                dtype=self.dtype,
                chat_template=self.chat_template,
            ),
            neurons=[Neuron(layer=l, index=i, delta=float(self.delta[l, i])) for l, i in chosen],
        )


def _cap_skip_last(settings: Settings, num_layers: int) -> Settings:
    """Leave at least one layer: a recipe tuned on a deep model (skip 2 + 2) still runs on a 3-layer one."""
    room = num_layers - settings.skip_first_layers - 1
    if settings.skip_last_layers <= room:
        return settings
    log.warning(
        "skip_last_layers=%d leaves no layer after skipping the first %d of %d; skipping the last %d instead",
        settings.skip_last_layers, settings.skip_first_layers, num_layers, room,
    )  # fmt: skip
    return dataclasses.replace(settings, skip_last_layers=room)


def attribute(
    model: nn.Module,
    tokenizer,
    spec: ArchSpec,
    model_id: ModelIdentity,
    positive: Sequence[str],
    negative: Sequence[str],
    neutral: Sequence[str],
    settings: Settings,
) -> Attribution:
    """Run the forward passes of CNA: deltas, skipped layers and universal neurons (no k yet)."""
    shape = ModelShape(model_id.num_layers, model_id.intermediate_size, model_id.hidden_size)
    if settings.skip_first_layers >= shape.num_layers:
        raise RecipeError(
            f"skip_first_layers={settings.skip_first_layers} skips all {shape.num_layers} layers.",
            "skip fewer layers.",
        )
    settings = _cap_skip_last(settings, shape.num_layers)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else pad_id
    sets = [encode_prompts(tokenizer, p, settings.chat_template) for p in (positive, negative)]
    prompts = {"positive": prompt_set(list(positive)), "negative": prompt_set(list(negative))}
    # The neutral prompts (universal neurons, specificity) run in the same passes as the contrast sets.
    top_n = None
    if settings.universal or settings.specificity:
        top_n = settings.universal_top_n or max(1, math.ceil(0.01 * shape.intermediate_size))
        sets.append(encode_prompts(tokenizer, neutral, settings.chat_template))
        prompts["neutral"] = prompt_set(list(neutral))
    # Layers skipped at the end are never selected: the forward passes stop before them.
    last = shape.num_layers - 1 - settings.skip_last_layers
    stats = collect_sets(model, spec, sets, settings.batch_size, pad_id, top_n=top_n, desc="forward passes",
                         last_layer=last)  # fmt: skip
    delta = stats[0].mean - stats[1].mean

    excluded = torch.zeros_like(delta, dtype=torch.bool)
    excluded[: settings.skip_first_layers] = True
    if settings.skip_last_layers:
        excluded[shape.num_layers - settings.skip_last_layers :] = True
    universal_list: list[tuple[int, int]] = []
    score = delta.abs()
    if top_n:
        neutral_stats = stats[2]
        if settings.universal:
            universal = universal_mask(neutral_stats, settings.universal_threshold)
            universal_list = [(int(a), int(b)) for a, b in universal.nonzero().tolist()]
            excluded |= universal
        else:
            top_n = None
        if settings.specificity:
            score = (score - settings.specificity * neutral_stats.abs_sums / neutral_stats.count).clamp(min=0)

    weight = next(model.parameters())
    return Attribution(
        delta=delta, score=score, excluded=excluded, universal=universal_list, top_n=top_n, prompts=prompts, settings=settings,
        model_id=model_id, dtype=str(weight.dtype).removeprefix("torch."),
        chat_template=settings.chat_template and bool(getattr(tokenizer, "chat_template", None)),
    )  # fmt: skip


def discover(
    model: nn.Module,
    tokenizer,
    spec: ArchSpec,
    model_id: ModelIdentity,
    positive: Sequence[str],
    negative: Sequence[str],
    neutral: Sequence[str],
    settings: Settings,
    *,
    behaviour: str = "custom",
    recipe: str | None = None,
    multiplier: float = 0.0,
) -> Circuit:
    """Run CNA and return the circuit (not yet saved).

    Example:
        >>> circuit = discover(model, tok, arch_for("llama"), ident, harmful, benign, neutral, Settings(top_k=100))
    """
    shape = ModelShape(model_id.num_layers, model_id.intermediate_size, model_id.hidden_size)
    k = resolve_k(settings, shape)  # before the forward passes, so a bad k fails fast
    result = attribute(model, tokenizer, spec, model_id, positive, negative, neutral, settings)
    fraction = None if settings.top_k is not None else settings.fraction
    return result.circuit(k, fraction=fraction, behaviour=behaviour, recipe=recipe, multiplier=multiplier)


def discover_circuit(
    source: Source,
    positive: Sequence[str],
    negative: Sequence[str],
    neutral: Sequence[str],
    settings: Settings,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    offload_folder: Path | None = None,
    trust_remote_code: bool = False,
    behaviour: str = "custom",
    recipe: str | None = None,
    multiplier: float = 0.0,
) -> Circuit:
    """Load `source`, fingerprint it, and run `discover` on it."""
    spec, shape, config = describe(source)
    model_id = identity(source, config, shape)
    model, tokenizer = load_model(
        source, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
        device_map=device_map, offload_folder=offload_folder,
    )  # fmt: skip
    return discover(
        model, tokenizer, spec, model_id, positive, negative, neutral, settings,
        behaviour=behaviour, recipe=recipe, multiplier=multiplier,
    )  # fmt: skip
