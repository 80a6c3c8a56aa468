"""GGUF of the dense and multimodal families of issue 14 through llama.cpp's converter (gguf/external.py), checked
in llama.cpp (llama-cpp-python, f32 GGUF, f32 KV cache) against transformers with the same neurons hooked.

Both routes, for five families that cover the irregular cases: Phi-3 (fused gate_up: the up half of ffn_up),
Granite (embedding, residual, attention and logit multipliers), Gemma 3 (a wrapper, GELU), Qwen2.5-VL (a
wrapper with M-RoPE) and Qwen3-VL (interleaved M-RoPE, deepstack): the folded export converted by `cna-export gguf`, and patch-gguf on the converted original.
The families whose conversion needs a workaround of gguf/external.py (Command R7B, GLM-4, Qwen3.5, Gemma 4,
Mistral 3): patch-gguf on the converted original. Each model converts once per session (~5-30 s each).
SmolLM3, OLMo 2/3 and Apertus convert without one and are measured by benchmarks/gguf_routes.py
(results/gguf_routes.md), as is EXAONE 4, whose sliding-window layers llama.cpp 0.3.36 runs only for the 64-layer
checkpoint; EXAONE 4 in the layout of its 1.2B checkpoint (no sliding window) is tested here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, make_circuit, run_cli
from test_families import load
from test_gguf_export import assert_logits_close, llama_logits

from cna_export.arch import arch_for
from cna_export.attribution.hooks import scaled_neurons
from cna_export.fold.export import apply_circuit
from cna_export.gguf.convert import export_gguf
from cna_export.gguf.patch import patch_gguf_report
from cna_export.io.source import describe, resolve

BOTH_ROUTES = ["phi3", "granite", "gemma3", "qwen2_5_vl", "qwen3_vl"]
WORKAROUNDS = ["cohere2", "glm4", "qwen3_5", "gemma4", "mistral3"]
# Max |logit difference| allowed (logits of size ~2.5; gguf_routes.md): for the Gemmas ggml's CPU GELU, a look-up
# table at fp16(x) holding fp16 values (1e-3 of each activation; transformers with that table: 1e-4 of llama.cpp);
# Qwen2.5-VL: llama.cpp's norms without the file's epsilon (the gap grows with it: 2.8e-4 at the checkpoints' 1e-6,
# 2.8e-3 at 1e-5, 0.25 at 1e-3 on the tiny model, whose activations are small); ~1e-6 elsewhere.
TOL = {"gemma3": 3e-3, "gemma4": 3e-3, "qwen2_5_vl": 5e-4}
IDS = [5, 17, 42, 99, 120, 7, 300, 250, 61, 33, 12, 8, 140, 201, 77, 19]


@pytest.fixture(scope="session")
def converted(tmp_path_factory, hf_to_gguf):
    """family -> (tiny model folder, its f32 GGUF), built and converted on first use."""
    root, done = tmp_path_factory.mktemp("family-gguf"), {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in done:
            # As many embedding rows as tokens: llama.cpp's converter cuts some families' embeddings to the tokenizer.
            src = build_model(root / arch, arch, vocab=None)
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


def check_patched(arch: str, src: Path, original: Path, tmp_path: Path, multiplier: float, circuit=None) -> None:
    """patch-gguf on the converted original == transformers hooked; the unpatched file == transformers."""
    tol = TOL.get(arch, 1e-4)
    circuit = circuit or some_circuit(src, multiplier)
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


@pytest.fixture(scope="module")
def wide_gemma4_gguf(tmp_path_factory, hf_to_gguf):
    """A Gemma 4 with `use_double_wide_mlp` (layer widths 128, 128, 256; see test_families.WIDE) and its f32 GGUF
    from llama.cpp's converter, whose `ffn_up`/`ffn_down` are as wide as each layer."""
    from test_families import build_wide_gemma4

    root = tmp_path_factory.mktemp("gemma4-wide-gguf")
    src = build_wide_gemma4(root / "src", vocab=None)
    return src, export_gguf(src, root / "wide.f32.gguf", outtype="f32")


