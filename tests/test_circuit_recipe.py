"""Circuit file round trip and validation; every recipe in recipes/ loads; architecture table errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, make_circuit

from cna_export.arch import ARCHITECTURES, ModelShape, arch_for
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import builtin_sets, load_prompts, load_recipe
from cna_export.errors import ArchitectureError, CircuitError, RecipeError

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_circuit_round_trip(tiny_models, tmp_path):
    circuit = make_circuit(tiny_models["llama"], [(0, 3), (2, 9)], 0.5)
    circuit.save(tmp_path / "c.json")
    loaded = Circuit.load(tmp_path / "c.json")
    assert loaded == circuit and loaded.sha256() == circuit.sha256()
    assert json.loads((tmp_path / "c.json").read_text())["format"] == "cna-circuit"
    idx, mult = loaded.edits()[2]
    assert idx.tolist() == [9] and mult.tolist() == [0.5]
    assert loaded.edits(multiplier=3.0)[0][1].tolist() == [3.0]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["neurons"].append(d["neurons"][0]), "listed twice"),
        (lambda d: d["neurons"][0].update(layer=99), "outside"),
        (lambda d: d["neurons"][0].update(index=-1), "neurons.0.index"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.pop("model"), "model"),
        (lambda d: d.update(format="other"), "not a cna-export circuit"),
    ],
)
def test_circuit_validation(tiny_models, tmp_path, mutate, message):
    data = json.loads(make_circuit(tiny_models["llama"], [(0, 3), (2, 9)]).to_json())
    mutate(data)
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(CircuitError, match=message):
        Circuit.load(tmp_path / "c.json")


def test_circuit_fit_checks(tiny_models):
    circuit = make_circuit(tiny_models["llama"], [(0, 3)])
    circuit.model.weights_sha256 = "a" * 64
    shape = ModelShape(3, 128, 64)
    circuit.check_fits("llama", shape, "a" * 64)
    with pytest.raises(CircuitError, match="qwen2"):
        circuit.check_fits("qwen2", shape)
    with pytest.raises(CircuitError, match="4 x 128"):
        circuit.check_fits("llama", ModelShape(4, 128, 64))
    with pytest.raises(CircuitError, match="--force"):
        circuit.check_fits("llama", shape, "b" * 64)
    circuit.check_fits("llama", shape, "b" * 64, force=True)
    with pytest.raises(CircuitError, match="negative"):
        circuit.edits(multiplier=-1.0)
    assert circuit.edits(multiplier=-1.0, allow_negative=True)[0][1].tolist() == [-1.0]
    with pytest.raises(CircuitError, match="finite"):
        circuit.edits(multiplier=float("nan"))


def test_unknown_architecture_lists_supported():
    with pytest.raises(ArchitectureError) as err:
        arch_for("gpt2")
    assert "gpt2" in str(err.value) and all(t in str(err.value) for t in ARCHITECTURES)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads(path: Path):
    recipe, base = load_recipe(path)
    assert recipe.name == path.stem
    pos, neg = load_prompts(recipe.positive, base), load_prompts(recipe.negative, base)
    assert len(pos) >= 32 and len(neg) >= 32
    assert not set(pos) & set(neg)
    for ref in (recipe.heldout_positive, recipe.heldout_negative):
        if ref is not None:
            assert not set(load_prompts(ref, base)) & set(pos), "held-out prompts must not be discovery prompts"
    assert recipe.selection().batch_size == recipe.batch_size
    # Its detector, system prompt and protect set resolve, and no split of the protect set leaks into another.
    from cna_export.attribution.discover import plan_discovery
    from cna_export.evaluate.declared import behaviour_of
    from cna_export.evaluate.detectors import detector_for
    from cna_export.evaluate.protect import protect_prompts

    assert callable(detector_for(behaviour_of(recipe, base)))
    plan = plan_discovery(recipe, base)
    assert (plan.selection.system_prompt is None) == (recipe.system_prompt is None)
    if recipe.protect is not None:
        discovery = set(load_prompts(recipe.protect, base))
        validation, test = (set(protect_prompts(recipe, base, s)) for s in ("validation", "test"))
        assert validation and test and not (discovery & validation or discovery & test or validation & test)
    if recipe.validation_positive is not None:  # choosing happens on validation, so it must not be the test split
        validation = set(load_prompts(recipe.validation_positive, base))
        assert not validation & set(load_prompts(recipe.heldout_positive, base))


def test_recipes_cover_required_behaviours():
    recipes = {p.stem: load_recipe(p)[0] for p in RECIPES}
    assert recipes["refusal-ablate"].multiplier == 0
    assert recipes["refusal-strengthen"].multiplier > 1
    assert any(r.behaviour != "refusal" for r in recipes.values())
    assert len(builtin_sets()) >= 5


@pytest.mark.parametrize(
    "text, message",
    [
        ("version: 1\nname: x\n", "missing the key behaviour. Fix: add a line such as `behaviour: "),
        ("version: 1\nname: x\nbehaviour: b\npositive: [a]\nnegative: [b]\nmultiplier: 0\nbogus: 1\n", "bogus"),
        ("version: 1\nname: x\nbehaviour: b\npositive: [a]\nnegative: [b]\nmultiplier: zero\n", "multiplier"),
        ("version: 1\nname: x\nbehaviour: b\npositive: [a]\nnegative: [b]\nmultiplier: -1\n", "negative"),
        (
            "version: 1\nname: x\nbehaviour: b\npositive: [a]\nnegative: [b]\nmultiplier: 0\ntop_k: 3\nfraction: 0.1\n",
            "not both",
        ),
        ("version: [\n", "YAML"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_prompts("p.txt", tmp_path) == ["one", "two"]
    assert load_prompts("p.jsonl", tmp_path) == ["a", "b"]
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(RecipeError, match="empty"):
        load_prompts("e.txt", tmp_path)
    with pytest.raises(RecipeError, match="built-in"):
        load_prompts("builtin:nope")
