"""Recipes: a behaviour's discovery prompts, held-out prompts and edit settings in one YAML file.

Held-out prompts come in two splits. The validation split (`validation_positive` / `validation_negative`) is
what `sweep` and every automatic choice of k, m, specificity or layer exclusions looks at; the test split
(`heldout_positive` / `heldout_negative`, the names older recipes already use) only gives reported numbers, so no
setting is ever chosen on the prompts it is reported on.

YAML -> `yaml.safe_load` -> pydantic (`extra="forbid"`). Prompt sets are inline lists, `builtin:NAME` (a set
shipped in `cna_export/data/prompts/`), or a path relative to the recipe (.yaml with a `prompts` list, .txt with
one prompt a line, .json list, or .jsonl with a `prompt` field).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from cna_export.circuit.selection import Knobs, Selection, Strict
from cna_export.errors import RecipeError

PromptRef = list[str] | str


def recipes_dir() -> Path:
    """The built-in recipes: `cna_export/recipes` in an installed wheel (setuptools maps the repository's
    top-level `recipes/` there), or that top-level folder in a source checkout."""
    here = Path(__file__).resolve()
    installed = here.parents[1] / "recipes"
    return installed if installed.is_dir() else here.parents[2] / "recipes"


class Universal(Strict):
    enabled: bool = Field(default=True, description=Selection.model_fields["universal"].description)
    top_n: int | None = Field(default=None, ge=1, description=Selection.model_fields["universal_top_n"].description)
    threshold: float = Field(default=0.8, gt=0, le=1, description=Selection.model_fields["universal_threshold"].description)
    prompts: PromptRef = Field(default="builtin:neutral_diverse", description="Diverse neutral prompts.")


class Recipe(Knobs):
    """A behaviour's prompt sets and edit settings; the selection knobs are `Selection`'s (defined there)."""

    version: Literal[1] = Field(description="Recipe format version.")
    name: str = Field(description="Short identifier, used in model cards and tags.")
    behaviour: str = Field(description="The behaviour the positive prompts elicit, e.g. 'refusal'.")
    description: str = Field(default="", description="One or two sentences for humans.")
    positive: PromptRef = Field(description="Prompts that elicit the behaviour.")
    negative: PromptRef = Field(description="Similar prompts that do not.")
    heldout_positive: PromptRef | None = Field(
        default=None, description="Test split: evaluation prompts with the behaviour, only for reported numbers."
    )
    heldout_negative: PromptRef | None = Field(
        default=None, description="Test split: evaluation prompts without it, only for reported numbers."
    )
    validation_positive: PromptRef | None = Field(
        default=None, description="Validation split with the behaviour: what sweeps choose k, m and settings on."
    )
    validation_negative: PromptRef | None = Field(
        default=None, description="Validation split without the behaviour (benign look-alikes and everyday requests)."
    )
    settings_chosen_on: Literal["validation", "test", "unknown"] = Field(
        default="unknown",
        description="Which split the recipe's own k, m and selection settings were chosen on; reports and cards "
        "warn when it is the test split.",
    )
    multiplier: float = Field(allow_inf_nan=False, description="0 ablates, 1 keeps, >1 amplifies.")
    allow_negative: bool = Field(default=False, description="Permit a negative multiplier.")
    universal: Universal = Field(default_factory=Universal, description="Universal-neuron exclusion.")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.multiplier < 0 and not self.allow_negative:
            raise ValueError("multiplier is negative; set allow_negative: true if intended")
        return self

    def selection(self) -> Selection:
        """The recipe's selection knobs as one `Selection`."""
        knobs = {name: getattr(self, name) for name in Knobs.model_fields}
        u = self.universal
        return Selection(**knobs, universal=u.enabled, universal_top_n=u.top_n, universal_threshold=u.threshold)


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe path, or the name of one in the project's `recipes/` folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    folder = recipes_dir()
    candidate = folder / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) if folder.is_dir() else "none"
    raise RecipeError(f"Recipe {name_or_path!r} not found.", f"pass a YAML path or one of: {known}.")


def load_recipe(name_or_path: str | Path) -> tuple[Recipe, Path]:
    """Load and validate a recipe; returns it and its folder (for relative prompt paths)."""
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise RecipeError(f"Recipe {path} is not valid YAML ({exc.__class__.__name__}).", "fix the syntax.") from None
    try:
        return Recipe.model_validate(data), path.parent
    except ValidationError as exc:
        from cna_export.circuit.template import recipe_error  # the template's lines are the examples it shows

        raise recipe_error(path, exc.errors()[0]) from None


def load_prompts(ref: PromptRef, base: Path | None = None) -> list[str]:
    """Resolve a prompt reference to a list of non-empty strings."""
    if isinstance(ref, list):
        prompts = ref
    elif ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
        data = resources.files("cna_export") / "data" / "prompts" / f"{name}.yaml"
        if not data.is_file():
            raise RecipeError(f"No built-in prompt set {name!r}.", f"use one of: {', '.join(builtin_sets())}.")
        prompts = _parse(data.read_text(), ".yaml", ref)
    else:
        path = (base or Path.cwd()) / ref
        if not path.is_file():
            raise RecipeError(f"Prompt file {path} does not exist.", "check the path (relative to the recipe).")
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise RecipeError(f"Prompt file {path} is not UTF-8 text.", "save it as UTF-8.") from None
        prompts = _parse(text, path.suffix, str(path))
    if not isinstance(prompts, list):
        raise RecipeError(f"Prompt set {ref} is not a list of strings.", "write one prompt per list item.")
    if not prompts:
        raise RecipeError(f"Prompt set {ref if isinstance(ref, str) else '(inline)'} is empty.", "add prompts.")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise RecipeError(f"Prompt set {ref if isinstance(ref, str) else '(inline)'} has an empty entry.", "remove it.")
    return list(prompts)


def _parse(text: str, suffix: str, where: str) -> list:
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
            return data["prompts"] if isinstance(data, dict) else data
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".jsonl":
            return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
        return [line for line in text.splitlines() if line.strip()]
    except (yaml.YAMLError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
        raise RecipeError(f"Prompt file {where} is malformed ({exc.__class__.__name__}).", "fix its format.") from None


def builtin_sets() -> list[str]:
    folder = resources.files("cna_export") / "data" / "prompts"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
