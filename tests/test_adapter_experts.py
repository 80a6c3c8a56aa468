"""Adapters of mixture-of-experts circuits (ship/adapter_experts.py): PEFT's LoRA on the stacked expert parameters
(`target_parameters`) and llama.cpp's GGUF LoRA on `ffn_*_exps`, each against the folded export as the dense
adapter is (tests/test_adapter.py): PEFT on the base gives the folded export's logits, unmerged and merged, and its
merged expert parameters are the folded ones; llama.cpp with the GGUF LoRA on the converted base gives the logits of
the converted folded export. What cannot be made exact is refused in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MOE_ARCHS, build_model, make_circuit, run_cli
from safetensors.torch import load_file
from test_experts_gguf import CHANGES as GPT_OSS_CHANGES  # gpt-oss as llama.cpp 0.3.36 runs it

from cna_export.arch.experts import SHARED
from cna_export.audit.adapter import verify_adapter
from cna_export.backends import ExportOptions, open_backend
from cna_export.circuit.format import Circuit
from cna_export.errors import CnaExportError
from cna_export.fold.export import apply_circuit
from cna_export.io.source import describe, resolve
from cna_export.ship.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, gguf_name, write_adapter
from cna_export.ship.adapter_experts import peft_stack

IDS = [5, 17, 42, 99, 120, 7, 300, 250, 61, 33, 12, 8, 140, 201, 77, 19]
UP_ARCHS = ["qwen2_moe", "mixtral", "granitemoe", "llama4"]  # the fused gate_up layouts, and a shared expert


def neurons(model_dir: Path) -> list[tuple]:
    """Every kind of neuron the model has: routed experts in two layers with different counts per expert (ranks
    2, 1 and 0 in the first layer: padded factors), the first and last neuron of an expert, the shared expert's,
    a dense layer's."""
    shape = describe(resolve(str(model_dir)))[1]
    moe = shape.moe
    layers = [i for i in range(shape.num_layers) if i not in moe.dense_layers]
    picked = [(layers[0], 0, 0), (layers[0], 0, moe.width - 1), (layers[0], 3, 2), (layers[-1], 1, 5)]
    picked += [(layers[-1], 2, j) for j in (1, 4, 9)]
    if moe.shared:
        picked += [(layers[-1], SHARED, 3), (layers[0], SHARED, moe.shared - 1)]
    return picked + [(i, None, 7) for i in sorted(moe.dense_layers)]


def circuit_of(model_dir: Path, m: float = 0.0) -> Circuit:
    c = make_circuit(model_dir, neurons(model_dir), m)
    c.neurons[1].multiplier = 2.5  # a neuron with its own multiplier
    return c