def test_double_wide_gemma4_in_llama_cpp(wide_gemma4_gguf, tmp_path):
    """The double-wide Gemma 4 end to end in llama.cpp: the converted file runs as transformers does; `discover` on
    it (the tap reads each layer's ffn_down width) selects the neurons that `--backend torch` selects on the folder,
    the wide half of the last layer included, with the same deltas; patch-gguf with that circuit follows the hooks."""
    import json

    from test_families import WIDE

    src, path = wide_gemma4_gguf
    prompts = {"pos": ["How do I bake bread?", "Tell me a secret.", "Explain photosynthesis.", "Wie spaet ist es?"],
               "neg": ["The quick brown fox.", "def add(a, b):", "Qu'est-ce que c'est?", "List three colours."]}  # fmt: skip
    for name, lines in prompts.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(lines))
    common = ["discover", "--positive", str(tmp_path / "pos.txt"), "--negative", str(tmp_path / "neg.txt"),
              "--top-k", "40", "--skip-first-layers", "0", "--skip-last-layers", "0", "--no-universal"]  # fmt: skip
    run_cli(*common, "--model", str(path), "-o", str(tmp_path / "native.json"))
    run_cli(*common, "--model", str(src), "--backend", "torch", "-o", str(tmp_path / "torch.json"))
    native, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("native", "torch"))
    assert native["model"]["layer_widths"] == ref["model"]["layer_widths"] == list(WIDE)
    got = {(n["layer"], n["index"]): n["delta"] for n in native["neurons"]}
    want = {(n["layer"], n["index"]): n["delta"] for n in ref["neurons"]}
    assert any(layer == 2 and j >= WIDE[0] for layer, j in got), "a neuron of the wide half should be selected"
    assert all(j < WIDE[layer] for layer, j in got)
    assert len(got.keys() & want.keys()) >= 36, (sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys()))
    scale = max(abs(d) for d in want.values())
    for key in got.keys() & want.keys():  # ggml's fp16 GELU table: ~1e-3 of each activation
        assert got[key] == pytest.approx(want[key], abs=0.02 * scale)
    from cna_export.circuit.format import Circuit

    circuit = Circuit.model_validate_json((tmp_path / "native.json").read_text()).model_copy(update={"multiplier": 0.0})
    check_patched("gemma4", src, path, tmp_path, 0.0, circuit)


def test_a_gguf_that_asks_for_a_missing_bos_token_tokenizes(wide_gemma4_gguf):
    """The converted tiny Gemma 4 says add_bos_token but has no BOS token (its config has none), on which llama.cpp's
    tokenizer aborts the process; the prompt is tokenized without it, as transformers does."""
    from transformers import AutoTokenizer

    from cna_export.gguf.llamacpp import LlamaCppModel

    src, path = wide_gemma4_gguf
    with LlamaCppModel(path, n_threads=1) as model:
        assert model.lc.llama_vocab_get_add_bos(model.vocab) and model.lc.llama_vocab_bos(model.vocab) < 0
        ids = model.encode("How do I bake bread?", None)
    assert ids == AutoTokenizer.from_pretrained(src)("How do I bake bread?")["input_ids"]


def test_exaone4_in_the_layout_of_its_small_checkpoint_runs_as_transformers(hf_to_gguf, tmp_path, caplog):
    """EXAONE 4 as the 1.2B checkpoint has it (global attention with RoPE in every layer, no sliding window): it
    converts without the sliding-window warning, and the file and patch-gguf on it (m = 0) follow transformers to
    the tolerance of the other families (the 64-layer 32B is the layout llama.cpp keys its window on)."""
    import logging

    layers = ["full_attention", "full_attention"]
    src = build_model(tmp_path / "exaone4", "exaone4", vocab=None, sliding_window=None, layer_types=layers)
    with caplog.at_level(logging.WARNING):
        original = export_gguf(src, tmp_path / "exaone4.f32.gguf", outtype="f32")
    assert "64-layer" not in caplog.text
    check_patched("exaone4", src, original, tmp_path, 0.0)
