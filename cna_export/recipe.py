"""Recipes: a behaviour's discovery prompts, held-out prompts and edit settings in one YAML file.

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cna_export.attribute import Settings
from cna_export.errors import RecipeError

PromptRef = list[str] | str
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Universal(_Strict):
    enabled: bool = Field(default=True, description="Exclude neurons that fire strongly on almost any prompt.")
    top_n: int | None = Field(default=None, ge=1, description="Per-layer top-|activation| size (default 1% of width).")
    threshold: float = Field(default=0.8, gt=0, le=1, description="Share of neutral prompts that makes universal.")
    prompts: PromptRef = Field(default="builtin:neutral_diverse", description="Diverse neutral prompts.")


class Recipe(_Strict):
    version: Literal[1] = Field(description="Recipe format version.")
    name: str = Field(description="Short identifier, used in model cards and tags.")
    behaviour: str = Field(description="The behaviour the positive prompts elicit, e.g. 'refusal'.")
    description: str = Field(default="", description="One or two sentences for humans.")
    positive: PromptRef = Field(description="Prompts that elicit the behaviour.")
    negative: PromptRef = Field(description="Similar prompts that do not.")
    heldout_positive: PromptRef | None = Field(default=None, description="Evaluation prompts with the behaviour.")
    heldout_negative: PromptRef | None = Field(default=None, description="Evaluation prompts without it.")
    top_k: int | None = Field(default=None, ge=1, description="Neurons to select (count).")
    fraction: float | None = Field(default=None, gt=0, le=1, description="Neurons to select (share of all).")
    multiplier: float = Field(description="0 ablates, 1 keeps, >1 amplifies.")
    allow_negative: bool = Field(default=False, description="Permit a negative multiplier.")
    skip_first_layers: int = Field(default=0, ge=0, description="Never select neurons in layers 0..n-1.")
    skip_last_layers: int = Field(
        default=0, ge=0, description="Never select neurons in the last n layers (not in the paper; see the recipes)."
    )
    universal: Universal = Field(default_factory=Universal, description="Universal-neuron exclusion.")
    specificity: float = Field(
        default=0.0, ge=0, allow_inf_nan=False,
        description="Rank by max(0, |delta| - specificity x mean |activation| on the universal.prompts): prefers "
        "neurons quiet on ordinary text (not in the paper; 0 ranks by |delta|).",
    )  # fmt: skip
    chat_template: bool = Field(default=True, description="Apply the tokenizer's chat template if it has one.")
    batch_size: int = Field(default=16, ge=1, description="Prompts per forward pass.")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.top_k is not None and self.fraction is not None:
            raise ValueError("give top_k or fraction, not both")
        if self.multiplier != self.multiplier or self.multiplier in (float("inf"), float("-inf")):
            raise ValueError("multiplier must be finite")
        if self.multiplier < 0 and not self.allow_negative:
            raise ValueError("multiplier is negative; set allow_negative: true if intended")
        return self

    def settings(self) -> Settings:
        return Settings(
            top_k=self.top_k,
            fraction=self.fraction if self.top_k is None else None,
            skip_first_layers=self.skip_first_layers,
            skip_last_layers=self.skip_last_layers,
            universal=self.universal.enabled,
            universal_top_n=self.universal.top_n,
            universal_threshold=self.universal.threshold,
            specificity=self.specificity,
            batch_size=self.batch_size,
            chat_template=self.chat_template,
        )


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe path, or the name of one in the project's `recipes/` folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))) if RECIPES_DIR.is_dir() else "none"
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
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        raise RecipeError(f"Recipe {path} is invalid at {where}: {err['msg']}.", "see recipes/ for examples.") from None


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
