"""Mixtures of experts in GGUF (issue 15): llama.cpp's converter on an edited MoE export, and patch-gguf on the
stacked `ffn_up_exps` (and the shared expert's `ffn_up_shexp`) of a converted original, both against transformers
with the same expert neurons hooked; diff/verify read (layer, expert, index) back from the patched file.

Conversion is llama.cpp's own converter in a child process (`CNA_EXPORT_HF_TO_GGUF`, the `hf_to_gguf` fixture),
about 5-15 s a file, so one session fixture converts each family's original and edited export once: Qwen2-MoE
(routed and shared experts) and Mixtral (read from a `llama` GGUF with experts). The tiny Qwen3-MoE keeps a dense
layer (`mlp_only_layers`), which llama.cpp's qwen3moe graph does not have, and the tiny OLMoE's grouped-query
k-norm is a shape llama.cpp 0.3.36 refuses, so neither converts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from gguf import GGUFReader
from test_moe import moe_circuit
from transformers import AutoModelForCausalLM

from cna_export.arch import arch_for
from cna_export.arch.experts import SHARED
from cna_export.attribution.hooks import scaled_neurons
from cna_export.audit.diff import diff, verify
from cna_export.fold.export import apply_circuit
from cna_export.gguf.convert import export_gguf
from cna_export.gguf.external import ENV
from cna_export.gguf.patch import patch_gguf_report, sidecar_path
from cna_export.io.source import describe, resolve

GGUF_ARCHS = ["qwen2_moe", "mixtral"]
IDS = [5, 17, 42, 99, 120, 7, 300, 250, 61, 33, 12, 8, 140, 201, 77, 19]
F32_TOL = 1e-4  # llama.cpp f32 (f32 KV cache) vs transformers fp32, as in test_gguf_export.py


def neurons_of(arch: str) -> list[tuple]:
    """Routed-expert neurons in every layer (first and last of an expert, several experts of one layer) and, for
    Qwen2-MoE, shared-expert neurons: enough that m = 0 moves the logits clearly."""
    picked = [(0, 0, 0), (0, 0, 15), (0, 3, 2), (1, 1, 5), (1, 2, 0), (1, 2, 9), (2, 0, 7), (2, 3, 11)]
    picked += [(0, e, j) for e in (1, 2) for j in range(0, 16, 3)]
    return picked + ([(1, SHARED, 3), (2, SHARED, 0), (2, SHARED, 23)] if arch == "qwen2_moe" else [])


@pytest.fixture(scope="session")
def converted(moe_models, hf_to_gguf, tmp_path_factory) -> dict[str, dict]:
    """Per family: the circuit (m = 0), and f32 GGUFs of the original and of its edited export; Qwen2-MoE also
    as Q8_0 (its 32-value ffn_up_exps rows are one Q8_0 block each)."""
    root = tmp_path_factory.mktemp("moe-gguf")
    out: dict[str, dict] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, hf_to_gguf)
        for arch in GGUF_ARCHS:
            src = moe_models[arch]
            circuit = moe_circuit(src, neurons_of(arch), 0.0)
            edited = apply_circuit(resolve(str(src)), circuit, root / f"{arch}-edited")
            out[arch] = {
                "src": src, "circuit": circuit,
                "f32": export_gguf(src, root / f"{arch}.f32.gguf", outtype="f32"),
                "edited": export_gguf(edited, root / f"{arch}-edited.f32.gguf", outtype="f32"),
            }  # fmt: skip
        out["qwen2_moe"]["q8_0"] = export_gguf(moe_models["qwen2_moe"], root / "qwen2_moe.q8_0.gguf", outtype="q8_0")
    return out


def llama_logits(path: Path, ids: list[int] = IDS) -> np.ndarray:
    from llama_cpp import Llama

    # f32 KV cache; no extra buffer types (ggml's AMX kernels crash on VMs that do not grant AMX tile state)
    llm = Llama(str(path), logits_all=True, n_ctx=64, type_k=0, type_v=0, use_extra_bufts=False, verbose=False,
                n_threads=1)  # fmt: skip
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def hf_logits(folder: Path, edits=None, ids: list[int] = IDS) -> np.ndarray:
    """transformers fp32 logits, with `edits` ((layer, expert) keys) scaled at run time."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    spec = arch_for(model.config.model_type)
    with torch.no_grad():
        if edits is None:
            return model(torch.tensor([ids])).logits[0].double().numpy()
        with scaled_neurons(model, spec, edits):
            return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_converted_edit_and_patch_equal_hooks(converted, tmp_path, arch):
    """(a) the converted edited export (m = 0) and (b) patch-gguf on the converted original (m = 0 and 2) give
    transformers' logits with the circuit's expert neurons hooked; the edit moves them by far more than the
    tolerance."""
    c = converted[arch]
    plain, hooked = hf_logits(c["src"]), hf_logits(c["src"], c["circuit"].unit_edits())
    effect = np.abs(hooked - plain).max()
    assert effect > 100 * F32_TOL
    np.testing.assert_allclose(llama_logits(c["f32"]), plain, atol=F32_TOL, rtol=0)
    np.testing.assert_allclose(llama_logits(c["edited"]), hooked, atol=F32_TOL, rtol=0)
    for m in (0.0, 2.0):
        want = hooked if m == 0 else hf_logits(c["src"], c["circuit"].unit_edits(m))
        got = llama_logits(patch_gguf_report(c["f32"], c["circuit"], tmp_path / f"m{m}.gguf", multiplier=m).out)
        np.testing.assert_allclose(got, want, atol=F32_TOL, rtol=0)
        print(f"{arch} m={m}: edit effect {np.abs(want - plain).max():.3g}; f32 patch-gguf vs hooks "
              f"{np.abs(got - want).max():.2g}")  # fmt: skip


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_patch_touches_only_the_expert_rows(converted, tmp_path, arch):
    """patch-gguf (CLI) rewrites exactly row e * n_ff + j of `ffn_up_exps` per routed neuron (row j of ffn_up_shexp
    for a shared one); every other byte is the source's; diff recovers (layer, expert, index) and verify holds the
    file to its circuit, and refuses it against a circuit that lacks one expert."""
    c = converted[arch]
    c["circuit"].save(tmp_path / "c.json")
    out = tmp_path / "patched.gguf"
    run_cli("patch-gguf", str(c["f32"]), "--circuit", str(tmp_path / "c.json"), "-o", str(out))
    before, after = GGUFReader(c["f32"]), GGUFReader(out)
    shape = describe(resolve(str(c["src"])))[1]
    expected: dict[str, set[int]] = {}
    for layer, e, j in neurons_of(arch):
        name = f"blk.{layer}.ffn_up_shexp.weight" if e == SHARED else f"blk.{layer}.ffn_up_exps.weight"
        expected.setdefault(name, set()).add(j if e == SHARED else e * shape.width_of(e) + j)
    for a, b in zip(before.tensors, after.tensors):
        rows_a, rows_b = (np.asarray(t.data).reshape(-1, t.data.shape[-1]) for t in (a, b))
        changed = set(np.nonzero((rows_a != rows_b).any(1))[0].tolist())
        assert changed == expected.get(a.name, set()), a.name
        for r in changed:
            assert not rows_b[r].any(), "m = 0 zeroes the row"
    recovered = diff(str(c["f32"]), str(out)).circuit()
    assert {(n.layer, n.expert, n.index) for n in recovered.neurons} == set(neurons_of(arch))
    assert recovered.multiplier == 0.0 and recovered.model.num_experts == 4
    proc = run_cli("diff", str(c["f32"]), str(out), "--verify", str(sidecar_path(out)))
    assert proc.stdout.startswith("OK:"), proc.stdout
    fewer = moe_circuit(c["src"], [n for n in neurons_of(arch) if n[:2] != (1, 1)], 0.0)
    ok, why = verify(str(c["f32"]), str(out), fewer)
    assert not ok and "layer 1 expert 1" in why, why


