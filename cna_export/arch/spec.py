"""Architecture table: everything that differs between supported model families, as data.

Every supported family has a gated MLP, `down_proj(act(gate_proj(x)) * up_proj(x))` without biases, so neuron j
of layer i is an input of that layer's `down_proj`: a column of `down_proj.weight` and a row of `up_proj.weight`.
Each row of the table says where those live (`Site`s: checkpoint tensors, GGUF tensors) and which runtime module
takes the neurons as its input (the hooks of attribution and evaluation). To add a family, add a row here and a
tiny test model in tests/conftest.py (`tests/test_arch.py` fails for a row without one).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field, replace
from typing import Any

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR

from cna_export.arch.experts import ExpertSpec, expert_shape
from cna_export.arch.sites import ModelShape, Site
from cna_export.arch.sites import gguf_site as _gguf
from cna_export.errors import ArchitectureError


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


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", MODEL_ARCH.LLAMA, permute_qk=True),
        # llama.cpp runs Mistral's dense models as the llama architecture.
        ArchSpec("mistral", MODEL_ARCH.LLAMA, permute_qk=True),
        ArchSpec("qwen2", MODEL_ARCH.QWEN2),
        ArchSpec("qwen3", MODEL_ARCH.QWEN3),
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

# Mixtures of experts (issue 15). One 2-D tensor per expert on disk; fused 3-D parameters in transformers 5.
_QWEN_EXPERTS = ExpertSpec(
    Site("model.layers.{i}.mlp.experts.{e}.down_proj.weight", axis=1),
    Site("model.layers.{i}.mlp.experts.{e}.up_proj.weight", axis=0),
)
ARCHITECTURES.update(
    {
        spec.model_type: spec
        for spec in (
            ArchSpec("qwen3_moe", MODEL_ARCH.QWEN3MOE, own_gguf=False, experts=_QWEN_EXPERTS),
            ArchSpec(
                "qwen2_moe",
                MODEL_ARCH.QWEN2MOE,
                own_gguf=False,
                experts=ExpertSpec(
                    _QWEN_EXPERTS.down,
                    _QWEN_EXPERTS.up,
                    shared_down=Site("model.layers.{i}.mlp.shared_expert.down_proj.weight", axis=1),
                    shared_up=Site("model.layers.{i}.mlp.shared_expert.up_proj.weight", axis=0),
                    shared_hook="mlp.shared_expert.down_proj",
                    shared_gate="mlp.shared_expert_gate",
                    shared_width_key="shared_expert_intermediate_size",
                ),
            ),
            ArchSpec(
                "olmoe",
                MODEL_ARCH.OLMOE,
                own_gguf=False,
                experts=ExpertSpec(_QWEN_EXPERTS.down, _QWEN_EXPERTS.up, width_key="intermediate_size"),
            ),
            # llama.cpp runs Mixtral as the llama architecture with experts.
            ArchSpec(
                "mixtral",
                MODEL_ARCH.LLAMA,
                permute_qk=True,
                own_gguf=False,
                experts=ExpertSpec(
                    Site("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", axis=1),
                    Site("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", axis=0),
                    width_key="intermediate_size",
                ),
            ),
        )
    }
)


def arch_for(model_type: str) -> ArchSpec:
    """Return the table entry for `model_type`, or fail naming the supported types."""
    try:
        return ARCHITECTURES[model_type]
    except (KeyError, TypeError):
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ArchitectureError(
            f"Unsupported model_type {model_type!r}.",
            f"use a model of one of these types: {supported}.",
        ) from None


def compatible(a: str, b: str) -> bool:
    """Whether a circuit made on model_type `a` fits a model of type `b`: the same type, or types whose neurons
    sit in the same places and that run as one llama.cpp architecture (Mistral's dense models and Llama)."""
    if a == b:
        return True
    sa, sb = ARCHITECTURES.get(a), ARCHITECTURES.get(b)
    return (
        sa is not None and sb is not None and sa.gguf_arch == sb.gguf_arch and sa.sites() == sb.sites()
        and sa.experts == sb.experts
    )  # fmt: skip


def model_type_for_gguf(architecture: str | None, model_name: str | None = None, experts: int | None = None) -> str:
    """The transformers model_type of a GGUF file, from `general.architecture` (and `general.name`, and
    `{arch}.expert_count`).

    Several model types convert to one llama.cpp architecture; the mapping follows transformers' GGUF loader,
    which reads a `llama` file whose name mentions Mistral as `mistral`; a `llama` file with experts is Mixtral.
    """
    if experts and architecture in GGUF_MOE_MODEL_TYPES:
        return GGUF_MOE_MODEL_TYPES[architecture]
    if architecture == MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA] and model_name and "mistral" in model_name.lower():
        return "mistral"
    if architecture in GGUF_MODEL_TYPES:
        return GGUF_MODEL_TYPES[architecture]
    raise ArchitectureError(
        f"GGUF architecture {architecture!r} is not supported.", f"use one of {sorted(GGUF_MODEL_TYPES)}."
    )