def load(folder: Path):
    import transformers

    spec = describe(resolve(str(folder)))[0]
    return getattr(transformers, spec.loader).from_pretrained(folder, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    # Llama 4's wrapper cannot build a text-only output in transformers 5 (tests/test_experts.py): its language
    # model (the same layers and lm_head) gives the logits.
    inner = getattr(model, "base_model", model)
    inner = getattr(inner, "model", inner) if type(inner).__name__ == "LoraModel" else inner
    run = inner.language_model if type(inner).__name__ == "Llama4ForConditionalGeneration" else model
    with torch.no_grad():
        return run(torch.tensor([IDS])).logits


def check_peft(model_dir: Path, circuit: Circuit, tmp_path: Path, target: str = "down") -> Path:
    """PEFT on the base == the folded export, unmerged and merged (logits, and every parameter the circuit
    touches); every factor in the file was loaded into the model, none ignored."""
    from peft import PeftModel, get_peft_model_state_dict

    src = resolve(str(model_dir))
    ad = write_adapter(open_backend(src), circuit, tmp_path / "ad", ExportOptions(target=target))
    folded = load(apply_circuit(src, circuit, tmp_path / "folded", target=target))
    ref = logits(folded)
    assert (logits(load(model_dir)) - ref).abs().max() > 1e-3  # the edit is visible: the comparison means something
    peft = PeftModel.from_pretrained(load(model_dir), str(ad)).eval()
    written, held = load_file(ad / ADAPTER_WEIGHTS), get_peft_model_state_dict(peft)
    assert set(held) == set(written)
    for key, value in written.items():
        assert torch.equal(held[key], value.to(held[key].dtype)), key
    torch.testing.assert_close(logits(peft), ref, rtol=1e-5, atol=1e-5)
    merged = peft.merge_and_unload()
    torch.testing.assert_close(logits(merged), ref, rtol=1e-5, atol=1e-5)
    mine, theirs = merged.state_dict(), folded.state_dict()
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():  # the edited parameters equal the fold's, the others the base's
        torch.testing.assert_close(value, theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    return ad


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_peft_expert_adapter_equals_fold(moe_models, tmp_path, arch):
    ad = check_peft(moe_models[arch], circuit_of(moe_models[arch]), tmp_path)
    config = json.loads((ad / ADAPTER_CONFIG).read_text())
    spec = describe(resolve(str(moe_models[arch])))[0]
    assert all(t.endswith(f"{spec.experts.module}.down_proj") for t in config["target_parameters"])
    assert len(config["target_parameters"]) == 2  # one per layer with routed neurons
    ok, why = verify_adapter(str(moe_models[arch]), ad, Circuit.load(ad / "circuit.json"))
    assert ok, why


@pytest.mark.parametrize("arch", UP_ARCHS)
def test_peft_expert_adapter_up_target(moe_models, tmp_path, arch):
    check_peft(moe_models[arch], circuit_of(moe_models[arch], m=0.5), tmp_path, target="up")


def test_peft_stack_is_peft_layout():
    """`peft_stack` is the inverse of PEFT's own reading of the factors (`ParamWrapper.get_delta_weight`), in both
    of its orders, on random per-expert factors."""
    from peft.tuners.lora.layer import ParamWrapper

    gen = torch.Generator().manual_seed(0)
    experts, d1, d2 = 3, 5, 7
    for rank, transposed in ((1, False), (1, True), (2, False), (2, True)):
        a = [torch.randn(rank, d2, generator=gen) for _ in range(experts)]
        b = [torch.randn(d1, rank, generator=gen) for _ in range(experts)]
        want = torch.stack([be @ ae for ae, be in zip(a, b)])
        big_a, big_b = peft_stack(a, b, transposed)
        assert big_a.is_contiguous() and big_b.is_contiguous()  # safetensors writes only contiguous tensors
        fake = type(
            "W",
            (),
            {
                "num_experts": experts,
                "_did_swap_in_out_features": not transposed,
                "scaling": {"x": 1.0},
                "get_param": lambda self: torch.zeros(1),
                "lora_A": {"x": torch.nn.Linear(1, 1)},
                "lora_B": {"x": torch.nn.Linear(1, 1)},
            },
        )()
        fake.lora_A["x"].weight = torch.nn.Parameter(big_a)
        fake.lora_B["x"].weight = torch.nn.Parameter(big_b)
        torch.testing.assert_close(ParamWrapper.get_delta_weight(fake, "x"), want)


def test_card_and_audit_command_cover_the_experts(moe_models, tmp_path):
    """The card says where the expert factors are; the audit command it prints passes on the adapter and fails,
    naming the factor, once one expert's factor is changed by one ulp."""
    from safetensors.torch import save_file

    from cna_export.ship.card import read_provenance

    model_dir = moe_models["qwen2_moe"]
    circuit_of(model_dir).save(tmp_path / "c.json")
    ad = tmp_path / "ad"
    run_cli("adapter", "--model", str(model_dir), "--circuit", str(tmp_path / "c.json"), "--out", str(ad), "--gguf")
    card = (ad / "README.md").read_text()
    assert "Experts: PEFT `target_parameters` on the stacked experts' down_proj of 2 layers" in card
    assert "`ffn_down_exps`" in card and "vllm serve" not in card
    record = read_provenance(ad / "README.md")["adapter"]
    config = json.loads((ad / ADAPTER_CONFIG).read_text())
    assert record["expert_parameters"] == sorted(config["target_parameters"])
    assert sorted(config["target_modules"]) == [f"model.layers.{i}.mlp.shared_expert.down_proj" for i in (0, 2)]
    # The card's command names the source by its folder name and the adapter by its own: here, their paths.
    words = next(line for line in card.splitlines() if line.startswith("cna-export diff")).split()[1:]
    assert words == ["diff", model_dir.name, "ad", "--verify", "ad/circuit.json"]
    command = ["diff", str(model_dir), str(ad), "--verify", str(ad / "circuit.json")]
    proc = run_cli(*command)
    assert proc.stdout.startswith("OK: ") and "-lora-f32.gguf" in proc.stdout
    tensors = load_file(ad / ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.2.mlp.experts.lora_B.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = torch.nextafter(tensors[key][0, 0], torch.tensor(1.0))
    save_file(tensors, ad / ADAPTER_WEIGHTS)
    proc = run_cli(*command, check=False)
    assert proc.returncode == 1 and f"FAILED: {key} differs" in proc.stdout


def test_cli_run_adapter_on_a_mixture_of_experts(moe_models, tmp_path):
    """`run --adapter` on Qwen2-MoE: discovery picks neurons inside experts (one of them alone in its layer: rank 1),
    and the adapter folder it writes loads in PEFT as the fold of the discovered circuit."""
    from peft import PeftModel

    model_dir, out = moe_models["qwen2_moe"], tmp_path / "ad"
    run_cli("run", "refusal-ablate", "--model", str(model_dir), "--out", str(out), "--adapter", "--top-k", "8",
            "--skip-first-layers", "0", "--skip-last-layers", "0", "--specificity", "0")  # fmt: skip
    written = Circuit.load(out / "circuit.json")
    assert any(isinstance(n.expert, int) for n in written.neurons) and 1 in written.layer_counts().values()
    folded = load(apply_circuit(resolve(str(model_dir)), written, tmp_path / "folded"))
    peft = PeftModel.from_pretrained(load(model_dir), str(out)).eval()
    torch.testing.assert_close(logits(peft), logits(folded), rtol=1e-5, atol=1e-5)


# What cannot be exact: one line, exit 2, nothing written ------------------------------------------------------------

from test_experts import mxfp4_gpt_oss  # noqa: E402, F401  (the fixture: gpt-oss with MXFP4 experts, as on the Hub)


def test_what_cannot_be_exact_is_refused_in_one_line(moe_models, mxfp4_gpt_oss, tmp_path, monkeypatch):  # noqa: F811
    import peft

    gpt_oss = moe_models["gpt_oss"]
    make_circuit(gpt_oss, [(1, 0, 3)]).save(tmp_path / "gpt_oss.json")
    make_circuit(mxfp4_gpt_oss, [(1, 0, 3)]).save(tmp_path / "mxfp4.json")
    cases = [
        ([gpt_oss, "gpt_oss.json", "--target", "up"], "clamps its experts' up projection and adds 1"),
        ([mxfp4_gpt_oss, "mxfp4.json"], "stored as MXFP4 codes, which transformers dequantizes on load"),
    ]
    for (model, circuit, *extra), message in cases:
        proc = run_cli("adapter", "--model", str(model), "--circuit", str(tmp_path / circuit), "--out",
                       str(tmp_path / "ad"), *extra, check=False)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "ad").exists()
    monkeypatch.setattr(peft, "__version__", "0.21.1")
    with pytest.raises(CnaExportError, match=r"need PEFT >= 0\.22 \(found 0\.21\.1\)"):
        write_adapter(open_backend(resolve(str(gpt_oss))), Circuit.load(tmp_path / "gpt_oss.json"), tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


# llama.cpp: the GGUF LoRA on ffn_*_exps -------------------------------------------------------------------------

# Routed and shared experts (qwen2moe), Mixtral's experts in a `llama` GGUF, Llama 4's stacked gate_up between dense
# layers; CNA_MOE_GGUF_ALL=1 adds the other families (measured: all pass, ~24 s a family on 2 cores; the LoRA was at
# most 1.3e-6 from the folded GGUF). Three as llama.cpp 0.3.36 runs them (`GGUF_CHANGES`, as in
# tests/test_llamacpp_moe.py and tests/test_experts_gguf.py): Qwen3-MoE without a dense layer, OLMoE with as many
# key/value heads as query heads, gpt-oss with llama.cpp's clamp and YaRN rounding.
GGUF_ARCHS = ["qwen2_moe", "mixtral", "llama4"] + (
    ["deepseek_v3", "qwen3_5_moe", "glm4_moe", "granitemoe", "qwen3_moe", "olmoe", "gpt_oss"]
    if os.environ.get("CNA_MOE_GGUF_ALL")
    else []
)
GGUF_CHANGES = {"qwen3_moe": dict(mlp_only_layers=[]), "olmoe": dict(num_key_value_heads=4), **GPT_OSS_CHANGES}


def llama_logits(path: Path, lora: Path | None = None, scale: float = 1.0) -> np.ndarray:
    from llama_cpp import Llama

    # f32 KV cache; no extra buffer types (ggml's AMX kernels crash on VMs that do not grant AMX tile state)
    kwargs = {"lora_path": str(lora), "lora_scale": scale} if lora else {}
    llm = Llama(str(path), logits_all=True, n_ctx=64, type_k=0, type_v=0, use_extra_bufts=False, verbose=False,
                n_threads=1, **kwargs)  # fmt: skip
    try:
        llm.eval(IDS)
        return np.array(llm.scores[: len(IDS)], dtype=np.float64)
    finally:
        llm.close()


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_gguf_expert_lora_in_llama_cpp_equals_folded_gguf(moe_models, hf_to_gguf, tmp_path, monkeypatch, arch):
    """llama.cpp applies a LoRA of ffn_down_exps / ffn_up_exps per routed expert (and of ffn_down_shexp): the
    converted base with the GGUF LoRA gives the converted folded export's logits, for both targets; scale 0 is
    the base. The same LoRA read from the converted base GGUF (factors dequantized from f32) is the same file."""
    from cna_export.gguf.convert import export_gguf
    from cna_export.gguf.external import ENV

    monkeypatch.setenv(ENV, hf_to_gguf)
    model_dir = moe_models[arch]
    if arch in GGUF_CHANGES:
        model_dir = build_model(tmp_path / arch, arch, **GGUF_CHANGES[arch])
    src, circuit = resolve(str(model_dir)), circuit_of(model_dir)
    base = export_gguf(model_dir, tmp_path / "base.gguf", outtype="f32")
    plain = llama_logits(base)
    for target in describe(src)[0].targets:  # gpt-oss: down only
        ad = write_adapter(
            open_backend(src), circuit, tmp_path / f"ad-{target}", ExportOptions(gguf="f32", target=target)
        )
        folded = apply_circuit(src, circuit, tmp_path / f"folded-{target}", target=target)
        ref = llama_logits(export_gguf(folded, tmp_path / f"folded-{target}.gguf", outtype="f32"))
        assert np.abs(plain - ref).max() > 1e-3  # the edit is visible
        assert np.abs(llama_logits(base, ad / gguf_name(ad)) - ref).max() <= 1e-4
        assert np.abs(llama_logits(base, ad / gguf_name(ad), 0.0) - plain).max() <= 1e-6
        ok, why = verify_adapter(str(model_dir), ad, Circuit.load(ad / "circuit.json"))
        assert ok and "-lora-f32.gguf" in why, why
    # From the GGUF itself (f32: the same values), the same factors: both files, every tensor.
    from_gguf, ad = (
        write_adapter(open_backend(resolve(str(base))), circuit, tmp_path / "from-gguf"),
        tmp_path / "ad-down",
    )
    assert _same_tensors(from_gguf / gguf_name(from_gguf), ad / gguf_name(ad))
    mine, theirs = load_file(from_gguf / ADAPTER_WEIGHTS), load_file(ad / ADAPTER_WEIGHTS)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _same_tensors(a: Path, b: Path) -> bool:
    from gguf import GGUFReader

    ta, tb = ({t.name: np.asarray(t.data) for t in GGUFReader(p).tensors} for p in (a, b))
    return ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
