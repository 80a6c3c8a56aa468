"""The row type of the architecture table: everything that differs between supported model families, as data.

Every supported family has a gated MLP, `down_proj(act(gate_proj(x)) * up_proj(x))` without biases, so neuron j
of layer i is an input of that layer's `down_proj`: a column of `down_proj.weight` and a row of `up_proj.weight`.
Each row of the table (`arch/families.py`, one block per vendor) says where those live (`Site`s: checkpoint
tensors, GGUF tensors) and which runtime module takes the neurons as its input (the hooks of attribution and
evaluation). This module defines the row type, `ArchSpec`; `arch/lookup.py` finds rows.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field, replace
from typing import Any

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR

from cna_export.arch.experts import ExpertSpec
from cna_export.arch.sites import ModelShape, Site
from cna_export.arch.sites import gguf_site as _gguf
from cna_export.errors import ArchitectureError

# `ModelShape` is imported from here by modules that predate `arch/sites.py`; the package (`cna_export.arch`) names
# all three.
__all__ = ["ArchSpec", "ModelShape", "Site"]


@dataclass(frozen=True)
class ArchSpec:
    """How one model family lays out its MLP neurons, and what its GGUF conversion needs.

    Attributes:
        model_type: `config.model_type` as transformers writes it.
        gguf_arch: the llama.cpp architecture this family converts to.
        activation: the gate activation (documentation; the card and the families table show it).
        layers_module: dotted path of the decoder-layer list inside the `*ForCausalLM` module.
        hook: dotted path, relative to a decoder layer, of the module whose input holds one value per neuron.
        down, up: the checkpoint sites (safetensors, PyTorch order: down_proj [hidden, n], up_proj [n, hidden]).
        gguf_down, gguf_up: the GGUF sites (numpy order: ffn_down [n_embd, n_ff], ffn_up [n_ff, n_embd]).
        text_config: the config.json key that holds the language model's config in a multimodal wrapper
            (attribution, shapes and GGUF read the language model; the vision tower is copied untouched).
        loader: the transformers auto class that loads the family (`AutoModelForImageTextToText` for wrappers).
        legacy_prefixes: what older checkpoints of the family name `model.language_model.` (the layout
            transformers 5 saves): the Hub files of Gemma 3 and Mistral 3 say `language_model.model.`, those
            of Qwen2.5-VL `model.`. `for_checkpoint` picks the one a checkpoint uses.
        gated: the MLP is `down(act(gate x) * up x)`. Without a gate (Apertus: `down(act(up x))`) a neuron is
            still an input of `down_proj`, but scaling its `up_proj` row is not exact, so only `down` folds.
        own_gguf: cna-export's own GGUF converter (gguf/convert.py) handles the family; the others convert
            with llama.cpp's converter (see README, "GGUF for every family") and patch with `patch-gguf`.

    GGUF conversion (gguf/convert.py) reads the rest:
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
        experts: for a mixture of experts, the expert sites and config keys (`down`/`up` are then the sites of
            the dense layers, if the model has any).
        width_key: config key of the dense MLP width (`ModelShape.intermediate_size`): Llama 4 keeps it in
            `intermediate_size_mlp` (its `intermediate_size` is an expert's), Qwen3.5-MoE has no dense MLP and no
            `intermediate_size`, so its expert width stands in.
        text_model_type: the `model_type` of a wrapper's text config (`qwen3_5_moe_text`), which a loaded
            model's `config.get_text_config()` reports; `shape_of` finds the row by it.
        double_wide: (flag, count key): where config[flag] is true, the last config[count] layers' MLPs are twice
            `intermediate_size` wide (Gemma 4's `use_double_wide_mlp` widens its `num_kv_shared_layers` KV-shared
            layers, which are the last ones); `shape_of` then gives each layer's width (`ModelShape.layer_widths`).
        from_gguf: a GGUF file of `gguf_arch` reads back as this family (`GGUF_MODEL_TYPES`). False where another
            row of the same llama.cpp architecture is the one: Mistral and Mixtral files are `llama` files, read as
            Mistral by their name and as Mixtral by their experts (`model_type_for_gguf`); OLMo 3 files read as
            OLMo 2, the Gemma 3 wrapper's as `gemma3_text` (a GGUF holds the language model only).
    """

    model_type: str
    gguf_arch: MODEL_ARCH
    activation: str = "silu"
    layers_module: str = "model.layers"
    hook: str = "mlp.down_proj"
    down: Site = Site("model.layers.{i}.mlp.down_proj.weight", axis=1)
    up: Site = Site("model.layers.{i}.mlp.up_proj.weight", axis=0)
    gguf_down: Site = field(default_factory=lambda: _gguf(MODEL_TENSOR.FFN_DOWN, axis=1))
    gguf_up: Site = field(default_factory=lambda: _gguf(MODEL_TENSOR.FFN_UP, axis=0))
    text_config: str | None = None
    loader: str = "AutoModelForCausalLM"
    legacy_prefixes: tuple[str, ...] = ()
    gated: bool = True
    own_gguf: bool = True
    permute_qk: bool = False
    norm_offset: float = 0.0
    tied_default: bool = False
    sliding_window: bool = False
    query_scale_weight: str | None = None
    query_scale_n_layer: int | None = None
    local_rope_base: float | None = None
    experts: ExpertSpec | None = None  # MoE families: where routed and shared experts live (arch/experts.py)
    width_key: str = "intermediate_size"
    text_model_type: str | None = None
    double_wide: tuple[str, str] | None = None
    from_gguf: bool = True

    @property
    def gguf_name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]

    def site(self, target: str, fmt: str = "safetensors") -> Site:
        """The site of `target` ("down" or "up") in `fmt` ("safetensors" or "gguf")."""
        self.check_target(target)
        if fmt == "gguf":
            return self.gguf_down if target == "down" else self.gguf_up
        return self.down if target == "down" else self.up

    def sites(self, fmt: str = "safetensors") -> dict[str, Site]:
        """The sites that a circuit may be folded into (an ungated MLP's `up_proj` is not one)."""
        return {target: self.site(target, fmt) for target in self.targets}

    @property
    def targets(self) -> tuple[str, ...]:
        up = self.gated and (self.experts is None or self.experts.up is not None)
        return ("down", "up") if up else ("down",)

    def check_target(self, target: str) -> None:
        """Refuse `up` where scaling the row of `up_proj` does not scale the neuron: an ungated MLP, or experts
        whose activation is not linear in `up` (gpt-oss clamps it and adds 1)."""
        if target not in self.targets:
            why = "has no gate in its MLP" if not self.gated else "clamps its experts' up projection and adds 1"
            raise ArchitectureError(
                f"{self.model_type} {why}, so scaling up_proj rows does not scale neurons.",
                "fold into down_proj (--target down, the default).",
            )

    def text_of(self, config: dict[str, Any]) -> dict[str, Any]:
        """The language model's part of a config.json dict (the whole dict for a text-only family)."""
        if self.text_config is None:
            return config
        text = config.get(self.text_config)
        if not isinstance(text, dict):
            raise ArchitectureError(
                f"config.json of this {self.model_type} model has no {self.text_config!r} object.",
                "use the config.json that came with the checkpoint.",
            )
        return text

    @property
    def checkpoint_layouts(self) -> bool:
        """Whether checkpoints of this family come in more than one layout (`for_checkpoint` picks one)."""
        return bool(self.legacy_prefixes) or self.experts is not None and self.experts.mxfp4_down is not None

    def for_checkpoint(self, names: Container[str]) -> ArchSpec:
        """This spec with its checkpoint sites renamed to the layout that a checkpoint with tensors `names`
        uses (one of `legacy_prefixes`, or MXFP4 experts); unchanged when the current layout is present or nothing
        matches."""
        ex = self.experts
        # gpt-oss has no dense layer, so layer 0 tells whether its experts are stored in MXFP4.
        if ex is not None and ex.mxfp4_down is not None and ex.mxfp4_down.name(0) in names:
            return replace(self, experts=replace(ex, down=ex.mxfp4_down))
        if self.down.name(0) in names:
            return self
        current = self.layers_module.rpartition(".")[0] + "."
        for prefix in self.legacy_prefixes:
            down, up = (replace(s, template=s.template.replace(current, prefix, 1)) for s in (self.down, self.up))
            if down.name(0) in names:
                return replace(self, down=down, up=up)
        return self
