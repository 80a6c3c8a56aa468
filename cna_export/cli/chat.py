"""The chat command: the same prompts answered by the original and the edited model, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from cna_export.cli.options import load_options, model_opts


def register(add) -> None:
    """Add this module's subcommand (`add(name, help, parents)` returns the subparser)."""
    model = model_opts()
    p = add("chat", "answer the same prompts with the original and the edited model, side by side", [model])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--circuit",
        type=Path,
        help="circuit applied at runtime (nothing exported: hooks in torch, a patched temporary GGUF)",
    )
    what.add_argument("--edited", type=Path, help="exported model: a folder, a .gguf, or the folder `run` wrote")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="prompt file (.txt, .yaml, .json, .jsonl) or builtin:NAME")
    p.add_argument("--multiplier", type=float, help="override the circuit's multiplier")
    p.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per answer (default 64)")
    p.add_argument("--no-chat-template", action="store_true", help="feed raw prompts")
    p.add_argument(
        "--system-prompt",
        help="system message (text or builtin:NAME; default: the one the circuit was discovered with)",
    )
    p.add_argument("--width", type=int, default=100, help="output width in characters")
    p.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> None:
    from cna_export.circuit.companions import load_system_prompt
    from cna_export.circuit.recipe import load_prompts
    from cna_export.evaluate.chat import render, side_by_side
    from cna_export.evaluate.measure import EvalConfig

    prompts = list(args.prompt) + (load_prompts(args.prompts) if args.prompts else [])
    system = load_system_prompt(args.system_prompt, None) if args.system_prompt else None
    cfg = EvalConfig(
        max_new_tokens=args.max_new_tokens, batch_size=8, chat_template=not args.no_chat_template, system_prompt=system
    )
    cfg.check()
    exchanges = side_by_side(
        args.model,
        prompts,
        circuit=args.circuit,
        edited=args.edited,
        multiplier=args.multiplier,
        allow_negative=args.allow_negative,
        cfg=cfg,
        load=load_options(args),
    )
    print(render(exchanges, args.width))
