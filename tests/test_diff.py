"""diff and verify: recover the applied circuit from (original, edited) and refuse anything else.

Covered: exports of every tiny architecture (down and up targets, float32 and bfloat16), quantized GGUF files
whose ffn_up rows were scaled through their f16 block scales, and the real SmolLM2 checkpoint (slow).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from conftest import ARCHS, build_model, make_circuit, run_cli
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize
from safetensors.torch import load_file, save_file

from cna_export.audit.diff import diff
from cna_export.audit.verify import verify
from cna_export.circuit.format import Circuit
from cna_export.fold.export import apply_circuit
from cna_export.gguf.quant import scale_fields
from cna_export.io.source import resolve

REAL = Path(os.environ.get("CNA_REAL_MODELS", Path.home() / ".cache" / "cna-real-models"))
SMOL = REAL / "SmolLM2-135M-Instruct.Q4_1.gguf"
# (layer, neuron) -> multiplier; the circuit's default is 0, two neurons override it.
EDIT = {(0, 3): 0.0, (0, 60): 2.5, (1, 7): 0.0, (1, 9): 0.3, (1, 95): 0.0}


def _circuit(model: Path | str, edit: dict[tuple[int, int], float] = EDIT, default: float = 0.0) -> Circuit:
    circuit = make_circuit(Path(model), list(edit), multiplier=default)
    circuit.neurons = [n.model_copy(update={"multiplier": None if edit[(n.layer, n.index)] == default
                                            else edit[(n.layer, n.index)]}) for n in circuit.neurons]  # fmt: skip
    return circuit


def _effective(circuit: Circuit) -> dict[tuple[int, int], float]:
    """(layer, neuron) -> multiplier as folded (float32, like the fold)."""
    return {
        (layer, int(i)): float(m)
        for layer, (index, mult) in circuit.edits(allow_negative=True).items()
        for i, m in zip(index, mult)
    }


def _assert_recovers(original: str, edited: str, applied: Circuit) -> None:
    report = diff(original, edited)
    assert report.is_circuit_edit, report.table()
    recovered = report.circuit()
    assert _effective(recovered) == _effective(applied)
    assert recovered.multiplier == applied.multiplier  # the most common factor is the default
    ok, reason = verify(original, edited, recovered)
    assert ok, reason


@pytest.mark.parametrize("target", ["down", "up"])
@pytest.mark.parametrize("arch", ARCHS)
def test_recovers_applied_circuit(tiny_models, tmp_path, arch, target):
    src = tiny_models[arch]
    circuit = _circuit(src)
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "edited", target=target)
    _assert_recovers(str(src), str(out), circuit)
    report = diff(str(src), str(out))
    kinds = {c.kind for c in report.changes}
    assert kinds == {target} and report.identical == report.compared - 2  # two layers edited
    assert verify(str(src), str(out), Circuit.load(out / "circuit.json"))[0]


def test_recovers_bfloat16_and_amplification(tmp_path):
    src = build_model(tmp_path / "bf16", "qwen3", dtype=torch.bfloat16)
    circuit = _circuit(src, {(0, 1): 2.0, (0, 2): 2.0, (1, 100): 0.5}, default=2.0)
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "edited", target="up")
    _assert_recovers(str(src), str(out), circuit)


def _tamper(folder: Path, name: str, fn) -> None:
    """Change one tensor of a single-file safetensors folder in place."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def test_verify_fails_on_any_other_change(tiny_models, tmp_path):
    src = tiny_models["qwen2"]
    circuit = _circuit(src)
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "edited")
    assert verify(str(src), str(out), circuit)[0]

    missing = _circuit(src, {**EDIT, (2, 11): 0.0})  # one neuron more than was applied
    ok, reason = verify(str(src), str(out), missing)
    assert not ok and "layer 2" in reason

    partial = {k: v for k, v in EDIT.items() if k != (1, 9)}  # the edit lacks a neuron of an edited layer
    ok, reason = verify(str(src), str(out), _circuit(src, partial))
    assert not ok and "neuron 9" in reason and "not in the circuit" in reason

    wrong = _circuit(src, {**EDIT, (1, 9): 0.4})
    ok, reason = verify(str(src), str(out), wrong)
    assert not ok and "scaled by 0.3" in reason

    def extra_neuron(t):  # one more weight in an edited tensor
        t[5, 40] += 0.01

    other = tmp_path / "other"
    shutil.copytree(out, other)
    _tamper(other, "model.layers.0.mlp.down_proj.weight", extra_neuron)
    ok, reason = verify(str(src), str(other), circuit)
    assert not ok and "neuron 40" in reason
    report = diff(str(src), str(other))
    assert not report.is_circuit_edit  # one weight of a column: not a constant factor

    def extra_weight(t):  # one weight outside the MLP
        t[0, 0] += 1e-3

    shutil.rmtree(other)
    shutil.copytree(out, other)
    _tamper(other, "model.layers.1.self_attn.v_proj.weight", extra_weight)
    ok, reason = verify(str(src), str(other), circuit)
    assert not ok and "self_attn.v_proj" in reason
    report = diff(str(src), str(other))
    assert not report.is_circuit_edit and "other" in {c.kind for c in report.changes}


