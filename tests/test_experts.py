"""Neurons inside experts (mixtures of experts): (layer, expert, index), routed attribution, exact folds, audits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MOE_ARCHS, build_model, make_circuit, run_cli
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from cna_export.arch import arch_for
from cna_export.arch.experts import SHARED
from cna_export.attribution.collect import collect, encode_prompts
from cna_export.attribution.experts import scaled_units
from cna_export.attribution.hooks import decoder_layers, scaled_neurons
from cna_export.attribution.select import attribute_on
from cna_export.backends.torch import TorchBackend
from cna_export.circuit.format import Circuit
from cna_export.circuit.selection import Selection
from cna_export.errors import ArchitectureError, CircuitError
from cna_export.fold.export import apply_circuit
from cna_export.io.checkpoint import CheckpointReader
from cna_export.io.source import describe, identity, resolve

PROMPTS = ["How do I bake bread?", "def add(a, b): return a + b", "Qu'est-ce que la photosynthese?"]
POS = ["How do I bake bread?", "Explain how to make a paper airplane.", "Write a Python function", "Sure, first"]
NEG = ["The quick brown fox jumps", "Wie spaet ist es?", "I cannot help with that request.", "0123456789 {}"]


def some_neurons(model_dir) -> list[tuple]:
    """Neurons of every kind the model has: routed experts in two layers, the shared expert, a dense layer."""
    shape = describe(resolve(str(model_dir)))[1]
    moe = shape.moe
    layers = [i for i in range(shape.num_layers) if i not in moe.dense_layers]
    picked = [(layers[0], 0, 1), (layers[0], 0, moe.width - 1), (layers[0], 3, 2), (layers[-1], 1, 5)]
    if moe.shared:
        picked.append((layers[-1], SHARED, 3))
    picked += [(i, None, 7) for i in sorted(moe.dense_layers)]
    return picked


def load(model_dir):
    """The source model in fp32 through its family's transformers class (a wrapper's for Qwen3.5-MoE, Llama 4)."""
    import transformers

    spec = describe(resolve(str(model_dir)))[0]
    return getattr(transformers, spec.loader).from_pretrained(model_dir, dtype=torch.float32).eval()


def logits(model, tokenizer, prompts):
    # Llama 4's wrapper in transformers 5.24 fails to build its output without an image (`image_outputs`): its
    # text-only logits come from the Llama4ForCausalLM inside it (the same layers and lm_head).
    run = model.language_model if type(model).__name__ == "Llama4ForConditionalGeneration" else model
    with torch.no_grad():
        return [run(tokenizer(p, return_tensors="pt")["input_ids"]).logits for p in prompts]


def manual_edit(model, spec, neurons, m: float) -> None:
    """An independent weight edit on the in-memory (fused) parameters: column j of the unit's down projection
    (row j of the fused `down_proj` [E, n, hidden] of gpt-oss and Llama 4, column j of [E, hidden, n] elsewhere)."""
    layers = decoder_layers(model, spec)
    ex = spec.experts
    with torch.no_grad():
        for layer, expert, j in neurons:
            if expert is None:
                layers[layer].get_submodule(spec.hook).weight[:, j] *= m
            elif expert == SHARED:
                layers[layer].get_submodule(ex.shared_hook).weight[:, j] *= m
            elif ex.fused in ("gpt_oss", "llama4"):
                layers[layer].get_submodule(ex.module).down_proj[expert, j, :] *= m
            else:
                layers[layer].get_submodule(ex.module).down_proj[expert, :, j] *= m


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_sites_match_checkpoint(moe_models, arch):
    spec, shape, _ = describe(resolve(str(moe_models[arch])))
    reader = CheckpointReader(moe_models[arch])
    moe = shape.moe
    assert moe is not None and moe.num_experts == 4
    for layer in range(shape.num_layers):
        for target in spec.targets:
            if layer in moe.dense_layers:
                site, width, units = spec.site(target), shape.intermediate_size, [None]
            else:
                site, width, units = spec.experts.site(target, 0), moe.width, range(moe.num_experts)
            for e in units:  # one 2-D tensor per expert, or the same stacked 3-D tensor for each
                sub = type(shape)(shape.num_layers, width, shape.hidden_size)
                assert reader.entry(site.name(layer, e)).shape == site.expected_shape(sub, moe.num_experts)
            if moe.shared and layer not in moe.dense_layers:
                site = spec.experts.site(target, SHARED)
                sub = type(shape)(shape.num_layers, moe.shared, shape.hidden_size)
                assert reader.entry(site.name(layer)).shape == site.expected_shape(sub)


def test_stacked_sites_describe_each_experts_slice():
    """The card says where a neuron is inside one expert's slice of a stacked tensor."""
    assert (
        arch_for("granitemoe").experts.down.describe()
        == "columns of each expert of `block_sparse_moe.output_linear.weight`"
    )
    assert arch_for("gpt_oss").experts.down.describe() == "rows of each expert of `mlp.experts.down_proj`"
    assert arch_for("gpt_oss").experts.mxfp4_down.describe() == (
        "rows of each expert of `mlp.experts.down_proj_blocks` (MXFP4 codes)"
    )
    assert arch_for("llama4").experts.up.describe() == (
        "columns of each expert of `feed_forward.experts.gate_up_proj` (part 2 of 2 of the fused tensor)"
    )


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize(("target", "m"), [("down", 0.0), ("down", 0.5), ("down", 2.0), ("up", 0.5)])
def test_export_equals_manual_edit(moe_models, tmp_path, arch, m, target):
    """Exported logits (down columns or up rows of each expert) == the source with the same expert columns scaled
    in memory; runtime scaling agrees; every tensor outside the circuit's units is byte-identical."""
    src = moe_models[arch]
    neurons = some_neurons(src)
    circuit = make_circuit(src, neurons, m)
    spec = arch_for(arch)
    if target not in spec.targets:  # gpt-oss: its clamped `up + 1` is not linear in the up rows
        with pytest.raises(ArchitectureError, match="clamps"):
            apply_circuit(resolve(str(src)), circuit, tmp_path / "out", target=target)
        assert not (tmp_path / "out").exists()
        return
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "out", target=target)
    tok = AutoTokenizer.from_pretrained(src)
    original = load(src)
    plain = logits(original, tok, PROMPTS)
    with scaled_units(decoder_layers(original, spec), spec, circuit.unit_edits()):
        hooked = logits(original, tok, PROMPTS)
    assert all(torch.equal(a, b) for a, b in zip(plain, logits(original, tok, PROMPTS))), "restored after"
    with scaled_neurons(original, spec, circuit.unit_edits()):  # the evaluation hooks take (layer, expert) keys
        assert all(torch.equal(a, b) for a, b in zip(hooked, logits(original, tok, PROMPTS)))
    manual_edit(original, spec, neurons, m)
    manual = logits(original, tok, PROMPTS)
    edited = load(out)
    for e, h, ref, p in zip(logits(edited, tok, PROMPTS), hooked, manual, plain):
        torch.testing.assert_close(e, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(e, p), "the edit should change the logits"
    _, shape, _ = describe(resolve(str(src)))
    touched = {(spec.experts.site(target, e) if e is not None else spec.site(target)).name(l, e) for l, e, _ in neurons}
    before, after = CheckpointReader(src), CheckpointReader(out)
    for name, entry in before.entries.items():
        raw_a = (src / entry.file).read_bytes()[entry.start : entry.end]
        e2 = after.entries[name]
        raw_b = (out / e2.file).read_bytes()[e2.start : e2.end]
        assert (raw_a == raw_b) == (name not in touched), name


def unfused_reference(model_dir, spec, prompts) -> torch.Tensor:
    """Mean of w_e * act(gate_e x) * (up_e x) at the last token, from the on-disk per-expert 2-D tensors, one prompt
    at a time: routing recomputed from the router weights, one loop over experts (no fused parameter)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    shape = describe(resolve(str(model_dir)))[1]
    moe, ex = shape.moe, spec.experts
    f = safe_open(str(model_dir / "model.safetensors"), "pt")
    gate_name = ex.down.template.split(".experts.")[0] + ".gate.weight"
    w1_name = ex.up.template.replace("up_proj", "gate_proj").replace("w3", "w1")
    rows = []
    for ids in encode_prompts(tok, prompts):
        xs = {}
        hooks = [
            layer.mlp.register_forward_pre_hook(lambda _m, a, i=i, xs=xs: xs.__setitem__(i, a[0][0, -1]))
            for i, layer in enumerate(decoder_layers(model, spec))
        ]
        with torch.no_grad():
            model(torch.tensor([ids]))
        for h in hooks:
            h.remove()
        row = torch.zeros(shape.num_layers, moe.layer_width(shape.intermediate_size), dtype=torch.float64)
        for i, x in xs.items():
            if i in moe.dense_layers:
                continue
            probs = torch.softmax(x @ f.get_tensor(gate_name.format(i=i)).T, -1)
            top = probs.topk(config.num_experts_per_tok)
            weights = top.values / top.values.sum() if getattr(config, "norm_topk_prob", True) else top.values
            for w, e in zip(weights.tolist(), top.indices.tolist()):
                gate = f.get_tensor(w1_name.format(i=i, e=e)) @ x
                up = f.get_tensor(ex.up.name(i, e)) @ x
                row[i, e * moe.width : (e + 1) * moe.width] = (w * torch.nn.functional.silu(gate) * up).double()
        rows.append(row)
    return torch.stack(rows).mean(0), model, tok


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_capture_equals_unfused_loop_and_batching(moe_models, arch):
    """The capture on the fused experts equals an unfused per-expert loop over the checkpoint tensors, and is the
    same for every batch size (left padding)."""
    spec = arch_for(arch)
    ref, model, tok = unfused_reference(moe_models[arch], spec, POS)
    moe = describe(resolve(str(moe_models[arch])))[1].moe
    enc = encode_prompts(tok, POS)
    assert len({len(e) for e in enc}) > 2, "prompts should differ in length so padding is exercised"
    for batch in (1, 3, 4):
        stats = collect(model, spec, enc, batch, tok.pad_token_id)
        mean = stats.mean.clone()
        for i in moe.dense_layers:
            mean[i] = 0
        torch.testing.assert_close(mean, ref, rtol=1e-4, atol=1e-5)
        assert stats.routed is not None and int(stats.routed.sum(-1).max()) == len(POS) * 2  # top-2 per prompt


# The router of each family (relative to a decoder layer), and how its output holds the routing of the tokens.
ROUTERS = {
    "deepseek_v3": "mlp.gate",
    "glm4_moe": "mlp.gate",
    "granitemoe": "block_sparse_moe.router",
    "gpt_oss": "mlp.router",
    "qwen3_5_moe": "mlp.gate",
    "llama4": "feed_forward.router",
}


def _dense_weights(arch: str, out: tuple, experts: int) -> torch.Tensor:
    """[E] router weights of the last token from a router's output: (logits, top-k weights, top-k indices), or
    Llama 4's (scores [tokens, E] with 0 where not routed, logits)."""
    if arch == "llama4":
        return out[0][-1]
    return torch.zeros(experts).index_add_(0, out[2][-1], out[1][-1].float())


def _expert_neurons(f, arch: str, config, i: int, e: int, x: torch.Tensor, w: float) -> torch.Tensor:
    """Coefficient of each column of expert e's down projection at x, from the tensors on disk, written out per
    family: w * act(gate x) * (up x); gpt-oss's biased, interleaved, clamped SwiGLU; Llama 4's router weight on
    the input."""
    silu = torch.nn.functional.silu
    if arch == "granitemoe":  # input_linear [E, 2n, hidden]: gate rows, then up
        gate, up = (f.get_tensor(f"model.layers.{i}.block_sparse_moe.input_linear.weight")[e] @ x).chunk(2)
        return w * silu(gate) * up
    if arch == "gpt_oss":  # gate_up_proj [E, hidden, 2n]: gate at even columns, up at odd ones
        name = f"model.layers.{i}.mlp.experts.gate_up_proj"
        gate_up = x @ f.get_tensor(name)[e] + f.get_tensor(name + "_bias")[e]
        gate, up = (
            gate_up[::2].clamp(max=config.swiglu_limit),
            gate_up[1::2].clamp(-config.swiglu_limit, config.swiglu_limit),
        )
        return w * (up + 1) * gate * torch.sigmoid(config.swiglu_alpha * gate)
    if arch == "llama4":  # gate_up_proj [E, hidden, 2n]: gate columns, then up; the input is scaled by w
        gate, up = (
            (w * x) @ f.get_tensor(f"language_model.model.layers.{i}.feed_forward.experts.gate_up_proj")[e]
        ).chunk(2)
        return silu(gate) * up
    mlp = f"model.language_model.layers.{i}.mlp" if arch == "qwen3_5_moe" else f"model.layers.{i}.mlp"
    gate = f.get_tensor(f"{mlp}.experts.{e}.gate_proj.weight") @ x
    return w * silu(gate) * (f.get_tensor(f"{mlp}.experts.{e}.up_proj.weight") @ x)


def _shared_neurons(f, arch: str, i: int, x: torch.Tensor) -> torch.Tensor:
    """The shared expert's coefficients at x: ungated (DeepSeek, GLM-4.5, Llama 4) or times Qwen's sigmoid gate."""
    mlp = {
        "deepseek_v3": f"model.layers.{i}.mlp.shared_experts",
        "glm4_moe": f"model.layers.{i}.mlp.shared_experts",
        "llama4": f"language_model.model.layers.{i}.feed_forward.shared_expert",
        "qwen3_5_moe": f"model.language_model.layers.{i}.mlp.shared_expert",
    }[arch]
    h = torch.nn.functional.silu(f.get_tensor(f"{mlp}.gate_proj.weight") @ x) * (
        f.get_tensor(f"{mlp}.up_proj.weight") @ x
    )
    if arch == "qwen3_5_moe":
        h = h * torch.sigmoid(f.get_tensor(f"{mlp}_gate.weight") @ x)
    return h


def routed_reference(model_dir, arch: str, prompts) -> torch.Tensor:
    """Mean at the last token of every expert neuron's coefficient, one prompt at a time: the routing from the
    family's own router (sigmoid and grouped top-k with the correction bias for DeepSeek/GLM, Llama 4's sigmoid
    scores), the neurons from the checkpoint's tensors in an unfused loop over experts (`_expert_neurons`)."""
    spec = arch_for(arch)
    model, tok = load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    config = model.config.get_text_config()
    shape = describe(resolve(str(model_dir)))[1]
    moe = shape.moe
    f = safe_open(str(model_dir / "model.safetensors"), "pt")
    block = spec.experts.module.rpartition(".")[0]
    rows = []
    for ids in encode_prompts(tok, prompts):
        xs, routes, hooks = {}, {}, []
        for i, layer in enumerate(decoder_layers(model, spec)):
            if i in moe.dense_layers:
                continue
            hooks.append(
                layer.get_submodule(block).register_forward_pre_hook(
                    lambda _m, a, i=i, xs=xs: xs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])[-1])
                )
            )
            hooks.append(
                layer.get_submodule(ROUTERS[arch]).register_forward_hook(
                    lambda _m, _a, out, i=i, routes=routes: routes.__setitem__(
                        i, _dense_weights(arch, out, moe.num_experts)
                    )
                )
            )
        run = model.language_model if arch == "llama4" else model  # see `logits`
        with torch.no_grad():
            run(torch.tensor([ids]))
        for h in hooks:
            h.remove()
        row = torch.zeros(shape.num_layers, moe.layer_width(shape.intermediate_size), dtype=torch.float64)
        for i, x in xs.items():
            with torch.no_grad():
                for e in torch.nonzero(routes[i]).flatten().tolist():
                    row[i, e * moe.width : (e + 1) * moe.width] = _expert_neurons(
                        f, arch, config, i, e, x, float(routes[i][e])
                    ).double()
                if moe.shared:
                    row[i, moe.num_experts * moe.width :] = _shared_neurons(f, arch, i, x).double()
        rows.append(row)
    return torch.stack(rows).mean(0), model, tok


