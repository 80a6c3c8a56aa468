"""Circuits as adapters (ship/adapter.py) and stacks of circuits (circuit/stack.py).

What the tool writes is loaded by the real consumers: PEFT (`PeftModel.from_pretrained`, `merge_and_unload`) must
give the logits of the folded export, and llama.cpp (llama-cpp-python, `lora_path`/`lora_scale`) with the GGUF
LoRA on an f32 GGUF of the base must give the logits of the converted folded export.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import conftest
import numpy as np
import pytest
import torch
from conftest import ARCHS, make_circuit, run_cli
from safetensors.torch import load_file

from cna_export.arch import arch_for
from cna_export.audit.diff import diff
from cna_export.backends import ExportOptions, open_backend, open_model
from cna_export.circuit.format import Circuit
from cna_export.circuit.stack import load_stack, stack
from cna_export.errors import CnaExportError
from cna_export.fold.export import apply_circuit
from cna_export.io.source import resolve
from cna_export.ship import adapter as adapter_mod
from cna_export.ship.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, gguf_name, lora_factors, write_adapter
from cna_export.ship.card import read_provenance

FAMILIES = getattr(conftest, "FAMILIES", [])  # the further dense families, where conftest has them
IDS = torch.tensor([[3, 17, 42, 99, 7, 256, 1, 300, 11, 64, 5, 200]])


def _circuit(model_dir: Path, m: float = 0.0, per_neuron: float | None = 2.5) -> Circuit:
    """Neurons in the first and last layer (two in one layer, so ranks differ), one with its own multiplier."""
    c = make_circuit(model_dir, [(0, 3), (0, 17), (0, 40)], m)
    last = c.model.num_layers - 1
    c.neurons.append(c.neurons[0].model_copy(update={"layer": last, "index": 5}))
    if per_neuron is not None:
        c.neurons[1].multiplier = per_neuron
    return c


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _hf(folder: Path):
    """The model as a user loads it: the family's transformers auto class (multimodal wrappers have their own)."""
    import transformers

    from cna_export.io.source import describe

    spec, _, _ = describe(resolve(str(folder)))
    loader = getattr(transformers, getattr(spec, "loader", "AutoModelForCausalLM"))
    return loader.from_pretrained(folder, dtype=torch.float32).eval()


