"""The one table of tiny test models: a row per supported `config.model_type` with its kind and the kwargs of its
transformers config (`tests/test_arch.py` fails for a row of the architecture table without one). The kind says
which fixture of tests/conftest.py holds the model and how `build_model` builds it:

* "dense": the seven families that cna-export's own GGUF converter handles (`tiny_models`);
* "moe": the mixtures of experts (`moe_models`);
* "family": the other dense and multimodal families, converted by llama.cpp's converter (`family_models`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Tiny:
    """One row of `TINY`: the kind of model (see the module docstring), the kwargs of its transformers config, and
    `build_tokenizer`'s kwargs for a tokenizer shaped like the family's (what llama.cpp and its converter look up)."""

    kind: Literal["dense", "moe", "family"]
    config: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=dict)


# Parts the rows share. MoE: 3 layers, 2 experts per token; the others: 2 layers of 128 neurons.
_MOE = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
# M-RoPE sections that fit the tiny rotary width (llama.cpp asserts on the default [11, 11, 10]).
_MOE_MROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "mrope_section": [1, 1, 0],
    "mrope_interleaved": True,
}
_DENSE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_SLIDING = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"])
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
_QWEN_VIT = dict(hidden_size=32, intermediate_size=64, depth=1, num_heads=2, out_hidden_size=64, patch_size=14)
_QWEN_IDS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502)
_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}

TINY: dict[str, Tiny] = {
    "llama": Tiny("dense", dict(_DENSE, num_hidden_layers=3, tie_word_embeddings=False)),
    "mistral": Tiny("dense", dict(_DENSE, intermediate_size=96, sliding_window=None)),
    "qwen2": Tiny("dense", dict(_DENSE, intermediate_size=112, num_hidden_layers=3, tie_word_embeddings=True)),
    "qwen3": Tiny("dense", dict(_DENSE, head_dim=16, tie_word_embeddings=True)),
    "gemma": Tiny("dense", dict(_DENSE, num_key_value_heads=1, head_dim=16)),
    "gemma2": Tiny("dense", dict(_DENSE, head_dim=16, sliding_window=16)),
    "gemma3_text": Tiny("dense", dict(_DENSE, num_hidden_layers=3, head_dim=16, sliding_window=16)),
    # Mixtures of experts: 4 experts, 2 per token; Qwen3-MoE keeps layer 0 dense (`mlp_only_layers`) and Qwen2-MoE
    # has a shared expert, so every kind of neuron (dense, routed, shared) has a model.
    "qwen3_moe": Tiny(
        "moe",
        dict(
            _MOE,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=4,
            head_dim=8,
            mlp_only_layers=[0],
            norm_topk_prob=True,
        ),
    ),
    "qwen2_moe": Tiny(
        "moe",
        dict(_MOE, intermediate_size=48, moe_intermediate_size=16, num_experts=4, shared_expert_intermediate_size=24),
    ),
    "olmoe": Tiny("moe", dict(_MOE, intermediate_size=16, num_experts=4)),
    "mixtral": Tiny("moe", dict(_MOE, intermediate_size=24, num_local_experts=4, sliding_window=None)),
    # DeepSeek-V3 and GLM-4.5: layer 0 dense, sigmoid routing in 2 groups (1 kept), an ungated shared expert.
    # (Multi-head latent attention: as many key/value heads as query heads.)
    "deepseek_v3": Tiny(
        "moe",
        dict(
            _MOE,
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
    ),
    "glm4_moe": Tiny(
        "moe",
        dict(
            _MOE,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            head_dim=8,
            partial_rotary_factor=0.5,
        ),
        tokenizer=dict(specials=("[gMASK]", "<|user|>", "<|observation|>")),
    ),
    "granitemoe": Tiny(
        "moe",
        dict(
            _MOE,
            intermediate_size=16,
            num_local_experts=4,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.1,
            logits_scaling=4.0,
        ),
    ),
    # A low swiglu_limit, so the clamps of gpt-oss's activation are hit at this size.
    "gpt_oss": Tiny(
        "moe", dict(_MOE, intermediate_size=16, num_local_experts=4, head_dim=8, sliding_window=16, swiglu_limit=1.0)
    ),
    # Wrappers (text config inside, a one-layer vision tower): Qwen3.5-MoE with linear-attention layers and a
    # gated shared expert (full attention every 2nd layer, as llama.cpp runs it: the Hub's models have it every
    # 4th); Llama 4 with Maverick's MoE layer every 2nd layer (`interleave_moe_layer_step`: layers 1 and 3; llama.cpp
    # keys its dense layers on the step), no RoPE in layer 3 (its default) and an ungated shared expert.
    "qwen3_5_moe": Tiny(
        "moe",
        dict(
            text_config=dict(
                _MOE,
                moe_intermediate_size=16,
                num_experts=4,
                shared_expert_intermediate_size=24,
                head_dim=8,
                layer_types=["linear_attention", "full_attention", "linear_attention"],
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                linear_key_head_dim=8,
                linear_value_head_dim=8,
                rope_parameters=_MOE_MROPE,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                depth=1,
                num_heads=2,
                out_hidden_size=32,
                patch_size=14,
                num_position_embeddings=16,
            ),
            image_token_id=500,
            video_token_id=501,
            vision_start_token_id=502,
        ),
    ),
    "llama4": Tiny(
        "moe",
        dict(
            text_config=dict(
                _MOE,
                num_hidden_layers=4,
                intermediate_size=16,
                intermediate_size_mlp=48,
                head_dim=8,
                num_local_experts=4,
                interleave_moe_layer_step=2,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
                vision_output_dim=32,
                projector_input_dim=32,
                projector_output_dim=32,
            ),
            image_token_index=500,
        ),
    ),
    # The other dense and multimodal families. Each keeps its config quirks at tiny size: Phi-3's longrope and fused
    # gate_up, SmolLM3's no-RoPE layer, OLMo's post-norms (their default), Granite's multipliers, GLM-4's fused MLP and
    # partial rotary, the sliding-window layer patterns of OLMo 3, Command R7B (cohere2) and EXAONE 4, Apertus'
    # ungated xIELU MLP, Qwen3.5's linear-attention layer. The wrappers get a one-layer vision tower; image and video
    # token ids sit above the tokenizer's 400 tokens.
    # llama.cpp picks Phi-3's long RoPE factors by the context it runs with (llama-cpp-python pads 64 to 256),
    # transformers by the sequence length: an original context above both keeps the two on the short factors.
    "phi3": Tiny(
        "family",
        dict(
            _DENSE,
            original_max_position_embeddings=512,
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0] * 8,
                "long_factor": [1.5] * 8,
            },
        ),
        tokenizer=dict(specials=("<s>", "</s>", "<unk>"), tokenizer_class="GPT2Tokenizer"),
    ),
    # Layer 3 has no RoPE, as in SmolLM3.
    "smollm3": Tiny("family", dict(_DENSE, num_hidden_layers=4, no_rope_layer_interval=4)),
    "olmo2": Tiny("family", dict(_DENSE)),
    "olmo3": Tiny("family", dict(_DENSE, **_SLIDING)),
    "granite": Tiny(
        "family",
        dict(_DENSE, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0),
    ),
    "glm4": Tiny(
        "family", dict(_DENSE, head_dim=16, partial_rotary_factor=0.5), tokenizer=dict(specials=("<|user|>",))
    ),
    # Command R7B's pattern (3 sliding-window layers with RoPE, then a global one without): llama.cpp hard-codes it.
    "cohere2": Tiny(
        "family",
        dict(
            _DENSE,
            num_hidden_layers=4,
            sliding_window=16,
            logit_scale=0.5,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
        ),
    ),
    "exaone4": Tiny("family", dict(_DENSE, **_SLIDING)),
    "apertus": Tiny("family", dict(_DENSE)),
    # M-RoPE sections that fit the tiny rotary width (llama.cpp asserts on the default [11, 11, 10]).
    "qwen3_5": Tiny(
        "family",
        dict(
            text_config=dict(
                _DENSE,
                head_dim=16,
                layer_types=["linear_attention", "full_attention"],
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.5,
                    "mrope_section": [2, 1, 1],
                    "mrope_interleaved": True,
                },
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                linear_key_head_dim=8,
                linear_value_head_dim=8,
            ),
            vision_config=dict(_QWEN_VIT, num_position_embeddings=16),
            **_QWEN_IDS,
        ),
    ),
    "gemma3": Tiny(
        "family",
        dict(
            text_config=dict(_DENSE, head_dim=16, sliding_window=16, query_pre_attn_scalar=16),
            vision_config=dict(_VIT, image_size=28, patch_size=14),
            mm_tokens_per_image=4,
            image_token_index=500,
            boi_token_index=501,
            eoi_token_index=502,
        ),
    ),
    "gemma4": Tiny(
        "family",
        dict(
            text_config=dict(
                _DENSE,
                head_dim=16,
                global_head_dim=16,
                **_SLIDING,
                hidden_size_per_layer_input=0,
                num_kv_shared_layers=0,
            ),
            vision_config=dict(_VIT, head_dim=16),
            audio_config=None,
        ),
        tokenizer=dict(sentencepiece=True),
    ),
    "mistral3": Tiny(
        "family",
        dict(
            text_config=dict(_DENSE, model_type="mistral", head_dim=16, sliding_window=None),
            vision_config=dict(_VIT, model_type="pixtral", image_size=28, patch_size=14, head_dim=16),
            image_token_index=500,
            spatial_merge_size=2,
        ),
    ),
    # The checkpoints' epsilon (transformers' default is 1e-5): llama.cpp 0.3.36 runs Qwen2-VL's RMS norms without
    # the file's epsilon, which the tiny model's small activations would show (test_family_gguf.TOL).
    "qwen2_5_vl": Tiny(
        "family",
        dict(
            text_config=dict(_DENSE, rope_parameters=_MROPE, rms_norm_eps=1e-6),
            vision_config=dict(_QWEN_VIT, fullatt_block_indexes=[0], window_size=56),
            **_QWEN_IDS,
        ),
    ),
    # Interleaved M-RoPE over the head's 8 rotary pairs: t, h, w take pairs 0,3,6 / 1,4,7 / 2,5 ([3, 3, 2]), as
    # [24, 20, 20] covers the checkpoints' 64; with [2, 3, 3] pair 6 is t's in transformers, llama.cpp's 4th section's.
    "qwen3_vl": Tiny(
        "family",
        dict(
            text_config=dict(
                _DENSE, head_dim=16, rope_parameters=dict(_MROPE, mrope_section=[3, 3, 2]), rms_norm_eps=1e-6
            ),
            vision_config=dict(_QWEN_VIT, deepstack_visual_indexes=[0], num_position_embeddings=16),
            **_QWEN_IDS,
        ),
    ),
}
ARCHS = sorted(a for a, t in TINY.items() if t.kind == "dense")
MOE_ARCHS = sorted(a for a, t in TINY.items() if t.kind == "moe")
FAMILIES = sorted(a for a, t in TINY.items() if t.kind == "family")
# Files a multimodal export must carry over byte for byte (their content is what a processor would read).
PROCESSOR_FILES = {
    "preprocessor_config.json": {"do_resize": True, "size": {"height": 28, "width": 28}},
    "processor_config.json": {"image_seq_length": 4},
}