# llama.cpp architecture name -> the model_type it is read as (explicit: several types share one architecture).
GGUF_MODEL_TYPES: dict[str, str] = {
    MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]: "llama",
    MODEL_ARCH_NAMES[MODEL_ARCH.QWEN2]: "qwen2",
    MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3]: "qwen3",
    MODEL_ARCH_NAMES[MODEL_ARCH.GEMMA]: "gemma",
    MODEL_ARCH_NAMES[MODEL_ARCH.GEMMA2]: "gemma2",
    MODEL_ARCH_NAMES[MODEL_ARCH.GEMMA3]: "gemma3_text",
    MODEL_ARCH_NAMES[MODEL_ARCH.QWEN2MOE]: "qwen2_moe",
    MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3MOE]: "qwen3_moe",
    MODEL_ARCH_NAMES[MODEL_ARCH.OLMOE]: "olmoe",
}
# Architectures that llama.cpp runs with or without experts: the model_type of a file that has experts.
GGUF_MOE_MODEL_TYPES: dict[str, str] = {MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]: "mixtral"}


def spec_of_config(model_type: Any) -> ArchSpec | None:
    """The row of a config's `model_type`: a family's own, or a wrapper's text config (`text_model_type`)."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    return next((s for s in ARCHITECTURES.values() if s.text_model_type and s.text_model_type == model_type), None)


def shape_of(config: Any) -> ModelShape:
    """Read layer count and MLP width from a transformers config (or a plain dict); each layer's width where the
    row's `double_wide` rule widens some."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    spec = spec_of_config(get("model_type"))
    width_key = spec.width_key if spec is not None else "intermediate_size"
    values = {key: get(key) for key in ("num_hidden_layers", width_key, "hidden_size")}
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ArchitectureError(
                f"config.json has no valid {key} (found {value!r}).",
                "use the config.json that came with the checkpoint.",
            )
    layers, width = values["num_hidden_layers"], values[width_key]
    moe = expert_shape(spec.experts, config, layers) if spec is not None and spec.experts is not None else None
    widths = [width] * layers
    if spec is not None and spec.double_wide is not None and get(spec.double_wide[0]):
        wide = get(spec.double_wide[1]) or 0
        widths = [2 * width if i >= layers - wide else width for i in range(layers)]
    return ModelShape.of_widths(widths, values["hidden_size"], moe)


# Dense and multimodal families (issue 14) ------------------------------------------------------------------------
# Their neurons sit where the seven's do (Phi-3 and GLM-4 fuse gate and up: the up neurons are the second half, in
# the checkpoint and in llama.cpp's ffn_up). The wrappers hold their language model under `model.language_model`
# (transformers 5's layout); they convert to GGUF through llama.cpp's converter, not gguf/convert.py.
LANGUAGE_MODEL = "model.language_model"
_FUSED_UP = Site("model.layers.{i}.mlp.gate_up_proj.weight", axis=0, part=1, parts=2)
_FUSED_GGUF_UP = replace(_gguf(MODEL_TENSOR.FFN_UP, axis=0), part=1, parts=2)


def _wrapper(
    model_type: str, gguf_arch: MODEL_ARCH, activation: str = "silu", legacy: tuple[str, ...] = ()
) -> ArchSpec:
    """A multimodal wrapper: text config under `text_config`, language model under `model.language_model`."""
    mlp = f"{LANGUAGE_MODEL}.layers.{{i}}.mlp."
    return ArchSpec(
        model_type, gguf_arch, activation, layers_module=f"{LANGUAGE_MODEL}.layers",
        down=Site(mlp + "down_proj.weight", axis=1), up=Site(mlp + "up_proj.weight", axis=0),
        text_config="text_config", loader="AutoModelForImageTextToText", legacy_prefixes=legacy, own_gguf=False,
    )  # fmt: skip


