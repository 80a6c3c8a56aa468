"""Mixtures of experts in GGUF: llama.cpp's converter on an edited MoE export, and patch-gguf on the
stacked `ffn_up_exps` (and the shared expert's `ffn_up_shexp`, a dense layer's `ffn_up`) of a converted original,
both against transformers with the same expert neurons hooked; diff/verify read (layer, expert, index) back from
the patched file.

Conversion is llama.cpp's own converter in a child process (`CNA_EXPORT_HF_TO_GGUF`, the `hf_to_gguf` fixture),
5-30 s a file on 2 cores, so one session fixture converts each family's original and edited export once. CI runs
five families (`CI_FAMILIES`): Qwen2-MoE (routed and shared experts, and the Q8_0 test), Mixtral (a `llama` GGUF
with experts), DeepSeek-V3 (llama.cpp's `deepseek2`: MLA attention, a dense layer, an ungated shared expert,
grouped sigmoid routing through the `scoring_func` workaround of gguf/external.py), Qwen3.5-MoE (a wrapper with
linear-attention layers and a gated shared expert, through two converter workarounds) and Llama 4 (a wrapper whose
stacked 3-D `gate_up_proj` becomes ffn_gate_exps/ffn_up_exps, dense layers between MoE ones, a layer without
RoPE): between them every kind of unit, site and converter path. `CNA_MOE_GGUF_ALL=1` adds GLM-4.5, Granite MoE
and gpt-oss, whose parts these already cover (measured: README, Mixtures of experts).

The tiny models are tests/conftest.py's, except gpt-oss (`CHANGES`): llama.cpp 0.3.36 clamps its experts at 7.0
whatever the model says (the tiny model's 1.0 is refused in one line, tested below) and rounds YaRN's correction
range (`truncate: true`; the released models say false, which `gguf` warns about). patch-gguf refuses gpt-oss
(clamped `up + 1`: ffn_up rows are not neurons); its folded export converts. Qwen3-MoE's dense layer
(`mlp_only_layers`) is not in llama.cpp's qwen3moe graph and the tiny OLMoE's grouped-query k-norm is a shape
llama.cpp 0.3.36 refuses, so neither converts here (tests/test_llamacpp_moe.py converts both without them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import build_model, make_circuit, run_cli
from gguf import GGUFReader

from cna_export.arch import arch_for
from cna_export.arch.experts import SHARED
from cna_export.attribution.hooks import scaled_neurons
from cna_export.audit.diff import diff
from cna_export.audit.verify import verify
from cna_export.fold.export import apply_circuit
from cna_export.gguf.convert import export_gguf
from cna_export.gguf.external import ENV
from cna_export.gguf.patch import patch_gguf_report, sidecar_path
from cna_export.io.source import describe, resolve

CI_FAMILIES = ["qwen2_moe", "mixtral", "deepseek_v3", "qwen3_5_moe", "llama4"]
GGUF_ARCHS = CI_FAMILIES + (["glm4_moe", "granitemoe", "gpt_oss"] if os.environ.get("CNA_MOE_GGUF_ALL") else [])
# family -> tiny-config changes for the GGUF route (module docstring): gpt-oss as llama.cpp 0.3.36 runs it.
_YARN = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
    "truncate": True,
}
CHANGES = {"gpt_oss": dict(swiglu_limit=7.0, rope_parameters=_YARN)}
IDS = [5, 17, 42, 99, 120, 7, 300, 250, 61, 33, 12, 8, 140, 201, 77, 19]
F32_TOL = 1e-4  # llama.cpp f32 (f32 KV cache) vs transformers fp32, as in test_gguf_export.py


def neurons_of(src: Path) -> list[tuple]:
    """Routed-expert neurons of the first and last MoE layer (first and last of an expert, several experts of one
    layer), the shared expert's where there is one, and one neuron of each dense layer: enough that m = 0 moves
    the logits clearly."""
    moe = describe(resolve(str(src)))[1].moe
    layers = [i for i in range(describe(resolve(str(src)))[1].num_layers) if i not in moe.dense_layers]
    first, last, n = layers[0], layers[-1], moe.width
    picked = [
        (first, 0, 0),
        (first, 0, n - 1),
        (first, 3, 2),
        (last, 1, 5),
        (last, 2, 0),
        (last, 2, 9),
        (last, 0, 7),
        (last, 3, 11),
    ]
    picked += [(first, e, j) for e in (1, 2) for j in range(0, n, 3)]
    if moe.shared:
        picked += [(last, SHARED, 3), (first, SHARED, 0), (first, SHARED, moe.shared - 1)]
    return list(dict.fromkeys(picked + [(i, None, 7) for i in sorted(moe.dense_layers)]))


class Converted(dict):
    """family -> its circuit (m = 0) and f32 GGUFs of the original and of its edited export, converted on first
    use (so `-k family` converts one family); Qwen2-MoE also as Q8_0 (its 32-value ffn_up_exps rows are one Q8_0
    block each)."""

    def __init__(self, moe_models: dict[str, Path], converter: str, root: Path) -> None:
        super().__init__()
        self.moe_models, self.converter, self.root = moe_models, converter, root

    def __missing__(self, arch: str) -> dict:
        root, src = self.root, self.moe_models[arch]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ENV, self.converter)
            src = build_model(root / arch, arch, **CHANGES[arch]) if arch in CHANGES else src
            circuit = make_circuit(src, neurons_of(src), 0.0)
            edited = apply_circuit(resolve(str(src)), circuit, root / f"{arch}-edited")
            self[arch] = {
                "src": src,
                "circuit": circuit,
                "f32": export_gguf(src, root / f"{arch}.f32.gguf", outtype="f32"),
                "edited": export_gguf(edited, root / f"{arch}-edited.f32.gguf", outtype="f32"),
            }
            if arch == "qwen2_moe":
                self[arch]["q8_0"] = export_gguf(src, root / f"{arch}.q8_0.gguf", outtype="q8_0")
        return self[arch]


@pytest.fixture(scope="session")
def converted(moe_models, hf_to_gguf, tmp_path_factory) -> Converted:
    """Each family's GGUFs, converted once a session (`Converted`)."""
    return Converted(moe_models, hf_to_gguf, tmp_path_factory.mktemp("moe-gguf"))


