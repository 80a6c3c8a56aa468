"""Commands on GGUF files: patch-gguf (scale a circuit's neurons inside an existing GGUF) and gguf (convert a
Hugging Face folder, e.g. an export, to GGUF for llama.cpp / Ollama)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cna_export.gguf.outtypes import OUTTYPE_NAMES


def register(add) -> None:
    """Add this module's subcommands (`add(name, help, parents)` returns the subparser)."""
    p = add("patch-gguf", "scale a circuit's neurons inside an existing GGUF file (no re-conversion)", [])
    p.add_argument("gguf", type=Path, help="GGUF file to patch (never modified)")
    p.add_argument("--circuit", required=True, type=Path, help="circuit file from discover")
    p.add_argument("-o", "--out", required=True, type=Path, help="patched GGUF file to write")
    p.add_argument("--multiplier", type=float, help="scale for every neuron (0 ablate, >1 amplify)")
    p.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output written by patch-gguf")
    p.add_argument("--force", action="store_true", help="patch with a circuit discovered on different weights")
    p.set_defaults(func=_patch_gguf)

    p = add("gguf", "convert a Hugging Face model folder (e.g. an export) to GGUF for llama.cpp / Ollama", [])
    p.add_argument("model_dir", type=Path, help="model folder with config.json, safetensors and tokenizer")
    p.add_argument("-o", "--out", required=True, type=Path, help="GGUF file to write (NAME.gguf)")
    p.add_argument("--outtype", choices=OUTTYPE_NAMES, default="f16", help="weight type (default f16)")
    p.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile next to the GGUF")
    p.add_argument("--ollama-create", metavar="NAME", help="write the Modelfile and run `ollama create NAME`")
    p.add_argument("--overwrite", action="store_true", help="replace an existing GGUF (and Modelfile)")
    p.set_defaults(func=_gguf)


def _patch_gguf(args: argparse.Namespace) -> None:
    from cna_export.circuit.format import Circuit
    from cna_export.gguf.patch import patch_gguf_report

    report = patch_gguf_report(args.gguf, Circuit.load(args.circuit), args.out, multiplier=args.multiplier,
                               overwrite=args.overwrite, force=args.force, allow_negative=args.allow_negative)  # fmt: skip
    print(f"wrote {report.out}: {report.summary()}")
    print(f"wrote {report.sidecar}")


def _gguf(args: argparse.Namespace) -> None:
    from cna_export.gguf.ollama import convert_for_ollama

    gguf, modelfile = convert_for_ollama(args.model_dir, args.out, outtype=args.outtype, overwrite=args.overwrite,
                                         modelfile=args.modelfile, ollama_name=args.ollama_create)  # fmt: skip
    print(f"wrote {gguf}")
    if modelfile is not None:
        print(f"wrote {modelfile}")
    if args.ollama_create:
        print(f"created Ollama model {args.ollama_create}")
