"""Shared fixtures: tiny random models of every supported architecture, built offline in a temp folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, PromptSet, RecordedSelection

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
# Keep the sha256 cache of the tests out of the user's home, in a folder removed when the session ends.
if "CNA_EXPORT_CACHE" not in os.environ:
    _CACHE = tempfile.TemporaryDirectory(prefix="cna-export-cache-")
    os.environ["CNA_EXPORT_CACHE"] = _CACHE.name
REPO = Path(__file__).resolve().parent.parent

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "How do I bake bread? Explain how to make a paper airplane. Write a Python function that reverses a string.",
    "The quick brown fox jumps over the lazy dog. Qu'est-ce que la photosynthese? Wie spaet ist es?",
    "def add(a, b):\n    return a + b\n# comments and code 0123456789 {}[]()<>=+-*/",
    "I cannot help with that request. Sure, here is how you can do it: first, second, third.",
]

# Tiny configs: one per supported architecture (kwargs for the transformers config class).
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, sliding_window=16),
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, sliding_window=16),
}  # fmt: skip
ARCHS = sorted(TINY)

# Tiny mixtures of experts (issue 15): 4 experts, 2 per token; Qwen3-MoE keeps layer 0 dense (`mlp_only_layers`)
# and Qwen2-MoE has a shared expert, so every kind of neuron (dense, routed, shared) has a model.
_MOE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2, tie_word_embeddings=False)
# M-RoPE sections that fit the tiny rotary width (llama.cpp asserts on the default [11, 11, 10]).
_MOE_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 0],
              "mrope_interleaved": True}  # fmt: skip
MOE_TINY = {
    "qwen3_moe": dict(_MOE, intermediate_size=48, moe_intermediate_size=16, num_experts=4, head_dim=8,
                      mlp_only_layers=[0], norm_topk_prob=True),
    "qwen2_moe": dict(_MOE, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                      shared_expert_intermediate_size=24),
    "olmoe": dict(_MOE, intermediate_size=16, num_experts=4),
    "mixtral": dict(_MOE, intermediate_size=24, num_local_experts=4, sliding_window=None),
    # DeepSeek-V3 and GLM-4.5: layer 0 dense, sigmoid routing in 2 groups (1 kept), an ungated shared expert.
    # (Multi-head latent attention: as many key/value heads as query heads.)
    "deepseek_v3": dict(_MOE, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
                        n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "glm4_moe": dict(_MOE, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8, partial_rotary_factor=0.5),
    "granitemoe": dict(_MOE, intermediate_size=16, num_local_experts=4, embedding_multiplier=2.0,
                       residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0),
    # A low swiglu_limit, so the clamps of gpt-oss's activation are hit at this size.
    "gpt_oss": dict(_MOE, intermediate_size=16, num_local_experts=4, head_dim=8, sliding_window=16,
                    swiglu_limit=1.0),
    # Wrappers (text config inside, a one-layer vision tower): Qwen3.5-MoE with linear-attention layers and a
    # gated shared expert (full attention every 2nd layer, as llama.cpp runs it: the Hub's models have it every
    # 4th); Llama 4 with Maverick's MoE layer every 2nd layer (`interleave_moe_layer_step`: layers 1 and 3; llama.cpp
    # keys its dense layers on the step), no RoPE in layer 3 (its default) and an ungated shared expert.
    "qwen3_5_moe": dict(text_config=dict(_MOE, moe_intermediate_size=16, num_experts=4,
                                         shared_expert_intermediate_size=24, head_dim=8,
                                         layer_types=["linear_attention", "full_attention", "linear_attention"],
                                         linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                         linear_value_head_dim=8, rope_parameters=_MOE_MROPE),
                        vision_config=dict(hidden_size=32, intermediate_size=64, depth=1, num_heads=2,
                                           out_hidden_size=32, patch_size=14, num_position_embeddings=16),
                        image_token_id=500, video_token_id=501, vision_start_token_id=502),
    "llama4": dict(text_config=dict(_MOE, num_hidden_layers=4, intermediate_size=16, intermediate_size_mlp=48,
                                    head_dim=8, num_local_experts=4, interleave_moe_layer_step=2),
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=32,
                                      projector_input_dim=32, projector_output_dim=32),
                   image_token_index=500),
}  # fmt: skip
MOE_ARCHS = sorted(MOE_TINY)
# Tokens that llama.cpp's converter looks up by text in a GLM-4.5 tokenizer (its bos, end of turn and of message).
MOE_TOKENIZERS = {"glm4_moe": dict(specials=("[gMASK]", "<|user|>", "<|observation|>"))}


def build_tokenizer(folder: Path, specials: tuple[str, ...] = (), sentencepiece: bool = False, **config):
    """A byte-level BPE tokenizer trained on CORPUS (400 tokens), saved in `folder`.

    Args:
        specials: more special tokens, after the three of CHATML (the ones some converters look up by text).
        sentencepiece: a Llama-style BPE instead (`▁` for spaces, byte fallback to `<0xNN>` tokens, 480 tokens),
            as Gemma's tokenizer.json is.
        config: more tokenizer_config.json keys (e.g. `tokenizer_class`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *specials]
    if sentencepiece:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<|endoftext|>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=[*base, *(f"<0x{b:02X}>" for b in range(256))])
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=base, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    tok.train_from_iterator(CORPUS * 4, trainer)
    # The turn marker is a special token (as Gemma's `<start_of_turn>` is): llama.cpp's converter marks only
    # special tokens as control tokens in a Llama-style vocabulary, and parses only those out of the chat text.
    extra = {"extra_special_tokens": ["<|im_start|>"]} if sentencepiece else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", **extra)
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    if config:  # after saving: transformers writes its own tokenizer_class
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}, indent=2))
    return fast


