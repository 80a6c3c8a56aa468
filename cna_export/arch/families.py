"""The architecture table: one `ArchSpec` row per supported `config.model_type`, in one block per vendor family
(as litgpt's `config.py` groups its rows), dense, multimodal and mixture-of-experts rows side by side.

`ARCHITECTURES` and `GGUF_MODEL_TYPES` are built from these rows at the end of the module and nowhere else. To add a
family, add its row to its vendor's block (or a new block, added to `FAMILIES`) and a tiny test model to
`TINY` in `cna_export/testing/tiny.py` (`tests/test_arch.py` fails for a row without one).

What the rows share is built first: a fused gate/up tensor holds the up neurons in its second half (Phi-3, GLM-4: in
the checkpoint and in llama.cpp's `ffn_up`); a multimodal wrapper holds its language model under
`model.language_model` (transformers 5's layout) and its text config under `text_config`; most mixtures of experts
keep one 2-D tensor per expert on disk (fused 3-D parameters in transformers 5), Granite MoE, gpt-oss and Llama 4
stack a layer's experts in 3-D tensors (sites with an `expert_axis`). Rows with `own_gguf=False` convert to GGUF
through llama.cpp's converter (gguf/external.py), not gguf/convert.py.
"""

from __future__ import annotations

from dataclasses import replace

from gguf import MODEL_ARCH, MODEL_TENSOR

from cna_export.arch.experts import DenseLayers, ExpertSpec
from cna_export.arch.sites import Site
from cna_export.arch.sites import gguf_site as _gguf
from cna_export.arch.spec import ArchSpec

# Building blocks ----------------------------------------------------------------------------------------------------
LANGUAGE_MODEL = "model.language_model"
_FUSED_UP = Site("model.layers.{i}.mlp.gate_up_proj.weight", axis=0, part=1, parts=2)
_FUSED_GGUF_UP = replace(_gguf(MODEL_TENSOR.FFN_UP, axis=0), part=1, parts=2)
_EXPERT_DOWN = Site("model.layers.{i}.mlp.experts.{e}.down_proj.weight", axis=1)
_EXPERT_UP = Site("model.layers.{i}.mlp.experts.{e}.up_proj.weight", axis=0)
_LM_MLP = f"{LANGUAGE_MODEL}.layers.{{i}}.mlp."
# Which config keys make a layer of an MoE model dense: each family reads only its own (issue 23, class 13).
_QWEN_DENSE = DenseLayers(listed="mlp_only_layers", sparse_step="decoder_sparse_step")
_FIRST_K_DENSE = DenseLayers(first_k="first_k_dense_replace")


def _wrapper(
    model_type: str, gguf_arch: MODEL_ARCH, activation: str = "silu", legacy: tuple[str, ...] = ()
) -> ArchSpec:
    """A multimodal wrapper: text config under `text_config`, language model under `model.language_model`."""
    return ArchSpec(
        model_type,
        gguf_arch,
        activation,
        layers_module=f"{LANGUAGE_MODEL}.layers",
        down=Site(_LM_MLP + "down_proj.weight", axis=1),
        up=Site(_LM_MLP + "up_proj.weight", axis=0),
        text_config="text_config",
        loader="AutoModelForImageTextToText",
        legacy_prefixes=legacy,
        own_gguf=False,
    )


def _shared_experts(model_type: str, gguf_arch: MODEL_ARCH) -> ArchSpec:
    """DeepSeek-V3's MoE layout, which GLM-4.5 shares: one 2-D tensor per expert, the first `first_k_dense_replace`
    layers dense, and an ungated `shared_experts` MLP as wide as `n_shared_experts` routed experts. Their sigmoid,
    grouped, bias-corrected routing happens in the router; the experts module is called with its result."""
    experts = ExpertSpec(
        _EXPERT_DOWN,
        _EXPERT_UP,
        shared_down=Site("model.layers.{i}.mlp.shared_experts.down_proj.weight", axis=1),
        shared_up=Site("model.layers.{i}.mlp.shared_experts.up_proj.weight", axis=0),
        shared_hook="mlp.shared_experts.down_proj",
        shared_width_key="n_shared_experts",
        shared_unit_width=True,
        dense=_FIRST_K_DENSE,
    )
    return ArchSpec(model_type, gguf_arch, own_gguf=False, experts=experts)