@pytest.mark.parametrize("arch", sorted(ROUTERS))
def test_capture_equals_unfused_loop_every_layout(moe_models, arch):
    """The capture on the real transformers class equals the unfused reference written out per family (grouped
    sigmoid routing with a correction bias, an ungated shared expert, stacked 3-D tensors on disk, gpt-oss's
    interleaved biased clamped SwiGLU, Llama 4's router weight on the expert input), for batch sizes 1 and 4."""
    spec = arch_for(arch)
    ref, model, tok = routed_reference(moe_models[arch], arch, POS)
    moe = describe(resolve(str(moe_models[arch])))[1].moe
    enc = encode_prompts(tok, POS)
    for batch in (1, 4):
        stats = collect(model, spec, enc, batch, tok.pad_token_id)
        mean = stats.mean.clone()
        for i in moe.dense_layers:
            mean[i] = 0
        torch.testing.assert_close(mean, ref, rtol=1e-4, atol=1e-5)
        routed = stats.routed.sum(-1)
        assert int(routed.max()) == len(POS) * 2 and int(routed[sorted(moe.dense_layers)].sum()) == 0  # top-2


def test_attribute_is_batch_invariant_and_records_routing(moe_models):
    src = moe_models["qwen2_moe"]
    source = resolve(str(src))
    spec, shape, config = describe(source)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    model_id = identity(source, config, shape)
    runs = [
        attribute_on(
            TorchBackend.of_model(model, tok, spec, model_id), POS, NEG, NEG, Selection(batch_size=b, universal=True)
        )
        for b in (1, 4)
    ]
    torch.testing.assert_close(runs[0].delta, runs[1].delta, rtol=1e-5, atol=1e-7)
    assert torch.equal(runs[0].excluded, runs[1].excluded)
    circuit = runs[1].circuit(12)
    assert circuit.format_version == 2 and any(n.expert is not None for n in circuit.neurons)
    assert circuit.routing.activation == "router_weight_x_down_input"
    routed = {(r.layer, r.expert) for r in circuit.routing.coverage}
    assert routed == {(n.layer, n.expert) for n in circuit.neurons if n.expert is not None}
    for r in circuit.routing.coverage:
        assert 0 <= r.routed["positive"] <= len(POS)
    assert "expert" in circuit.summary()
    again = Circuit.model_validate_json(circuit.to_json())
    assert again.neurons == circuit.neurons and again.routing == circuit.routing


