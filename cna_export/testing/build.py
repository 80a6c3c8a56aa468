"""Building tiny random models from the table (cna_export/testing/tiny.py), and hand-made circuits for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, PromptSet, RecordedSelection, shape_fields
from cna_export.io.source import describe, resolve
from cna_export.testing.tiny import PROCESSOR_FILES, TINY

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
    folder: Path,
    arch: str,
    dtype: torch.dtype = torch.float32,
    shard: str | None = None,
    vocab: int | None = 512,
    **overrides: Any,
) -> Path:
    """A random model of `arch` (a row of `TINY`) saved as a Hugging Face folder.

    Args:
        dtype: the weights' dtype; shard: `max_shard_size` (None: one file).
        vocab: embedding rows (None: exactly the tokenizer's tokens, as llama.cpp's converter expects for some
            families).
        overrides: config keys that replace the row's (a wrapper's go into its text config with the token ids).

    A "family" model keeps the default init of its tensors of more than two dimensions (convolutions), gets no
    generation_config.json, and a wrapper of that kind gets the processor files (`PROCESSOR_FILES`).
    """
    import transformers
    from transformers import AutoConfig, GenerationConfig

    tiny = TINY[arch]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, **tiny.tokenizer)
    ids = dict(
        vocab_size=vocab or len(tokenizer),
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    kwargs = {**tiny.config, **overrides}
    wrapper = "text_config" in kwargs
    if wrapper:
        config = AutoConfig.for_model(arch, **{**kwargs, "text_config": {**kwargs["text_config"], **ids}})
    else:
        config = AutoConfig.for_model(arch, **{**ids, **kwargs})
    torch.manual_seed(sum(map(ord, arch)))
    loader = "AutoModelForImageTextToText" if wrapper else "AutoModelForCausalLM"
    model = getattr(transformers, loader).from_config(config).to(dtype).eval()
    _randomize(model, tiny.kind)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if tiny.kind != "family":
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, max_new_tokens=8).save_pretrained(folder)
    elif wrapper:
        for name, content in PROCESSOR_FILES.items():
            (folder / name).write_text(json.dumps(content, indent=2))
    return folder


def _randomize(model: torch.nn.Module, kind: str) -> None:
    """Wider weights than the default init, so neurons differ clearly between prompts."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 or p.ndim == 3 and kind != "family":  # 3-D: fused experts
                p.normal_(0, 0.08 if p.ndim == 2 else 0.2)
            elif name.endswith("_proj_bias") and kind != "family":  # gpt-oss experts' biases
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's routing correction: let it change the top-k
                b.normal_(0, 0.5)


def make_circuit(model_dir: Path, neurons: list[tuple], multiplier: float = 0.0) -> Circuit:
    """A hand-made circuit for `model_dir` (no provenance hash, so it applies to any weights of that shape):
    neurons as (layer, index), or (layer, expert, index) in an MoE model; the identity carries the model's experts
    and per-layer widths."""
    _, shape, config = describe(resolve(str(model_dir)))
    return Circuit(
        multiplier=multiplier,
        model=ModelIdentity(
            source=str(model_dir),
            model_type=config["model_type"],
            num_layers=shape.num_layers,
            intermediate_size=shape.intermediate_size,
            hidden_size=shape.hidden_size,
            **shape_fields(shape),
        ),
        prompts={"positive": PromptSet(count=0, sha256=""), "negative": PromptSet(count=0, sha256="")},
        selection=RecordedSelection(top_k=len(neurons)),
        neurons=[Neuron(layer=n[0], expert=n[1] if len(n) == 3 else None, index=n[-1], delta=1.0) for n in neurons],
    )