# Meta: Llama --------------------------------------------------------------------------------------------------------
_L4 = "language_model.model.layers.{i}.feed_forward."  # Llama 4 keeps transformers 4's wrapper layout
META = (
    ArchSpec("llama", MODEL_ARCH.LLAMA, permute_qk=True),
    # A wrapper with dense layers between MoE ones (`moe_layers`; without it every `interleave_moe_layer_step`-th
    # layer is MoE, as transformers reads it), 3-D stacked experts and an ungated shared expert.
    ArchSpec(
        "llama4",
        MODEL_ARCH.LLAMA4,
        layers_module="language_model.model.layers",
        hook="feed_forward.down_proj",
        down=Site(_L4 + "down_proj.weight", axis=1),
        up=Site(_L4 + "up_proj.weight", axis=0),
        text_config="text_config",
        loader="AutoModelForImageTextToText",
        own_gguf=False,
        width_key="intermediate_size_mlp",
        text_model_type="llama4_text",
        experts=ExpertSpec(
            Site(_L4 + "experts.down_proj", axis=1, expert_axis=0),
            Site(_L4 + "experts.gate_up_proj", axis=2, part=1, parts=2, expert_axis=0),
            module="feed_forward.experts",
            fused="llama4",
            router="feed_forward.router",
            width_key="intermediate_size",
            shared_down=Site(_L4 + "shared_expert.down_proj.weight", axis=1),
            shared_up=Site(_L4 + "shared_expert.up_proj.weight", axis=0),
            shared_hook="feed_forward.shared_expert.down_proj",
            shared_width_key="intermediate_size",
            dense=DenseLayers(sparse_listed="moe_layers", sparse_step="interleave_moe_layer_step"),
        ),
    ),
)

# Mistral AI ---------------------------------------------------------------------------------------------------------
MISTRAL = (
    # llama.cpp runs Mistral's dense models, and Mixtral with its experts, as the llama architecture.
    ArchSpec("mistral", MODEL_ARCH.LLAMA, permute_qk=True, from_gguf=False),
    ArchSpec(
        "mixtral",
        MODEL_ARCH.LLAMA,
        permute_qk=True,
        own_gguf=False,
        from_gguf=False,
        experts=ExpertSpec(
            Site("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", axis=1),
            Site("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", axis=0),
            width_key="intermediate_size",
        ),
    ),
    _wrapper("mistral3", MODEL_ARCH.MISTRAL3, legacy=("language_model.model.",)),
)

# Alibaba: Qwen ------------------------------------------------------------------------------------------------------
QWEN = (
    ArchSpec("qwen2", MODEL_ARCH.QWEN2),
    ArchSpec("qwen3", MODEL_ARCH.QWEN3),
    ArchSpec(
        "qwen2_moe",
        MODEL_ARCH.QWEN2MOE,
        own_gguf=False,
        experts=ExpertSpec(
            _EXPERT_DOWN,
            _EXPERT_UP,
            shared_down=Site("model.layers.{i}.mlp.shared_expert.down_proj.weight", axis=1),
            shared_up=Site("model.layers.{i}.mlp.shared_expert.up_proj.weight", axis=0),
            shared_hook="mlp.shared_expert.down_proj",
            shared_gate="mlp.shared_expert_gate",
            shared_width_key="shared_expert_intermediate_size",
            dense=_QWEN_DENSE,
        ),
    ),
    ArchSpec(
        "qwen3_moe",
        MODEL_ARCH.QWEN3MOE,
        own_gguf=False,
        experts=ExpertSpec(_EXPERT_DOWN, _EXPERT_UP, dense=_QWEN_DENSE),
    ),
    _wrapper("qwen3_5", MODEL_ARCH.QWEN35),
    # No dense MLP and no `intermediate_size`: the expert width stands in; a gated shared expert.
    replace(
        _wrapper("qwen3_5_moe", MODEL_ARCH.QWEN35MOE),
        width_key="moe_intermediate_size",
        text_model_type="qwen3_5_moe_text",
        experts=ExpertSpec(
            Site(_LM_MLP + "experts.{e}.down_proj.weight", axis=1),
            Site(_LM_MLP + "experts.{e}.up_proj.weight", axis=0),
            shared_down=Site(_LM_MLP + "shared_expert.down_proj.weight", axis=1),
            shared_up=Site(_LM_MLP + "shared_expert.up_proj.weight", axis=0),
            shared_hook="mlp.shared_expert.down_proj",
            shared_gate="mlp.shared_expert_gate",
            shared_width_key="shared_expert_intermediate_size",
        ),
    ),
    _wrapper("qwen2_5_vl", MODEL_ARCH.QWEN2VL, legacy=("model.",)),
    _wrapper("qwen3_vl", MODEL_ARCH.QWEN3VL),
)

# Google: Gemma ------------------------------------------------------------------------------------------------------
GOOGLE = (
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
    replace(_wrapper("gemma3", MODEL_ARCH.GEMMA3, "gelu_tanh", legacy=("language_model.model.",)), from_gguf=False),
    # Under `use_double_wide_mlp` its last `num_kv_shared_layers` layers (the KV-shared ones) are twice as wide.
    replace(
        _wrapper("gemma4", MODEL_ARCH.GEMMA4, "gelu_tanh"),
        text_model_type="gemma4_text",
        double_wide=("use_double_wide_mlp", "num_kv_shared_layers"),
    ),
)

# Microsoft: Phi -----------------------------------------------------------------------------------------------------
MICROSOFT = (ArchSpec("phi3", MODEL_ARCH.PHI3, up=_FUSED_UP, gguf_up=_FUSED_GGUF_UP, own_gguf=False),)

