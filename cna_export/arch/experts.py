"""Mixture-of-experts layers as data: where the neurons of routed and shared experts live, and how many there are.

A neuron of an MoE model is identified by (layer, expert, index):

* `expert = None`: a dense MLP (every layer of a dense model; the dense layers of an MoE model, e.g. Qwen MoE's
  `mlp_only_layers` or DeepSeek's first layers). `index` is a column of `mlp.down_proj.weight`.
* `expert = e` (0 <= e < num_experts): routed expert e. `index` is a column of that expert's down projection.
* `expert = "shared"`: the shared expert that every token passes through (Qwen2-MoE `shared_expert`, DeepSeek's
  `shared_experts`).

On disk (safetensors) most families keep one 2-D tensor per expert (`...experts.{e}.down_proj.weight`,
Mixtral's `...experts.{e}.w2.weight`); Granite MoE, gpt-oss and Llama 4 stack a layer's experts in one 3-D tensor
(gpt-oss on the Hub: in MXFP4 blocks). transformers 5 fuses them on load into 3-D parameters (`FUSED_DOWN` below)
and has no per-expert Linear. Folding edits the on-disk tensors; attribution and runtime scaling read the fused
parameters.

For attribution every MoE layer is one row of `layer_width` columns: routed expert e's neuron j is column
`e * width + j`, the shared expert's neuron j is `num_experts * width + j`; a dense layer uses the first
`intermediate_size` columns.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from gguf import MODEL_TENSOR

from cna_export.arch.sites import Site, gguf_site
from cna_export.errors import ArchitectureError

SHARED = "shared"
# None: a dense MLP; an int: a routed expert; "shared": the shared expert.
ExpertKey = int | Literal["shared"] | None


@dataclass(frozen=True)
class DenseLayers:
    """The config keys that say which layers of an MoE model keep a dense MLP, as the family's transformers code
    reads them. Each family names only its own keys: a key of another family in its config changes nothing.

    Attributes:
        listed: a list of dense layers (Qwen MoE's `mlp_only_layers`).
        first_k: the first k layers are dense (DeepSeek's and GLM-4.5's `first_k_dense_replace`).
        sparse_listed: a list of the MoE layers, the others dense (Llama 4's `moe_layers`); where the config sets
            it, `sparse_step` is not read.
        sparse_step: only every step-th layer is MoE, layer i where (i + 1) % step == 0 (Qwen MoE's
            `decoder_sparse_step`, Llama 4's `interleave_moe_layer_step`).
    """

    listed: str | None = None
    first_k: str | None = None
    sparse_listed: str | None = None
    sparse_step: str | None = None


@dataclass(frozen=True)
class ExpertSpec:
    """Where the experts of one MoE family live.

    Attributes:
        down, up: checkpoint sites of a routed expert: templates with `{i}` and `{e}` (one 2-D tensor per expert),
            or sites with an `expert_axis` (one tensor stacks a layer's experts: Granite MoE, gpt-oss, Llama 4).
            `up` is None where scaling an up row does not scale the neuron (gpt-oss: clamped `up + 1`).
        module: runtime module (relative to a decoder layer) holding the fused `gate_up_proj` and `down_proj`;
            its forward takes (hidden, top_k_index, top_k_weights), which is where attribution reads the routing
            (Llama 4's takes the routed inputs only: its router is `router`, see `fused`).
        fused: how that module lays out and runs its experts, a key of `FUSED_DOWN` (attribution/experts.py
            holds the matching activation math).
        router: runtime module whose output holds the router weights, where the experts module is not called
            with them (Llama 4's `feed_forward.router`: scores [tokens, E], 0 where a token is not routed).
        count_keys: config keys of the number of routed experts, first found wins (transformers 5 writes Qwen3-MoE's
            `num_experts` as `num_local_experts`; DeepSeek's config.json says `n_routed_experts`).
        width_key: config key of each routed expert's width.
        shared_unit_width: the shared expert's width counts in routed-expert widths (DeepSeek's
            `n_shared_experts` x `moe_intermediate_size`) rather than in neurons.
        mxfp4_down: the down site of checkpoints that store the experts in MXFP4 (gpt-oss on the Hub:
            `down_proj_blocks`, a `Site` with `codec`); `ArchSpec.for_checkpoint` uses it where a checkpoint has it.
        shared_down, shared_up: checkpoint sites of the shared expert (None: the family has none).
        shared_hook: runtime module whose input is the shared expert's neurons.
        shared_gate: runtime module whose sigmoid scales the shared expert's output (its "router weight"); None:
            the shared expert's output is added as it is (DeepSeek, GLM-4.5, Llama 4), its weight is 1.
        shared_width_key: config key of the shared expert's width.
        dense: the config keys that make a layer dense (`DenseLayers`); the default names none: every layer of
            Mixtral, OLMoE, Granite MoE, gpt-oss and Qwen3.5-MoE is MoE.
        gguf_down, gguf_up: GGUF sites of the routed experts: llama.cpp stacks a layer's experts into one 3-D
            tensor, `ffn_down_exps` [E, n_embd, n] and `ffn_up_exps` [E, n, n_embd] in numpy order (expert e's
            up matrix is rows e*n .. e*n + n - 1 of the tensor read as rows of n_embd values).
        gguf_shared_down, gguf_shared_up: GGUF sites of the shared expert (2-D, like a dense MLP's).
    """

    down: Site
    up: Site | None
    module: str = "mlp.experts"
    fused: str = "gate_up"
    router: str | None = None
    count_keys: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
    width_key: str = "moe_intermediate_size"
    shared_unit_width: bool = False
    mxfp4_down: Site | None = None
    shared_down: Site | None = None
    shared_up: Site | None = None
    shared_hook: str | None = None
    shared_gate: str | None = None
    shared_width_key: str | None = None
    dense: DenseLayers = DenseLayers()
    gguf_down: Site = field(default_factory=lambda: gguf_site(MODEL_TENSOR.FFN_DOWN_EXP, axis=2, expert_axis=0))
    gguf_up: Site = field(default_factory=lambda: gguf_site(MODEL_TENSOR.FFN_UP_EXP, axis=1, expert_axis=0))
    gguf_shared_down: Site = field(default_factory=lambda: gguf_site(MODEL_TENSOR.FFN_DOWN_SHEXP, axis=1))
    gguf_shared_up: Site = field(default_factory=lambda: gguf_site(MODEL_TENSOR.FFN_UP_SHEXP, axis=0))

    def site(self, target: str, expert: ExpertKey, fmt: str = "safetensors") -> Site:
        """The site of `target` ("down" or "up") of a routed or the shared expert in `fmt` ("safetensors" or
        "gguf")."""
        gguf = fmt == "gguf"
        if expert == SHARED:
            assert self.shared_down is not None and self.shared_up is not None
            if target == "down":
                return self.gguf_shared_down if gguf else self.shared_down
            return self.gguf_shared_up if gguf else self.shared_up
        if target == "down":
            return self.gguf_down if gguf else self.down
        return self.gguf_up if gguf else self.up


@dataclass(frozen=True)
class ExpertShape:
    """The sizes of an MoE model's experts (read from config.json)."""

    num_experts: int
    width: int
    shared: int = 0
    dense_layers: frozenset[int] = frozenset()

    def units(self, layer: int, dense_width: int) -> list[tuple[ExpertKey, int]]:
        """(expert key, width) of every neuron group of `layer`, in column order."""
        if layer in self.dense_layers:
            return [(None, dense_width)]
        units: list[tuple[ExpertKey, int]] = [(e, self.width) for e in range(self.num_experts)]
        return units + ([(SHARED, self.shared)] if self.shared else [])

    def layer_width(self, dense_width: int) -> int:
        """Columns of one attribution row: the widest layer (a dense layer may be wider than its experts)."""
        moe = self.num_experts * self.width + self.shared
        return max(moe, dense_width) if self.dense_layers else moe

    def column(self, layer: int, expert: ExpertKey, index: int) -> int:
        """The attribution column of neuron (layer, expert, index)."""
        if expert is None or layer in self.dense_layers:
            return index
        return (self.num_experts if expert == SHARED else expert) * self.width + index

    def neuron(self, layer: int, column: int) -> tuple[ExpertKey, int]:
        """(expert, index) of attribution column `column` of `layer` (inverse of `column`)."""
        if layer in self.dense_layers:
            return None, column
        e, j = divmod(column, self.width)
        if e >= self.num_experts:
            return SHARED, column - self.num_experts * self.width
        return e, j

    def valid(self, layer: int, column: int, dense_width: int) -> bool:
        """Whether a column of the (padded) attribution row of `layer` is a neuron."""
        if layer in self.dense_layers:
            return column < dense_width
        return column < self.num_experts * self.width + self.shared


# The in-memory layouts of transformers 5's fused experts: where neuron j of expert e sits in `down_proj`.
#   gate_up: gate_up_proj [E, 2n, hidden] (gate rows, then up), down_proj [E, hidden, n], no biases;
#   gpt_oss: gate_up_proj [E, hidden, 2n] (gate and up interleaved: even and odd columns) and its bias,
#            `(clamp(up) + 1) * glu(clamp(gate))`, down_proj [E, n, hidden] and a bias added after the sum;
#   llama4:  gate_up_proj [E, hidden, 2n] (gate columns, then up), down_proj [E, n, hidden]; the router weight
#            scales the expert's input, not its output.
FUSED_DOWN: dict[str, Site] = {
    "gate_up": Site("down_proj", axis=2, expert_axis=0),
    "gpt_oss": Site("down_proj", axis=1, expert_axis=0),
    "llama4": Site("down_proj", axis=1, expert_axis=0),
}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def _config_value(config: Any, key: str | None, check: Callable[[Any], bool], what: str) -> Any:
    """config[key] (None where the family has no such key or the config does not set it); a value that fails
    `check` is refused in one line rather than read as something else."""
    value = None if key is None else _get(config, key)
    if value is not None and not check(value):
        raise ArchitectureError(
            f"config.json has no valid {key} (found {reprlib.repr(value)}; it should be {what}).",
            "use the config.json that came with the checkpoint.",
        )
    return value


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_layer_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(_is_int(i, 0) for i in value)


def dense_layers(config: Any, num_layers: int, keys: DenseLayers) -> frozenset[int]:
    """Layers of an MoE model that keep a dense MLP, from the config keys the family's row names (`keys`)."""
    listed = set(_config_value(config, keys.listed, _is_layer_list, "a list of layer indices") or ())
    first = _config_value(config, keys.first_k, lambda v: _is_int(v, 0), "a count of layers") or 0
    sparse = _config_value(config, keys.sparse_listed, _is_layer_list, "a list of layer indices")
    step = _config_value(config, keys.sparse_step, lambda v: _is_int(v, 1), "a positive integer") or 1

    def dense(i: int) -> bool:
        if i in listed or i < first:
            return True
        return i not in sparse if sparse is not None else (i + 1) % step != 0

    return frozenset(filter(dense, range(num_layers)))


def expert_shape(spec: ExpertSpec, config: Any, num_layers: int) -> ExpertShape | None:
    """The expert sizes of a model of this family, or None when the config has no experts."""
    count = next((c for c in (_get(config, k) for k in spec.count_keys) if c is not None), None)
    width = _get(config, spec.width_key)
    if not isinstance(count, int) or not isinstance(width, int) or count <= 0 or width <= 0:
        return None
    shared = int(_get(config, spec.shared_width_key, 0) or 0) if spec.shared_width_key else 0
    shared *= width if spec.shared_unit_width else 1
    return ExpertShape(count, width, shared, dense_layers(config, num_layers, spec.dense))