ARCHITECTURES.update(
    {
        spec.model_type: spec
        for spec in (
            ArchSpec("phi3", MODEL_ARCH.PHI3, up=_FUSED_UP, gguf_up=_FUSED_GGUF_UP, own_gguf=False),
            ArchSpec("smollm3", MODEL_ARCH.SMOLLM3, own_gguf=False),
            ArchSpec("olmo2", MODEL_ARCH.OLMO2, own_gguf=False),
            ArchSpec("olmo3", MODEL_ARCH.OLMO2, own_gguf=False),  # llama.cpp runs OLMo 3 as its olmo2 graph
            ArchSpec("granite", MODEL_ARCH.GRANITE, own_gguf=False),
            ArchSpec("glm4", MODEL_ARCH.GLM4, up=_FUSED_UP, gguf_up=_FUSED_GGUF_UP, own_gguf=False),
            ArchSpec("cohere2", MODEL_ARCH.COHERE2, own_gguf=False),
            ArchSpec("exaone4", MODEL_ARCH.EXAONE4, own_gguf=False),
            ArchSpec("apertus", MODEL_ARCH.APERTUS, "xielu", gated=False, own_gguf=False),
            _wrapper("qwen3_5", MODEL_ARCH.QWEN35),
            _wrapper("gemma3", MODEL_ARCH.GEMMA3, "gelu_tanh", legacy=("language_model.model.",)),
            # Under `use_double_wide_mlp` its last `num_kv_shared_layers` layers (the KV-shared ones) are twice as wide.
            replace(
                _wrapper("gemma4", MODEL_ARCH.GEMMA4, "gelu_tanh"),
                text_model_type="gemma4_text",
                double_wide=("use_double_wide_mlp", "num_kv_shared_layers"),
            ),
            _wrapper("mistral3", MODEL_ARCH.MISTRAL3, legacy=("language_model.model.",)),
            _wrapper("qwen2_5_vl", MODEL_ARCH.QWEN2VL, legacy=("model.",)),
            _wrapper("qwen3_vl", MODEL_ARCH.QWEN3VL),
        )
    }
)
# A GGUF holds the language model only; a wrapper's file is read as the wrapper type (its circuits then fit).
_GGUF_READ_AS = {
    MODEL_ARCH.PHI3: "phi3", MODEL_ARCH.SMOLLM3: "smollm3", MODEL_ARCH.OLMO2: "olmo2", MODEL_ARCH.GRANITE: "granite",
    MODEL_ARCH.GLM4: "glm4", MODEL_ARCH.COHERE2: "cohere2", MODEL_ARCH.EXAONE4: "exaone4",
    MODEL_ARCH.APERTUS: "apertus", MODEL_ARCH.QWEN35: "qwen3_5", MODEL_ARCH.GEMMA4: "gemma4",
    MODEL_ARCH.MISTRAL3: "mistral3", MODEL_ARCH.QWEN2VL: "qwen2_5_vl", MODEL_ARCH.QWEN3VL: "qwen3_vl",
}  # fmt: skip
GGUF_MODEL_TYPES.update({MODEL_ARCH_NAMES[arch]: model_type for arch, model_type in _GGUF_READ_AS.items()})