def test_universal_neurons_are_per_expert_among_routed_prompts(moe_models):
    """Universal neurons of an MoE layer: the top-n by |activation| is taken inside each routed expert (and the
    shared one), counted only over the neutral prompts whose last token was routed there; the excluded
    (layer, column) pairs are exactly those of a one-prompt-at-a-time count, and none of them is selected."""
    import math

    from cna_export.attribution.select import prepare

    src = moe_models["qwen2_moe"]
    source = resolve(str(src))
    spec, shape, config = describe(source)
    moe = shape.moe
    model, tok = load(src), AutoTokenizer.from_pretrained(src)
    neutral = PROMPTS + NEG
    selection = Selection(universal=True, universal_top_n=1, universal_threshold=0.25, batch_size=3)
    run = attribute_on(
        TorchBackend.of_model(model, tok, spec, identity(source, config, shape)), POS, NEG, neutral, selection
    )
    last = prepare(shape, selection)[2]
    counts: dict[tuple[int, int], int] = {}
    for ids in encode_prompts(tok, neutral):
        stats = collect(model, spec, [ids], 1, tok.pad_token_id, last_layer=last)
        for layer in range(last + 1):
            for expert, width in moe.units(layer, shape.intermediate_size):
                if expert != SHARED and not stats.routed[layer, expert]:
                    continue  # an unrouted expert's zeros are no one's top-1
                start = moe.column(layer, expert, 0)
                column = start + int(stats.sums[layer, start : start + width].abs().argmax())
                counts[(layer, column)] = counts.get((layer, column), 0) + 1
    want = {key for key, c in counts.items() if c >= math.ceil(0.25 * len(neutral))}
    assert set(run.universal) == want
    kinds = {moe.neuron(layer, column)[0] == SHARED for layer, column in want}
    assert kinds == {True, False}, "both routed and shared experts should have universal neurons here"
    assert all(bool(run.excluded[layer, column]) for layer, column in want)
    available = int((~run.excluded).sum())
    circuit = run.circuit(available)
    chosen = {(n.layer, moe.column(n.layer, n.expert, n.index)) for n in circuit.neurons}
    assert len(chosen) == available and not chosen & want
    assert set(circuit.selection.universal_excluded) == want


