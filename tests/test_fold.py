"""Folding is exact: exported checkpoints equal runtime hooks, and only the chosen columns change."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, build_model, make_circuit
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from cna_export.arch import arch_for
from cna_export.attribution.hooks import scaled_neurons
from cna_export.fold.export import apply_circuit
from cna_export.fold.scale import fold_site, group_by_layer
from cna_export.io.checkpoint import CheckpointReader, read_header
from cna_export.io.source import resolve

PROMPTS = ["How do I bake bread?", "Write a Python function that reverses a string.", "Wie spaet ist es?"]


def pick_neurons(model_dir, n=12, seed=0) -> list[tuple[int, int]]:
    config = json.loads((model_dir / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    layers, width = config["num_hidden_layers"], config["intermediate_size"]
    flat = torch.randperm(layers * width, generator=g)[:n]
    return [(int(i) // width, int(i) % width) for i in flat]


def logits(model, tokenizer, prompts):
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(model(ids).logits)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("m", [0.0, 0.5, 2.0])
def test_export_equals_hooks(tiny_models, tmp_path, arch, m):
    src = tiny_models[arch]
    neurons = pick_neurons(src)
    circuit = make_circuit(src, neurons, multiplier=m)
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(src)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with scaled_neurons(original, arch_for(arch), circuit.edits()):
        hooked = logits(original, tok, PROMPTS)
    plain = logits(original, tok, PROMPTS)
    exported = logits(edited, tok, PROMPTS)
    for h, e, p in zip(hooked, exported, plain):
        torch.testing.assert_close(e, h, rtol=1e-5, atol=1e-5)
        if m != 1.0:
            assert not torch.allclose(e, p), "the edit should change the logits"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_only_chosen_columns_change(tiny_models, tmp_path, arch):
    src = tiny_models[arch]
    neurons = pick_neurons(src, n=20, seed=1)
    out = apply_circuit(resolve(str(src)), make_circuit(src, neurons, 0.5), tmp_path / "out")
    spec = arch_for(arch)
    before, after = CheckpointReader(src), CheckpointReader(out)
    assert before.files == after.files
    changed = {spec.down.name(l) for l, _ in neurons}
    for name, entry in before.entries.items():
        raw_a = (src / entry.file).read_bytes()[entry.start : entry.end]
        e2 = after.entries[name]
        raw_b = (out / e2.file).read_bytes()[e2.start : e2.end]
        assert (entry.dtype, entry.shape) == (e2.dtype, e2.shape)
        if name not in changed:
            assert raw_a == raw_b, f"{name} should be byte-identical"
            continue
        a, b = before.tensor(name), after.tensor(name)
        cols = sorted(i for l, i in neurons if spec.down.name(l) == name)
        keep = [c for c in range(a.shape[1]) if c not in cols]
        assert torch.equal(a[:, keep], b[:, keep])
        torch.testing.assert_close(b[:, cols], a[:, cols] * 0.5, rtol=0, atol=0)
    # side files copied, circuit saved, metadata carries provenance
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert (out / "circuit.json").is_file()
    _, meta = read_header(out / after.files[0])
    assert meta["format"] == "pt" and meta["cna_export.version"]
    with safe_open(out / after.files[0], framework="pt") as f:
        assert f.metadata()["cna_export.behaviour"] == "custom"


def test_source_untouched_and_no_temp_left(tiny_models, tmp_path):
    src = tiny_models["qwen3"]
    snapshot = {p.name: p.read_bytes() for p in src.iterdir()}
    apply_circuit(resolve(str(src)), make_circuit(src, [(0, 1), (1, 5)]), tmp_path / "out")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == snapshot
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bf16_dtype_kept_and_exact(tmp_path):
    src = build_model(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    out = apply_circuit(resolve(str(src)), make_circuit(src, [(1, 3), (2, 7)], 2.0), tmp_path / "out")
    a = CheckpointReader(src).tensor("model.layers.1.mlp.down_proj.weight")
    b = CheckpointReader(out).tensor("model.layers.1.mlp.down_proj.weight")
    assert b.dtype == torch.bfloat16
    assert torch.equal(b[:, 3], a[:, 3] * 2)  # scaling by a power of two is exact in bf16


def test_up_rows_equal_down_columns(tiny_models, tmp_path):
    src = tiny_models["mistral"]
    circuit = make_circuit(src, pick_neurons(src, 10, 3), 0.3)
    down = apply_circuit(resolve(str(src)), circuit, tmp_path / "down", target="down")
    up = apply_circuit(resolve(str(src)), circuit, tmp_path / "up", target="up")
    tok = AutoTokenizer.from_pretrained(src)
    a = logits(AutoModelForCausalLM.from_pretrained(down), tok, PROMPTS)
    b = logits(AutoModelForCausalLM.from_pretrained(up), tok, PROMPTS)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_fold_math_pure():
    w = torch.arange(12.0).reshape(3, 4)
    edits = group_by_layer([(0, 2, 0.0), (0, 0, 3.0)])
    index, mult = edits[0]
    assert index.tolist() == [0, 2] and mult.tolist() == [3.0, 0.0]
    down, up = arch_for("llama").down, arch_for("llama").up
    out = fold_site(w, down, 4, index, mult)
    assert out[:, 0].tolist() == [0.0, 12.0, 24.0] and out[:, 2].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(out[:, [1, 3]], w[:, [1, 3]]) and w[0, 2] == 2.0  # input not modified
    torch.testing.assert_close(fold_site(w.T, up, 4, index, mult), out.T)