# Mixtures of experts, the other families (issue 15) -------------------------------------------------------------
# DeepSeek-V3 and GLM-4.5 keep one 2-D tensor per expert, their first `first_k_dense_replace` layers dense, and an
# ungated `shared_experts` MLP as wide as `n_shared_experts` routed experts; their sigmoid, grouped, bias-corrected
# routing happens in the router, and the experts module is called with its result. Granite MoE, gpt-oss and
# Llama 4 store each layer's experts stacked in 3-D tensors on disk (sites with an `expert_axis`).
_SHARED_EXPERTS = dict(
    shared_down=Site("model.layers.{i}.mlp.shared_experts.down_proj.weight", axis=1),
    shared_up=Site("model.layers.{i}.mlp.shared_experts.up_proj.weight", axis=0),
    shared_hook="mlp.shared_experts.down_proj", shared_width_key="n_shared_experts", shared_unit_width=True,
)  # fmt: skip
_LM_MLP = f"{LANGUAGE_MODEL}.layers.{{i}}.mlp."
_L4 = "language_model.model.layers.{i}.feed_forward."  # Llama 4 keeps transformers 4's wrapper layout
ARCHITECTURES.update(
    {
        spec.model_type: spec
        for spec in (
            ArchSpec("deepseek_v3", MODEL_ARCH.DEEPSEEK2, own_gguf=False,
                     experts=ExpertSpec(_QWEN_EXPERTS.down, _QWEN_EXPERTS.up, **_SHARED_EXPERTS)),
            ArchSpec("glm4_moe", MODEL_ARCH.GLM4_MOE, own_gguf=False,
                     experts=ExpertSpec(_QWEN_EXPERTS.down, _QWEN_EXPERTS.up, **_SHARED_EXPERTS)),
            # No dense layer: `hook` only names the MoE block (its parent), where a forward pass may end.
            ArchSpec("granitemoe", MODEL_ARCH.GRANITE_MOE, hook="block_sparse_moe.down_proj", own_gguf=False,
                     experts=ExpertSpec(
                         Site("model.layers.{i}.block_sparse_moe.output_linear.weight", axis=2, expert_axis=0),
                         Site("model.layers.{i}.block_sparse_moe.input_linear.weight", axis=1, part=1, parts=2,
                              expert_axis=0),
                         module="block_sparse_moe.experts", width_key="intermediate_size")),
            replace(
                _wrapper("qwen3_5_moe", MODEL_ARCH.QWEN35MOE), width_key="moe_intermediate_size",
                text_model_type="qwen3_5_moe_text",
                experts=ExpertSpec(
                    Site(_LM_MLP + "experts.{e}.down_proj.weight", axis=1),
                    Site(_LM_MLP + "experts.{e}.up_proj.weight", axis=0),
                    shared_down=Site(_LM_MLP + "shared_expert.down_proj.weight", axis=1),
                    shared_up=Site(_LM_MLP + "shared_expert.up_proj.weight", axis=0),
                    shared_hook="mlp.shared_expert.down_proj", shared_gate="mlp.shared_expert_gate",
                    shared_width_key="shared_expert_intermediate_size"),
            ),
            # bf16 experts on disk as transformers 5 saves them, or MXFP4 as on the Hub (`down_proj_blocks`, folded
            # by fold/mxfp4.py); the up rows are no fold target (clamp and +1).
            ArchSpec("gpt_oss", MODEL_ARCH.GPT_OSS, own_gguf=False,
                     experts=ExpertSpec(Site("model.layers.{i}.mlp.experts.down_proj", axis=1, expert_axis=0), None,
                                        fused="gpt_oss", width_key="intermediate_size",
                                        mxfp4_down=Site("model.layers.{i}.mlp.experts.down_proj_blocks", axis=1,
                                                        expert_axis=0, codec="mxfp4"))),
            ArchSpec("llama4", MODEL_ARCH.LLAMA4, layers_module="language_model.model.layers",
                     hook="feed_forward.down_proj", down=Site(_L4 + "down_proj.weight", axis=1),
                     up=Site(_L4 + "up_proj.weight", axis=0), text_config="text_config",
                     loader="AutoModelForImageTextToText", own_gguf=False, width_key="intermediate_size_mlp",
                     text_model_type="llama4_text",
                     experts=ExpertSpec(
                         Site(_L4 + "experts.down_proj", axis=1, expert_axis=0),
                         Site(_L4 + "experts.gate_up_proj", axis=2, part=1, parts=2, expert_axis=0),
                         module="feed_forward.experts", fused="llama4", router="feed_forward.router",
                         width_key="intermediate_size",
                         shared_down=Site(_L4 + "shared_expert.down_proj.weight", axis=1),
                         shared_up=Site(_L4 + "shared_expert.up_proj.weight", axis=0),
                         shared_hook="feed_forward.shared_expert.down_proj", shared_width_key="intermediate_size")),
        )
    }
)  # fmt: skip
# llama.cpp runs DeepSeek-V2/V3 as `deepseek2` (MLA attention, leading dense layers, grouped sigmoid routing from
# `expert_gating_func`); its experts and shared expert sit at the table's GGUF sites.
GGUF_MODEL_TYPES[MODEL_ARCH_NAMES[MODEL_ARCH.DEEPSEEK2]] = "deepseek_v3"
# The other MoE families run as llama.cpp architectures of their own (tests/test_moe_gguf.py converts and loads each).
_GGUF_MOE_READ_AS = {
    MODEL_ARCH.GLM4_MOE: "glm4_moe", MODEL_ARCH.GRANITE_MOE: "granitemoe", MODEL_ARCH.QWEN35MOE: "qwen3_5_moe",
    MODEL_ARCH.GPT_OSS: "gpt_oss", MODEL_ARCH.LLAMA4: "llama4",
}  # fmt: skip
GGUF_MODEL_TYPES.update({MODEL_ARCH_NAMES[arch]: model_type for arch, model_type in _GGUF_MOE_READ_AS.items()})