def build_model(
    folder: Path, arch: str, dtype: torch.dtype = torch.float32, shard: str | None = None, **overrides
) -> Path:
    """A random model of `arch` saved as a Hugging Face folder (optionally sharded; an MoE wrapper's token ids
    go into its text config; `overrides` change config keys of the tiny config)."""
    import transformers
    from transformers import AutoConfig, GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, **MOE_TOKENIZERS.get(arch, {}))
    ids = dict(vocab_size=512, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, bos_token_id=None)  # fmt: skip
    kwargs = {**{**TINY, **MOE_TINY}[arch], **overrides}
    wrapper = "text_config" in kwargs
    config = AutoConfig.for_model(arch, **({**kwargs, "text_config": {**kwargs["text_config"], **ids}} if wrapper
                                           else {**ids, **kwargs}))  # fmt: skip
    torch.manual_seed(sum(map(ord, arch)))
    loader = "AutoModelForImageTextToText" if wrapper else "AutoModelForCausalLM"
    model = getattr(transformers, loader).from_config(config).to(dtype).eval()
    with torch.no_grad():  # wider weights than the default init, so neurons differ clearly between prompts
        for name, p in model.named_parameters():
            if p.ndim in (2, 3):  # 3-D: fused experts
                p.normal_(0, 0.08 if p.ndim == 2 else 0.2)
            elif name.endswith("_proj_bias"):  # gpt-oss experts' biases
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's routing correction: let it change the top-k
                b.normal_(0, 0.5)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, max_new_tokens=8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random mixture-of-experts folder per MoE family (per-expert 2-D or stacked 3-D tensors on disk)."""
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: build_model(root / arch, arch) for arch in MOE_ARCHS}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model folder per architecture (llama is sharded across several files)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_model(root / arch, arch, shard="60KB" if arch == "llama" else None) for arch in ARCHS}


def make_circuit(model_dir: Path, neurons: list[tuple], multiplier: float = 0.0) -> Circuit:
    """A hand-made circuit for `model_dir` (no provenance hash, so it applies to any weights of that shape):
    neurons as (layer, index), or (layer, expert, index) in an MoE model; the identity carries the model's experts
    and per-layer widths."""
    from cna_export.circuit.format import shape_fields
    from cna_export.io.source import describe, resolve

    _, shape, config = describe(resolve(str(model_dir)))
    return Circuit(
        multiplier=multiplier,
        model=ModelIdentity(source=str(model_dir), model_type=config["model_type"], num_layers=shape.num_layers,
                            intermediate_size=shape.intermediate_size, hidden_size=shape.hidden_size,
                            **shape_fields(shape)),
        prompts={"positive": PromptSet(count=0, sha256=""), "negative": PromptSet(count=0, sha256="")},
        selection=RecordedSelection(top_k=len(neurons)),
        neurons=[Neuron(layer=n[0], expert=n[1] if len(n) == 3 else None, index=n[-1], delta=1.0) for n in neurons],
    )  # fmt: skip


def run_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run `cna-export` in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cna_export", *args], capture_output=True, text=True, env=env, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cna-export {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


# Dense and multimodal families (issue 14) ------------------------------------------------------------------------
# Each keeps its config quirks at tiny size: Phi-3's longrope and fused gate_up, SmolLM3's no-RoPE layer, OLMo's
# post-norms (their default), Granite's multipliers, GLM-4's fused MLP and partial rotary, the sliding-window layer
# patterns of OLMo 3, Command R7B (cohere2) and EXAONE 4, Apertus' ungated xIELU MLP, Qwen3.5's linear-attention
# layer. The wrappers get a one-layer vision tower; image and video token ids sit above the tokenizer's 400 tokens.
_DENSE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_SLIDING = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"])
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
_QWEN_VIT = dict(hidden_size=32, intermediate_size=64, depth=1, num_heads=2, out_hidden_size=64, patch_size=14)
_QWEN_IDS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502)
_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
FAMILY_TINY = {
    # llama.cpp picks Phi-3's long RoPE factors by the context it runs with (llama-cpp-python pads 64 to 256),
    # transformers by the sequence length: an original context above both keeps the two on the short factors.
    "phi3": dict(_DENSE, original_max_position_embeddings=512, max_position_embeddings=1024, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [1.5] * 8}),
    "smollm3": dict(_DENSE, num_hidden_layers=4, no_rope_layer_interval=4),  # layer 3 has no RoPE, as in SmolLM3
    "olmo2": dict(_DENSE),
    "olmo3": dict(_DENSE, **_SLIDING),
    "granite": dict(_DENSE, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1,
                    logits_scaling=4.0),
    "glm4": dict(_DENSE, head_dim=16, partial_rotary_factor=0.5),
    # Command R7B's pattern (3 sliding-window layers with RoPE, then a global one without): llama.cpp hard-codes it.
    "cohere2": dict(_DENSE, num_hidden_layers=4, sliding_window=16, logit_scale=0.5,
                    layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    "exaone4": dict(_DENSE, **_SLIDING),
    "apertus": dict(_DENSE),
    # M-RoPE sections that fit the tiny rotary width (llama.cpp asserts on the default [11, 11, 10]).
    "qwen3_5": dict(text_config=dict(_DENSE, head_dim=16, layer_types=["linear_attention", "full_attention"],
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                                                      "mrope_interleaved": True},
                                     linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                     linear_value_head_dim=8),
                    vision_config=dict(_QWEN_VIT, num_position_embeddings=16), **_QWEN_IDS),
    "gemma3": dict(text_config=dict(_DENSE, head_dim=16, sliding_window=16, query_pre_attn_scalar=16),
                   vision_config=dict(_VIT, image_size=28, patch_size=14), mm_tokens_per_image=4,
                   image_token_index=500, boi_token_index=501, eoi_token_index=502),
    "gemma4": dict(text_config=dict(_DENSE, head_dim=16, global_head_dim=16, **_SLIDING,
                                    hidden_size_per_layer_input=0, num_kv_shared_layers=0),
                   vision_config=dict(_VIT, head_dim=16), audio_config=None),
    "mistral3": dict(text_config=dict(_DENSE, model_type="mistral", head_dim=16, sliding_window=None),
                     vision_config=dict(_VIT, model_type="pixtral", image_size=28, patch_size=14, head_dim=16),
                     image_token_index=500, spatial_merge_size=2),
    # The checkpoints' epsilon (transformers' default is 1e-5): llama.cpp 0.3.36 runs Qwen2-VL's RMS norms without
    # the file's epsilon, which the tiny model's small activations would show (test_family_gguf.TOL).
    "qwen2_5_vl": dict(text_config=dict(_DENSE, rope_parameters=_MROPE, rms_norm_eps=1e-6),
                       vision_config=dict(_QWEN_VIT, fullatt_block_indexes=[0], window_size=56), **_QWEN_IDS),
    # Interleaved M-RoPE over the head's 8 rotary pairs: t, h, w take pairs 0,3,6 / 1,4,7 / 2,5 ([3, 3, 2]), as
    # [24, 20, 20] covers the checkpoints' 64; with [2, 3, 3] pair 6 is t's in transformers, llama.cpp's 4th section's.
    "qwen3_vl": dict(text_config=dict(_DENSE, head_dim=16, rope_parameters=dict(_MROPE, mrope_section=[3, 3, 2]),
                                      rms_norm_eps=1e-6),
                     vision_config=dict(_QWEN_VIT, deepstack_visual_indexes=[0], num_position_embeddings=16),
                     **_QWEN_IDS),
}  # fmt: skip
FAMILIES = sorted(FAMILY_TINY)
# Tokenizers shaped like the family's (build_tokenizer's arguments), for what llama.cpp and its converter look up:
# llama.cpp gives `</s>`, `<s>`, `<unk>` and `<|endoftext|>` attributes by text in a model named Phi-3 (and fails
# without them), Phi-4's tokenizer_config says GPT2Tokenizer (the converter then reads a BPE vocabulary), GLM-4's
# converter reads `<|user|>` as end of turn, and Gemma 4's reads a Llama-style BPE with byte fallback.
FAMILY_TOKENIZERS = {
    "phi3": dict(specials=("<s>", "</s>", "<unk>"), tokenizer_class="GPT2Tokenizer"),
    "glm4": dict(specials=("<|user|>",)),
    "gemma4": dict(sentencepiece=True),
}
# Files a multimodal export must carry over byte for byte (their content is what a processor would read).
PROCESSOR_FILES = {"preprocessor_config.json": {"do_resize": True, "size": {"height": 28, "width": 28}},
                   "processor_config.json": {"image_seq_length": 4}}  # fmt: skip


def build_family_model(folder: Path, arch: str, vocab: int | None = 512) -> Path:
    """A random model of a family of issue 14 (text-only, or a wrapper with a vision tower and processor files).

    `vocab`: embedding rows (None: exactly the tokenizer's tokens, as llama.cpp's converter expects for some
    families)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, **FAMILY_TOKENIZERS.get(arch, {}))
    ids = dict(vocab_size=vocab or len(tokenizer), max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, bos_token_id=None)  # fmt: skip
    kwargs = dict(FAMILY_TINY[arch])
    wrapper = "text_config" in kwargs
    if wrapper:
        kwargs["text_config"] = {**kwargs["text_config"], **ids}
    config = AutoConfig.for_model(arch, **(kwargs if wrapper else {**ids, **kwargs}))
    torch.manual_seed(sum(map(ord, arch)))
    loader = AutoModelForImageTextToText if wrapper else AutoModelForCausalLM
    model = loader.from_config(config).eval()
    with torch.no_grad():  # wider weights than the default init, so neurons differ clearly between prompts
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    if wrapper:
        for name, content in PROCESSOR_FILES.items():
            (folder / name).write_text(json.dumps(content, indent=2))
    return folder


