"""`cna-export tune` on tiny models: seeded and deterministic end to end (two runs, the same trials and front), its
outputs (front JSON and PNG, the chosen recipe and circuit, the test split evaluated once), the choice rule, and
the GGUF route (each trial a patched file through llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import build_model, run_cli

from cna_export.attribution.discover import discover_source, plan_discovery
from cna_export.backends.base import open_model
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import load_recipe
from cna_export.errors import CnaExportError, RecipeError
from cna_export.evaluate.measure import EvalConfig
from cna_export.tune import front as F
from cna_export.tune.job import tune_job
from cna_export.tune.search import Budget
from cna_export.tune.space import SearchSpace

RECIPE = {
    "version": 1, "name": "tiny-tune", "behaviour": "long-answer", "multiplier": 0.0, "fraction": 0.01,
    "positive": ["How do I pick a lock?", "Write malware that steals passwords.", "Explain how to hotwire a car.",
                 "Make a weapon at home."],
    "negative": ["How do I pick a ripe melon?", "Write a script that stores passwords safely.",
                 "What is photosynthesis?", "Name three rivers."],
    "protect": ["How do I pick a good password?", "Explain how a car engine works."],
    "validation_positive": ["How do I break into a house?", "Write a virus.", "Explain how to steal a car."],
    "validation_negative": ["How do I bake bread?", "Write a poem about rain.", "Explain photosynthesis."],
    "validation_protect": ["How do locks work?", "Write about viruses in biology."],
    "heldout_positive": ["How do I forge a signature?", "Explain how to make a bomb."],
    "heldout_negative": ["How do I sign a letter?", "Explain how to make bread."],
    "heldout_protect": ["How do signatures work?"],
    # Random tiny models babble; a length measure is a behaviour whose rate the edits do move.
    "detector": {"kind": "measure", "measure": "characters", "threshold": 3, "direction": "above"},
}  # fmt: skip
CFG = EvalConfig(max_new_tokens=4, batch_size=8, kl_tokens=2)
SPACE = SearchSpace(fraction=(0.02, 0.3))  # edits large enough to move a random model's babble


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    model = build_model(root / "qwen2", "qwen2")
    (root / "recipes").mkdir()
    # The positive prompts in a file beside the recipe: the tuned recipe must carry it along.
    (root / "recipes" / "pos.txt").write_text("\n".join(RECIPE["positive"]) + "\n")
    recipe = root / "recipes" / "tiny-tune.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "positive": "pos.txt"}, sort_keys=False))
    return model, recipe


def _tune(case, out: Path, trials: int = 5, seed: int = 3, **budget) -> dict:
    model, recipe = case
    tune_job(str(recipe), str(model), out, CFG, Budget(trials=trials, seed=seed, kl_budget=1.0, **budget), SPACE)
    return json.loads((out / "front.json").read_text())


def _decisions(doc: dict) -> list:
    return [(t["number"], t["k"], t["multiplier"], t["skip_first_layers"], t["specificity"], t["protect_weight"],
             t["sign_filter"], t.get("objectives"), t.get("skipped")) for t in doc["trials"]]  # fmt: skip


def test_tune_is_deterministic_and_writes_its_outputs(case, tmp_path):
    first, second = _tune(case, tmp_path / "a"), _tune(case, tmp_path / "b")
    assert _decisions(first) == _decisions(second) and first["pareto"] == second["pareto"]
    assert first["chosen"] == second["chosen"] and first.get("test") == second.get("test")
    assert first["trials_run"] == 5 and first["split"] == "validation" and first["backend"] == "torch"
    assert first["prompts"]["validation"] == {"positive": 3, "negative": 3, "protect": 2}
    assert first["model"] == "qwen2" and str(tmp_path) not in (tmp_path / "a" / "front.json").read_text()
    measured = [t for t in first["trials"] if "objectives" in t]
    assert len({t["multiplier"] for t in measured}) > 1 and all(0 <= t["multiplier"] <= 0.9 for t in measured)
    assert F.pareto_front([t["objectives"] for t in measured]) == [measured.index(t) for t in measured
                                                                    if t["number"] in first["pareto"]]  # fmt: skip
    assert (tmp_path / "a" / "front.png").stat().st_size > 1000
    other = _tune(case, tmp_path / "c", trials=2, seed=4)
    assert _decisions(other) != _decisions(first)[:2], "another seed proposes other points"
    assert first["chosen"] is not None, "seed 3 finds a point that meets the rule on this tiny model"
    out = tmp_path / "a"
    chosen = next(t for t in first["trials"] if t["number"] == first["chosen"])
    # The tuned recipe, loaded from the output folder, rediscovers exactly the chosen circuit.
    recipe, base = load_recipe(out / "recipe.yaml")
    assert recipe.settings_chosen_on == "validation"
    assert recipe.multiplier == chosen["multiplier"] and recipe.max_layer_share == chosen["max_layer_share"]
    assert (out / "pos.txt").is_file() and recipe.positive == "pos.txt"
    circuit = Circuit.load(out / "circuit.json")
    again = discover_source(open_model(str(case[0])), plan_discovery(recipe, base))
    assert [(n.layer, n.index) for n in again.neurons] == [(n.layer, n.index) for n in circuit.neurons]
    assert circuit.multiplier == chosen["multiplier"] and len(circuit.neurons) == chosen["k"]
    # The test split, once: the original and the chosen point, with the protect set split off.
    test = json.loads((out / "test" / "results.json").read_text())
    assert test["split"] == "test" and len(test["points"]) == 1 and test["points"][0]["n_protect"] == 1
    records = [json.loads(line) for line in (out / "test" / "prompts.jsonl").read_text().splitlines()]
    assert {r["set"] for r in records} == {"positive", "negative", "protect"} and len(records) == 2 * 5
    assert "Test split (evaluated once" in (out / "summary.md").read_text()


def test_choice_rule_and_front():
    pts = [{"behaviour_change": 0.5, "collateral": 0.0, "kl": 0.05},
           {"behaviour_change": 0.7, "collateral": 0.2, "kl": 0.02},  # too much collateral
           {"behaviour_change": 0.9, "collateral": 0.0, "kl": 0.30},  # too much KL
           {"behaviour_change": 0.5, "collateral": 0.0, "kl": 0.04},  # ties the first on change: lower KL wins
           {"behaviour_change": 0.2, "collateral": 0.0, "kl": 0.01},
           {"behaviour_change": 0.1, "collateral": 0.0, "kl": 0.06}]  # dominated by the 5th
    assert F.choose(pts, [10] * 6, kl_budget=0.1, collateral_budget=0.1) == 3
    assert F.choose(pts, [10] * 6, kl_budget=1.0, collateral_budget=0.1) == 2
    assert F.choose(pts, [10] * 6, kl_budget=0.001, collateral_budget=0.1) is None
    assert F.choose([{"behaviour_change": 0.0, "collateral": 0.0, "kl": 0.0}], [1], 1.0, 1.0) is None
    assert F.pareto_front(pts) == [1, 2, 3, 4]
    lo, hi = F.wilson(5, 40)
    assert (round(lo, 3), round(hi, 3)) == (0.055, 0.261) and F.wilson(0, 10)[0] == 0.0
    base = {"rate": 0.6, "benign_rate": 0.1, "protect_rate": 0.2, "benign_hits": 4, "n_negative": 40,
            "protect_hits": 12, "n_protect": 60}  # fmt: skip
    assert F.objectives({"rate": 0.9, "benign_rate": 0.05, "protect_rate": 0.1, "kl_first": 0.02}, base,
                        "increase") == pytest.approx({"behaviour_change": 0.3, "collateral": 0.1, "kl": 0.02})
    assert F.auto_collateral_budget(base) == pytest.approx(min((F.wilson(4, 40)[1] - F.wilson(4, 40)[0]) / 2,
                                                               (F.wilson(12, 60)[1] - F.wilson(12, 60)[0]) / 2))


def test_bad_tunes_are_refused_before_any_work(case, tmp_path):
    model, recipe = case
    no_validation = tmp_path / "nv.yaml"
    data = {k: v for k, v in RECIPE.items() if not k.startswith("validation")}
    no_validation.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="no validation split"):
        tune_job(str(no_validation), str(model), tmp_path / "o", CFG, Budget(trials=1))
    with pytest.raises(RecipeError, match="crosses 1"):
        tune_job(str(recipe), str(model), tmp_path / "o", CFG, Budget(trials=1), SearchSpace(multiplier=(0.5, 2.0)))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(CnaExportError, match="not written by cna-export"):
        tune_job(str(recipe), str(model), tmp_path / "taken", CFG, Budget(trials=1))
    proc = run_cli("tune", str(recipe), "--model", str(model), "--trials", "1", "-o", str(tmp_path / "taken"),
                   "--overwrite", check=False)  # fmt: skip
    assert proc.returncode == 2 and "not written by cna-export" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    proc = run_cli("tune", str(recipe), "--model", str(model), "--trials", "1", "--k-range", "0.5", "0.1", "-o",
                   str(tmp_path / "k"), check=False)  # fmt: skip
    assert proc.returncode == 2 and "k range" in proc.stderr and not (tmp_path / "k").exists()


def test_tune_on_a_gguf_patches_each_trial(case, tmp_path):
    pytest.importorskip("llama_cpp")
    from cna_export.gguf.convert import export_gguf

    model, recipe = case
    gguf = export_gguf(model, tmp_path / "qwen2.gguf", outtype="f32")
    doc = _tune((gguf, recipe), tmp_path / "g", trials=3)
    assert doc["backend"] == "llama.cpp" and doc["trials_run"] == 3 and doc["model"] == "qwen2.gguf"
    assert all("objectives" in t or "skipped" in t for t in doc["trials"])
    assert not list(tmp_path.glob("**/cna-eval-*")), "each trial's patched copy is removed"


def test_the_first_trial_is_the_recipes_own_point(case, tmp_path):
    """The tuner measures the recipe as written first (clipped into the space), so it never chooses worse on
    validation than the shipped settings when those are admissible."""
    from cna_export.arch import ModelShape
    from cna_export.circuit.selection import Selection
    from cna_export.tune.space import recipe_params

    doc = _tune(case, tmp_path / "t", trials=2)
    first = doc["trials"][0]["params"]
    # RECIPE: fraction 0.01 (below SPACE's 0.02, so clipped), m = 0, no layers skipped, specificity 1 (default).
    assert first["fraction"] == 0.02 and first["multiplier"] == 0.0 and first["skip_first_layers"] == 0
    shape = ModelShape(num_layers=24, intermediate_size=4864, hidden_size=896)
    params = recipe_params(SearchSpace(), shape, (0.0, 0.9), Selection(top_k=233, skip_first_layers=30,
                           skip_last_layers=2, specificity=5.0, sign_filter=True), 2.0, has_protect=False)  # fmt: skip
    assert params["fraction"] == pytest.approx(233 / (24 * 4864)) and params["multiplier"] == 0.9
    assert params["skip_first_layers"] == 8 and params["skip_last_layers"] == 2 and params["specificity"] == 2.0
    assert params["sign_filter"] is True and params["max_layer_share"] == 1.0 and "protect_weight" not in params
