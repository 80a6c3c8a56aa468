"""A recipe to start from (`cna-export new-recipe NAME`), and the example lines recipe errors show.

The template carries the selection settings that worked for refusal (`recipes/refusal-ablate.yaml`: skip the first
and last two layers, specificity 1, 0.2% of the MLP neurons, the universal-neuron filter) and the prompt splits,
every key with a comment, and validates as written. Its lines double as the examples in recipe validation errors
("add a line such as `multiplier: 0.0`"), so the two never disagree.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from cna_export.errors import RecipeError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

# The settings of recipes/refusal-ablate.yaml (a test keeps the two equal): what worked for refusal.
REFUSAL_SETTINGS = {
    "fraction": 0.002,
    "skip_first_layers": 2,
    "skip_last_layers": 2,
    "specificity": 1.0,
    "universal_threshold": 0.8,
}

_TEMPLATE = """\
# cna-export recipe "{name}". Replace the example prompts with your own, then:
#   cna-export run {name}.yaml --model MODEL --out OUT
#   cna-export eval --model MODEL --edited OUT --recipe {name}.yaml --out OUT-eval
# Prompt sets are inline lists (as here), builtin:NAME (e.g. builtin:refusal_harmful_discovery), or a file
# next to this recipe: .txt (one prompt a line), .yaml (a `prompts` list), .json (a list), .jsonl ("prompt").
version: 1  # recipe format version (required)
name: {name}  # short identifier, used in model cards and tags (required)
behaviour: {name}  # what the positive prompts elicit (required); eval detects refusal and answer-in-french
description: >-
  One or two sentences for humans: what this edit changes and why.

# Discovery: the neurons whose activation differs most between these two sets are selected. Use pairs that
# differ only in the behaviour (a harmful request and a benign look-alike); 30-50 of each work well.
positive:  # prompts that show the behaviour (required)
  - "Example prompt that shows the behaviour: replace me."
  - "A second example prompt that shows the behaviour: replace me."
negative:  # similar prompts that do not (required)
  - "Example look-alike prompt without the behaviour: replace me."
  - "A second look-alike prompt without the behaviour: replace me."

# Held-out prompts, never used for discovery. Validation: what `cna-export sweep` chooses k and m on.
# Test: only for the numbers you report (`cna-export eval`).
validation_positive:
  - "A validation prompt that shows the behaviour: replace me."
validation_negative:
  - "A validation look-alike prompt without it: replace me."
heldout_positive:
  - "A test prompt that shows the behaviour: replace me."
heldout_negative:
  - "A test look-alike prompt without it: replace me."
settings_chosen_on: validation  # the split the settings below were chosen on: validation, test or unknown

# The edit.
multiplier: 0.0  # 0 removes the selected neurons, 1 keeps them, >1 amplifies them (required)
fraction: {fraction}  # neurons to select, as a share of all MLP neurons (or `top_k: 500` for a count)
skip_first_layers: {skip_first_layers}  # never select neurons in the first layers (embedding-like features)
skip_last_layers: {skip_last_layers}  # never in the last layers: an edit concentrated there garbles the output
specificity: {specificity}  # rank by |delta| - 1 x mean |activation| on neutral text: prefers specific neurons
universal:  # leave out neurons that fire strongly on almost any prompt
  enabled: true
  threshold: {universal_threshold}  # share of neutral prompts on which a neuron must be among its layer's top
  prompts: builtin:neutral_diverse
chat_template: true  # wrap prompts in the model's chat template
batch_size: 16  # prompts per forward pass
"""


def recipe_template(name: str) -> str:
    """The commented YAML of a new recipe called `name`, with the settings that worked for refusal.

    Example:
        >>> "skip_last_layers: 2" in recipe_template("pirate")
        True
    """
    if not NAME_PATTERN.match(name):
        raise RecipeError(
            f"Recipe name {name!r} is not a short identifier.",
            "use lower-case letters, digits, '-' and '_', e.g. pirate-speak.",
        )
    return _TEMPLATE.format(
        name=name, **{k: f"{v:g}" if isinstance(v, float) else v for k, v in REFUSAL_SETTINGS.items()}
    )


def write_recipe_template(name: str, out: Path | None = None, overwrite: bool = False) -> Path:
    """Write the template of `name` to `out` (default `NAME.yaml` in the current folder), never over an existing
    file unless `overwrite`, and never over a folder or a link (`cna_export.io.output.OutputPlan`)."""
    from cna_export.io.output import write_text_atomic

    text = recipe_template(name)
    return write_text_atomic(Path(out) if out is not None else Path(f"{name}.yaml"), text, overwrite)


# Example lines for keys whose template line shows no value on the line itself (lists), or that it leaves out.
_MORE_EXAMPLES = {
    "top_k": "top_k: 500",
    "allow_negative": "allow_negative: false",
    "positive": "positive: builtin:refusal_harmful_discovery",
    "negative": "negative: builtin:refusal_benign_discovery",
    "description": "description: One or two sentences for humans.",
    "universal.top_n": "top_n: 40",
}


def _examples() -> dict[str, str]:
    """key -> its line in the template (a nested key as `universal.threshold`), without the comment."""
    out, parent = dict(_MORE_EXAMPLES), ""
    for line in recipe_template("my-recipe").splitlines():
        m = re.match(r"^( *)([a-z_]+):(.*)$", line)
        if not m:
            continue
        indent, key, rest = m.groups()
        value = rest.split("  #")[0].strip()
        if not indent:
            parent = key
        if value and value != ">-":
            out.setdefault(f"{parent}.{key}" if indent else key, f"{key}: {value}")
    return out


def example_line(loc: tuple) -> str | None:
    """An example line for the key at a pydantic error location, in backticks: ("multiplier",) gives
    "`multiplier: 0.0`", ("universal", "threshold") "`threshold: 0.8` under `universal:`"; None without one."""
    keys = [p for p in loc if isinstance(p, str)]
    if not keys:
        return None
    examples = _examples()
    if len(keys) > 1 and f"{keys[0]}.{keys[1]}" in examples:
        return f"`{examples[f'{keys[0]}.{keys[1]}']}` under `{keys[0]}:`"
    return f"`{examples[keys[0]]}`" if keys[0] in examples else None


def recipe_error(path: Path, err: dict) -> RecipeError:
    """A one-line error for the first pydantic error of a recipe: the key, what is wrong, and an example line.

    Example:
        >>> str(recipe_error(Path("r.yaml"), {"type": "missing", "loc": ("multiplier",), "msg": "Field required"}))
        'Recipe r.yaml is missing the key multiplier. Fix: add a line such as `multiplier: 0.0`.'
    """
    where = ".".join(str(p) for p in err["loc"]) or "top level"
    example = example_line(tuple(err["loc"]))
    template = "`cna-export new-recipe NAME` writes a complete, commented recipe"
    if err["type"] == "missing":
        fix = f"add a line such as {example}." if example else f"add it; {template}."
        return RecipeError(f"Recipe {path} is missing the key {where}.", fix)
    problem = f"Recipe {path} is invalid at {where}: {err['msg']}."
    if err["type"] == "extra_forbidden":
        known = [k.split(".")[-1] for k in _examples() if k.count(".") == where.count(".")]
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        if close:
            return RecipeError(problem, f"rename it to {close[0]} (a misspelling?), or remove it.")
        return RecipeError(problem, f"remove it; {template}.")
    if example:
        return RecipeError(problem, f"write it like {example}.")
    return RecipeError(problem, f"see recipes/ for examples; {template}.")