def test_cli_diff_json_output_and_exit_codes(tiny_models, tmp_path, capsys):
    from cna_export.cli.main import main

    src = tiny_models["gemma2"]
    circuit = _circuit(src)
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "edited", target="up")
    rec = tmp_path / "recovered_circuit.json"
    proc = run_cli("diff", str(src), str(out), "--json", "-o", str(rec))  # once as a user runs it
    data = json.loads(proc.stdout)
    assert data["circuit_edit"] and data["neurons"] == len(EDIT) and data["tensors"]["changed"] == 2
    assert _effective(Circuit.load(rec)) == _effective(circuit)

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["diff", *args])
        printed = capsys.readouterr()
        return code, printed.out, printed.err

    code, table, _ = cli(str(src), str(out))
    assert code == 0 and "up_proj" in table and "2.5 x1" in table and "a circuit edit" in table
    assert cli(str(src), str(out), "--verify", str(out / "circuit.json"))[0] == 0
    wrong = tmp_path / "wrong.json"
    _circuit(src, {**EDIT, (0, 60): 3.0}).save(wrong)
    code, printed, _ = cli(str(src), str(out), "--verify", str(wrong), "--json")
    assert code == 1 and json.loads(printed)["verified"] is False
    code, printed, _ = cli(str(src), str(tiny_models["gemma"]))
    assert code == 1 and "NOT only a circuit edit" in printed
    code, _, err = cli(str(tmp_path / "nope"), str(out))
    assert code == 2 and "error" in err
    assert cli(str(src), str(out), "-o", str(rec))[0] == 2  # never overwrites without --overwrite


@pytest.mark.parametrize(("outtype", "target"), [("f32", "down"), ("f16", "up"), ("bf16", "down")])
def test_float_gguf_conversions(tiny_models, tmp_path, outtype, target):
    from cna_export.gguf.convert import export_gguf

    src = tiny_models["qwen3"]
    circuit = _circuit(src)
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "edited", target=target)
    a = export_gguf(src, tmp_path / f"original-{outtype}.gguf", outtype=outtype)
    b = export_gguf(out, tmp_path / f"edited-{outtype}.gguf", outtype=outtype)
    _assert_recovers(str(a), str(b), circuit)
    assert {c.name for c in diff(str(a), str(b)).changes} == {f"blk.{i}.ffn_{target}.weight" for i in (0, 1)}


# Quantized GGUF --------------------------------------------------------------------------------------------------