def test_quantized_patch_moves_like_transformers(converted, tmp_path):
    """Q8_0: patch-gguf scales each ffn_up_exps / ffn_up_shexp row through its f16 block scales (codes untouched;
    verify accepts it); llama.cpp's change of logits follows transformers' change with the same neurons hooked."""
    c = converted["qwen2_moe"]
    layout = {t.name: t.tensor_type.name for t in GGUFReader(c["q8_0"]).tensors}
    assert layout["blk.1.ffn_up_exps.weight"] == layout["blk.1.ffn_up_shexp.weight"] == "Q8_0"
    plain, hooked = hf_logits(c["src"]), hf_logits(c["src"], c["circuit"].unit_edits())
    # m = 2 doubles 23 neurons: the larger change of the residual flips near-tied routing choices of the Q8_0 model
    # (llama.cpp quantizes every matrix, the reference does not), so it is held to a looser correlation.
    for m, min_corr in ((0.0, 0.99), (0.5, 0.99), (2.0, 0.9)):
        report = patch_gguf_report(c["q8_0"], c["circuit"], tmp_path / f"m{m}.gguf", multiplier=m)
        assert {t.route for t in report.tensors} == {"scales"}
        ok, why = verify(str(c["q8_0"]), str(report.out), c["circuit"].applied(m))
        assert ok, why
        want = hf_logits(c["src"], c["circuit"].unit_edits(m)) - plain
        got = llama_logits(report.out) - llama_logits(c["q8_0"])
        corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
        print(f"Q8_0 m={m}: effect {np.abs(want).max():.3g}, |llama.cpp - transformers| change "
              f"{np.abs(got - want).max():.3g}, correlation {corr:.4f}")  # fmt: skip
        assert corr > min_corr
    assert np.abs(hooked - plain).max() > 0.1


