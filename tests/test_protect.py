"""The protect set and the sign filter in selection: score = |delta| - W |delta_protect| (clamped at 0), with
delta_protect = mean(protect) - mean(negative); a neuron that moves on both the positive and the protect prompts is
dropped at W > 0 and kept at W = 0; the sign filter keeps neurons whose positive-set activation has delta's sign.
Checked on constructed sums (exact) and on a tiny model against an unbatched reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, last_token_inputs
from transformers import AutoModelForCausalLM, AutoTokenizer

from cna_export.attribution.collect import SetStats
from cna_export.attribution.discover import plan_discovery
from cna_export.attribution.select import attribute_on, from_stats
from cna_export.backends.torch import TorchBackend
from cna_export.circuit.format import ModelIdentity, prompt_set
from cna_export.circuit.recipe import load_prompts, load_recipe
from cna_export.circuit.selection import Selection
from cna_export.errors import RecipeError
from cna_export.io.source import describe, identity, resolve

# Plain strings (a loaded prompt also carries where it came from), so they can be written into a recipe.
POS = [str(p) for p in load_prompts("builtin:refusal_harmful_discovery")[:8]]
NEG = [str(p) for p in load_prompts("builtin:refusal_benign_discovery")[:8]]
POOL = [str(p) for p in load_prompts("builtin:refusal_harmful_test")[:24]]  # candidates for a constructed protect set
NEUTRAL = [str(p) for p in load_prompts("builtin:neutral_diverse")[:8]]


def constructed(positive, negative, protect) -> tuple[list[SetStats], dict, ModelIdentity]:
    """Sums of one prompt each (so sums are means) over a 1-layer, 6-neuron model."""
    ident = ModelIdentity(source="made-up", model_type="llama", num_layers=1, intermediate_size=6, hidden_size=4)
    stats = [SetStats(torch.tensor([row], dtype=torch.float64), 1) for row in (positive, negative, protect)]
    names = {n: prompt_set([n]) for n in ("positive", "negative", "protect")}
    return stats, names, ident


def chosen(stats, names, ident, k: int, **knobs) -> set[int]:
    att = from_stats(stats, Selection(universal=False, **knobs), None, names, ident, dtype="float64",
                     chat_template=False)  # fmt: skip
    return {n.index for n in att.circuit(k).neurons}


def test_a_neuron_that_also_moves_the_protect_set_is_dropped():
    #           neuron:  0    1    2    3    4     5
    positive = [5.0, 4.0, 3.0, 1.0, 0.2, -0.5]
    negative = [0.0, 0.0, 0.0, 0.0, 0.0, -3.0]
    protect = [5.0, 0.0, 0.5, 0.0, 0.0, -3.0]  # neuron 0 reads the protect prompts like the positive ones
    case = constructed(positive, negative, protect)
    assert chosen(*case, k=2) == {0, 1} and chosen(*case, k=2, protect_weight=0.0) == {0, 1}
    assert chosen(*case, k=2, protect_weight=1.0) == {1, 2}  # 0 scores 5 - 5 = 0; 2 scores 3 - 0.5
    assert chosen(*case, k=2, protect_weight=0.1) == {0, 1}  # a light penalty: 5 - 0.5 still ranks first
    # past the neurons left with a positive score, the penalized neuron comes last
    assert chosen(*case, k=5, protect_weight=1.0) == {1, 2, 3, 4, 5}


def test_sign_filter_keeps_neurons_whose_positive_activation_has_deltas_sign():
    positive = [5.0, 4.0, 3.0, 1.0, 0.2, -0.5]
    negative = [0.0, 0.0, 0.0, 0.0, 0.0, -3.0]  # neuron 5: delta +2.5, but its positive-set activation is negative
    case = constructed(positive, negative, negative)
    assert chosen(*case, k=4) == {0, 1, 2, 5}
    assert chosen(*case, k=4, sign_filter=True) == {0, 1, 2, 3}
    # a negative delta whose positive activation is negative too is kept: amplifying it moves towards the behaviour
    flipped = constructed([-x for x in positive[:5]] + [3.0], [0.0] * 5 + [0.5], negative)
    assert 5 in chosen(*flipped, k=6, sign_filter=True) and 0 in chosen(*flipped, k=1, sign_filter=True)
    with pytest.raises(RecipeError, match="only 5 neurons remain"):
        chosen(*case, k=6, sign_filter=True)


def test_per_layer_budget_spreads_the_neurons():
    ident = ModelIdentity(source="made-up", model_type="llama", num_layers=2, intermediate_size=4, hidden_size=4)
    positive = torch.tensor([[9.0, 8.0, 7.0, 6.0], [5.0, 4.0, 3.0, 2.0]], dtype=torch.float64)
    stats = [SetStats(positive, 1), SetStats(torch.zeros_like(positive), 1)]
    names = {n: prompt_set([n]) for n in ("positive", "negative")}

    def places(k, share):
        att = from_stats(stats, Selection(universal=False, max_layer_share=share), None, names, ident,
                         dtype="float64", chat_template=False)  # fmt: skip
        return [(n.layer, n.index) for n in att.circuit(k).neurons]

    assert places(4, None) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert places(4, 0.5) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # at most 2 of 4 in a layer, in rank order
    assert places(3, 0.5) == [(0, 0), (0, 1), (1, 0)]  # ceil(1.5) = 2 per layer
    with pytest.raises(RecipeError, match="at most 1 per layer"):
        places(4, 0.25)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_model(tmp_path_factory.mktemp("protect") / "qwen2", "qwen2")
    source = resolve(str(folder))
    spec, shape, config = describe(source)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoTokenizer.from_pretrained(folder), spec, identity(source, config, shape)


def reference(model, tok, spec, prompts) -> torch.Tensor:
    """[prompts, layers, neurons] last-token down-projection inputs, one prompt at a time."""
    return torch.stack([torch.stack(layers) for layers in last_token_inputs(model, spec, tok, prompts)])


def test_protect_penalty_on_a_tiny_model_matches_the_reference(tiny):
    _, model, tok, spec, ident = tiny
    pos, neg = reference(model, tok, spec, POS).mean(0), reference(model, tok, spec, NEG).mean(0)
    delta = pos - neg
    top = int(delta.abs().flatten().argmax())
    width = delta.shape[1]
    layer, index = top // width, top % width
    # A protect set built to move the top neuron: the pool prompts that push it furthest along its delta.
    pool = reference(model, tok, spec, POOL)[:, layer, index] - neg[layer, index]
    order = (pool * delta[layer, index].sign()).argsort(descending=True)[:4]
    protect = [POOL[int(i)] for i in order]
    delta_protect = reference(model, tok, spec, protect).mean(0) - neg
    assert abs(delta_protect[layer, index]) >= abs(delta[layer, index]), "the construction must move the neuron"
    k = 12
    backend = TorchBackend.of_model(model, tok, spec, ident)
    for weight in (0.0, 1.0):
        settings = Selection(top_k=k, universal=False, protect_weight=weight)
        circuit_neurons = attribute_on(backend, POS, NEG, NEUTRAL, settings, protect=protect).circuit(k).neurons
        got = {(n.layer, n.index) for n in circuit_neurons}
        score = (delta.abs() - weight * delta_protect.abs()).clamp(min=0)
        assert int((score > 0).sum()) > k, "the top k must not be ties at zero"
        expected = {(int(i) // width, int(i) % width) for i in score.flatten().topk(k).indices}
        assert got == expected
        assert ((layer, index) in got) == (weight == 0.0)  # kept without the penalty, dropped with it


def test_reselect_equals_a_fresh_attribution(tiny):
    _, model, tok, spec, ident = tiny
    protect = POOL[:4]
    backend = TorchBackend.of_model(model, tok, spec, ident)
    full = attribute_on(backend, POS, NEG, NEUTRAL, Selection(universal=True), protect=protect)
    for knobs in ({"skip_first_layers": 1, "specificity": 0.5}, {"protect_weight": 0.7, "sign_filter": True},
                  {"skip_last_layers": 1, "universal": False, "protect_weight": 2.0}):  # fmt: skip
        settings = Selection(**knobs)
        fresh = attribute_on(backend, POS, NEG, NEUTRAL, settings, protect=protect)
        again = full.reselect(settings)
        assert torch.equal(again.excluded, fresh.excluded)
        kept = ~fresh.excluded  # a fresh pass with skip_last_layers never computes the skipped layers' sums
        torch.testing.assert_close(again.score[kept], fresh.score[kept], rtol=1e-4, atol=1e-6)  # batch order
        places = [[(n.layer, n.index) for n in a.circuit(10).neurons] for a in (again, fresh)]
        assert places[0] == places[1]


def test_recipe_and_plan_rules(tmp_path: Path):
    base = {"version": 1, "name": "r", "behaviour": "refusal", "multiplier": 2.0, "positive": POS, "negative": NEG}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**base, "protect_weight": 1.0}))
    with pytest.raises(RecipeError, match="protect_weight needs a protect prompt set"):
        load_recipe(path)
    path.write_text(yaml.safe_dump({**base, "protect": POOL[:3], "protect_weight": 1.0, "sign_filter": True}))
    plan = plan_discovery(*load_recipe(path))
    assert plan.protect == POOL[:3] and plan.selection.sign_filter and plan.selection.protect_weight == 1.0
    assert plan_discovery(*load_recipe(path), overrides={"protect_weight": 0.0}).protect == []  # not run at 0
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(RecipeError, match="needs protect prompts"):
        plan_discovery(*load_recipe(path), overrides={"protect_weight": 0.5})
    with pytest.raises(RecipeError, match="--protect-weight -1"):
        plan_discovery(*load_recipe(path), overrides={"protect_weight": -1.0})


def test_discover_flags_record_the_protect_set(tiny, tmp_path):
    import json

    import cna_export.cli.main as cli

    folder = tiny[0]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "name": "r", "behaviour": "refusal", "multiplier": 2.0,
                                    "positive": POS, "negative": NEG, "protect": POOL[:3]}))  # fmt: skip
    out = tmp_path / "c.json"
    assert cli.main(["discover", "--model", str(folder), "--recipe", str(path), "--top-k", "5", "--protect-weight",
                     "0.5", "--sign-filter", "-o", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert data["selection"]["protect_weight"] == 0.5 and data["selection"]["sign_filter"] is True
    assert data["prompts"]["protect"]["count"] == 3


def test_sweep_reports_the_validation_protect_set(tiny, tmp_path):
    """A sweep of a recipe with a protect set measures its validation protect prompts beside the positive ones:
    every point (and the original) has a protect rate, the records say `set: protect`, and the counts are kept."""
    from cna_export.backends import open_backend
    from cna_export.evaluate.measure import EvalConfig
    from cna_export.evaluate.options import SweepOptions
    from cna_export.evaluate.sweep import sweep_source

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "name": "r", "behaviour": "refusal", "multiplier": 0.0,
                                    "positive": POS, "negative": NEG, "protect": POOL[:3],
                                    "validation_positive": POOL[3:6], "validation_negative": NEUTRAL[:3],
                                    "validation_protect": POOL[6:8]}))  # fmt: skip
    recipe, base = load_recipe(path)
    cfg = EvalConfig(max_new_tokens=3, batch_size=4, kl_tokens=2)
    results, records, _, _ = sweep_source(open_backend(resolve(str(tiny[0]))), recipe, base, cfg,
                                          SweepOptions(ks=[5], multipliers=[0.0]))  # fmt: skip
    assert results["heldout"]["positive"] == 3 and results["heldout"]["protect"] == 2
    for point in [results["baseline"], *results["points"]]:
        assert point["n_positive"] == 3 and point["n_protect"] == 2 and 0 <= point["protect_rate"] <= 1
    protect = [r["prompt"] for r in records if r["set"] == "protect" and r["label"] == "original"]
    assert sorted(protect) == sorted(POOL[6:8])
