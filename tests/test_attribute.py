"""Attribution: batching, padding and order do not change the result; exclusions and k behave."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import last_token_inputs
from transformers import AutoModelForCausalLM, AutoTokenizer

from cna_export.arch import ModelShape, arch_for
from cna_export.attribution.collect import collect, encode_prompts
from cna_export.attribution.discover import discover_on
from cna_export.attribution.select import attribute_on, select
from cna_export.backends.torch import TorchBackend
from cna_export.circuit.recipe import load_prompts
from cna_export.circuit.selection import Selection
from cna_export.errors import RecipeError
from cna_export.io.source import describe, identity, resolve

POS = load_prompts("builtin:refusal_harmful_discovery")[:12]
NEG = load_prompts("builtin:refusal_benign_discovery")[:12]
NEUTRAL = load_prompts("builtin:neutral_diverse")[:16]


def setup(model_dir):
    source = resolve(str(model_dir))
    spec, shape, config = describe(source)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), spec, identity(source, config, shape)


def reference_activations(model, tokenizer, spec, prompts, magnitude=False):
    """Unbatched, full forward, one prompt at a time: the reference implementation's way (mean of |act| with
    `magnitude`)."""
    rows = torch.stack([torch.stack(layers) for layers in last_token_inputs(model, spec, tokenizer, prompts)])
    return (rows.abs() if magnitude else rows).mean(0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3_text"])
def test_batched_equals_unbatched(tiny_models, arch):
    model, tok, spec, _ = setup(tiny_models[arch])
    enc = encode_prompts(tok, POS)
    assert len({len(e) for e in enc}) > 3, "prompts should differ in length so padding is exercised"
    ref = reference_activations(model, tok, spec, POS)
    for batch in (1, 5, 12):
        stats = collect(model, spec, enc, batch, tok.pad_token_id)
        torch.testing.assert_close(stats.mean, ref, rtol=1e-4, atol=1e-5)


def test_discover_independent_of_order_and_batch(tiny_models):
    model, tok, spec, ident = setup(tiny_models["llama"])
    base = discover_on(
        TorchBackend.of_model(model, tok, spec, ident), POS, NEG, NEUTRAL, Selection(top_k=20, batch_size=1)
    )
    rng = random.Random(0)
    pos, neg = POS[:], NEG[:]
    rng.shuffle(pos)
    rng.shuffle(neg)
    other = discover_on(
        TorchBackend.of_model(model, tok, spec, ident), pos, neg, NEUTRAL, Selection(top_k=20, batch_size=7)
    )
    assert [(n.layer, n.index) for n in base.neurons] == [(n.layer, n.index) for n in other.neurons]
    for a, b in zip(base.neurons, other.neurons):
        assert a.delta == pytest.approx(b.delta, rel=1e-4, abs=1e-6)


def test_selection_is_top_abs_delta_with_exclusions(tiny_models):
    model, tok, spec, ident = setup(tiny_models["qwen3"])
    ref = reference_activations(model, tok, spec, POS) - reference_activations(model, tok, spec, NEG)
    settings = Selection(top_k=15, skip_first_layers=1, universal=True, universal_top_n=8, universal_threshold=0.5)
    circuit = discover_on(TorchBackend.of_model(model, tok, spec, ident), POS, NEG, NEUTRAL, settings)
    assert all(n.layer >= 1 for n in circuit.neurons)
    excluded = set(map(tuple, circuit.selection.universal_excluded))
    assert excluded, "with a low threshold some neurons should be universal"
    assert not excluded & {(n.layer, n.index) for n in circuit.neurons}
    score = ref.abs().clone()
    score[:1] = -1
    for layer, index in excluded:
        score[layer, index] = -1
    expected = {(int(i) // score.shape[1], int(i) % score.shape[1]) for i in score.flatten().topk(15).indices}
    assert {(n.layer, n.index) for n in circuit.neurons} == expected
    for n in circuit.neurons:
        assert n.delta == pytest.approx(float(ref[n.layer, n.index]), rel=1e-4, abs=1e-6)
    # recorded in the circuit
    assert circuit.selection.skip_first_layers == 1 and circuit.selection.universal_top_n == 8
    assert circuit.prompts["positive"].count == len(POS) and "neutral" in circuit.prompts


def test_specificity_ranks_by_delta_minus_neutral_activity(tiny_models):
    """specificity S ranks by max(0, |delta| - S mean |neutral activation|), as the unbatched reference says; the
    neutral prompts run even with the universal filter off, and the setting is recorded in the circuit."""
    model, tok, spec, ident = setup(tiny_models["llama"])
    delta = reference_activations(model, tok, spec, POS) - reference_activations(model, tok, spec, NEG)
    neutral = reference_activations(model, tok, spec, NEUTRAL, magnitude=True)
    settings = Selection(top_k=12, universal=False, specificity=0.3)
    circuit = discover_on(TorchBackend.of_model(model, tok, spec, ident), POS, NEG, NEUTRAL, settings)
    score = (delta.abs() - 0.3 * neutral).clamp(min=0)
    assert (score > 0).sum() > 12, "the top 12 must not be ties at zero"
    expected = {(int(i) // score.shape[1], int(i) % score.shape[1]) for i in score.flatten().topk(12).indices}
    assert {(n.layer, n.index) for n in circuit.neurons} == expected
    plain = discover_on(
        TorchBackend.of_model(model, tok, spec, ident), POS, NEG, NEUTRAL, Selection(top_k=12, universal=False)
    )
    assert {(n.layer, n.index) for n in plain.neurons} != expected, "the penalty should change the selection"
    for n in circuit.neurons:  # neurons keep their true delta
        assert n.delta == pytest.approx(float(delta[n.layer, n.index]), rel=1e-4, abs=1e-6)
    assert circuit.selection.specificity == 0.3 and plain.selection.specificity == 0
    assert "neutral" in circuit.prompts and circuit.selection.universal_excluded == []
    assert circuit.selection.universal_top_n is None
    # past the neurons the penalty leaves positive, the rest come by |delta| (not by position)
    att = attribute_on(TorchBackend.of_model(model, tok, spec, ident), POS, NEG, NEUTRAL, settings)
    positive = att.score > 0
    n = int(positive.sum())
    assert 12 < n < positive.numel()
    chosen = {(x.layer, x.index) for x in att.circuit(n + 5).neurons}
    rest = att.delta.abs().masked_fill(positive, -1).flatten().topk(5).indices
    expected_rest = {(int(i) // positive.shape[1], int(i) % positive.shape[1]) for i in rest}
    assert chosen == {tuple(map(int, ij)) for ij in positive.nonzero().tolist()} | expected_rest


def test_universal_neurons_are_the_always_on_ones(tiny_models):
    model, tok, spec, _ = setup(tiny_models["mistral"])
    # make one neuron fire hugely on every prompt: scale its up_proj row and gate row
    layer, index = 1, 17
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.up_proj.weight[index] *= 50
        mlp.gate_proj.weight[index] = mlp.gate_proj.weight[index].abs() * 50
    stats = collect(model, spec, encode_prompts(tok, NEUTRAL), 8, tok.pad_token_id, top_n=2)
    from cna_export.attribution.select import universal_mask

    mask = universal_mask(stats, 0.8)
    assert mask[layer, index]
    assert int(mask.sum()) < 10


def test_k_from_fraction_and_bounds():
    shape = ModelShape(num_layers=10, intermediate_size=1000, hidden_size=64)
    assert Selection(fraction=0.001).resolve_k(shape) == 10
    assert Selection(top_k=7).resolve_k(shape) == 7
    with pytest.raises(RecipeError, match="outside"):
        Selection(top_k=10_001).resolve_k(shape)


def test_select_breaks_ties_by_position():
    delta = torch.tensor([[1.0, -2.0, 2.0], [0.5, 2.0, 0.1]], dtype=torch.float64)
    excluded = torch.zeros_like(delta, dtype=torch.bool)
    assert select(delta, 3, excluded) == [(0, 1), (0, 2), (1, 1)]
    excluded[0, 1] = True
    assert select(delta, 2, excluded) == [(0, 2), (1, 1)]
    with pytest.raises(RecipeError, match="remain"):
        select(delta, 6, excluded)


def test_chat_template_used_only_when_present(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    templated = encode_prompts(tok, ["hello"])[0]
    assert tok.decode(templated).startswith("<|im_start|>user\nhello")
    raw = encode_prompts(tok, ["hello"], chat_template=False)[0]
    assert tok.decode(raw) == "hello"
    tok.chat_template = None
    assert encode_prompts(tok, ["hello"]) == [raw]
    with pytest.raises(RecipeError, match="empty"):
        encode_prompts(tok, [])


def test_stops_before_lm_head(tiny_models):
    model, tok, spec, _ = setup(tiny_models["gemma"])
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        collect(model, spec, encode_prompts(tok, POS[:3]), 3, tok.pad_token_id)
    finally:
        handle.remove()
    assert calls == []
    assert arch_for("gemma").activation == "gelu_tanh"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_sets_run_together_give_each_its_own_sums(tiny_models, arch):
    """collect_sets over several sets == one collect per set: sums, top-n counts and |act| sums, whatever the
    batch mix; a set without the chat template shares no prefix with the others and still comes out right."""
    from cna_export.attribution.collect import collect_sets

    model, tok, spec, _ = setup(tiny_models[arch])
    sets = [encode_prompts(tok, POS[:7]), encode_prompts(tok, NEG[:5]), encode_prompts(tok, NEUTRAL[:6])]
    for plain in (False, True):
        if plain:
            sets[2] = encode_prompts(tok, NEUTRAL[:6], chat_template=False)
        together = collect_sets(model, spec, sets, 4, tok.pad_token_id, top_n=3)
        for enc, got in zip(sets, together):
            alone = collect(model, spec, enc, 4, tok.pad_token_id, top_n=3)
            assert got.count == alone.count == len(enc)
            torch.testing.assert_close(got.sums, alone.sums, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.abs_sums, alone.abs_sums, rtol=1e-4, atol=1e-5)
            assert torch.equal(got.top_counts, alone.top_counts)
            assert int(got.top_counts[0].sum()) == 3 * len(enc)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_shared_prefix_cache_gives_same_sums(tiny_models, arch):
    from cna_export.attribution.collect import common_prefix

    model, tok, spec, _ = setup(tiny_models[arch])
    prompts = [f"You are a helpful assistant. Please answer briefly. {p}" for p in POS[:8]]
    enc = encode_prompts(tok, prompts)
    assert common_prefix(enc) >= 8
    shared = collect(model, spec, enc, 3, tok.pad_token_id, top_n=4)
    plain = collect(model, spec, enc, 3, tok.pad_token_id, top_n=4, share_prefix=False)
    torch.testing.assert_close(shared.sums, plain.sums, rtol=1e-4, atol=1e-5)
    assert torch.equal(shared.top_counts, plain.top_counts)


def test_skip_last_layers_option(tiny_models):
    """Optional exclusion of the last layers (default off = the paper's selection): top |delta| of the rest."""
    model, tok, spec, ident = setup(tiny_models["llama"])
    n_layers = ident.num_layers
    plain = discover_on(
        TorchBackend.of_model(model, tok, spec, ident), POS, NEG, NEUTRAL, Selection(top_k=20, universal=False)
    )
    assert plain.selection.skip_last_layers == 0
    assert any(n.layer == n_layers - 1 for n in plain.neurons), "the tiny model's last layer should be selected"
    settings = Selection(top_k=20, universal=False, skip_first_layers=1, skip_last_layers=1)
    cut = discover_on(TorchBackend.of_model(model, tok, spec, ident), POS, NEG, NEUTRAL, settings)
    assert all(1 <= n.layer < n_layers - 1 for n in cut.neurons)
    assert cut.selection.skip_last_layers == 1
    # the same ranking as the plain selection, restricted to the allowed layers
    backend = TorchBackend.of_model(model, tok, spec, ident)
    allowed = [n for n in discover_on(backend, POS, NEG, NEUTRAL, Selection(top_k=200, universal=False)).neurons
               if 1 <= n.layer < n_layers - 1][:20]  # fmt: skip
    assert [(n.layer, n.index) for n in cut.neurons] == [(n.layer, n.index) for n in allowed]
    # more than there is room for: refused, never quietly narrowed (issue 23)
    with pytest.raises(RecipeError, match="leaves none of this model's"):
        discover_on(backend, POS, NEG, NEUTRAL, Selection(top_k=5, skip_first_layers=1, skip_last_layers=n_layers))
    with pytest.raises(RecipeError, match="leaves none of this model's"):
        discover_on(backend, POS, NEG, NEUTRAL, Selection(top_k=5, skip_first_layers=n_layers))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_forward_stops_at_the_last_selectable_layer(tiny_models, arch):
    """With the last layers skipped they are never computed; the earlier layers' sums are unchanged (with and
    without the shared-prefix cache, whose later layers then stay empty)."""
    model, tok, spec, _ = setup(tiny_models[arch])
    layers = model.get_submodule(spec.layers_module)
    last = len(layers) - 2
    enc = encode_prompts(tok, [f"You are a helpful assistant. Please answer briefly. {p}" for p in POS[:6]])
    full = collect(model, spec, enc, 4, tok.pad_token_id, top_n=3)
    calls = []
    handle = layers[last + 1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for share in (True, False):
            cut = collect(model, spec, enc, 4, tok.pad_token_id, top_n=3, share_prefix=share, last_layer=last)
            torch.testing.assert_close(cut.sums[: last + 1], full.sums[: last + 1], rtol=1e-4, atol=1e-5)
            assert torch.equal(cut.top_counts[: last + 1], full.top_counts[: last + 1])
            assert not cut.sums[last + 1 :].any()
    finally:
        handle.remove()
    assert calls == [], "a layer after the last selectable one ran"