def _check_peft(model_dir: Path, circuit: Circuit, tmp_path: Path, target: str = "down") -> None:
    """PEFT on the base == the folded export, unmerged and merged; the factors PEFT holds are the file's."""
    from peft import PeftModel, get_peft_model_state_dict

    src = resolve(str(model_dir))
    ad = write_adapter(open_backend(src), circuit, tmp_path / "ad", ExportOptions(target=target))
    folded = apply_circuit(src, circuit, tmp_path / "folded", target=target)
    ref = _logits(_hf(folded))
    peft = PeftModel.from_pretrained(_hf(model_dir), str(ad)).eval()
    written = load_file(ad / ADAPTER_WEIGHTS)
    held = get_peft_model_state_dict(peft)
    assert set(held) == set(written)  # every factor was loaded into a module, none ignored
    for key, value in written.items():  # the one-hot factor is stored in bfloat16, exactly
        assert torch.equal(held[key], value.to(held[key].dtype)), key
    assert {v.dtype for v in written.values()} == {torch.float32, torch.bfloat16}
    torch.testing.assert_close(_logits(peft), ref, rtol=1e-5, atol=1e-5)
    merged = peft.merge_and_unload()
    torch.testing.assert_close(_logits(merged), ref, rtol=1e-5, atol=1e-5)
    spec, folded_sd = arch_for(circuit.model.model_type), _hf(folded).state_dict()
    for layer in circuit.layer_counts():
        name = spec.site(target).name(layer)
        torch.testing.assert_close(merged.state_dict()[name], folded_sd[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_equals_fold(arch, tiny_models, tmp_path):
    _check_peft(tiny_models[arch], _circuit(tiny_models[arch]), tmp_path)


@pytest.mark.parametrize("arch", FAMILIES)
def test_peft_adapter_equals_fold_families(arch, request, tmp_path):
    model_dir = request.getfixturevalue("family_models")[arch]
    _check_peft(model_dir, _circuit(model_dir), tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_peft_adapter_up_target(arch, tiny_models, tmp_path):
    _check_peft(tiny_models[arch], _circuit(tiny_models[arch]), tmp_path, target="up")


def test_factors_are_exact_and_config_has_per_module_ranks(tiny_models, tmp_path):
    model_dir = tiny_models["qwen2"]
    w = torch.randn(64, 112)
    index, mult = torch.tensor([3, 9]), torch.tensor([0.0, 2.0])
    a, b = lora_factors(w, arch_for("qwen2").down, 112, index, mult)
    assert a.shape == (2, 112) and b.shape == (64, 2) and set(a.unique().tolist()) == {0.0, 1.0}
    expected = w.clone()
    expected[:, index] *= mult
    assert torch.equal(w + b @ a, expected)  # m in {0, 2}: w + w (m - 1) is exact
    ad = write_adapter(open_model(str(model_dir)), _circuit(model_dir), tmp_path / "ad")
    config = json.loads((ad / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 3
    assert config["rank_pattern"] == config["alpha_pattern"] == {"model.layers.2.mlp.down_proj": 1}
    assert sorted(config["target_modules"]) == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]


# llama.cpp -------------------------------------------------------------------------------------------------------


def _llama(path: Path, lora: Path | None = None, scale: float = 1.0) -> np.ndarray:
    import llama_cpp.llama as ll
    from llama_cpp import Llama

    defaults = ll.llama_cpp.llama_model_default_params

    def params():  # no extra buffer types: AMX kernels crash on VMs without AMX tile state (test_gguf_export.py)
        p = defaults()
        p.use_extra_bufts = False
        return p

    kwargs = {"lora_path": str(lora), "lora_scale": scale} if lora else {}
    with mock.patch.object(ll.llama_cpp, "llama_model_default_params", params):
        llm = Llama(str(path), logits_all=True, n_ctx=64, type_k=0, type_v=0, verbose=False, seed=0, n_threads=1,
                    **kwargs)  # fmt: skip
    ids = IDS[0].tolist()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _gguf(folder: Path, out: Path) -> Path:
    from cna_export.gguf.convert import export_gguf

    return export_gguf(folder, out, outtype="f32")


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_lora_in_llama_cpp_equals_folded_gguf(arch, tiny_models, tmp_path):
    model_dir = tiny_models[arch]
    src, circuit = resolve(str(model_dir)), _circuit(model_dir)
    ad = write_adapter(open_backend(src), circuit, tmp_path / "ad", ExportOptions(gguf="f32"))
    base = _gguf(model_dir, tmp_path / "base.gguf")
    folded = _gguf(apply_circuit(src, circuit, tmp_path / "folded"), tmp_path / "folded.gguf")
    got, ref = _llama(base, ad / gguf_name(ad)), _llama(folded)
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(_llama(base) - ref).max() > 1e-3  # the edit is visible, so the comparison means something


def test_gguf_lora_scale_is_a_dial(tiny_models, tmp_path):
    """llama.cpp's scale s gives each neuron 1 + s (m - 1): s = 0.5 of an ablation (m = 0) is the fold with 0.5."""
    from gguf import GGUFReader

    model_dir = tiny_models["qwen2"]
    src, circuit = resolve(str(model_dir)), _circuit(model_dir, m=0.0, per_neuron=None)
    ad = write_adapter(open_backend(src), circuit, tmp_path / "ad", ExportOptions(gguf="f32"))
    reader = GGUFReader(ad / gguf_name(ad))
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 0.0 and fields["general.architecture"] == "qwen2"
    assert {t.name for t in reader.tensors} >= {"blk.0.ffn_down.weight.lora_a", "blk.0.ffn_down.weight.lora_b"}
    base = _gguf(model_dir, tmp_path / "base.gguf")
    half = _gguf(apply_circuit(src, circuit, tmp_path / "half", multiplier=0.5), tmp_path / "half.gguf")
    assert np.abs(_llama(base, ad / gguf_name(ad), 0.5) - _llama(half)).max() <= 1e-4
    assert np.abs(_llama(base, ad / gguf_name(ad), 0.0) - _llama(base)).max() <= 1e-6


# Stacking --------------------------------------------------------------------------------------------------------


def _two(model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    a = make_circuit(model_dir, [(0, 3), (1, 8)], 2.0)
    a.behaviour = "refusal"
    b = make_circuit(model_dir, [(1, 8), (2, 30)], 0.5)
    b.behaviour = "french"
    a.save(tmp_path / "refusal.json")
    b.save(tmp_path / "french.json")
    return tmp_path / "refusal.json", tmp_path / "french.json"


def test_stack_multiplies_and_records_sources(tiny_models, tmp_path):
    pa, pb = _two(tiny_models["qwen2"], tmp_path)
    both = load_stack([pa, pb])
    m = {(n.layer, n.index): n.multiplier if n.multiplier is not None else both.multiplier for n in both.neurons}
    assert m == {(0, 3): 2.0, (1, 8): 1.0, (2, 30): 0.5}
    assert [s.file for s in both.sources] == ["refusal.json", "french.json"] and both.behaviour == "refusal + french"
    assert Circuit.model_validate_json(both.to_json()) == both  # the stacked circuit file round-trips
    single = Circuit.load(pa)
    assert stack([single]) is single and "sources" not in single.to_json()  # one circuit: the file as before


def test_cli_apply_and_adapter_stack(tiny_models, tmp_path):
    from peft import PeftModel

    model_dir = tiny_models["qwen2"]
    pa, pb = _two(model_dir, tmp_path)
    run_cli("apply", "--model", str(model_dir), "--circuit", str(pa), str(pb), "--out", str(tmp_path / "ex"))
    run_cli("adapter", "--model", str(model_dir), "--circuit", str(pa), str(pb), "--out", str(tmp_path / "ad"))
    for folder in ("ex", "ad"):
        written = Circuit.load(tmp_path / folder / "circuit.json")
        assert [s.file for s in written.sources] == ["refusal.json", "french.json"]
        card = (tmp_path / folder / "README.md").read_text()
        assert "`refusal.json`: refusal" in card and "`french.json`: french" in card
        assert [s["file"] for s in read_provenance(tmp_path / folder / "README.md")["circuit"]["sources"]] == [
            "refusal.json", "french.json"]  # fmt: skip
    peft = PeftModel.from_pretrained(_hf(model_dir), str(tmp_path / "ad")).eval()
    torch.testing.assert_close(_logits(peft), _logits(_hf(tmp_path / "ex")), rtol=1e-5, atol=1e-5)
    ref = make_circuit(model_dir, [(0, 3), (1, 8), (2, 30)], 0.0)
    for n, m in zip(ref.neurons, (2.0, 1.0, 0.5)):
        n.multiplier = m
    torch.testing.assert_close(_logits(_hf(tmp_path / "ex")), _logits(_hf(apply_circuit(
        resolve(str(model_dir)), ref, tmp_path / "ref"))), rtol=0, atol=0)  # fmt: skip


# Audit, Hub, bad input -------------------------------------------------------------------------------------------


def test_diff_of_merged_adapter_recovers_the_circuit(tiny_models, tmp_path):
    from peft import PeftModel

    model_dir = tiny_models["llama"]
    circuit = _circuit(model_dir, m=0.0, per_neuron=2.0)
    ad = write_adapter(open_model(str(model_dir)), circuit, tmp_path / "ad")
    PeftModel.from_pretrained(_hf(model_dir), str(ad)).merge_and_unload().save_pretrained(tmp_path / "merged")
    report = diff(str(model_dir), str(tmp_path / "merged"))
    assert report.is_circuit_edit
    expected = {(n.layer, n.index): n.multiplier if n.multiplier is not None else 0.0 for n in circuit.neurons}
    assert report.multipliers() == expected


def test_push_adapter_folder(tiny_models, tmp_path, monkeypatch):
    import huggingface_hub
    import yaml

    calls = []

    class Api:
        def __init__(self, token=None, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    model_dir = tiny_models["qwen2"]
    ad = write_adapter(open_model(str(model_dir)), _circuit(model_dir), tmp_path / "ad",
                       ExportOptions(gguf="f32", base_model="acme/tiny-qwen"))  # fmt: skip
    front = yaml.safe_load((ad / "README.md").read_text().split("---\n", 2)[1])
    assert front["library_name"] == "peft" and front["base_model"] == "acme/tiny-qwen"
    assert front["base_model_relation"] == "adapter"
    assert json.loads((ad / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "acme/tiny-qwen"
    from cna_export.ship.hub import push

    assert push(ad, "me/tiny-lora").endswith("/commit/1")
    upload = dict(calls)["upload_folder"]
    assert upload["commit_message"].startswith("Upload adapter") and upload["repo_type"] == "model"
    (ad / "adapter_model.safetensors").write_bytes(b"changed")
    with pytest.raises(CnaExportError, match="does not match the sha256"):
        push(ad, "me/tiny-lora")


def test_bad_inputs_fail_in_one_line_and_write_nothing(tiny_models, tmp_path, monkeypatch):
    model_dir = tiny_models["qwen2"]
    pa, pb = _two(model_dir, tmp_path)
    other = make_circuit(tiny_models["llama"], [(0, 1)])
    other.save(tmp_path / "llama.json")
    out = tmp_path / "ad"
    cases = [
        (["--circuit", str(pa), str(pb), "--multiplier", "0"], "--multiplier overrides"),
        (["--circuit", str(pa), str(tmp_path / "llama.json")], "different models"),
        (["--circuit", str(tmp_path / "missing.json")], "does not exist"),
    ]
    for extra, message in cases:
        proc = run_cli("adapter", "--model", str(model_dir), "--out", str(out), *extra, check=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not out.exists()
    proc = run_cli("adapter", "--model", str(model_dir), "--circuit", str(tmp_path / "llama.json"), "--out",
                   str(out), check=False)  # fmt: skip
    assert proc.returncode == 2 and "llama model but this model is qwen2" in proc.stderr and not out.exists()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_mod, "write_gguf_lora", broken)
    with pytest.raises(CnaExportError, match="No space left"):
        write_adapter(open_model(str(model_dir)), _circuit(model_dir), out, ExportOptions(gguf="f32"))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "cna-tmp" in p.name]


def test_cli_run_adapter_stacks_on_the_discovered_circuit(tiny_models, tmp_path):
    """`run --adapter --circuit extra.json --gguf f32`: discovery, a stack of the two, an adapter folder."""
    from peft import PeftModel

    model_dir = tiny_models["qwen2"]
    extra = make_circuit(model_dir, [(0, 1)], 3.0)
    extra.behaviour = "french"
    extra.save(tmp_path / "french.json")
    out = tmp_path / "ad"
    proc = run_cli("run", "refusal-ablate", "--model", str(model_dir), "--out", str(out), "--top-k", "6",
                   "--skip-first-layers", "1", "--skip-last-layers", "0", "--specificity", "0", "--adapter",
                   "--gguf", "f32", "--circuit", str(tmp_path / "french.json"))  # fmt: skip
    assert "(LoRA adapter)" in proc.stdout and (out / gguf_name(out)).is_file()
    written = Circuit.load(out / "circuit.json")
    assert [s.file for s in written.sources] == ["refusal-ablate (discovered)", "french.json"]
    assert len(written.neurons) == 7 and (out / "recipe.yaml").is_file()
    peft = PeftModel.from_pretrained(_hf(model_dir), str(out)).eval()
    folded = apply_circuit(resolve(str(model_dir)), written, tmp_path / "folded")
    torch.testing.assert_close(_logits(peft), _logits(_hf(folded)), rtol=1e-5, atol=1e-5)
    proc = run_cli("run", "refusal-ablate", "--model", str(model_dir), "--out", str(tmp_path / "x"), "--adapter",
                   "--gguf", "q8_0", check=False)  # fmt: skip
    assert proc.returncode == 2 and "written in f32" in proc.stderr and not (tmp_path / "x").exists()
