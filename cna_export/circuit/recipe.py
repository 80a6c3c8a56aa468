"""Recipes: a behaviour's discovery prompts, held-out prompts and edit settings in one YAML file.

Held-out prompts come in two splits. The validation split (`validation_positive` / `validation_negative`) is
what `sweep` and every automatic choice of k, m, specificity or layer exclusions looks at; the test split
(`heldout_positive` / `heldout_negative`, the names older recipes already use) only gives reported numbers, so no
setting is ever chosen on the prompts it is reported on.

YAML -> `yaml.safe_load` -> pydantic (`extra="forbid"`). Prompt sets are inline lists, `builtin:NAME` (a set
shipped in `cna_export/data/prompts/`), or a path relative to the recipe (.yaml with a `prompts` list, .txt with
one prompt a line, .json list, or .jsonl with a `prompt` field).

A recipe is untrusted input: the files it names must lie inside its own folder (a relative path without `..`,
and no symbolic link out of it), `builtin:` takes only the names shipped, and a recipe named by a circuit is
looked up among the shipped recipes only. A path typed on the command line (`--positive FILE`) is the user's
own choice and may be anywhere. Every prompt remembers where it came from (`Prompt.origin`), so a message about
it (too long for the model's context) names the file and line.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from cna_export.circuit.detector import DetectorSpec
from cna_export.circuit.selection import Knobs, Selection, Strict
from cna_export.errors import RecipeError
from cna_export.io.untrusted_json import parse_json

PromptRef = list[str] | str
# What a YAML or JSON parser raises on a hostile file besides its own errors: RecursionError for absurd nesting,
# ValueError for an integer of more than 4300 digits (Python's limit), UnicodeDecodeError for bytes that are not
# UTF-8 (a ValueError).
YAML_FAILURES = (yaml.YAMLError, ValueError, RecursionError)


class Prompt(str):
    """A prompt's text, and where it came from (`origin`: "Prompt file pos.txt line 3"), for messages about it."""

    origin: str

    def __new__(cls, text: str, origin: str = "") -> Prompt:
        obj = super().__new__(cls, text)
        obj.origin = origin
        return obj


def check_prompt_fits(prompt: str, n_tokens: int, limit: int | None, model: str) -> None:
    """Refuse a prompt of more tokens than the model's context, before any forward pass tries to hold it.

    The one check of both routes (torch: `max_position_embeddings` of the config; llama.cpp: the GGUF's
    training context)."""
    if limit is not None and n_tokens > limit:
        where = getattr(prompt, "origin", "") or f"Prompt {prompt[:40]!r}..."
        raise RecipeError(
            f"{where} has {n_tokens} tokens, more than the context of {model} ({limit} tokens).",
            "shorten the prompt or remove it from the set.",
        )


def recipes_dir() -> Path:
    """The built-in recipes: `cna_export/recipes` in an installed wheel (setuptools maps the repository's
    top-level `recipes/` there), or that top-level folder in a source checkout."""
    here = Path(__file__).resolve()
    installed = here.parents[1] / "recipes"
    return installed if installed.is_dir() else here.parents[2] / "recipes"


class Universal(Strict):
    enabled: bool = Field(default=True, description=Selection.model_fields["universal"].description)
    top_n: int | None = Field(default=None, ge=1, description=Selection.model_fields["universal_top_n"].description)
    threshold: float = Field(
        default=0.8, gt=0, le=1, description=Selection.model_fields["universal_threshold"].description
    )
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
    protect: PromptRef | None = Field(
        default=None,
        description="Discovery prompts whose behaviour must not change (benign look-alikes, in-domain requests, "
        "another category): with protect_weight > 0, neurons that also move on them rank lower.",
    )
    validation_protect: PromptRef | None = Field(
        default=None, description="Validation split of the protect set: the tuner's collateral is measured on it."
    )
    heldout_protect: PromptRef | None = Field(
        default=None, description="Test split of the protect set: its behaviour change is reported, never chosen on."
    )
    detector: DetectorSpec | None = Field(
        default=None,
        description="How the behaviour is detected (kind: builtin, rules, answer_key or measure); without it, the "
        "built-in detector named by `behaviour`.",
    )
    system_prompt: str | None = Field(
        default=None,
        min_length=1,
        description="System message before every prompt (attribution, eval, chat): the text itself, builtin:NAME "
        "(a `system:` key in cna_export/data/prompts/NAME.yaml), or a .txt/.yaml file beside the recipe.",
    )
    multiplier: float = Field(allow_inf_nan=False, description="0 ablates, 1 keeps, >1 amplifies.")
    allow_negative: bool = Field(default=False, description="Permit a negative multiplier.")
    universal: Universal = Field(default_factory=Universal, description="Universal-neuron exclusion.")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.multiplier < 0 and not self.allow_negative:
            raise ValueError("multiplier is negative; set allow_negative: true if intended")
        if self.protect_weight and self.protect is None:
            raise ValueError("protect_weight needs a protect prompt set")
        return self

    def selection(self) -> Selection:
        """The recipe's selection knobs as one `Selection`."""
        knobs = {name: getattr(self, name) for name in Knobs.model_fields}
        u = self.universal
        return Selection(**knobs, universal=u.enabled, universal_top_n=u.top_n, universal_threshold=u.threshold)


