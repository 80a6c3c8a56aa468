"""The push command: an exported folder (or one .gguf file) uploaded to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(add) -> None:
    """Add this module's subcommand (`add(name, help, parents)` returns the subparser)."""
    p = add("push", "upload an exported folder (or a .gguf file) to the Hugging Face Hub", [])
    p.add_argument("path", type=Path, help="exported model folder, or one .gguf file")
    p.add_argument("repo_id", help="Hub repository, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to push to (created if missing; default main)")
    p.add_argument("--commit-message", help="commit title")
    p.add_argument("--no-verify", action="store_true", help="skip checking the files against the card's sha256")
    p.set_defaults(func=_push)


def _push(args: argparse.Namespace) -> None:
    from cna_export.ship.hub import push

    url = push(
        args.path,
        args.repo_id,
        private=args.private,
        branch=args.revision,
        commit_message=args.commit_message,
        verify=not args.no_verify,
    )
    print(f"pushed {args.path} to {url}")