def test_circuit_versions(moe_models, tiny_models, tmp_path):
    """A dense circuit is still written as version 1 (no `expert` keys); version 1 loads; MoE circuits are version 2
    and refuse the dense-only `edits()`; an expert outside the model is refused on load."""

    dense = make_circuit(tiny_models["llama"], [(0, 1)])
    data = json.loads(dense.to_json())
    assert data["format_version"] == 1 and "expert" not in data["neurons"][0] and "routing" not in data
    dense.save(tmp_path / "v1.json")
    assert Circuit.load(tmp_path / "v1.json").neurons[0].expert is None
    moe = make_circuit(moe_models["qwen2_moe"], [(1, 2, 3), (1, SHARED, 4)])
    data = json.loads(moe.to_json())
    assert data["format_version"] == 2 and data["neurons"][1]["expert"] == "shared"
    with pytest.raises(CircuitError, match="experts"):
        moe.edits()
    data["neurons"][0]["expert"] = 9
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(CircuitError, match="outside"):
        Circuit.load(tmp_path / "bad.json")


def test_inspect_and_card_show_experts(moe_models, tmp_path):
    """inspect prints neurons per (layer, expert) and writes the layer x expert heatmap; the card has the table."""
    from cna_export.evaluate.plots import expert_grid

    src = moe_models["qwen2_moe"]
    circuit = make_circuit(src, some_neurons(src))
    columns, grid = expert_grid(circuit)
    assert columns == ["0", "1", "2", "3", "shared"] and grid[0][0] == 2 and grid[2][4] == 1
    path = tmp_path / "c.json"
    circuit.save(path)
    out = run_cli("inspect", str(path), "--plot", str(tmp_path / "layers.png")).stdout
    assert "expert" in out and "shared" in out
    assert (tmp_path / "layers-experts.png").read_bytes()[:4] == b"\x89PNG"
    card = (apply_circuit(resolve(str(src)), circuit, tmp_path / "out") / "README.md").read_text()
    assert "| layer | expert | neurons |" in card and "| 2 | shared | 1 |" in card