def shipped_recipes() -> list[str]:
    """The names of the recipes that come with cna-export."""
    folder = recipes_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_recipe(name_or_path: str | Path, shipped_only: bool = False) -> Path:
    """A recipe path (typed by the user), or the name of one in the project's `recipes/` folder.

    `shipped_only`: the name comes from a file (a circuit's `recipe`), so only a shipped recipe's name is looked
    up, never a path."""
    path = Path(name_or_path)
    if not shipped_only and path.is_file():
        return path
    known = shipped_recipes()
    if str(name_or_path) in known:
        return recipes_dir() / f"{name_or_path}.yaml"
    where = "a shipped recipe's name" if shipped_only else "a YAML path"
    raise RecipeError(
        f"Recipe {str(name_or_path)!r} not found.", f"pass {where} or one of: {', '.join(known) or 'none'}."
    )


def load_recipe(name_or_path: str | Path, shipped_only: bool = False) -> tuple[Recipe, Path]:
    """Load and validate a recipe; returns it and its folder (for relative prompt paths)."""
    path = find_recipe(name_or_path, shipped_only)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except YAML_FAILURES as exc:
        raise RecipeError(f"Recipe {path} is not valid YAML ({yaml_failure(exc)}).", "fix the syntax.") from None
    try:
        return Recipe.model_validate(data), path.parent
    except ValidationError as exc:
        from cna_export.circuit.template import recipe_error  # the template's lines are the examples it shows

        raise recipe_error(path, exc.errors()[0]) from None


def load_prompts(ref: PromptRef, base: Path | None = None) -> list[Prompt]:
    """Resolve a prompt reference to a list of non-empty prompts, each with its origin.

    Args:
        ref: an inline list, `builtin:NAME`, or a file path.
        base: the folder of the recipe that holds `ref`: a file it names must lie inside that folder. None for a
            path the user typed (`--positive FILE`), which is read wherever it is (relative to the working folder).
    """
    if isinstance(ref, list):
        prompts, where, unit = ref, "Inline prompt", ""
    elif ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
        if name not in builtin_sets():  # only the shipped names: never `builtin:../../x`
            raise RecipeError(f"No built-in prompt set {name!r}.", f"use one of: {', '.join(builtin_sets())}.")
        data = resources.files("cna_export") / "data" / "prompts" / f"{name}.yaml"
        prompts, where, unit = (
            _parse(data.read_text(encoding="utf-8"), ".yaml", ref),
            f"Built-in prompt set {name}",
            " item",
        )
    else:
        path = recipe_file(ref, base)
        if not path.is_file():
            raise RecipeError(f"Prompt file {path} does not exist.", "check the path (relative to the recipe).")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"Prompt file {path} is not UTF-8 text.", "save it as UTF-8.") from None
        prompts, where = _parse(text, path.suffix, str(path)), f"Prompt file {path}"
        unit = " line" if path.suffix not in (".yaml", ".yml", ".json") else " item"
    if not isinstance(prompts, list):
        raise RecipeError(f"Prompt set {ref} is not a list of strings.", "write one prompt per list item.")
    if not prompts:
        raise RecipeError(f"Prompt set {ref if isinstance(ref, str) else '(inline)'} is empty.", "add prompts.")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise RecipeError(f"Prompt set {ref if isinstance(ref, str) else '(inline)'} has an empty entry.", "remove it.")
    numbers = prompts.numbers if isinstance(prompts, _Numbered) else range(1, len(prompts) + 1)
    return [Prompt(p, f"{where}{unit} {n}") for p, n in zip(prompts, numbers)]


def recipe_file(ref: str, base: Path | None, what: str = "prompt file") -> Path:
    """The file a recipe names (a prompt set, an answers file, a system prompt): the one containment check.

    A recipe's file (`base`, the recipe's folder, set) must lie inside that folder: a relative path without `..`,
    resolving (symbolic links followed) inside it. With `base` None the path was typed on the command line and
    is the user's own choice."""
    if "\0" in ref:
        raise RecipeError(f"The {what} name {ref!r} holds a NUL character.", "fix the name.")
    if base is None:
        return Path(ref).expanduser()
    rel = Path(ref)
    fix = "name a file inside the recipe's folder by a relative path, or pass the file on the command line."
    if rel.is_absolute() or ".." in rel.parts or ref.startswith("~"):
        raise RecipeError(f"Recipe {what} {ref!r} is not inside the recipe's folder {base}.", fix)
    path = base / rel
    if (path.exists() or path.is_symlink()) and not path.resolve().is_relative_to(Path(base).resolve()):
        raise RecipeError(f"Recipe {what} {ref!r} links outside the recipe's folder {base}.", fix)
    return path


class _Numbered(list):
    """Prompts with their line numbers in the file (a .txt or .jsonl file skips blank lines)."""

    numbers: list[int]


def _numbered(pairs: list[tuple[int, object]]) -> _Numbered:
    out = _Numbered(p for _, p in pairs)
    out.numbers = [n for n, _ in pairs]
    return out


def yaml_failure(exc: BaseException) -> str:
    """A parser failure in words (a ValueError of a 5000-digit integer says how to raise Python's limit)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, yaml.YAMLError):
        return exc.__class__.__name__
    return "a number too long to read" if "digits" in str(exc) else exc.__class__.__name__


def _parse(text: str, suffix: str, where: str) -> list:
    fail = lambda why: RecipeError(f"Prompt file {where} is malformed ({why}).", "fix its format.")  # noqa: E731
    if suffix == ".json":
        return parse_json(text, fail)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        if suffix == ".jsonl":
            return _numbered(
                [(n, parse_json(line, lambda why, n=n: fail(f"line {n}: {why}"))["prompt"]) for n, line in lines]
            )
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
            return data["prompts"] if isinstance(data, dict) else data
    except (KeyError, TypeError) as exc:
        raise fail(exc.__class__.__name__) from None
    except YAML_FAILURES as exc:
        raise fail(yaml_failure(exc)) from None
    return _numbered(lines)


def builtin_sets() -> list[str]:
    folder = resources.files("cna_export") / "data" / "prompts"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
