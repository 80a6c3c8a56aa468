"""Architecture table: everything that differs between supported model families, as data.

All supported families use a gated MLP, `down_proj(act(gate_proj(x)) * up_proj(x))`, without biases, so one
neuron j of layer i is column j of `down_proj.weight` and row j of `up_proj.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import MODEL_ARCH

from cna_export.errors import ArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """How one model family names and wires its MLP.

    Attributes:
        model_type: `config.model_type` as transformers writes it.
        gguf_arch: the llama.cpp architecture this family converts to.
        activation: the gate activation, for documentation and GGUF metadata.
        layers_module: dotted path of the decoder-layer list inside the `*ForCausalLM` module.
        down_proj_module: dotted path of one layer's down projection, relative to the layer.
        gate_weight, up_weight, down_weight: checkpoint tensor names, `{i}` is the layer index.

    GGUF conversion (gguf_export.py) reads the rest:
        permute_qk: llama.cpp's `llama` graph applies rotary embeddings to interleaved pairs while transformers
            rotates halves, so q/k projection rows are permuted on conversion.
        norm_offset: the model applies RMSNorm as `x * (offset + w)` (Gemma: 1); llama.cpp applies `x * w`, so
            the offset is added to every norm weight.
        tied_default: whether `tie_word_embeddings` is on when config.json does not say.
        sliding_window: llama.cpp reads `sliding_window` (the arch interleaves local-attention layers).
        query_scale_weight: the arch scales queries by `query_pre_attn_scalar ** -0.5`, but llama.cpp by
            `head_dim ** -0.5` (or `(hidden / heads) ** -0.5` at `query_scale_n_layer` layers, its 27B rule); the
            ratio is folded into this tensor (the query projection, or the query norm where one follows it).
        local_rope_base: the rope base llama.cpp hard-codes for sliding-window layers, checked against config.
    """

    model_type: str
    gguf_arch: MODEL_ARCH
    activation: str
    layers_module: str = "model.layers"
    down_proj_module: str = "mlp.down_proj"
    gate_weight: str = "model.layers.{i}.mlp.gate_proj.weight"
    up_weight: str = "model.layers.{i}.mlp.up_proj.weight"
    down_weight: str = "model.layers.{i}.mlp.down_proj.weight"
    permute_qk: bool = False
    norm_offset: float = 0.0
    tied_default: bool = False
    sliding_window: bool = False
    query_scale_weight: str | None = None
    query_scale_n_layer: int | None = None
    local_rope_base: float | None = None


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", MODEL_ARCH.LLAMA, "silu", permute_qk=True),
        # llama.cpp runs Mistral's dense models as the llama architecture.
        ArchSpec("mistral", MODEL_ARCH.LLAMA, "silu", permute_qk=True),
        ArchSpec("qwen2", MODEL_ARCH.QWEN2, "silu"),
        ArchSpec("qwen3", MODEL_ARCH.QWEN3, "silu"),
        ArchSpec("gemma", MODEL_ARCH.GEMMA, "gelu_tanh", norm_offset=1.0, tied_default=True),
        ArchSpec(
            "gemma2",
            MODEL_ARCH.GEMMA2,
            "gelu_tanh",
            norm_offset=1.0,
            tied_default=True,
            sliding_window=True,
            query_scale_weight="model.layers.{i}.self_attn.q_proj.weight",
            query_scale_n_layer=46,
        ),
        ArchSpec(
            "gemma3_text",
            MODEL_ARCH.GEMMA3,
            "gelu_tanh",
            norm_offset=1.0,
            tied_default=True,
            sliding_window=True,
            query_scale_weight="model.layers.{i}.self_attn.q_norm.weight",
            query_scale_n_layer=62,
            local_rope_base=10000.0,
        ),
    )
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes that a circuit must fit."""

    num_layers: int
    intermediate_size: int
    hidden_size: int

    @property
    def num_neurons(self) -> int:
        return self.num_layers * self.intermediate_size


def arch_for(model_type: str) -> ArchSpec:
    """Return the table entry for `model_type`, or fail naming the supported types."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ArchitectureError(
            f"Unsupported model_type {model_type!r}.",
            f"use a model of one of these types: {supported}.",
        ) from None


def shape_of(config: Any) -> ModelShape:
    """Read layer count and MLP width from a transformers config (or a plain dict)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    values = {key: get(key) for key in ("num_hidden_layers", "intermediate_size", "hidden_size")}
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ArchitectureError(
                f"config.json has no valid {key} (found {value!r}).",
                "use the config.json that came with the checkpoint.",
            )
    return ModelShape(values["num_hidden_layers"], values["intermediate_size"], values["hidden_size"])