def test_patch_dense_and_expert_layers_of_one_file(moe_models, tmp_path):
    """A Qwen3-MoE GGUF with a dense layer (`mlp_only_layers`, which llama.cpp's converter does not write, so the
    file is written here with gguf-py): its shape is read from ffn_up and ffn_up_exps alike, and patch-gguf scales
    the dense row and the Q8_0 expert rows (block scales) that the circuit names; diff --verify holds it."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    src = tmp_path / "qwen3moe.gguf"
    w = GGUFWriter(src, "qwen3moe")
    w.add_feed_forward_length(48)
    for name, shape in [("blk.0.ffn_up.weight", (48, 32)), ("blk.0.ffn_down.weight", (32, 48))]:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float16))
    for i in (1, 2):
        up = quantize(rng.standard_normal((4, 16, 32)).astype(np.float32), GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_up_exps.weight", up, raw_dtype=GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", rng.standard_normal((4, 32, 16)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    neurons = [(0, None, 7), (1, 2, 5), (1, 0, 0), (2, 3, 15)]
    circuit = moe_circuit(moe_models["qwen3_moe"], neurons, 0.5)  # the tiny qwen3_moe: 3 layers, layer 0 dense
    report = patch_gguf_report(src, circuit, tmp_path / "out.gguf")
    assert {(t.name, t.route) for t in report.tensors} == {
        ("blk.0.ffn_up.weight", "values"), ("blk.1.ffn_up_exps.weight", "scales"),
        ("blk.2.ffn_up_exps.weight", "scales")}  # fmt: skip
    before, after = ({t.name: t for t in GGUFReader(p).tensors} for p in (src, report.out))
    expected = {
        "blk.0.ffn_up.weight": {7},
        "blk.1.ffn_up_exps.weight": {2 * 16 + 5, 0},
        "blk.2.ffn_up_exps.weight": {63},
    }
    for name, a in before.items():
        rows_a, rows_b = (np.asarray(t.data).reshape(-1, t.data.shape[-1]) for t in (a, after[name]))
        changed = set(np.nonzero((rows_a != rows_b).any(1))[0].tolist())
        assert changed == expected.get(name, set()), name
        for r in changed:
            da, db = (dequantize(x[r : r + 1], a.tensor_type).astype(np.float64) for x in (rows_a, rows_b))
            np.testing.assert_allclose(db, 0.5 * da, rtol=2**-10, atol=0)
    recovered = diff(str(src), str(report.out)).circuit()
    assert {(n.layer, n.expert, n.index) for n in recovered.neurons} == set(neurons)
    assert recovered.model.dense_layers == [0] and recovered.model.expert_size == 16
    ok, why = verify(str(src), str(report.out), circuit)
    assert ok, why