def llama_logits(path: Path, ids: list[int] = IDS) -> np.ndarray:
    from llama_cpp import Llama

    # f32 KV cache; no extra buffer types (ggml's AMX kernels crash on VMs that do not grant AMX tile state)
    llm = Llama(
        str(path), logits_all=True, n_ctx=64, type_k=0, type_v=0, use_extra_bufts=False, verbose=False, n_threads=1
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def hf_logits(folder: Path, edits=None, ids: list[int] = IDS) -> np.ndarray:
    """transformers fp32 logits, with `edits` ((layer, expert) keys) scaled at run time."""
    spec = arch_for(json.loads((folder / "config.json").read_text())["model_type"])
    model = getattr(transformers, spec.loader).from_pretrained(folder, dtype=torch.float32).eval()
    # Llama 4's wrapper in transformers 5.24 cannot build a text-only output (`image_outputs`): its language model
    # (the same layers and lm_head) gives the logits.
    run = model.language_model if spec.model_type == "llama4" else model
    with torch.no_grad():
        if edits is None:
            return run(torch.tensor([ids])).logits[0].double().numpy()
        with scaled_neurons(model, spec, edits):
            return run(torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_converted_edit_and_patch_equal_hooks(converted, tmp_path, arch):
    """(a) the converted edited export (m = 0) and (b) patch-gguf on the converted original (m = 0 and 2) give
    transformers' logits with the circuit's expert neurons hooked; the edit moves them by far more than the
    tolerance."""
    c = converted[arch]
    plain, hooked = hf_logits(c["src"]), hf_logits(c["src"], c["circuit"].unit_edits())
    effect = np.abs(hooked - plain).max()
    assert effect > 100 * F32_TOL
    original, edited = llama_logits(c["f32"]), llama_logits(c["edited"])
    print(
        f"{arch}: f32 original vs transformers {np.abs(original - plain).max():.2g}; edit effect {effect:.3g}, "
        f"f32 edited export vs hooks {np.abs(edited - hooked).max():.2g}"
    )
    np.testing.assert_allclose(original, plain, atol=F32_TOL, rtol=0)
    np.testing.assert_allclose(edited, hooked, atol=F32_TOL, rtol=0)
    if "up" not in arch_for(arch).targets:  # gpt-oss: its folded export is the route (test_patch_refuses_...)
        return
    for m in (0.0, 2.0):
        want = hooked if m == 0 else hf_logits(c["src"], c["circuit"].unit_edits(m))
        got = llama_logits(patch_gguf_report(c["f32"], c["circuit"], tmp_path / f"m{m}.gguf", multiplier=m).out)
        np.testing.assert_allclose(got, want, atol=F32_TOL, rtol=0)
        print(
            f"{arch} m={m}: edit effect {np.abs(want - plain).max():.3g}; f32 patch-gguf vs hooks "
            f"{np.abs(got - want).max():.2g}"
        )


@pytest.mark.parametrize("arch", [a for a in GGUF_ARCHS if a != "gpt_oss"])
def test_patch_touches_only_the_expert_rows(converted, tmp_path, arch):
    """patch-gguf (CLI) rewrites exactly row e * n_ff + j of `ffn_up_exps` per routed neuron (row j of ffn_up_shexp
    for a shared one, of ffn_up for a dense layer's); every other byte is the source's; diff recovers (layer,
    expert, index) and verify holds the file to its circuit, and refuses it against a circuit that lacks one
    expert."""
    c = converted[arch]
    neurons = neurons_of(c["src"])
    c["circuit"].save(tmp_path / "c.json")
    out = tmp_path / "patched.gguf"
    run_cli("patch-gguf", str(c["f32"]), "--circuit", str(tmp_path / "c.json"), "-o", str(out))
    before, after = GGUFReader(c["f32"]), GGUFReader(out)
    width = describe(resolve(str(c["src"])))[1].moe.width
    expected: dict[str, set[int]] = {}
    for layer, e, j in neurons:
        part = {None: "ffn_up", SHARED: "ffn_up_shexp"}.get(e, "ffn_up_exps")
        expected.setdefault(f"blk.{layer}.{part}.weight", set()).add(e * width + j if isinstance(e, int) else j)
    for a, b in zip(before.tensors, after.tensors):
        rows_a, rows_b = (np.asarray(t.data).reshape(-1, t.data.shape[-1]) for t in (a, b))
        changed = set(np.nonzero((rows_a != rows_b).any(1))[0].tolist())
        assert changed == expected.get(a.name, set()), a.name
        for r in changed:
            assert not rows_b[r].any(), "m = 0 zeroes the row"
    recovered = diff(str(c["f32"]), str(out)).circuit()
    assert {(n.layer, n.expert, n.index) for n in recovered.neurons} == set(neurons)
    assert recovered.multiplier == 0.0 and recovered.model.num_experts == 4
    assert recovered.model.model_type == arch
    proc = run_cli("diff", str(c["f32"]), str(out), "--verify", str(sidecar_path(out)))
    assert proc.stdout.startswith("OK:"), proc.stdout
    last = neurons[3][0]  # (last MoE layer, expert 1, 5)
    fewer = make_circuit(c["src"], [n for n in neurons if n[:2] != (last, 1)], 0.0)
    ok, why = verify(str(c["f32"]), str(out), fewer)
    assert not ok and f"layer {last} expert 1" in why, why


@pytest.mark.parametrize(
    ("arch", "change", "words"),
    [
        ("gpt_oss", {}, ("swiglu_limit 1.0", "7.0", "transformers")),
        ("llama4", {"moe_layers": [1, 2]}, ("MoE layers [1, 2]", "interleave_moe_layer_step", "patch-gguf")),
    ],
)
def test_what_llamacpp_cannot_run_is_one_line(moe_models, hf_to_gguf, tmp_path, monkeypatch, arch, change, words):
    """Layouts llama.cpp 0.3.36 would run as another model: the tiny gpt-oss clamps at swiglu_limit 1.0 (llama.cpp
    clamps gpt-oss at 7.0 whatever the GGUF says); a Llama 4 whose MoE layers are not every
    `interleave_moe_layer_step`-th (llama.cpp derives them from the step, and would not load it). `gguf` refuses
    before converting: one line naming the reason and the route that works, exit 2, no file."""
    src = tmp_path / arch
    shutil.copytree(moe_models[arch], src)
    config = json.loads((src / "config.json").read_text())
    config.get("text_config", config).update(change)
    (src / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv(ENV, hf_to_gguf)
    proc = run_cli("gguf", str(src), "-o", str(tmp_path / "g.gguf"), "--outtype", "f32", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "g.gguf").exists()


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
        print(
            f"Q8_0 m={m}: effect {np.abs(want).max():.3g}, |llama.cpp - transformers| change "
            f"{np.abs(got - want).max():.3g}, correlation {corr:.4f}"
        )
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
    circuit = make_circuit(moe_models["qwen3_moe"], neurons, 0.5)  # the tiny qwen3_moe: 3 layers, layer 0 dense
    report = patch_gguf_report(src, circuit, tmp_path / "out.gguf")
    assert {(t.name, t.route) for t in report.tensors} == {
        ("blk.0.ffn_up.weight", "values"),
        ("blk.1.ffn_up_exps.weight", "scales"),
        ("blk.2.ffn_up_exps.weight", "scales"),
    }
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


def test_gpt_oss_yarn_caveat():
    """llama.cpp 0.3.36 rounds YaRN's correction range: `gguf` warns for a gpt-oss that says `truncate: false` (the
    released ones do; 2.4e-3 on the tiny model), not for `truncate: true` (1e-6, the GGUFs tested above)."""
    from cna_export.gguf.external import RUNTIME_CAVEATS

    warn = RUNTIME_CAVEATS["gpt_oss"]
    assert "truncate: false" in warn({"rope_parameters": {**_YARN, "truncate": False}})
    assert warn({"rope_parameters": _YARN}) is None and warn({}) is None