def test_diff_and_verify_recover_experts(moe_models, tmp_path):
    """diff recovers (layer, expert, index) and the factor of every kind of neuron; verify is exact, and names the
    expert when the edit does not match the circuit."""
    from cna_export.audit.diff import diff
    from cna_export.audit.verify import verify

    src = moe_models["qwen3_moe"]
    neurons = some_neurons(src)
    circuit = make_circuit(src, neurons, 0.5)
    circuit.neurons[2] = circuit.neurons[2].model_copy(update={"multiplier": 2.0})
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "out")
    report = diff(str(src), str(out))
    assert report.is_circuit_edit
    recovered = report.circuit()
    assert recovered.format_version == 2
    got = {(n.layer, n.expert, n.index): n.multiplier or recovered.multiplier for n in recovered.neurons}
    want = {(n.layer, n.expert, n.index): n.multiplier or 0.5 for n in circuit.neurons}
    assert got == want
    ok, why = verify(str(src), str(out), circuit)
    assert ok, why
    ok, why = verify(str(src), str(out), recovered)
    assert ok, why
    wrong = circuit.model_copy(update={"multiplier": 0.25})
    ok, why = verify(str(src), str(out), wrong)
    assert not ok and "scales it by 0.25" in why and "but it was scaled by 0.5" in why
    fewer = circuit.model_copy(update={"neurons": [n for n in circuit.neurons if n.expert != 3]})
    ok, why = verify(str(src), str(out), fewer)
    assert not ok and "expert 3" in why, why
    proc = run_cli("diff", str(src), str(out), "--verify", str(out / "circuit.json"))
    assert proc.returncode == 0


