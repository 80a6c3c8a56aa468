"""Files that accompany a recipe's prompt sets: answer keys (`answers:`, the expected answer of each prompt) and
system prompts (`system:`). Both are named like prompt sets: `builtin:NAME` for a file shipped in
`cna_export/data/prompts/`, or a path relative to the recipe's folder (never outside it)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from cna_export.circuit.recipe import YAML_FAILURES, builtin_sets, recipe_file, yaml_failure
from cna_export.errors import RecipeError

SYSTEM_MAX_CHARS = 20_000
_FILE_SUFFIXES = (".txt", ".yaml", ".yml")


def _read(ref: str, base: Path | None, what: str) -> tuple[str, str]:
    """(text, suffix) of a builtin:NAME (.yaml) or of a file beside the recipe (the prompt sets' containment:
    `recipe.recipe_file`; a path typed on the command line, `base` None, may be anywhere)."""
    if ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
        if name not in builtin_sets():  # only the shipped names: never `builtin:..` or a path
            raise RecipeError(f"No built-in {what} {name!r}.", "check the name in the recipe.")
        data = resources.files("cna_export") / "data" / "prompts" / f"{name}.yaml"
        return data.read_text(encoding="utf-8"), ".yaml"
    path = recipe_file(ref, base, what)
    if not path.is_file():
        raise RecipeError(f"The {what} {ref!r} does not exist.", "check the path (relative to the recipe).")
    try:
        return path.read_text(encoding="utf-8"), path.suffix
    except UnicodeDecodeError:
        raise RecipeError(f"The {what} {ref!r} is not UTF-8 text.", "save it as UTF-8.") from None


def _yaml_key(text: str, key: str, ref: str, what: str):
    try:
        data = yaml.safe_load(text)
    except YAML_FAILURES as exc:  # a 5000-digit integer is a ValueError, absurd nesting a RecursionError
        raise RecipeError(f"The {what} {ref} is not valid YAML ({yaml_failure(exc)}).", "fix its syntax.") from None
    return data.get(key) if isinstance(data, dict) else None


def load_answers(ref: str, base: Path | None) -> list[list[str]]:
    """An answers file's `answers:` list; each entry is a string or a list of acceptable strings.

    Example:
        >>> load_answers("builtin:sycophancy_claim_test_answers", None)[0]
        ['Canberra']
    """
    text, _ = _read(ref, base, "answers file")
    answers = _yaml_key(text, "answers", ref, "answers file")
    if not isinstance(answers, list) or not answers:
        raise RecipeError(f"The answers file {ref} has no `answers:` list.", "write one expected answer per prompt.")
    out = []
    for i, entry in enumerate(answers):
        options = [entry] if isinstance(entry, str) else entry
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o.strip() for o in options):
            raise RecipeError(
                f"The answers file {ref}: entry {i} is not a string or a list of strings.",
                "write each expected answer as text, or a list of acceptable texts.",
            )
        out.append([o.strip() for o in options])
    return out


def load_system_prompt(ref: str, base: Path | None) -> str:
    """A recipe's `system_prompt`: `builtin:NAME` (the `system:` key of a shipped YAML), a one-line .txt/.yaml
    path beside the recipe (a YAML file's `system:` key), or else the text itself."""
    is_file = ref.startswith("builtin:") or ("\n" not in ref and ref.strip().endswith(_FILE_SUFFIXES))
    if not is_file:
        text = ref
    else:
        raw, suffix = _read(ref.strip(), base, "system prompt")
        text = raw if suffix == ".txt" else _yaml_key(raw, "system", ref, "system prompt")
    if not isinstance(text, str) or not text.strip():
        raise RecipeError(f"The system prompt {ref[:60]!r} is empty or has no `system:` text.", "write the text.")
    if len(text) > SYSTEM_MAX_CHARS:
        raise RecipeError(f"The system prompt has {len(text)} characters (limit {SYSTEM_MAX_CHARS}).", "shorten it.")
    return text.strip()
