"""Shared fixtures: tiny random models of every supported architecture, built offline in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, PromptSet, RecordedSelection

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
# Keep the sha256 cache of the tests out of the user's home.
os.environ.setdefault("CNA_EXPORT_CACHE", tempfile.mkdtemp(prefix="cna-export-cache-"))
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


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, arch: str, dtype: torch.dtype = torch.float32, shard: str | None = None) -> Path:
    """A random model of `arch` saved as a Hugging Face folder (optionally sharded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    config = AutoConfig.for_model(
        arch, vocab_size=512, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **TINY[arch],
    )  # fmt: skip
    torch.manual_seed(sum(map(ord, arch)))
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # wider weights than the default init, so neurons differ clearly between prompts
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, max_new_tokens=8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model folder per architecture (llama is sharded across several files)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_model(root / arch, arch, shard="60KB" if arch == "llama" else None) for arch in ARCHS}


def make_circuit(model_dir: Path, neurons: list[tuple[int, int]], multiplier: float = 0.0) -> Circuit:
    """A hand-made circuit for `model_dir` (no provenance hash, so it applies to any weights of that shape)."""
    from cna_export.io.source import describe, resolve

    _, shape, config = describe(resolve(str(model_dir)))
    return Circuit(
        multiplier=multiplier,
        model=ModelIdentity(source=str(model_dir), model_type=config["model_type"], num_layers=shape.num_layers,
                            intermediate_size=shape.intermediate_size, hidden_size=shape.hidden_size),
        prompts={"positive": PromptSet(count=0, sha256=""), "negative": PromptSet(count=0, sha256="")},
        selection=RecordedSelection(top_k=len(neurons)),
        neurons=[Neuron(layer=l, index=i, delta=1.0) for l, i in neurons],
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
