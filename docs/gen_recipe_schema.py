"""Write the recipe keys table of docs/recipes.md from the pydantic model (`cna_export.circuit.recipe.Recipe`).

The table sits between the markers `<!-- recipe-schema:start -->` and `<!-- recipe-schema:end -->`;
tests/test_docs.py fails when it no longer matches the model. To regenerate it after changing a field:

    python docs/gen_recipe_schema.py          # rewrites the table in docs/recipes.md
    python docs/gen_recipe_schema.py --check  # exit 1 if it is out of date (what the test checks)
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

PAGE = Path(__file__).resolve().parent / "recipes.md"
START, END = "<!-- recipe-schema:start -->", "<!-- recipe-schema:end -->"


def _type_name(annotation: object) -> str:
    """A reader's name for a field's type: `integer or null`, `prompt set`, `one of validation, test, unknown`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # a discriminated union (the detector block): its types
        return _type_name(typing.get_args(annotation)[0])
    if _variants(annotation):
        return "mapping by `kind` (below)"
    if origin is list and _is_model(typing.get_args(annotation)[0]):
        return "list of mappings (below)"
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}s"
    if origin is dict:
        key, value = typing.get_args(annotation)
        keys = typing.get_args(key) if typing.get_origin(key) is typing.Literal else ()
        return f"mapping of {'a prompt-set key' if keys else _type_name(key)} to {_type_name(value)}"
    if origin is typing.Literal:
        values = typing.get_args(annotation)
        return f"`{values[0]}`" if len(values) == 1 else "one of " + ", ".join(f"`{v}`" for v in values)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        plain = [a for a in args if a is not type(None)]
        if set(plain) == {str, list[str]}:  # PromptRef: an inline list, builtin:NAME or a file next to the recipe
            name = "prompt set"
        else:
            name = " or ".join(_type_name(a) for a in plain)
        return name + (" or null" if len(plain) < len(args) else "")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping (below)"
    names: dict[object, str] = {int: "integer", float: "number", bool: "boolean", str: "string"}
    return names.get(annotation, str(annotation))


def _is_model(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _variants(annotation: object) -> list[type[BaseModel]]:
    """The models of a union of two or more models (inside Annotated and an optional None), else []."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return []
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1:
        return _variants(args[0])
    return args if len(args) > 1 and all(_is_model(a) for a in args) else []


def _constraints(info: FieldInfo) -> str:
    """The field's range in words, from its pydantic metadata (`>= 1`, `> 0, <= 1`, `finite`)."""
    words = []
    for item in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                words.append(f"{sign} {getattr(item, attr):g}")
        if getattr(item, "allow_inf_nan", None) is False:
            words.append("finite")
    return ", ".join(words)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        return "(see below)"
    if info.default is PydanticUndefined or info.default is None:
        return "none"
    value = info.default
    if value == "":
        return "empty"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _rows(model: type[BaseModel], prefix: str = "", only: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    for name, info in model.model_fields.items():
        kind = _type_name(info.annotation)
        rule = _constraints(info)
        description = only + " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append((f"`{prefix}{name}`", kind + (f" ({rule})" if rule else ""), _default(info), description))
        annotation = info.annotation
        if _is_model(annotation):
            rows.extend(_rows(annotation, prefix=f"{prefix}{name}.", only=only))
        for variant in _variants(annotation):  # each kind's keys, the kind named in the meaning
            tag = typing.get_args(variant.model_fields["kind"].annotation)[0]
            fields = _rows(variant, prefix=f"{prefix}{name}.", only=f"(kind `{tag}`) ")
            rows.extend(r for r in fields if r[0] != f"`{prefix}{name}.kind`")
        inner = typing.get_args(annotation)
        listed = next((typing.get_args(a)[0] for a in (annotation, *inner) if typing.get_origin(a) is list
                       and _is_model(typing.get_args(a)[0])), None)  # fmt: skip
        if listed is not None:
            rows.extend(_rows(listed, prefix=f"{prefix}{name}[].", only=only))
    return rows


def render() -> str:
    """The markdown table of every recipe key: required keys first, then the rest in the model's order."""
    from cna_export.circuit.recipe import Recipe
    from cna_export.circuit.selection import DEFAULT_FRACTION

    rows = _rows(Recipe)
    # Required keys first (stable: the model's order within each group); a block's keys stay under it.
    top = [i for i, r in enumerate(rows) if "." not in r[0] and "[" not in r[0]]
    blocks = [rows[i : j] for i, j in zip(top, top[1:] + [len(rows)])]
    blocks.sort(key=lambda b: b[0][2] != "**required**")
    rows = [r for b in blocks for r in b]
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| {key} | {kind} | {default} | {text} |" for key, kind, default, text in rows]
    lines += [
        "",
        f"Rules across keys: give `top_k` or `fraction`, not both (neither: {DEFAULT_FRACTION:g} of all MLP "
        "neurons); a negative `multiplier` needs `allow_negative: true`.",
    ]
    return "\n".join(lines)


def replace_table(page: str, table: str) -> str:
    """`page` with the text between the markers replaced by `table`."""
    head, found, rest = page.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise SystemExit(f"{PAGE} lacks the markers {START} ... {END}")
    return f"{head}{START}\n{table}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/recipes.md is out of date")
    args = parser.parse_args()
    page = PAGE.read_text()
    updated = replace_table(page, render())
    if args.check:
        if updated != page:
            print(f"{PAGE} is out of date: run python docs/gen_recipe_schema.py", file=sys.stderr)
            return 1
        return 0
    if updated != page:
        PAGE.write_text(updated)
        print(f"updated {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
