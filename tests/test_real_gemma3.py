"""The real Gemma 3 270M (gemma3_text, Q4_K_M GGUF from PyPI, see ../shared/REAL_MODELS.md), offline: discover from
the GGUF, patch it, verify the patch, llama.cpp generates from the original and the patched file, and the circuit
applied to the GGUF with --safetensors exports a model that transformers runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_cli

REAL = Path(os.environ.get("CNA_REAL_MODELS", Path.home() / ".cache" / "cna-real-models"))
GEMMA = REAL / "gemma-3-270m.Q4_K_M.gguf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GEMMA.is_file(), reason=f"run ../shared/scripts/fetch-real-models.sh first ({GEMMA})"),
]


def generate(path: Path, prompt: str = "The capital of France is") -> str:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=128, n_threads=2, use_extra_bufts=False, verbose=False)
    return llm(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]


def test_discover_apply_patch_and_generate(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    circuit, out, patched = tmp_path / "c.json", tmp_path / "gemma-edited", tmp_path / "gemma-patched.Q4_K_M.gguf"
    # A base model: the recipe's prompts still give a contrast; 36 neurons (0.1%) keep the run short.
    run_cli("discover", "--model", str(GEMMA), "--recipe", "refusal-ablate", "--top-k", "36", "-o", str(circuit))
    run_cli("patch-gguf", str(GEMMA), "--circuit", str(circuit), "-o", str(patched))
    run_cli("diff", str(GEMMA), str(patched), "--verify", str(circuit))
    original, edited = generate(GEMMA), generate(patched)
    assert original.strip() and edited.strip(), "llama.cpp generated nothing"
    # `apply` on a GGUF keeps its quantization; --safetensors exports the dequantized model for transformers.
    run_cli("apply", "--model", str(GEMMA), "--circuit", str(circuit), "--out", str(out), "--safetensors")
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] > ids["input_ids"].shape[1]