def last_token_inputs(model, spec, tok, prompts) -> list[list[torch.Tensor]]:
    """Per prompt, one at a time, each layer's down-projection input at the last token (float64): the reference the
    batched attribution is checked against."""
    from cna_export.attribution.collect import encode_prompts
    from cna_export.attribution.hooks import down_projs

    out = []
    for ids in encode_prompts(tok, prompts):
        got = {}
        hooks = [p.register_forward_pre_hook(lambda m, a, i=i, got=got: got.__setitem__(i, a[0][0, -1].double()))
                 for i, p in enumerate(down_projs(model, spec))]  # fmt: skip
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for h in hooks:
            h.remove()
        out.append([got[i] for i in sorted(got)])
    return out

@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model folder per family of issue 14."""
    root = tmp_path_factory.mktemp("tiny-families")
    return {arch: build_family_model(root / arch, arch) for arch in FAMILIES}


@pytest.fixture(scope="session")
def hf_to_gguf() -> str:
    """llama.cpp's converter, installed apart (`CNA_EXPORT_HF_TO_GGUF`, see gguf/external.py); .ci/run installs it,
    so in CI a missing converter fails instead of skipping."""
    where = os.environ.get("CNA_EXPORT_HF_TO_GGUF")
    if not where:
        if os.environ.get("CI"):
            pytest.fail("CI runs with llama.cpp's converter: .ci/run sets CNA_EXPORT_HF_TO_GGUF")
        pytest.skip("llama.cpp's converter not installed (set CNA_EXPORT_HF_TO_GGUF, see gguf/external.py)")
    return where
