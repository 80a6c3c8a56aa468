"""The tuned recipe: the chosen point written as a recipe (the source recipe with the point's knobs and a note
saying where they came from), with the prompt files it names copied beside it, so it runs as written."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from cna_export.circuit.detector import PROMPT_FIELDS
from cna_export.circuit.recipe import Recipe
from cna_export.errors import RecipeError
from cna_export.tune.space import Point


def write_recipe(recipe_file: Path, base: Path | None, point: Point, folder: Path, document: dict) -> Path:
    """The recipe with the chosen point, in `folder`, with the files its prompt references name copied beside it
    (the same relative names), so it loads from there and carries no path of this machine."""
    data = yaml.safe_load(Path(recipe_file).read_text(encoding="utf-8"))
    data.pop("top_k", None)
    # Exact values, not rounded ones: a rounded specificity or budget could change which neurons are selected.
    data.update(
        fraction=point.fraction,
        multiplier=point.multiplier,
        skip_first_layers=point.skip_first_layers,
        skip_last_layers=point.skip_last_layers,
        specificity=point.specificity,
        protect_weight=point.protect_weight,
        sign_filter=point.sign_filter,
        max_layer_share=point.max_layer_share,
        settings_chosen_on="validation",
    )
    if point.multiplier < 0:
        data["allow_negative"] = True
    if not data.get("protect"):
        data.pop("protect_weight")
    note = (
        f" Tuned by cna-export tune on {document['model']} ({document['backend']}, validation split, seed "
        f"{document['seed']}, {document['trials_run']} trials): k = {point.k} ({100 * point.fraction:.3f}%), "
        f"m = {point.multiplier:.3g}; rule: {document['rule']}."
    )
    data["description"] = ((data.get("description") or "").strip() + note).strip()
    for ref in _file_refs(data):
        _copy_beside(ref, base, folder)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110), encoding="utf-8")
    Recipe.model_validate(data)  # what is written loads
    return path


def _file_refs(data: dict) -> list[str]:
    """The file names a recipe refers to (prompt sets, answer files, a system prompt file, neutral prompts)."""
    refs = [data.get(f) for f in PROMPT_FIELDS] + [(data.get("universal") or {}).get("prompts")]
    refs += list(((data.get("detector") or {}).get("answers") or {}).values())
    system = data.get("system_prompt")
    if isinstance(system, str) and "\n" not in system and system.strip().endswith((".txt", ".yaml", ".yml")):
        refs.append(system.strip())
    return [r for r in refs if isinstance(r, str) and not r.startswith("builtin:")]


def _copy_beside(ref: str, base: Path | None, folder: Path) -> None:
    src = ((base or Path.cwd()) / ref).resolve()
    dst = (folder / ref).resolve()
    if not dst.is_relative_to(folder.resolve()) or not src.is_file():
        raise RecipeError(
            f"The recipe names {ref!r}, which cannot be copied beside the tuned recipe.",
            "keep the recipe's files in its folder.",
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