@pytest.mark.parametrize("arch", sorted(ROUTERS))
def test_diff_and_verify_every_layout(moe_models, tmp_path, arch):
    """On every layout (per-expert 2-D tensors beside an ungated shared expert, 3-D tensors that stack a layer's
    experts, a wrapper's language model) diff recovers each (layer, expert, index) and its factor, `diff --verify`
    accepts the export, and a wrong factor or a missing expert is named."""
    from cna_export.audit.diff import diff
    from cna_export.audit.verify import verify

    src = moe_models[arch]
    circuit = make_circuit(src, some_neurons(src), 0.5)
    circuit.neurons[2] = circuit.neurons[2].model_copy(update={"multiplier": 2.0})
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "out")
    recovered = diff(str(src), str(out)).circuit()
    got = {(n.layer, n.expert, n.index): n.multiplier or recovered.multiplier for n in recovered.neurons}
    assert got == {(n.layer, n.expert, n.index): n.multiplier or 0.5 for n in circuit.neurons}
    assert verify(str(src), str(out), circuit)[0] and verify(str(src), str(out), recovered)[0]
    ok, why = verify(str(src), str(out), circuit.model_copy(update={"multiplier": 0.25}))
    assert not ok and "scales it by 0.25" in why, why
    fewer = circuit.model_copy(update={"neurons": [n for n in circuit.neurons if n.expert != 3]})
    ok, why = verify(str(src), str(out), fewer)
    assert not ok and "expert 3" in why, why
    assert run_cli("diff", str(src), str(out), "--verify", str(out / "circuit.json")).returncode == 0


@pytest.mark.parametrize("arch", sorted(ROUTERS))
def test_attribute_then_export_verifies_every_layout(moe_models, tmp_path, arch):
    """discover -> apply on each layout, through the real transformers class: the circuit holds expert neurons with
    their routing coverage, and its export verifies exactly."""
    from cna_export.audit.verify import verify

    src = moe_models[arch]
    source = resolve(str(src))
    spec, shape, config = describe(source)
    model, tok = load(src), AutoTokenizer.from_pretrained(src)
    run = attribute_on(
        TorchBackend.of_model(model, tok, spec, identity(source, config, shape)), POS, NEG, NEG, Selection(batch_size=4)
    )
    circuit = run.circuit(12)
    assert circuit.format_version == 2 and any(isinstance(n.expert, int) for n in circuit.neurons)
    routed = {(r.layer, r.expert): r.routed for r in circuit.routing.coverage}
    assert set(routed) == {(n.layer, n.expert) for n in circuit.neurons if n.expert is not None}
    assert all(0 < max(r["positive"], r["negative"]) <= len(POS) for r in routed.values())
    out = apply_circuit(source, circuit, tmp_path / "out")
    ok, why = verify(str(src), str(out), Circuit.load(out / "circuit.json"))
    assert ok, why


def test_gpt_oss_fold_is_exact_with_biases_and_clamped_activation():
    """gpt-oss experts: h = (clamp(up) + 1) * glu(clamp(gate)) with biases on gate/up and on down. Scaling row j
    of expert e's down_proj [E, n, hidden] (the fused 3-D layout, an expert-axis site) equals scaling h_j by m in
    an unfused reference loop, clamps hit and biases included: the down bias is added once, after the sum over
    neurons, so it is not a neuron's. Scaling the up row instead is not exact here (clamp and +1), which is why only
    the down site is a fold target for this family."""
    from transformers import AutoConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from cna_export.arch.sites import Site
    from cna_export.fold.scale import fold_site_

    config = AutoConfig.for_model(
        "gpt_oss", hidden_size=32, intermediate_size=16, num_local_experts=4, swiglu_limit=0.7
    )
    torch.manual_seed(0)
    experts = GptOssExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(6, 32)
    index = torch.tensor([[0, 2], [1, 2], [2, 3], [0, 1], [2, 0], [3, 2]])
    weights = torch.rand(6, 2)
    site = Site("model.layers.{i}.mlp.experts.down_proj", axis=1, expert_axis=0)
    e, j = 2, torch.tensor([3, 11])

    def reference(m: float) -> torch.Tensor:
        out = torch.zeros(6, 32)
        for t in range(6):
            for k in range(2):
                ex = int(index[t, k])
                gate_up = x[t] @ experts.gate_up_proj[ex] + experts.gate_up_proj_bias[ex]
                h = experts._apply_gate(gate_up)
                if ex == e:
                    h = h.clone()
                    h[j] *= m
                out[t] += weights[t, k] * (h @ original[ex] + experts.down_proj_bias[ex])
        return out

    with torch.no_grad():
        gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        assert bool((gate_up[:, 1::2].abs() > 0.7).any()), "the clamp should be active in this test"
        original = experts.down_proj.detach().clone()
        for m in (0.0, 0.5, 2.0):
            experts.down_proj.copy_(original)
            fold_site_(experts.down_proj.data, site, 16, j, torch.full((2,), m), expert=e)
            torch.testing.assert_close(experts(x, index, weights), reference(m), rtol=1e-5, atol=1e-5)
        experts.down_proj.copy_(original)
        up = experts.gate_up_proj.data[e][:, 1::2]  # the up columns of the interleaved [hidden, 2n] slice
        up[:, j] *= 2.0
        assert not torch.allclose(experts(x, index, weights), reference(2.0), atol=1e-4)


