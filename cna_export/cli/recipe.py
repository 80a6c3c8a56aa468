"""The new-recipe command: a commented recipe template to start a custom edit from."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(add) -> None:
    """Add this module's subcommand (`add(name, help, parents)` returns the subparser)."""
    p = add("new-recipe", "write a commented recipe template to start a custom edit from", [])
    p.add_argument("name", help="the recipe's name (lower-case letters, digits, '-', '_'), e.g. pirate-speak")
    p.add_argument("-o", "--out", type=Path, help="file to write (default NAME.yaml in the current folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_new_recipe)


def _new_recipe(args: argparse.Namespace) -> None:
    from cna_export.circuit.template import write_recipe_template

    path = write_recipe_template(args.name, args.out, args.overwrite)
    print(f"wrote {path}: replace its example prompts with your own, then")
    print(f"  cna-export run {path} --model MODEL --out OUT")