def write_gguf(path: Path, qtype: str, n_layers: int = 2, n_embd: int = 64, n_ff: int = 128) -> Path:
    """A tiny llama-architecture GGUF whose MLP weights are quantized to `qtype` (enough for diff/verify)."""
    rng = np.random.default_rng(len(qtype))
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_embedding_length(n_embd)
    w.add_tensor("token_embd.weight", rng.normal(0, 0.1, (32, n_embd)).astype(np.float32))
    qt = GGMLQuantizationType[qtype]
    for i in range(n_layers):
        for name, shape in (("ffn_up", (n_ff, n_embd)), ("ffn_gate", (n_ff, n_embd)), ("ffn_down", (n_embd, n_ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", quantize(rng.normal(0, 0.1, shape).astype(np.float32), qt),
                         raw_dtype=qt)  # fmt: skip
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def scale_rows_in_gguf(src: Path, out: Path, edit: dict[tuple[int, int], float]) -> Path:
    """Scale ffn_up rows of a quantized GGUF the way GGUF_NOTES describes: every f16 block scale times m."""
    shutil.copyfile(src, out)
    reader = GGUFReader(out, "r+")
    for t in reader.tensors:
        qtype = t.tensor_type.name
        block = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        for (layer, j), m in edit.items():
            if t.name == f"blk.{layer}.ffn_up.weight":
                row = t.data[j].reshape(-1, block)
                for off in scale_fields(qtype):
                    old = row[:, off : off + 2].copy().view(np.float16).astype(np.float64)
                    row[:, off : off + 2] = (old * m).astype(np.float16).view(np.uint8)
    reader.data.flush()
    del reader
    return out


def _edit_byte(path: Path, tensor: str, row: int, col: int) -> None:
    reader = GGUFReader(path, "r+")
    (t,) = [t for t in reader.tensors if t.name == tensor]
    t.data[row, col] ^= 0x11
    reader.data.flush()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_1"])
def test_quantized_gguf_scales(tmp_path, qtype):
    src = write_gguf(tmp_path / "m.gguf", qtype)
    out = scale_rows_in_gguf(src, tmp_path / "edited.gguf", EDIT)
    circuit = _circuit(src)
    _assert_recovers(str(src), str(out), circuit)
    assert verify(str(src), str(out), circuit)[0]

    ok, reason = verify(str(src), str(out), _circuit(src, {**EDIT, (1, 9): 0.5}))
    assert not ok and "scaled by 0.3" in reason
    ok, reason = verify(str(src), str(out), _circuit(src, {**EDIT, (0, 4): 0.0}))
    assert not ok and "neuron 4" in reason and "missing" in reason

    values = tmp_path / "values.gguf"  # a quantized value (not a scale) of an edited row changed
    shutil.copyfile(out, values)
    _edit_byte(values, "blk.0.ffn_up.weight", 60, 10)
    ok, reason = verify(str(src), str(values), circuit)
    assert not ok and "quantized values changed" in reason
    extra = tmp_path / "extra.gguf"  # a row outside the circuit, and a tensor outside the MLP
    shutil.copyfile(out, extra)
    _edit_byte(extra, "blk.1.ffn_up.weight", 50, 0)
    ok, reason = verify(str(src), str(extra), circuit)
    assert not ok and "neuron 50" in reason and "not in the circuit" in reason
    shutil.copyfile(out, extra)
    _edit_byte(extra, "blk.1.ffn_gate.weight", 0, 5)
    assert not verify(str(src), str(extra), circuit)[0]
    assert not diff(str(src), str(extra)).is_circuit_edit


def test_damaged_gguf_is_one_clear_error(tmp_path):
    from cna_export.errors import CheckpointError

    src = write_gguf(tmp_path / "m.gguf", "Q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[:-100])  # a truncated download
    with pytest.raises(CheckpointError, match="cut.gguf"):
        diff(str(src), str(cut))


def test_gguf_patch_output_verifies(tmp_path):
    gguf_patch = pytest.importorskip("cna_export.gguf.patch")
    src = write_gguf(tmp_path / "m.gguf", "Q4_1")
    circuit = _circuit(src)
    out = gguf_patch.patch_gguf(src, circuit, tmp_path / "patched.gguf")
    _assert_recovers(str(src), str(out), circuit)
    proc = run_cli("diff", str(src), str(out), "--verify", str(out) + ".circuit.json", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# The real SmolLM2-135M-Instruct (Q4_1 GGUF) --------------------------------------------------------------------

real = pytest.mark.skipif(not SMOL.is_file(), reason=f"run ../shared/scripts/fetch-real-models.sh first ({SMOL})")
SMOL_EDIT = {(3, 17): 0.0, (7, 1000): 0.0, (12, 5): 2.0, (20, 1535): 0.0, (29, 400): 0.5}


@pytest.mark.slow
@real
def test_real_smollm2_export_recovers(tmp_path):
    circuit = _circuit(SMOL, SMOL_EDIT)
    out = apply_circuit(resolve(str(SMOL)), circuit, tmp_path / "edited")
    # The GGUF is dequantized the way apply does it, so the edit comes out exact (verify, which dequantizes it
    # once more, is left to the tiny models and to the patched GGUF below, to keep this test short).
    report = diff(str(SMOL), str(out))
    assert report.is_circuit_edit and report.identical == report.compared - len({k[0] for k in SMOL_EDIT})
    assert _effective(report.circuit()) == _effective(circuit)
    card = (out / "README.md").read_text()  # the license comes from the GGUF's general.license
    assert yaml.safe_load(card.split("---\n", 2)[1])["license"] == "apache-2.0"


@pytest.mark.slow
@real
def test_real_smollm2_patched_q4_1(tmp_path):
    gguf_patch = pytest.importorskip("cna_export.gguf.patch")
    circuit = _circuit(SMOL, SMOL_EDIT)
    out = gguf_patch.patch_gguf(SMOL, circuit, tmp_path / "patched.gguf")
    _assert_recovers(str(SMOL), str(out), circuit)
    ok, reason = verify(str(SMOL), str(out), _circuit(SMOL, {**SMOL_EDIT, (12, 5): 3.0}))
    assert not ok and "scaled by 2" in reason
