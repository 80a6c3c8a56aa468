"""The `adapter` command: a circuit (or a stack of them) as a PEFT LoRA adapter, and optionally a GGUF LoRA."""

from __future__ import annotations

import argparse
from pathlib import Path

from cna_export.errors import CnaExportError

EXAMPLE = """examples:
  cna-export adapter --model Qwen/Qwen2.5-0.5B-Instruct --circuit circuit.json --out no-refusal-lora
  cna-export adapter --model ./m --circuit refusal.json french.json --out both-lora --gguf
  cna-export adapter --model ./m --circuit c.json --out lora --push-to-hub me/m-no-refusal-lora
  cna-export adapter --model m.Q4_K_M.gguf --circuit c.json --out lora   # factors read from the GGUF
the folder holds adapter_model.safetensors + adapter_config.json (PEFT, vLLM), circuit.json and a card; with
--gguf also OUT-lora-f32.gguf for llama.cpp (`--lora-scaled FILE S`: each neuron gets 1 + S (m - 1)) and Ollama."""


def register(add) -> None:
    """Add the `adapter` subcommand (`add(name, help, parents)` returns the subparser)."""
    p = add("adapter", "write a circuit as a LoRA adapter (PEFT; --gguf: llama.cpp / Ollama)", [])
    p.epilog = EXAMPLE
    p.add_argument(
        "--model",
        required=True,
        help="base model: folder or Hub id (safetensors), or a .gguf file (its LoRA: OUT-lora-f32.gguf)",
    )
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--circuit", required=True, type=Path, nargs="+",
                   help="circuit file(s); several are stacked (a neuron in several gets the product)")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="adapter folder to write")
    p.add_argument("--multiplier", type=float, help="scale for every neuron of the (single) circuit")
    p.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    p.add_argument("--target", choices=("down", "up"), default="down", help="adapt down_proj (default) or up_proj")
    p.add_argument("--gguf", action="store_true", help="also write OUT/OUT-lora-f32.gguf (llama.cpp, Ollama)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--force", action="store_true", help="use a circuit discovered on different weights of this shape")
    p.add_argument("--base-model", help="Hub id of the base model for the card and adapter_config.json")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the adapter folder to this Hub model repository")
    p.add_argument("--private", action="store_true", help="create the --push-to-hub repository as private")
    p.set_defaults(func=_adapter)


def check_push(args: argparse.Namespace) -> None:
    """Fail on a bad --push-to-hub before any work."""
    if args.push_to_hub is not None:
        from cna_export.ship.card import check_repo_id

        check_repo_id(args.push_to_hub)
    elif args.private:
        raise CnaExportError("--private needs --push-to-hub.", "add --push-to-hub owner/name, or drop --private.")


def _adapter(args: argparse.Namespace) -> None:
    from cna_export.backends import ExportOptions, LoadOptions, open_model
    from cna_export.circuit.stack import load_stack
    from cna_export.ship.adapter import gguf_name, write_adapter

    check_push(args)
    circuit = load_stack(args.circuit, args.multiplier, args.allow_negative)
    options = ExportOptions.checked(
        multiplier=args.multiplier, allow_negative=args.allow_negative, overwrite=args.overwrite, force=args.force,
        target=args.target, gguf="f32" if args.gguf else None, base_model=args.base_model,
    )  # fmt: skip
    out = write_adapter(open_model(args.model, LoadOptions(revision=args.revision)), circuit, args.out, options)
    print(f"wrote {out}: {len(circuit.neurons)} neurons in {len(circuit.layer_counts())} layers as a LoRA adapter")
    if (out / gguf_name(out)).is_file():
        print(f"wrote {out / gguf_name(out)}")
    if args.push_to_hub is not None:
        from cna_export.ship.hub import push

        print(f"pushed {out} to {push(out, args.push_to_hub, private=args.private)}")
