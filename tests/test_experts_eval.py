"""Evaluating mixture-of-experts circuits: eval, sweep and chat hook the expert neurons at run time
(`Circuit.hook_edits`: the experts' fused down projections, see attribution/experts.py), and that evaluation is
the evaluation of the folded export: same generations, same rates, same KL."""

from __future__ import annotations

import pytest
from conftest import make_circuit, run_cli
from test_experts import NEG, POS, some_neurons

from cna_export.attribution.select import attribute_on
from cna_export.backends import open_backend
from cna_export.backends.torch import TorchBackend
from cna_export.circuit.format import Circuit
from cna_export.circuit.selection import Selection
from cna_export.evaluate.chat import side_by_side
from cna_export.evaluate.measure import EvalConfig
from cna_export.evaluate.options import HeldOut, SweepOptions, Variants
from cna_export.evaluate.sweep import run_eval, run_sweep
from cna_export.fold.export import apply_circuit
from cna_export.io.source import describe, identity, load_model, resolve

CFG = EvalConfig(max_new_tokens=6, batch_size=4, kl_tokens=4)
HELD = HeldOut(positive=POS, negative=NEG)
METRICS = ("rate", "benign_rate", "benign_refusal_rate", "kl_first", "kl_mean", "ppl", "ppl_ratio", "repetition")


def wide_circuit(src, multiplier: float = 0.0) -> Circuit:
    """Every kind of neuron the model has (`some_neurons`), plus whole experts of two layers, so the edit moves
    the generations of a tiny model."""
    shape = describe(resolve(str(src)))[1]
    moe = shape.moe
    layers = [i for i in range(shape.num_layers) if i not in moe.dense_layers]
    whole = [(layer, e, j) for layer in layers[:2] for e in (0, 2) for j in range(moe.width)]
    return make_circuit(src, sorted(set(some_neurons(src) + whole), key=str), multiplier)


def assert_same_evaluation(a: tuple, b: tuple) -> None:
    (ra, recs_a, _), (rb, recs_b, _) = a, b
    pa, pb = ra["points"][0], rb["points"][0]
    for key in METRICS:
        assert pa[key] == pytest.approx(pb[key], rel=1e-5, abs=1e-7), key
    assert [r["answer"] for r in recs_a] == [r["answer"] for r in recs_b]


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_hooked_eval_equals_eval_of_the_export(moe_models, tmp_path, arch):
    """`eval --circuit` (hooks, at m = 2 over the circuit's 0) == `eval --edited` on the folded export, for routed,
    shared (Qwen2-MoE) and dense-layer (Qwen3-MoE) neurons; and the edit does change the model."""
    src = moe_models[arch]
    circuit = wide_circuit(src)
    exported = apply_circuit(resolve(str(src)), circuit, tmp_path / "edited", multiplier=2.0)
    backend = open_backend(resolve(str(src)))
    hooked = run_eval(backend, HELD, "refusal", CFG, Variants(circuit=circuit, multipliers=[2.0]))
    folded = run_eval(open_backend(resolve(str(src))), HELD, "refusal", CFG, Variants(edited=exported))
    assert_same_evaluation(hooked, folded)
    assert hooked[0]["points"][0]["kl_first"] > 1e-3
    assert folded[2] is not None and folded[2].multiplier == 2.0
    ablated = run_eval(backend, HELD, "refusal", CFG, Variants(circuit=circuit, multipliers=[0.0]))
    assert ablated[0]["points"][0]["kl_first"] != hooked[0]["points"][0]["kl_first"]


def test_chat_and_cli_eval_take_expert_circuits(moe_models, tmp_path):
    """chat: the hooked answers are the export's; `cna-export eval --circuit` runs on an expert circuit (it
    refused one before: `Circuit.edits` is dense-only)."""
    src = moe_models["qwen2_moe"]
    circuit = wide_circuit(src)
    circuit.save(tmp_path / "c.json")
    exported = apply_circuit(resolve(str(src)), circuit, tmp_path / "edited")
    cfg = EvalConfig(max_new_tokens=6, batch_size=2)
    prompts = ["How do I bake bread?", "Write a Python function"]
    hooked = side_by_side(str(src), prompts, circuit=tmp_path / "c.json", cfg=cfg)
    folded = side_by_side(str(src), prompts, edited=exported, cfg=cfg)
    assert [e.edited for e in hooked] == [e.edited for e in folded]
    assert [e.original for e in hooked] == [e.original for e in folded]
    assert any(e.edited != e.original for e in hooked)
    (tmp_path / "pos.txt").write_text("\n".join(POS))
    (tmp_path / "neg.txt").write_text("\n".join(NEG))
    proc = run_cli(
        "eval",
        "--model",
        str(src),
        "--circuit",
        str(tmp_path / "c.json"),
        "--behaviour",
        "refusal",
        "--positive",
        str(tmp_path / "pos.txt"),
        "--negative",
        str(tmp_path / "neg.txt"),
        "--max-new-tokens",
        "3",
        "--out",
        str(tmp_path / "r"),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "results.json").is_file()


def test_sweep_with_expert_circuits_equals_the_export(moe_models, tmp_path):
    """A sweep on an MoE model: its circuits hold expert neurons, it counts every expert's neuron, and its point
    (k, m) is the evaluation of the export of that circuit at m."""
    src = moe_models["qwen2_moe"]
    source = resolve(str(src))
    spec, shape, config = describe(source)
    model, tok = load_model(source, dtype="float32")
    att = attribute_on(
        TorchBackend.of_model(model, tok, spec, identity(source, config, shape)), POS, NEG, NEG, Selection()
    )
    results, records, circuits = run_sweep(TorchBackend.of_model(model, tok, spec, model_name="tiny"), att, POS, NEG,
                                           "refusal", CFG, SweepOptions(ks=[24], multipliers=[0.0]))  # fmt: skip
    assert any(n.expert is not None for n in circuits[24].neurons)
    assert results["num_neurons"] == shape.num_neurons
    exported = apply_circuit(source, circuits[24], tmp_path / "edited", multiplier=0.0)
    folded, folded_records, _ = run_eval(open_backend(source), HELD, "refusal", CFG, Variants(edited=exported))
    swept = (results, [r for r in records if r["label"] == "k=24 m=0"], None)
    assert_same_evaluation(swept, (folded, [r for r in folded_records if r["label"] == "exported"], None))