def test_mxfp4_fold_exact_or_refused():
    """gpt-oss MXFP4 down_proj blocks: m = 0 and representable powers of two fold exactly into the 4-bit codes (the
    dequantized tensor, by transformers' own decoder, is the original with those columns scaled; the other 31
    neurons of each block and the scales are untouched); other factors are refused before any write."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from cna_export.fold.mxfp4 import fold_mxfp4_neurons_

    torch.manual_seed(0)
    experts, rows, n = 2, 8, 64
    blocks = torch.randint(0, 256, (experts, rows, n // 32, 16), dtype=torch.uint8)
    scales = torch.randint(120, 130, (experts, rows, n // 32), dtype=torch.uint8)
    dense = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, n, rows]
    # Neuron 5 of expert 1 holds only codes that m = 2 and m = 0.5 keep exact: values 1 and 2 (codes 2, 4).
    j = 5
    byte, high = divmod(j % 32, 2)
    keep = blocks[1, :, 0, byte] & (0x0F if high else 0xF0)
    blocks[1, :, 0, byte] = keep | ((torch.arange(rows) % 2 * 2 + 2).to(torch.uint8) << (4 if high else 0))
    dense = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    for m in (0.0, 2.0, 0.5):
        b = blocks.clone()
        fold_mxfp4_neurons_(b, 1, torch.tensor([j]), torch.tensor([m]))
        want = dense.clone()
        want[1, j] *= m
        assert torch.equal(convert_moe_packed_tensors(b, scales, dtype=torch.float32), want)
    b = blocks.clone()
    fold_mxfp4_neurons_(b, 0, torch.tensor([3, 40]), torch.tensor([0.0, 0.0]))
    want = dense.clone()
    want[0, [3, 40]] = 0
    assert torch.equal(convert_moe_packed_tensors(b, scales, dtype=torch.float32), want)
    for m in (0.3, 4.0):  # not a power of two; a power of two that overflows (2 * 4 = 8 is no e2m1 value)
        with pytest.raises(CircuitError, match="MXFP4"):
            fold_mxfp4_neurons_(b2 := blocks.clone(), 1, torch.tensor([j]), torch.tensor([m]))
        assert torch.equal(b2, blocks)


# Neurons of the MXFP4 gpt-oss below whose 4-bit codes are all +-1 or +-2, so that m = 0.5 and m = 2 are exact.
MXFP4_SAFE = [(0, 0, 3), (1, 1, 5), (1, 1, 40)]


@pytest.fixture(scope="module")
def mxfp4_gpt_oss(tmp_path_factory):
    """A tiny gpt-oss with its experts in MXFP4 as on the Hub: `*_proj_blocks` [E, rows, n/32, 16] and
    `*_proj_scales` [E, rows, n/32] instead of the float tensors (random codes and scales, n = 64), and a
    quantization_config that says mxfp4. transformers dequantizes it on load."""
    from safetensors.torch import load_file, save_file

    folder = build_model(tmp_path_factory.mktemp("mxfp4") / "gpt_oss", "gpt_oss", intermediate_size=64)
    weights = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name in [n for n in weights if n.endswith(("experts.down_proj", "experts.gate_up_proj"))]:
        experts, inner, outer = weights.pop(name).shape  # [E, n, hidden] and [E, hidden, 2n]: blocks over dim 1
        weights[name + "_blocks"] = torch.randint(
            0, 256, (experts, outer, inner // 32, 16), dtype=torch.uint8, generator=g
        )
        weights[name + "_scales"] = torch.randint(
            122, 127, (experts, outer, inner // 32), dtype=torch.uint8, generator=g
        )
    for layer, expert, j in MXFP4_SAFE:
        blocks = weights[f"model.layers.{layer}.mlp.experts.down_proj_blocks"]
        byte, high = divmod(j % 32, 2)
        codes = torch.tensor([2, 4, 10, 12], dtype=torch.uint8)[torch.randint(0, 4, (blocks.shape[1],), generator=g)]
        column = blocks[expert, :, j // 32, byte]
        blocks[expert, :, j // 32, byte] = (column & 0x0F) | (codes << 4) if high else (column & 0xF0) | codes
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))
    return folder


def load_mxfp4(folder):
    from transformers import Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)
    ).eval()


def test_mxfp4_decode_matches_transformers(mxfp4_gpt_oss):
    """The audit's MXFP4 decoder gives what transformers loads for gpt-oss's experts."""
    from cna_export.fold.mxfp4 import decode_mxfp4

    f = safe_open(str(mxfp4_gpt_oss / "model.safetensors"), "pt")
    name = "model.layers.1.mlp.experts.down_proj"
    decoded = decode_mxfp4(f.get_tensor(name + "_blocks"), f.get_tensor(name + "_scales"))
    assert decoded.shape == (4, 64, 32)
    assert torch.equal(decoded, load_mxfp4(mxfp4_gpt_oss).model.layers[1].mlp.experts.down_proj.detach())


@pytest.mark.parametrize(
    ("m", "neurons"), [(0.0, MXFP4_SAFE + [(0, 2, 7), (2, 3, 63)]), (0.5, MXFP4_SAFE), (2.0, MXFP4_SAFE)]
)
def test_mxfp4_export_equals_manual_edit_and_verifies(mxfp4_gpt_oss, tmp_path, m, neurons):
    """An MXFP4 gpt-oss exports as MXFP4: the neurons' 4-bit codes change, every other byte (their scales, the
    other 31 neurons of each block, gate_up) stays; transformers loads the export with the logits of the source
    with the same rows of down_proj scaled by hand; diff recovers the neurons and --verify accepts the export."""
    from cna_export.audit.diff import diff
    from cna_export.audit.verify import verify

    src = mxfp4_gpt_oss
    circuit = make_circuit(src, neurons, m)
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(src)
    original = load_mxfp4(src)
    plain = logits(original, tok, PROMPTS)
    manual_edit(original, arch_for("gpt_oss"), neurons, m)
    for e, ref, p in zip(logits(load_mxfp4(out), tok, PROMPTS), logits(original, tok, PROMPTS), plain):
        torch.testing.assert_close(e, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(e, p), "the edit should change the logits"
    before, after = CheckpointReader(src), CheckpointReader(out)
    touched = {f"model.layers.{layer}.mlp.experts.down_proj_blocks" for layer, _, _ in neurons}
    for name, entry in before.entries.items():
        raw_a = (src / entry.file).read_bytes()[entry.start : entry.end]
        e2 = after.entries[name]
        assert (raw_a == (out / e2.file).read_bytes()[e2.start : e2.end]) == (name not in touched), name
    recovered = diff(str(src), str(out)).circuit()
    assert {(n.layer, n.expert, n.index) for n in recovered.neurons} == set(neurons)
    assert {n.multiplier or recovered.multiplier for n in recovered.neurons} == {m}
    ok, why = verify(str(src), str(out), circuit)
    assert ok, why
    ok, why = verify(str(src), str(out), circuit.model_copy(update={"multiplier": 0.25 if m else 0.5}))
    assert not ok
    assert run_cli("diff", str(src), str(out), "--verify", str(out / "circuit.json")).returncode == 0


def test_mxfp4_export_refuses_an_inexact_factor(mxfp4_gpt_oss, tmp_path):
    """A factor the 4-bit codes of a neuron cannot hold (a random neuron at m = 2, any neuron at m = 0.3) is
    refused in one line, and the export leaves nothing behind."""
    for neurons, m in (([(0, 2, 7)], 2.0), (MXFP4_SAFE[:1], 0.3)):
        with pytest.raises(CircuitError, match="MXFP4"):
            apply_circuit(resolve(str(mxfp4_gpt_oss)), make_circuit(mxfp4_gpt_oss, neurons, m), tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_fraction_counts_every_expert(moe_models):
    """A fraction of 'all MLP neurons' counts the neurons of every expert (and of the dense layers), as the circuit
    summary and the card do."""
    shape = describe(resolve(str(moe_models["qwen3_moe"])))[1]
    assert shape.num_neurons == 48 + 2 * 4 * 16  # layer 0 dense (48), layers 1-2: 4 experts of 16
    circuit = make_circuit(moe_models["qwen3_moe"], [(1, 0, 1)])
    assert circuit.num_neurons == shape.num_neurons
    assert Selection(fraction=0.05).resolve_k(shape) == round(0.05 * 176)


def test_discover_with_a_fraction_counts_every_expert(moe_models):
    """`discover` on an MoE folder (torch) takes a fraction of every expert's neurons, not of the dense widths
    alone: the k it selects is the one the model's shape gives."""
    from cna_export.attribution.discover import DiscoveryPlan, discover_source
    from cna_export.backends import LoadOptions, open_backend

    source = resolve(str(moe_models["qwen2_moe"]))
    shape = describe(source)[1]
    selection = Selection(fraction=0.1, universal=False, skip_first_layers=0, skip_last_layers=0)
    backend = open_backend(source, LoadOptions(backend="torch"))
    circuit = discover_source(backend, DiscoveryPlan(selection, PROMPTS, PROMPTS[::-1], []))
    assert shape.moe is not None
    assert len(circuit.neurons) == selection.resolve_k(shape) == round(0.1 * shape.num_neurons)


def test_discover_ignores_another_familys_dense_layer_key(moe_models, tmp_path):
    """A Qwen2-MoE config.json that carries DeepSeek's `first_k_dense_replace` (issue 23, class 13): discover once
    hooked `mlp.down_proj` on layer 0's sparse block and died with an AttributeError; the key changes nothing."""
    import shutil

    from cna_export.attribution.discover import DiscoveryPlan, discover_source
    from cna_export.backends import LoadOptions, open_backend

    folder = shutil.copytree(moe_models["qwen2_moe"], tmp_path / "qwen2_moe")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "first_k_dense_replace": 1}))
    selection = Selection(top_k=12, universal=False, skip_first_layers=0, skip_last_layers=0)
    circuits = [
        discover_source(open_backend(resolve(str(where)), LoadOptions(backend="torch")),
                        DiscoveryPlan(selection, POS, NEG, []))
        for where in (moe_models["qwen2_moe"], folder)
    ]  # fmt: skip
    assert circuits[1].model.dense_layers == [] and describe(resolve(str(folder)))[1].moe.dense_layers == frozenset()
    assert [n.model_dump() for n in circuits[1].neurons] == [n.model_dump() for n in circuits[0].neurons]
