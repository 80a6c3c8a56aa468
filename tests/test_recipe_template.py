"""`cna-export new-recipe`: a commented template that validates as written, and recipe errors that name the key
and show an example line (issue 24, item 5)."""

from __future__ import annotations

import pytest
import yaml
from conftest import run_cli

from cna_export.circuit.recipe import Recipe, load_prompts, load_recipe
from cna_export.circuit.template import REFUSAL_SETTINGS, recipe_template
from cna_export.errors import RecipeError


def test_new_recipe_writes_a_template_that_validates(tmp_path):
    proc = run_cli("new-recipe", "pirate-speak", cwd=tmp_path)
    path = tmp_path / "pirate-speak.yaml"
    assert f"wrote {path.name}" in proc.stdout and "cna-export run" in proc.stdout
    text = path.read_text()
    assert text.count("#") >= 20  # every setting is explained
    recipe, base = load_recipe(path)
    assert recipe.name == "pirate-speak" and recipe.behaviour == "pirate-speak"
    assert recipe.skip_last_layers == 2 and recipe.skip_first_layers == 2 and recipe.specificity == 1.0
    assert recipe.fraction == 0.002 and recipe.universal.enabled and recipe.universal.threshold == 0.8
    assert recipe.settings_chosen_on == "validation"
    for ref in (recipe.positive, recipe.negative, recipe.validation_positive, recipe.validation_negative,
                recipe.heldout_positive, recipe.heldout_negative, recipe.universal.prompts):  # fmt: skip
        assert load_prompts(ref, base)
    # never over an existing file without --overwrite
    again = run_cli("new-recipe", "pirate-speak", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr and path.read_text() == text
    assert run_cli("new-recipe", "pirate-speak", "--overwrite", cwd=tmp_path).returncode == 0


def test_template_settings_are_the_refusal_recipes():
    """The template says it carries what worked for refusal: keep it equal to recipes/refusal-ablate.yaml."""
    refusal, _ = load_recipe("refusal-ablate")
    assert REFUSAL_SETTINGS == {"fraction": refusal.fraction, "skip_first_layers": refusal.skip_first_layers,
                                "skip_last_layers": refusal.skip_last_layers, "specificity": refusal.specificity,
                                "universal_threshold": refusal.universal.threshold}  # fmt: skip
    Recipe.model_validate(yaml.safe_load(recipe_template("x")))


def test_bad_recipe_name_is_one_line(tmp_path):
    proc = run_cli("new-recipe", "../Bad Name", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "short identifier" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def _drop(text: str, key: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith(f"{key}:"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: _drop(t, "multiplier"), "is missing the key multiplier. Fix: add a line such as `multiplier: 0.0`"),
        (lambda t: _drop(t, "version"), "is missing the key version. Fix: add a line such as `version: 1`"),
        (
            lambda t: t.replace("fraction:", "fracton:"),
            "is invalid at fracton: Extra inputs are not permitted. Fix: rename it to fraction",
        ),
        (
            lambda t: t.replace("skip_last_layers: 2", "skip_last_layers: two"),
            "is invalid at skip_last_layers: Input should be a valid integer. Fix: write it like `skip_last_layers: 2`",
        ),
        (
            lambda t: t.replace("threshold: 0.8", "threshold: high"),
            "is invalid at universal.threshold: Input should be a valid number. Fix: write it like `threshold: 0.8` "
            "under `universal:`",
        ),
    ],
)
def test_recipe_errors_name_the_key_and_show_an_example(tmp_path, edit, message):
    path = tmp_path / "r.yaml"
    path.write_text(edit(recipe_template("mine")))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1
