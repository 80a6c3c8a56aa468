"""GGUF of the dense and multimodal families of issue 14 through llama.cpp's converter (gguf/external.py), checked
in llama.cpp (llama-cpp-python, f32 GGUF, f32 KV cache) against transformers with the same neurons hooked.

Both routes, for four families that cover the irregular cases: Phi-3 (fused gate_up: the up half of ffn_up),
Granite (embedding, residual, attention and logit multipliers), Gemma 3 (a wrapper, GELU) and Qwen2.5-VL (a
wrapper with M-RoPE): the folded export converted by `cna-export gguf`, and patch-gguf on the converted original.
The families whose conversion needs a workaround of gguf/external.py (Command R7B, GLM-4, Qwen3.5, Gemma 4,
Mistral 3): patch-gguf on the converted original. Each model converts once per session (~5-30 s each).
SmolLM3, OLMo 2/3, Apertus and Qwen3-VL convert without one and are measured by benchmarks/gguf_routes.py
(results/gguf_routes.md), as is EXAONE 4, whose sliding-window layers llama.cpp 0.3.36 runs only for the 64-layer
checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_family_model, make_circuit, run_cli
from test_families import load
from test_gguf_export import assert_logits_close, llama_logits

from cna_export.arch import arch_for
from cna_export.attribution.hooks import scaled_neurons
from cna_export.fold.export import apply_circuit
from cna_export.gguf.convert import export_gguf
from cna_export.gguf.patch import patch_gguf_report
from cna_export.io.source import describe, resolve

BOTH_ROUTES = ["phi3", "granite", "gemma3", "qwen2_5_vl"]
WORKAROUNDS = ["cohere2", "glm4", "qwen3_5", "gemma4", "mistral3"]
# Max |logit difference| allowed (logits of size ~2.5; gguf_routes.md): ggml's GELU for the Gemmas, M-RoPE at a
# 16-wide head for Qwen2.5-VL, ~1e-6 elsewhere.
TOL = {"gemma3": 3e-3, "gemma4": 2e-2, "qwen2_5_vl": 1e-2}
IDS = [5, 17, 42, 99, 120, 7, 300, 250, 61, 33, 12, 8, 140, 201, 77, 19]


@pytest.fixture(scope="session")
def converted(tmp_path_factory, hf_to_gguf):
    """family -> (tiny model folder, its f32 GGUF), built and converted on first use."""
    root, done = tmp_path_factory.mktemp("family-gguf"), {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in done:
            # As many embedding rows as tokens: llama.cpp's converter cuts some families' embeddings to the tokenizer.
            src = build_family_model(root / arch, arch, vocab=None)
            done[arch] = src, export_gguf(src, root / f"{arch}.f32.gguf", outtype="f32")
        return done[arch]

    return get


def hooked_logits(src: Path, circuit=None) -> np.ndarray:
    """transformers fp32 logits of the family's own class on IDS, with `circuit`'s neurons scaled by hooks."""
    arch = describe(resolve(str(src)))[2]["model_type"]
    model = load(src, arch)
    hooks = scaled_neurons(model, arch_for(arch), circuit.edits()) if circuit else contextlib.nullcontext()
    with torch.no_grad(), hooks:
        return model(input_ids=torch.tensor([IDS])).logits[0].numpy()


def some_circuit(src: Path, multiplier: float):
    """8 neurons spread over the layers (the up half's rows for a fused gate_up)."""
    shape = describe(resolve(str(src)))[1]
    return make_circuit(src, [(i % shape.num_layers, 7 * i + 3) for i in range(8)], multiplier=multiplier)


def check_patched(arch: str, src: Path, original: Path, tmp_path: Path, multiplier: float) -> None:
    """patch-gguf on the converted original == transformers hooked; the unpatched file == transformers."""
    tol = TOL.get(arch, 1e-4)
    circuit = some_circuit(src, multiplier)
    plain, hooked = hooked_logits(src), hooked_logits(src, circuit)
    assert float(np.abs(hooked - plain).max()) > 10 * tol, "the edit should move the logits past the tolerance"
    assert_logits_close(llama_logits(original, IDS)[:, : plain.shape[1]], plain, tol)
    patch_gguf_report(original, circuit, tmp_path / "patched.gguf")
    assert_logits_close(llama_logits(tmp_path / "patched.gguf", IDS)[:, : plain.shape[1]], hooked, tol)


@pytest.mark.parametrize("arch", BOTH_ROUTES)
def test_converted_export_and_patched_original_equal_hooks(converted, tmp_path, arch):
    """The folded export (m = 0, 8 neurons, up rows) converted by `cna-export gguf` and patch-gguf on the converted
    original (m = 2) both run in llama.cpp as transformers runs the source with the neurons hooked."""
    src, original = converted(arch)
    circuit = some_circuit(src, 0.0)
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "export", target="up")
    run_cli("gguf", str(out), "-o", str(tmp_path / "export.gguf"), "--outtype", "f32")
    hooked = hooked_logits(src, circuit)
    got = llama_logits(tmp_path / "export.gguf", IDS)[:, : hooked.shape[1]]
    assert_logits_close(got, hooked, TOL.get(arch, 1e-4))
    check_patched(arch, src, original, tmp_path, 2.0)


@pytest.mark.parametrize("arch", WORKAROUNDS)
def test_workaround_families_convert_and_patch(converted, tmp_path, arch):
    """With gguf/external.py's workarounds llama.cpp's converter writes files that llama.cpp loads and runs as
    transformers does, and patch-gguf on them follows the hooks (m = 0)."""
    src, original = converted(arch)
    check_patched(arch, src, original, tmp_path, 0.0)


def test_what_llama_cpp_cannot_run_is_one_line(converted, tmp_path):
    """A Qwen3.5 whose full-attention layers are not every k-th (llama.cpp reads only the interval): `cna-export
    gguf` exits 2 with one line that names the problem and patch-gguf, and writes nothing."""
    import json

    src, _ = converted("qwen3_5")
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in src.iterdir():
        (odd / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["layer_types"] = ["full_attention", "linear_attention"]
    (odd / "config.json").unlink()
    (odd / "config.json").write_text(json.dumps(config))
    proc = run_cli("gguf", str(odd), "-o", str(tmp_path / "odd.gguf"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not one full-attention layer every k layers" in proc.stderr and "patch-gguf" in proc.stderr
    assert not (tmp_path / "odd.gguf").exists()


def test_exaone4_window_warning_and_converter_failure_line(family_models, tmp_path, monkeypatch, caplog):
    """An EXAONE 4 with sliding-window layers that is not the 64-layer model: the conversion warns that llama.cpp
    will run all its layers as global attention; a converter that fails (here: a folder without it) is one line
    naming it, with the way to its output and patch-gguf."""
    import logging

    from cna_export.errors import CnaExportError
    from cna_export.gguf.external import ENV

    monkeypatch.setenv(ENV, str(tmp_path))  # a folder, but no converter in it: the child fails at once
    with caplog.at_level(logging.WARNING), pytest.raises(CnaExportError) as err:
        export_gguf(family_models["exaone4"], tmp_path / "x.gguf")
    assert "only in the 64-layer model" in caplog.text
    assert str(err.value).startswith("llama.cpp's converter failed on") and "\n" not in str(err.value)
    assert "--verbose" in str(err.value) and "patch-gguf" in str(err.value)
    assert not (tmp_path / "x.gguf").exists()