# Hugging Face: SmolLM -----------------------------------------------------------------------------------------------
HUGGING_FACE = (ArchSpec("smollm3", MODEL_ARCH.SMOLLM3, own_gguf=False),)

# Allen AI: OLMo -----------------------------------------------------------------------------------------------------
ALLEN_AI = (
    ArchSpec("olmo2", MODEL_ARCH.OLMO2, own_gguf=False),
    ArchSpec("olmo3", MODEL_ARCH.OLMO2, own_gguf=False, from_gguf=False),  # llama.cpp runs OLMo 3 as its olmo2 graph
    ArchSpec(
        "olmoe",
        MODEL_ARCH.OLMOE,
        own_gguf=False,
        experts=ExpertSpec(_EXPERT_DOWN, _EXPERT_UP, width_key="intermediate_size"),
    ),
)

# IBM: Granite -------------------------------------------------------------------------------------------------------
IBM = (
    ArchSpec("granite", MODEL_ARCH.GRANITE, own_gguf=False),
    # No dense layer: `hook` only names the MoE block (its parent), where a forward pass may end.
    ArchSpec(
        "granitemoe",
        MODEL_ARCH.GRANITE_MOE,
        hook="block_sparse_moe.down_proj",
        own_gguf=False,
        experts=ExpertSpec(
            Site("model.layers.{i}.block_sparse_moe.output_linear.weight", axis=2, expert_axis=0),
            Site("model.layers.{i}.block_sparse_moe.input_linear.weight", axis=1, part=1, parts=2, expert_axis=0),
            module="block_sparse_moe.experts",
            width_key="intermediate_size",
        ),
    ),
)

# Zhipu AI: GLM ------------------------------------------------------------------------------------------------------
ZHIPU = (
    ArchSpec("glm4", MODEL_ARCH.GLM4, up=_FUSED_UP, gguf_up=_FUSED_GGUF_UP, own_gguf=False),
    _shared_experts("glm4_moe", MODEL_ARCH.GLM4_MOE),
)

# DeepSeek -----------------------------------------------------------------------------------------------------------
# llama.cpp runs DeepSeek-V2/V3 as `deepseek2` (MLA attention, leading dense layers, grouped sigmoid routing from
# `expert_gating_func`); its experts and shared expert sit at the table's GGUF sites.
DEEPSEEK = (_shared_experts("deepseek_v3", MODEL_ARCH.DEEPSEEK2),)

# OpenAI: gpt-oss ----------------------------------------------------------------------------------------------------
# bf16 experts on disk as transformers 5 saves them, or MXFP4 as on the Hub (`down_proj_blocks`, folded by
# fold/mxfp4.py); the up rows are no fold target (clamp and +1).
OPENAI = (
    ArchSpec(
        "gpt_oss",
        MODEL_ARCH.GPT_OSS,
        own_gguf=False,
        experts=ExpertSpec(
            Site("model.layers.{i}.mlp.experts.down_proj", axis=1, expert_axis=0),
            None,
            fused="gpt_oss",
            width_key="intermediate_size",
            mxfp4_down=Site("model.layers.{i}.mlp.experts.down_proj_blocks", axis=1, expert_axis=0, codec="mxfp4"),
        ),
    ),
)

# Cohere: Command ----------------------------------------------------------------------------------------------------
COHERE = (ArchSpec("cohere2", MODEL_ARCH.COHERE2, own_gguf=False),)

# LG AI Research: EXAONE ---------------------------------------------------------------------------------------------
LG = (ArchSpec("exaone4", MODEL_ARCH.EXAONE4, own_gguf=False),)

# Swiss AI: Apertus (an ungated xIELU MLP) ---------------------------------------------------------------------------
SWISS_AI = (ArchSpec("apertus", MODEL_ARCH.APERTUS, "xielu", gated=False, own_gguf=False),)

# The table ----------------------------------------------------------------------------------------------------------
FAMILIES: tuple[ArchSpec, ...] = (
    *META,
    *MISTRAL,
    *QWEN,
    *GOOGLE,
    *MICROSOFT,
    *HUGGING_FACE,
    *ALLEN_AI,
    *IBM,
    *ZHIPU,
    *DEEPSEEK,
    *OPENAI,
    *COHERE,
    *LG,
    *SWISS_AI,
)
ARCHITECTURES: dict[str, ArchSpec] = {spec.model_type: spec for spec in FAMILIES}
# llama.cpp architecture name -> the model_type a GGUF file of it is read as (the one row with `from_gguf`).
GGUF_MODEL_TYPES: dict[str, str] = {spec.gguf_name: spec.model_type for spec in FAMILIES if spec.from_gguf}
# Architectures that llama.cpp runs with or without experts: the model_type of a file that has experts.
GGUF_MOE_MODEL_TYPES: dict[str, str] = {ARCHITECTURES["mixtral"].gguf_name: "mixtral"}
